"""Streaming readers: chunk-sized blocks in shuffled order (rows shuffled within the block).

Random row access into Zarr is ~20x slower than reading whole chunks (notes/snakemake-zarr.md), so
training reads one block of whole chunks at a time; memory is a block plus the one read ahead,
flat in dataset size.

- ``iter_batches``: in-process generator (what training and evaluation use): one background thread
  reads the next block while a second permutes/converts the previous one, so the caller only
  slices batches.
- ``ChunkDataset`` / ``chunk_loader``: a torch IterableDataset splitting the shuffled blocks across
  DataLoader workers, each opening the store itself.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch


def block_ranges(n: int, block: int) -> list[tuple[int, int]]:
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def default_block(arrays: Sequence, batch_size: int) -> int:
    """Whole chunks, at least one batch."""
    n = arrays[0].shape[0]
    chunk = (getattr(arrays[0], "chunks", None) or (max(n, 1),))[0]
    block = max(chunk, batch_size)
    return -(-block // chunk) * chunk


def iter_batches(arrays: Sequence, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 block: int | None = None, dtype=torch.float32, prefetch: int = 1,
                 drop_last: bool = False) -> Iterator[list[torch.Tensor]]:
    """Yield lists of tensors, one per array, holding the same images.

    arrays:   zarr arrays, QuantizedArrays (int8 stores) or numpy arrays with equal first dimension.
    block:    images read at once (default: the first array's chunk length, at least batch_size).
    shuffle:  block order shuffled, rows permuted within the block (batches may straddle blocks).
    prefetch: blocks in flight per background stage (0 = everything in the calling thread). One
              thread reads blocks, a second permutes rows and converts to ``dtype``, so the caller
              only slices batches (views) while its training step runs.
    """
    n = _check_lengths(arrays)
    if block is None:
        block = default_block(arrays, batch_size)
    rng = np.random.default_rng(seed)
    ranges = block_ranges(n, block)
    if shuffle:
        ranges = [ranges[i] for i in rng.permutation(len(ranges))]
    blocks = block_stream(arrays, ranges, shuffle=shuffle, rng=rng, dtype=dtype, prefetch=prefetch)
    yield from batches_from_blocks(blocks, batch_size, drop_last=drop_last)


def _check_lengths(arrays: Sequence) -> int:
    n = arrays[0].shape[0]
    for a in arrays:
        if a.shape[0] != n:
            raise ValueError(f"arrays disagree on the number of images: {[x.shape[0] for x in arrays]}")
    return n


def block_stream(arrays: Sequence, ranges: Sequence[tuple[int, int]], *, shuffle: bool,
                 rng: np.random.Generator, dtype=torch.float32, prefetch: int = 1) -> Iterator[list[torch.Tensor]]:
    """Blocks (lists of tensors, one per array) for the given image ranges, rows permuted when
    shuffling; read and prepared in two background threads when prefetch > 0."""
    readers = [block_reader(x) for x in arrays]

    def read():  # the rng is used by this one thread in block order: deterministic
        for a, b in ranges:
            perm = rng.permutation(b - a) if shuffle else None
            yield [r(a, b, perm) for r in readers]

    def prepare(blocks):
        for data in blocks:
            yield [_prepare(d, dtype) for d in data]

    if prefetch <= 0 or len(ranges) <= 1:
        return prepare(read())
    if not _needs_conversion(arrays, dtype):  # nothing for a second stage to do: one thread
        return prepare(_prefetched(read(), prefetch))
    return _prefetched(prepare(_prefetched(read(), prefetch)), prefetch)


def _needs_conversion(arrays: Sequence, dtype) -> bool:
    want = torch.empty(0, dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else None
    for x in arrays:
        d = np.dtype(getattr(x, "dtype", np.float32))
        if (d.kind == "f" and d != want) or (d.kind in "iub" and d != np.int64):
            return True
    return False


def _prepare(d: np.ndarray, dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(d))
    return t.to(dtype) if t.is_floating_point() else t.long()


def block_reader(x) -> Callable[..., np.ndarray]:
    """A function (a, b, perm=None) -> numpy array of images a..b of x, rows in the order
    ``perm`` (out[i] = x[a + perm[i]]) when given; dequantised for QuantizedArray."""
    from .quant import QuantizedArray, dequantize

    if isinstance(x, QuantizedArray):
        rq, rs = block_reader(x.q), block_reader(x.scale)
        return lambda a, b, perm=None: dequantize(rq(a, b, perm), rs(a, b, perm), x.dtype)
    direct = _direct_reader(x)
    if direct is not None:
        return direct

    def read(a, b, perm=None):
        d = np.asarray(x[a:b])
        return d if perm is None else np.take(d, perm, axis=0)

    return read


def _direct_reader(x) -> Callable[[int, int], np.ndarray] | None:
    """Fast path for what extract writes by default: an uncompressed, unsharded Zarr v3 array on a
    local disk chunked along the image axis only. Chunk files are then the raw little-endian C-order
    bytes of (chunk, ...) images, so a block is read straight into its buffer, rows already in the
    shuffled order (os.preadv scatters file rows to their destinations): one copy out of the page
    cache, where zarr's read plus a permutation make three. None when anything differs (a codec,
    sharding, another store, big-endian), and the caller reads through zarr.
    Set STITCHCACHE_ZARR_DIRECT=0 to always read through zarr."""
    if os.environ.get("STITCHCACHE_ZARR_DIRECT", "1") == "0":
        return None
    try:
        import sys

        import zarr
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        if not isinstance(x, zarr.Array) or x.metadata.zarr_format != 3 or x.shards is not None:
            return None
        meta = x.metadata
        if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], BytesCodec):
            return None
        endian = getattr(meta.codecs[0].endian, "value", meta.codecs[0].endian)
        dtype = np.dtype(x.dtype)
        if dtype.itemsize > 1 and (endian != "little" or sys.byteorder != "little"):
            return None
        if dtype.kind not in "biuf" or not isinstance(x.store_path.store, LocalStore):
            return None
        chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        shape = tuple(x.shape)
        if chunk_shape[1:] != shape[1:]:
            return None
        root = os.path.join(str(x.store_path.store.root), x.store_path.path)
        fill = x.fill_value
    except Exception:  # any surprise in zarr's internals: use zarr
        return None
    c0, rest = chunk_shape[0], shape[1:]
    row_bytes = int(np.prod(rest, dtype=np.int64)) * dtype.itemsize
    zeros = (0,) * len(rest)

    def read(a: int, b: int, perm: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((b - a,) + rest, dtype)
        rows = out.reshape(b - a, -1).view(np.uint8) if b > a else out
        # destination row of each source row: rows land permuted straight out of the file (scatter
        # read, os.preadv), so shuffling costs no extra copy
        dest = np.arange(b - a) if perm is None else np.argsort(perm)
        pos = a
        while pos < b:
            ci = pos // c0
            end = min(b, (ci + 1) * c0)
            path = os.path.join(root, meta.encode_chunk_key((ci,) + zeros))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # never written: zarr reads the fill value
                out[dest[pos - a:end - a]] = fill
                pos = end
                continue
            try:
                if perm is None:
                    _pread_into(fd, [memoryview(rows[pos - a:end - a].reshape(-1))], (pos - ci * c0) * row_bytes, path)
                else:
                    bufs = [memoryview(rows[i]) for i in dest[pos - a:end - a]]
                    _pread_into(fd, bufs, (pos - ci * c0) * row_bytes, path)
            finally:
                os.close(fd)
            pos = end
        return out

    return read


_IOV_MAX = 1024 if hasattr(os, "preadv") else 1  # Linux's IOV_MAX


def _pread_into(fd: int, bufs: list, offset: int, path: str) -> None:
    """Fill the buffers in order from the file at offset (scatter read), however the kernel splits it."""
    i = 0
    while i < len(bufs):
        group = bufs[i:i + _IOV_MAX]
        n = os.preadv(fd, group, offset) if hasattr(os, "preadv") else os.pread(fd, len(group[0]), offset)
        if not hasattr(os, "preadv"):  # pread returns bytes
            group[0][: len(n)] = n
            n = len(n)
        if n <= 0:
            raise OSError(f"{path}: chunk file shorter than expected")
        offset += n
        while n and i < len(bufs):
            if n >= len(bufs[i]):
                n -= len(bufs[i])
                i += 1
            else:  # partially filled: continue into the rest of this buffer
                bufs[i] = bufs[i][n:]
                n = 0


def _prefetched(it: Iterator, depth: int) -> Iterator:
    """Run `it` in a background thread, at most `depth` items ahead (file reads, numpy copies and
    torch ops release the GIL). Stops the thread when the consumer stops early."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put((True, done))
        except BaseException as e:  # re-raised in the consumer
            q.put((False, e))

    t = threading.Thread(target=work, daemon=True, name="stitchcache-prefetch")
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()


def batches_from_blocks(blocks: Iterable[list[torch.Tensor]], batch_size: int, *,
                        drop_last: bool = False) -> Iterator[list[torch.Tensor]]:
    """Cut a stream of prepared blocks (lists of same-length tensors) into batches: views of the
    block, except the one batch straddling two blocks, which is concatenated."""
    carry: list[torch.Tensor] | None = None
    for data in blocks:
        m = data[0].shape[0]
        i = 0
        if carry is not None:
            take = min(batch_size - carry[0].shape[0], m)
            carry = [torch.cat([c, d[:take]]) for c, d in zip(carry, data)]
            i = take
            if carry[0].shape[0] < batch_size:
                continue
            yield carry
            carry = None
        while i + batch_size <= m:
            yield [d[i:i + batch_size] for d in data]
            i += batch_size
        if i < m:
            carry = [d[i:m] for d in data]
    if carry is not None and carry[0].shape[0] and not drop_last:
        yield carry


class ChunkDataset(torch.utils.data.IterableDataset):
    """Torch-facing streaming reader of a FeatureStore, for ``DataLoader(ds, batch_size=None,
    num_workers=k)``.

    Blocks of whole chunks are shuffled with one permutation shared by all workers (seed, epoch),
    dealt round-robin to the DataLoader workers, and each worker opens the store itself (zarr
    handles are not shared across processes), permutes rows within its blocks and yields batches:
    lists of tensors, one per name in ``names`` ('final', 'labels', a layer index or 'layer_06').
    Every image is yielded once per epoch; each worker may end with one short batch unless
    ``drop_last``. Call ``set_epoch(e)`` before each epoch for a new order.
    """

    def __init__(self, store, names: Sequence, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 block: int | None = None, dtype=torch.float32, drop_last: bool = False, prefetch: int = 1):
        super().__init__()
        self.path = str(getattr(store, "path", store))
        self.names, self.batch_size = list(names), int(batch_size)
        self.shuffle, self.seed, self.block = shuffle, int(seed), block
        self.dtype, self.drop_last, self.prefetch = dtype, drop_last, int(prefetch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _arrays(self):
        from .store import FeatureStore

        store = FeatureStore(self.path)
        return [store.array(n) for n in self.names]

    def worker_ranges(self, arrays, worker: int, num_workers: int) -> list[tuple[int, int]]:
        n = _check_lengths(arrays)
        ranges = block_ranges(n, self.block or default_block(arrays, self.batch_size))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(ranges))
            ranges = [ranges[i] for i in order]
        return ranges[worker::num_workers]

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        arrays = self._arrays()  # opened here, i.e. inside the worker process
        mine = self.worker_ranges(arrays, worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, worker, 1])
        blocks = block_stream(arrays, mine, shuffle=self.shuffle, rng=rng, dtype=self.dtype, prefetch=self.prefetch)
        yield from batches_from_blocks(blocks, self.batch_size, drop_last=self.drop_last)


def chunk_loader(store, names: Sequence, batch_size: int, *, num_workers: int = 2, shuffle: bool = True,
                 seed: int = 0, pin_memory: bool = False, **kw) -> torch.utils.data.DataLoader:
    """A DataLoader over a ChunkDataset (batching is done by the dataset: batch_size=None)."""
    ds = ChunkDataset(store, names, batch_size, shuffle=shuffle, seed=seed, **kw)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=False)


def pool_tokens(z: torch.Tensor, num_prefix: int, pool: str) -> torch.Tensor:
    """(B, T, D) -> (B, D). 'mean' = mean of patch tokens; 'cls' = first token (needs a prefix)."""
    if pool == "mean":
        return z[:, num_prefix:].mean(dim=1)
    if pool == "cls":
        if num_prefix == 0:
            raise ValueError("pool 'cls' needs a prefix token; this model has none (use pool: mean)")
        return z[:, 0]
    raise ValueError(f"unknown pool {pool!r} (mean | cls)")


def pooled_features(array, num_prefix: int, pool: str, batch_size: int = 512) -> torch.Tensor:
    """Stream a (N, T, D) token array into pooled (N, D) float32 features."""
    out = [pool_tokens(t, num_prefix, pool) for (t,) in iter_batches([array], batch_size)]
    return torch.cat(out) if out else torch.empty(0)
