"""FeatureStore: one Zarr v3 group per (dataset split, model) holding every captured layer.

Layout of ``<cache_root>/features/<key>/``::

    zarr.json                 group attributes: model facts, dataset, layers, dtype, versions, created
    layer_00 ... layer_LL     (N, T, D) tokens after block l (layer_00 = embeddings)
    final                     (N, T, D) final-norm tokens (pre-logit)
    labels                    (N,) int64
    progress/chunk_000012     marker: every array's chunk 12 is written (resume unit)
    COMPLETE                  written last, atomically: the store is finished and may be read

A writer holds an exclusive lock (``<store>.lock``, fcntl) so two jobs never write one store.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import numpy as np
import zarr

DTYPES = {"float16": "float16", "float32": "float32"}


def layer_name(l: int) -> str:
    return f"layer_{int(l):02d}"


class IncompleteStore(RuntimeError):
    pass


class StoreBusy(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class FeatureStore:
    """Read-only view of a finished store."""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"no feature store at {str(self.path)!r}")
        if not allow_incomplete and not self.is_complete(self.path):
            raise IncompleteStore(
                f"feature store {str(self.path)!r} is incomplete (extraction was interrupted or is "
                "still running); re-run the extract step to finish it"
            )
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs = dict(self.group.attrs)
        try:  # `stitchcache cache ls` shows when a store was last read (best effort: may be read-only)
            (self.path / "last_used").touch()
        except OSError:
            pass

    @staticmethod
    def is_complete(path) -> bool:
        return (Path(path) / "COMPLETE").exists()

    @property
    def num_images(self) -> int:
        return int(self.attrs["num_images"])

    @property
    def layers(self) -> list[int]:
        return list(self.attrs["layers"])

    def layer(self, l: int) -> zarr.Array:
        if int(l) not in self.layers:
            raise KeyError(
                f"feature store {self.path.name} ({self.attrs.get('model_name', '?')}) has no layer {l}; "
                f"it holds layers {self.layers}"
            )
        return self.group[layer_name(l)]

    @property
    def final(self) -> zarr.Array:
        return self.group["final"]

    @property
    def labels(self) -> zarr.Array:
        return self.group["labels"]

    def array(self, name: str | int) -> zarr.Array:
        """'final', 'labels' or a layer index."""
        if isinstance(name, int) or str(name).isdigit():
            return self.layer(int(name))
        return self.group[name]


def open_store(path: str | os.PathLike) -> FeatureStore:
    return FeatureStore(path)


def open_record(path: str | os.PathLike) -> tuple[dict, FeatureStore]:
    """A feature record (extract's JSON output) and the finished store it points to."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"feature record {str(p)!r} does not exist (run the extract step first)")
    record = json.loads(p.read_text())
    return record, FeatureStore(record["store"])


class StoreWriter:
    """Creates (or resumes) a store; chunks of whole images are the unit of work and of resume."""

    def __init__(self, path, *, num_images: int, layers: list[int], num_tokens: int, width: int,
                 dtype: str = "float16", chunk_size: int = 256, attrs: dict | None = None,
                 compressor: str = "none"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(str(self.path) + ".lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreBusy(f"another process is writing feature store {str(self.path)!r}; wait for it to finish")
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.uname().nodename}:{os.getpid()}\n")
        self._lock_file.flush()
        self.num_images, self.chunk_size = int(num_images), int(chunk_size)
        self.layers = sorted(int(l) for l in layers)
        self.progress = self.path / "progress"
        shape = (self.num_images, int(num_tokens), int(width))
        if (self.path / "zarr.json").exists():
            self.group = zarr.open_group(str(self.path), mode="r+")
            old = dict(self.group.attrs)
            if old.get("key_parts") != (attrs or {}).get("key_parts"):
                raise RuntimeError(f"store {str(self.path)!r} exists with different inputs; refusing to mix")
            self.chunk_size = int(old["chunk_size"])
        else:
            self.group = zarr.open_group(str(self.path), mode="w")
            codec = _compressor(compressor)
            kw = dict(dtype=DTYPES[dtype], chunks=(self.chunk_size, shape[1], shape[2]), compressors=codec,
                      dimension_names=("image", "token", "channel"), config={"write_empty_chunks": True})
            for l in self.layers:
                self.group.create_array(layer_name(l), shape=shape, **kw)
            self.group.create_array("final", shape=shape, **kw)
            self.group.create_array("labels", shape=(self.num_images,), dtype="int64", chunks=(self.chunk_size,),
                                    dimension_names=("image",), config={"write_empty_chunks": True})
            self.group.attrs.update({**(attrs or {}), "num_images": self.num_images, "layers": self.layers,
                                     "dtype": dtype, "chunk_size": self.chunk_size, "compressor": compressor,
                                     "num_tokens": shape[1], "width": shape[2]})
        self.progress.mkdir(exist_ok=True)
        # write_empty_chunks is a runtime setting zarr does not persist: open every array with it, or
        # chunks equal to the fill value (e.g. all-zero labels) are silently never written
        names = [layer_name(l) for l in self.layers] + ["final", "labels"]
        self.arrays = {n: self.group[n].with_config({"write_empty_chunks": True}) for n in names}

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.chunk_size)

    def chunk_range(self, ci: int) -> tuple[int, int]:
        return ci * self.chunk_size, min((ci + 1) * self.chunk_size, self.num_images)

    def pending_chunks(self) -> list[int]:
        return [ci for ci in range(self.num_chunks) if not (self.progress / f"chunk_{ci:06d}").exists()]

    def write_chunk(self, ci: int, layers: dict[int, np.ndarray], final: np.ndarray, labels: np.ndarray) -> None:
        a, b = self.chunk_range(ci)
        for l in self.layers:
            self.arrays[layer_name(l)][a:b] = layers[l]
        self.arrays["final"][a:b] = final
        self.arrays["labels"][a:b] = labels
        (self.progress / f"chunk_{ci:06d}").touch()  # recorded only after every array has the chunk

    def finalize(self, extra: dict | None = None) -> None:
        missing = self.pending_chunks()
        if missing:
            raise IncompleteStore(f"cannot finalize {self.path}: {len(missing)} chunks missing")
        self.group.attrs.update({"complete": True, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})})
        _atomic_write_text(self.path / "COMPLETE", json.dumps({"completed": time.time()}))

    def close(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _compressor(name: str):
    if name in (None, "none"):
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return ZstdCodec(level=1)
    if name == "blosc":
        return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    raise ValueError(f"unknown compressor {name!r} (none | zstd | blosc)")
