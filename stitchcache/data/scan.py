"""Bad images are found before any forward pass: every image of a split is decoded once (in
threads; PIL releases the GIL while decoding), every failure is collected, and the result is
cached by the split's manifest digest, so the scan runs once per split content.

``checked_split(split, on_bad_image, cache_dir)``:

* ``error`` (default): if any image is bad, one :class:`BadImages` error lists every bad file with
  its path and reason (before a store exists, so fixing the files orphans no finished chunk);
* ``skip``: the bad images are left out; the returned split's manifest records their ids
  (``skipped``), so its digest - and the store key - is stable across runs and changes only when
  the set of bad files does. The store attributes list them too.

Cost: one decode of every image (the same decode extraction does once more), spread over
``workers`` threads, then nothing while the manifest stays the same.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import SEGMENTATION, Split

ON_BAD_IMAGE = ("error", "skip")
SCAN_VERSION = 1  # bump when what counts as a bad image changes (cached scans are then redone)
MAX_LISTED = 50


class BadImages(ValueError):
    """Images of a split that cannot be used; ``bad``: [(index, id, where, reason)]."""

    def __init__(self, message: str, bad: list):
        super().__init__(message)
        self.bad = bad


def _check(split: Split, i: int):
    try:
        split.image(i)
        if getattr(split, "task", None) == SEGMENTATION:
            split.label(i)
    except Exception as e:  # noqa: BLE001 - every failure is a bad image, reported with its path
        return [i, split.image_id(i), split.where(i), f"{type(e).__name__}: {e}"]
    return None


def _scan_file(cache_dir: Path, digest: str) -> Path:
    from PIL import __version__ as pil

    return Path(cache_dir) / f"{digest[:32]}-v{SCAN_VERSION}-pil{pil}.json"


def scan_split(split: Split, cache_dir=None, workers: int | None = None) -> list:
    """[(index, id, where, reason)] of every image that fails to decode (cached by manifest)."""
    digest = split.digest()
    cached = _scan_file(cache_dir, digest) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            data = json.loads(cached.read_text())
            if data.get("manifest") == digest:
                return [list(b) for b in data["bad"]]
        except (OSError, ValueError, KeyError):
            pass
    n = len(split)
    workers = max(1, int(workers or min(8, os.cpu_count() or 1)))
    print(f"[stitchcache] checking {n} images of split {split.name!r} before extraction ({workers} threads)",
          file=sys.stderr, flush=True)
    with ThreadPoolExecutor(workers) as pool:
        bad = [b for b in pool.map(lambda i: _check(split, i), range(n), chunksize=64) if b is not None]
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"manifest": digest, "split": split.name, "checked": n, "bad": bad}))
            os.replace(tmp, cached)
        except OSError:
            pass
    return bad


class SkippedSplit(Split):
    """A split without some of its images; the manifest names them (``skipped``)."""

    def __init__(self, base: Split, skipped: list[int]):
        self.base = base
        drop = set(skipped)
        self.index = [i for i in range(len(base)) if i not in drop]
        self.skipped_ids = [base.image_id(i) for i in sorted(drop)]
        for attr in ("name", "num_classes", "task", "ignore_index", "classes"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def __len__(self):
        return len(self.index)

    def image(self, i):
        return self.base.image(self.index[i])

    def label(self, i):
        return self.base.label(self.index[i])

    def image_path(self, i):
        return self.base.image_path(self.index[i])

    def image_id(self, i):
        return self.base.image_id(self.index[i])

    def manifest(self):
        return {**self.base.manifest(), "skipped": self.skipped_ids}


def checked_split(split: Split, on_bad_image: str = "error", cache_dir=None, workers: int | None = None,
                  dataset: str | None = None) -> Split:
    """The split to extract: unchanged when every image decodes; else an error listing every bad
    file (``error``) or the split without them (``skip``)."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"datasets.{dataset or '?'}.on_bad_image: {on_bad_image!r} is not one of "
                         f"{' | '.join(ON_BAD_IMAGE)}")
    bad = scan_split(split, cache_dir, workers)
    if not bad:
        return split
    name = dataset or "?"
    if on_bad_image == "skip":
        print(f"[stitchcache] skipping {len(bad)} bad image(s) of {name}/{split.name} "
              f"(datasets.{name}.on_bad_image: skip): "
              + ", ".join(b[2] for b in bad[:10]) + (" ..." if len(bad) > 10 else ""), file=sys.stderr, flush=True)
        return SkippedSplit(split, [b[0] for b in bad])
    lines = [f"  {b[2]}: {b[3]}" for b in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more"
                     + (f" (all listed in {_scan_file(cache_dir, split.digest())})" if cache_dir else ""))
    raise BadImages(f"{len(bad)} of {len(split)} images of {name}/{split.name} cannot be used:\n"
                    + "\n".join(lines)
                    + f"\nFix or remove them, or set `datasets.{name}.on_bad_image: skip` to leave them out "
                    "(the skipped files are recorded in the store).", bad)
