"""The writer's lock of a feature store: ``<store>.lock``, held by one process, dies with it.

A POSIX record lock (``fcntl.lockf``, F_SETLK) is owned by the *process* that took it: unlike an
``flock``, which belongs to the open file and so is shared with every child forked while it is
held (DataLoader workers, which outlive a SIGKILLed parent for a few seconds), a record lock is
never inherited by ``fork`` and the kernel drops it the moment its owner dies. A scheduler's
immediate requeue after a kill therefore resumes instead of failing with a false "busy". It also
works across hosts on NFS (lockd), where ``flock`` is emulated with the same record locks anyway.

Record locks do not exclude threads of one process, and closing *any* descriptor of the file
releases the process's lock, so a process-wide registry of held paths refuses a second holder in
the same process before the file is opened again.

``StoreLock(path, timeout=s)`` waits up to ``s`` seconds for another writer (a visible message at
the start and once a minute), then raises :class:`StoreBusy` naming the holder (host:pid).
"""
from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from pathlib import Path


class StoreBusy(RuntimeError):
    pass


_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


def _log(msg: str) -> None:
    print(f"[stitchcache] {msg}", file=sys.stderr, flush=True)


class StoreLock:
    """Exclusive, process-owned lock on ``lock_path``; released on ``close()`` or process death."""

    def __init__(self, lock_path, timeout: float = 0.0, poll: float = 1.0, what: str | None = None,
                 timeout_key: str = "extract.lock_timeout"):
        self.path = Path(lock_path)
        self.what = what or str(self.path)
        self.fd = None
        key = str(self.path.resolve())
        deadline = time.monotonic() + max(0.0, float(timeout))
        waited_msg, next_note = False, 0.0
        while True:
            holder = self._try(key)
            if holder is None:
                if waited_msg:
                    _log(f"lock on {self.what} acquired")
                return
            now = time.monotonic()
            if now >= deadline:
                raise StoreBusy(
                    f"another process ({holder}) is writing {self.what}"
                    + (f"; waited {float(timeout):.0f} s (`{timeout_key}`)" if timeout > 0 else "")
                    + "; wait for it to finish, or raise the timeout")
            if now >= next_note:
                _log(f"waiting for {holder}, which is writing {self.what} "
                     f"(up to {deadline - now:.0f} s more, `{timeout_key}`)")
                waited_msg, next_note = True, now + 60.0
            time.sleep(min(poll, max(0.01, deadline - now)))

    def _try(self, key: str) -> str | None:
        """Take the lock (None) or return a description of its holder."""
        with _HELD_GUARD:
            if key in _HELD:
                return f"this process (pid {os.getpid()})"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)  # we hold no lock on it, so closing releases nothing
                return holder
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.uname().nodename}:{os.getpid()}\n".encode(), 0)
            self.fd, self._key = fd, key
            _HELD.add(key)
            return None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def close(self) -> None:
        with _HELD_GUARD:
            if self.fd is None:
                return
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None
                _HELD.discard(self._key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_locked(lock_path) -> bool:
    """Whether some process (this one included) holds the writer's lock ``lock_path`` now."""
    p = Path(lock_path)
    key = str(p.resolve())
    with _HELD_GUARD:
        if key in _HELD:
            return True  # (and opening + closing the file here would release our own lock)
        if not p.exists():
            return False
        fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"host:pid {text}" if text else "an unknown process"
