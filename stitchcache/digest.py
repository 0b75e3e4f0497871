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


def _stamp(st: os.stat_result) -> str:
    """Everything that changes when a file's content may have changed."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def memo_path(p: str | os.PathLike) -> Path:
    root = Path(os.environ.get(DIGEST_DIR_ENV, Path.home() / ".cache" / "stitchcache" / "digests"))
    return root / (hashlib.sha256(str(Path(p).resolve()).encode()).hexdigest()[:32] + ".json")


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
    stamp = _stamp(p.stat())
    memo = memo_path(p)
    try:
        data = json.loads(memo.read_text())
        if data.get("key") == stamp:
            return data["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_file(p)
    if _stamp(p.stat()) != stamp:  # written while we read it: do not memoise a torn read
        return digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(memo.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": stamp, "sha256": digest, "path": str(p)}))
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest
