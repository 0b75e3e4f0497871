"""FeatureStore: one Zarr v3 group per (dataset split, model) holding every captured layer.

Layout of ``<cache_root>/features/<key>/``::

    zarr.json                 group attributes: model facts, dataset, layers, dtype, versions, created
    layer_00 ... layer_LL     (N, T, D) tokens after block l (layer_00 = embeddings)
    final                     (N, T, D) final-norm tokens (pre-logit)
    labels                    (N,) int64 class indices, or for segmentation (N, H, W) uint8 masks at the
                              model's input size (255 = ignore); attributes task / num_classes / ignore_index
    order                     (N,) int64: row i holds image order[i] of the dataset split (a seeded
                              permutation, so chunks mix classes; FeatureStore.order / image_ids)
    <array>_scale             (N, T) float32 per-token scales, only when dtype is int8 (see quant.py)
    image_ids.json            the stable id of the image in each row (``FeatureStore.image_ids()``),
                              a JSON list in row order; written at creation, before the geometry
    progress/chunk_000012     marker: every array's chunk 12 is written
    COMPLETE                  written last, atomically: the store is finished and may be read

The unit of work and of resume is a chunk of whole images, or, when the store is sharded
(``shard_size``: Zarr's sharding codec, several chunks per file), a whole shard: a shard is always
written whole, and the markers of all its chunks are created after every array has the shard, so a
restarted job rewrites any shard whose markers are not all there.

A writer holds an exclusive lock (``<store>.lock``, lock.py: a record lock owned by the writing
process, so it dies with it) so two jobs never write one store; ``lock_timeout`` waits for another
writer instead of failing at once.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import zarr

from .lock import StoreBusy, StoreLock  # noqa: F401  (StoreBusy is part of this module's API)
from .quant import SCALE_DTYPE, SCALE_SUFFIX, Quantized, QuantizedArray, dequantize, quantize

DTYPES = {"float16": "float16", "float32": "float32", "int8": "int8"}


# attributes _create writes last: a store without all of them was killed while being created
IMAGE_IDS = "image_ids.json"
_CREATED = ("num_images", "layers", "dtype", "chunk_size", "shard_size", "compressor", "num_tokens", "width")


def layer_name(l: int) -> str:
    return f"layer_{int(l):02d}"


class IncompleteStore(RuntimeError):
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

    @property
    def dtype(self) -> str:
        return str(self.attrs.get("dtype", "float16"))

    @property
    def shard_size(self) -> int | None:
        s = self.attrs.get("shard_size")
        return int(s) if s else None

    def _tokens(self, name: str):
        """A token array as readers see it: the zarr array, or for int8 stores a QuantizedArray
        (same shape/chunks, slices dequantised to float32)."""
        if self.dtype == "int8":
            return QuantizedArray(self.group[name], self.group[name + SCALE_SUFFIX])
        return self.group[name]

    def layer(self, l: int):
        if int(l) not in self.layers:
            raise KeyError(
                f"feature store {self.path.name} ({self.attrs.get('model_name', '?')}) has no layer {l}; "
                f"it holds layers {self.layers}"
            )
        return self._tokens(layer_name(l))

    @property
    def final(self):
        return self._tokens("final")

    @property
    def labels(self) -> zarr.Array:
        return self.group["labels"]

    @property
    def order(self) -> np.ndarray:
        """(N,) int64: the dataset-split index of each row (identity for stores without ``order``)."""
        if "order" in self.group:
            return np.asarray(self.group["order"][:], dtype=np.int64)
        return np.arange(self.num_images, dtype=np.int64)

    def image_ids(self, split=None) -> list[str]:
        """The stable manifest id of the image in each row, in row order (``Split.image_id``: the
        image's relative path, or ``<source>:<index>``). Use this rather than a row index: rows are in a
        seeded random order (``order``). Read from the store's image_ids.json; a store written before
        stores carried it needs ``split`` (``data.open_split``, checked against the store's manifest)."""
        path = self.path / IMAGE_IDS
        if path.is_file():
            ids = json.loads(path.read_text())
            if len(ids) != self.num_images:
                raise ValueError(f"{path}: {len(ids)} image ids for the store's {self.num_images} images")
            return ids
        if split is None:
            raise FileNotFoundError(
                f"feature store {str(self.path)!r} ({self.attrs.get('model_name', '?')}) records no image ids "
                f"({IMAGE_IDS}); it was written before stores carried them: re-run its extraction")
        want = (self.attrs.get("dataset") or {}).get("manifest")
        if want is not None and split.digest() != want:
            raise ValueError(f"feature store {self.path.name}: split {split.name!r} is not the data it was extracted "
                             f"from (manifest {split.digest()[:12]} vs {want[:12]})")
        return [split.image_id(int(i)) for i in self.order]

    def array(self, name: str | int):
        """'final', 'labels' or a layer index (or 'layer_06')."""
        if isinstance(name, int) or str(name).isdigit():
            return self.layer(int(name))
        if name == "labels":
            return self.labels
        if name == "final" or str(name).startswith("layer_"):
            if str(name).startswith("layer_"):
                return self.layer(int(str(name)[6:]))
            return self._tokens(name)
        return self.group[name]

    def dask(self, name: str | int = "final"):
        """A dask array over 'final', 'labels' or a layer (index or 'layer_06') for analytics:
        one dask chunk per Zarr shard (or chunk); int8 stores are dequantised lazily to float32."""
        import dask.array as da

        def load(z):
            shards = getattr(z, "shards", None)
            return da.from_zarr(z, chunks=shards or z.chunks)

        arr = self.array(name)
        if isinstance(arr, QuantizedArray):
            q, s = load(arr.q), load(arr.scale)
            return q.astype(np.float32) * s[..., None]
        return load(arr)


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
    """Creates (or resumes) a store. The unit of work and of resume is a chunk of whole images, or
    a whole shard when ``shard_size`` is set (images per shard, a multiple of ``chunk_size``).

    ``lock_timeout``: seconds to wait for another process writing the same store (then StoreBusy);
    when that writer finished it meanwhile, ``already_complete`` is True and nothing else is set up.

    Write with ``write_unit(u, layers, final, labels)`` (``pending_units()`` lists what is left);
    ``write_chunk`` / ``pending_chunks`` are the same for unsharded stores. Token values are float
    arrays, or for int8 stores optionally ``quant.Quantized(q, scale)`` already quantised.
    """

    def __init__(self, path, *, num_images: int, layers: list[int], num_tokens: int, width: int,
                 dtype: str = "float16", chunk_size: int = 256, attrs: dict | None = None,
                 compressor: str = "none", shard_size: int | None = None,
                 label_shape: tuple = (), label_dtype: str = "int64", lock_timeout: float = 0.0,
                 order=None, image_ids: list[str] | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} ({' | '.join(DTYPES)})")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = StoreLock(str(self.path) + ".lock", timeout=lock_timeout,
                               what=f"feature store {str(self.path)!r}")
        # finished by another writer while this one waited for the lock: nothing to write or open
        self.already_complete = FeatureStore.is_complete(self.path)
        if self.already_complete:
            return
        self.num_images, self.chunk_size = int(num_images), int(chunk_size)
        self.shard_size = int(shard_size) if shard_size else None
        self.dtype = dtype
        self.layers = sorted(int(l) for l in layers)
        self.label_shape, self.label_dtype = tuple(int(x) for x in label_shape), str(np.dtype(label_dtype))
        if image_ids is not None and len(image_ids) != self.num_images:
            self.close()
            raise ValueError(f"{self.path}: {len(image_ids)} image ids for {self.num_images} images")
        self.image_ids = None if image_ids is None else [str(i) for i in image_ids]
        self.progress = self.path / "progress"
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        if self.order is not None and self.order.shape != (self.num_images,):
            raise ValueError(f"{self.path}: order has shape {self.order.shape}, expected ({self.num_images},)")
        shape = (self.num_images, int(num_tokens), int(width))
        try:
            old = None
            if (self.path / "zarr.json").exists():
                self.group = zarr.open_group(str(self.path), mode="r+")
                old = dict(self.group.attrs)
                if not all(k in old for k in _CREATED):  # killed while being created (_create writes the
                    old = None  # attributes last; no chunk can be recorded yet): create it again
            if old is not None:
                if old.get("key_parts") != (attrs or {}).get("key_parts"):
                    raise RuntimeError(f"store {str(self.path)!r} exists with different inputs; refusing to mix")
                # the geometry on disk wins over this call's settings (they are not part of the key)
                self.chunk_size = int(old["chunk_size"])
                self.shard_size = int(old["shard_size"]) if old.get("shard_size") else None
                self.dtype = old.get("dtype", dtype)
            else:
                self._create(shape, attrs, compressor)
        except BaseException:
            self.close()
            raise
        self.progress.mkdir(exist_ok=True)
        # write_empty_chunks is a runtime setting zarr does not persist: open every array with it, or
        # chunks equal to the fill value (e.g. all-zero labels) are silently never written
        self.token_names = [layer_name(l) for l in self.layers] + ["final"]
        names = self.token_names + ["labels"]
        if self.dtype == "int8":
            names += [n + SCALE_SUFFIX for n in self.token_names]
        self.arrays = {n: self.group[n].with_config({"write_empty_chunks": True}) for n in names}

    def _create(self, shape, attrs, compressor) -> None:
        C, S = self.chunk_size, self.shard_size
        if S is not None:
            if S < 1 or S % C:
                raise ValueError(f"shard_size ({S}) must be a positive multiple of chunk_size ({C})")
            S = self.shard_size = min(S, max(C, -(-self.num_images // C) * C))  # no shard larger than the data
        self.group = zarr.open_group(str(self.path), mode="w")
        codec = _compressor(compressor)
        common = dict(compressors=codec, config={"write_empty_chunks": True})
        tok = dict(chunks=(C, shape[1], shape[2]), shards=(S, shape[1], shape[2]) if S else None,
                   dimension_names=("image", "token", "channel"), **common)
        names = [layer_name(l) for l in self.layers] + ["final"]
        for n in names:
            self.group.create_array(n, shape=shape, dtype=DTYPES[self.dtype], **tok)
            if self.dtype == "int8":
                self.group.create_array(n + SCALE_SUFFIX, shape=shape[:2], dtype=SCALE_DTYPE,
                                        chunks=(C, shape[1]), shards=(S, shape[1]) if S else None,
                                        dimension_names=("image", "token"), config={"write_empty_chunks": True})
        L = self.label_shape  # () class indices; (H, W) segmentation masks, chunked like the tokens
        self.group.create_array("labels", shape=(self.num_images, *L), dtype=self.label_dtype, chunks=(C, *L),
                                shards=(S, *L) if S else None,
                                dimension_names=("image", "y", "x")[:1 + len(L)] if len(L) in (0, 2) else None,
                                config={"write_empty_chunks": True})
        if self.order is not None:  # dataset index of each row, written whole before the attributes
            self.group.create_array("order", shape=(self.num_images,), dtype="int64", chunks=(max(self.num_images, 1),),
                                    dimension_names=("image",))[:] = self.order
        if self.image_ids is not None:
            _atomic_write_text(self.path / IMAGE_IDS, json.dumps(self.image_ids))
        # one metadata write (zarr's attrs.update writes zarr.json once per key: a kill in between
        # would leave a store that looks created but lacks its geometry)
        self.group.update_attributes({**(attrs or {}), "num_images": self.num_images, "layers": self.layers,
                                      "dtype": self.dtype, "chunk_size": C, "shard_size": S,
                                      "compressor": compressor, "num_tokens": shape[1], "width": shape[2],
                                      "label_shape": list(L), "label_dtype": self.label_dtype,
                                      **({"quantization": "int8 symmetric per token, <array>_scale float32 (N, T)"}
                                         if self.dtype == "int8" else {})})

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.chunk_size)

    def chunk_range(self, ci: int) -> tuple[int, int]:
        return ci * self.chunk_size, min((ci + 1) * self.chunk_size, self.num_images)

    def pending_chunks(self) -> list[int]:
        return [ci for ci in range(self.num_chunks) if not (self.progress / f"chunk_{ci:06d}").exists()]

    # -- units: a chunk, or a whole shard in sharded stores ---------------------------------------
    @property
    def unit_size(self) -> int:
        return self.shard_size or self.chunk_size

    @property
    def num_units(self) -> int:
        return -(-self.num_images // self.unit_size)

    def unit_range(self, u: int) -> tuple[int, int]:
        return u * self.unit_size, min((u + 1) * self.unit_size, self.num_images)

    def unit_chunks(self, u: int) -> range:
        per = self.unit_size // self.chunk_size
        return range(u * per, min((u + 1) * per, self.num_chunks))

    def pending_units(self) -> list[int]:
        done = {p.name for p in self.progress.iterdir()} if self.progress.is_dir() else set()
        return [u for u in range(self.num_units)
                if any(f"chunk_{ci:06d}" not in done for ci in self.unit_chunks(u))]

    def write_unit(self, u: int, layers: dict, final, labels: np.ndarray) -> None:
        """Write images unit_range(u) of every array, then record the unit's chunks as written."""
        a, b = self.unit_range(u)
        for name, value in [(layer_name(l), layers[l]) for l in self.layers] + [("final", final)]:
            self._write_tokens(name, a, b, value)
        lab = self.arrays["labels"]
        labels = np.asarray(labels)
        if labels.shape != (b - a, *lab.shape[1:]):
            raise ValueError(f"{self.path}: unit {u} labels have shape {labels.shape}, the store's labels "
                             f"{(b - a, *lab.shape[1:])}")
        lab[a:b] = labels.astype(lab.dtype, copy=False)
        for ci in self.unit_chunks(u):  # recorded only after every array has the whole unit
            (self.progress / f"chunk_{ci:06d}").touch()

    def _write_tokens(self, name: str, a: int, b: int, value) -> None:
        if self.dtype == "int8":
            qv = value if isinstance(value, Quantized) else quantize(value)
            self.arrays[name][a:b] = qv.q
            self.arrays[name + SCALE_SUFFIX][a:b] = qv.scale
        else:
            if isinstance(value, Quantized):
                value = dequantize(value.q, value.scale)
            self.arrays[name][a:b] = value

    def write_chunk(self, ci: int, layers: dict[int, np.ndarray], final: np.ndarray, labels: np.ndarray) -> None:
        if self.shard_size and self.shard_size != self.chunk_size:
            raise ValueError(f"{self.path} is sharded ({self.shard_size} images per shard): a shard is "
                             "written whole, use write_unit(shard_index, ...)")
        self.write_unit(ci, layers, final, labels)

    def finalize(self, extra: dict | None = None) -> None:
        missing = self.pending_chunks()
        if missing:
            raise IncompleteStore(f"cannot finalize {self.path}: {len(missing)} chunks missing")
        self.group.attrs.update({"complete": True, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})})
        _atomic_write_text(self.path / "COMPLETE", json.dumps({"completed": time.time()}))

    def close(self) -> None:
        self._lock.close()

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
