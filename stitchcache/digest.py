"""Content digests of files, memoised so that a big file (a 1 GB checkpoint) is hashed once.

``file_digest(path)`` is the sha256 of a file's bytes. The memo (one small JSON per file under
``$STITCHCACHE_DIGEST_DIR``, default ``~/.cache/stitchcache/digests``) is keyed by the file's
identity *and* every stamp the kernel keeps of a change: device, inode, size, ``mtime_ns`` and
``ctime_ns``. ``mtime`` alone can be set back by a tool (``touch -d``, ``cp -p``, ``rsync -t``,
``tar -x``); ``ctime`` cannot be set from user space and changes on every write, chmod or rename,
and a file copied or replaced in place gets a new inode. So a changed file always misses the memo
and is hashed again; the price is an occasional re-hash of an unchanged file after a metadata-only
change (chmod, a move), about 1-2 s per GB from a warm page cache.

Used by the backends (weights, model config files) and by the data readers (files of a manifest).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DIGEST_DIR_ENV = "STITCHCACHE_DIGEST_DIR"


def stamp(st: os.stat_result) -> str:
    """Everything that changes when a file's content may have changed."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def memo_root(env: str, name: str) -> Path:
    """A memo folder: ``$<env>``, default ``~/.cache/stitchcache/<name>``."""
    return Path(os.environ.get(env, Path.home() / ".cache" / "stitchcache" / name))


def read_memo(memo: Path, key: str):
    """The value memoised in the file ``memo`` under ``key`` (None when absent, unreadable or another key)."""
    try:
        data = json.loads(memo.read_text())
        return data["value"] if data.get("key") == key else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def write_memo(memo: Path, key: str, value, **extra) -> None:
    """Memoise ``value`` under ``key`` in the file ``memo`` (atomically; one that cannot be written is skipped)."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(memo.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "value": value, **extra}))
        os.replace(tmp, memo)
    except OSError:
        pass


def memo_path(p: str | os.PathLike) -> Path:
    return memo_root(DIGEST_DIR_ENV, "digests") / (hashlib.sha256(str(Path(p).resolve()).encode()).hexdigest()[:32] + ".json")


def sha256_file(p: str | os.PathLike) -> str:
    """sha256 of a file's bytes, no memo."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(p: str | os.PathLike) -> str:
    """sha256 of a file, memoised by (device, inode, size, mtime_ns, ctime_ns)."""
    p = Path(p)
    before = stamp(p.stat())
    memo = memo_path(p)
    known = read_memo(memo, before)
    if isinstance(known, str):
        return known
    digest = sha256_file(p)
    if stamp(p.stat()) == before:  # else written while we read it: do not memoise a torn read
        write_memo(memo, before, digest, path=str(p))
    return digest
