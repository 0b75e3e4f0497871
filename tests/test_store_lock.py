"""The store writer's lock: it dies with its writer (even when the writer has forked DataLoader
workers that outlive it), a second writer waits for the first and then uses its finished store,
and a wait that runs out says who holds the lock and which setting to raise."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, tiny_vit
from stitchcache.cache.lock import StoreLock
from stitchcache.cache.store import StoreBusy, StoreWriter

GEOM = dict(num_images=4, layers=[0], num_tokens=2, width=4, chunk_size=2)


def _spawn(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(pids):
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


WRITER_WITH_WORKERS = """
    import sys, time, torch
    from stitchcache.cache.store import StoreWriter

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            if i >= 2:
                time.sleep(120)  # the workers are busy decoding when the writer is killed
            return i

    w = StoreWriter(sys.argv[1], num_images=4, layers=[0], num_tokens=2, width=4, chunk_size=2)
    it = iter(torch.utils.data.DataLoader(Slow(), batch_size=1, num_workers=2))
    next(it)
    print(" ".join(str(p.pid) for p in it._workers), flush=True)
    time.sleep(300)
"""


def test_lock_dies_with_a_sigkilled_writer_whose_workers_live_on(tmp_path):
    """Before: an flock shared with the forked DataLoader workers kept the store 'busy' after the
    writer's SIGKILL, so an immediate re-run (a scheduler's requeue) failed with StoreBusy."""
    store = tmp_path / "features" / "k"
    proc = _spawn(WRITER_WITH_WORKERS, store)
    workers = []
    try:
        workers = proc.stdout.readline().split()
        assert len(workers) == 2, proc.stderr.read()
        with pytest.raises(StoreBusy):  # held while the writer lives
            StoreWriter(store, **GEOM)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in workers:  # the workers outlive their parent
            os.kill(int(pid), 0)
        with StoreWriter(store, **GEOM) as w:  # at once: the lock died with the writer
            assert w.pending_units() == [0, 1]
    finally:
        _kill(workers)
        proc.kill()
        proc.wait()


HOLDER = """
    import sys, time
    from stitchcache.cache.lock import StoreLock

    lock = StoreLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_wait_runs_out_naming_the_holder_and_the_setting(tmp_path, capfd):
    lock_path = tmp_path / "s.lock"
    proc = _spawn(HOLDER, lock_path, 60)
    try:
        assert proc.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(StoreBusy, match=rf"{proc.pid}.*extract\.lock_timeout"):
            StoreLock(lock_path, timeout=1.5, poll=0.2, what="feature store 'x'")
        assert 1.4 < time.monotonic() - t0 < 10
        assert "waiting for host:pid" in capfd.readouterr().err
    finally:
        proc.kill()
        proc.wait()
    with StoreLock(lock_path, timeout=0):  # free again once the holder is gone
        pass


def test_lock_is_released_when_the_holder_exits_and_a_waiter_gets_it(tmp_path):
    lock_path = tmp_path / "s.lock"
    proc = _spawn(HOLDER, lock_path, 1.5)
    try:
        assert proc.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with StoreLock(lock_path, timeout=60, poll=0.1) as lock:
            assert lock.held and time.monotonic() - t0 < 30
    finally:
        proc.kill()
        proc.wait()


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    """Record locks do not exclude a process from itself: the process-wide registry does, and the
    refused attempt must not release the first writer's lock (closing any fd of the file would)."""
    with StoreWriter(tmp_path / "s", **GEOM):
        with pytest.raises(StoreBusy, match="this process"):
            StoreWriter(tmp_path / "s", **GEOM)
        proc = _spawn(HOLDER, tmp_path / "s.lock", 0)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "StoreBusy" in err  # still held against other processes
    with StoreWriter(tmp_path / "s", **GEOM):
        pass


EXTRACT_SLOWLY = """
    import json, sys, time
    from pathlib import Path
    import stitchcache.extract as ex

    real = ex._run
    def slow(*args, **kwargs):  # the lock is held from here on
        print("writing", flush=True)
        release = Path(sys.argv[3]) / "release"
        for _ in range(600):  # until the test's extraction is waiting for this one
            if release.exists():
                break
            time.sleep(0.1)
        return real(*args, **kwargs)
    ex._run = slow
    rec = ex.extract(json.loads(sys.argv[1]), json.loads(sys.argv[2]), "train", sys.argv[3], json.loads(sys.argv[4]))
    print(json.dumps(rec), flush=True)
"""


def test_second_extraction_waits_and_uses_the_finished_store(tmp_path, image_folder, capfd, monkeypatch):
    """Before: a second experiment needing a store another process was writing failed with StoreBusy."""
    import json

    from stitchcache.cache import FeatureStore, lock
    from stitchcache.extract import extract

    spec = {"name": "t", **tiny_vit(depth=2), "checkpoint": None}
    settings = {"chunk_size": 16, "num_workers": 0, "lock_timeout": 120}
    cache = tmp_path / "cache"
    real_log = lock._log

    def log_and_release(msg):  # once this process waits, let the first writer go on
        real_log(msg)
        if msg.startswith("waiting for"):
            (cache / "release").touch()

    monkeypatch.setattr(lock, "_log", log_and_release)
    proc = _spawn(EXTRACT_SLOWLY, json.dumps(spec), json.dumps(image_folder), cache, json.dumps(settings))
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        rec = extract(spec, image_folder, "train", cache, settings)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
        proc.wait()
    first = json.loads(out.strip().splitlines()[-1])
    assert rec["store"] == first["store"] and FeatureStore.is_complete(rec["store"])
    log = capfd.readouterr().err
    assert "waiting for host:pid" in log and "finished by another process" in log


def test_gc_sees_a_store_another_process_is_writing(tmp_path):
    """gc tested the lock with flock, which does not see record locks: it must use the writer's."""
    from stitchcache.cache.lock import is_locked
    from stitchcache.cache.manage import _locked

    store = tmp_path / "features" / "k"
    proc = _spawn(HOLDER, str(store) + ".lock", 60)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert _locked(store) and is_locked(str(store) + ".lock")
    finally:
        proc.kill()
        proc.wait()
    assert not _locked(store)
    with StoreWriter(store, **GEOM):  # held by this process: locked, and asking does not release it
        assert _locked(store) and _locked(store)
        with pytest.raises(StoreBusy):
            StoreWriter(store, **GEOM)
