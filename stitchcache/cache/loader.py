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
import sys
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
    layout = _direct_layout(x)
    if layout is not None:
        return lambda a, b, perm=None: _read_direct(x, layout, a, b, perm)
    if not isinstance(x, np.ndarray) and x.nbytes <= _WHOLE_BYTES:
        # small arrays through zarr (labels: zstd, 8 bytes per image): one getitem per pass, not per
        # block (each costs ~0.7 ms, a quarter of a pass over a 0.8 GB store on fast memory)
        whole: list[np.ndarray] = []

        def read_small(a, b, perm=None):
            if not whole:
                whole.append(np.asarray(x[:]))
            d = whole[0][a:b]
            return d.copy() if perm is None else np.take(d, perm, axis=0)

        return read_small

    def read(a, b, perm=None):
        d = np.asarray(x[a:b])
        return d if perm is None else np.take(d, perm, axis=0)

    return read


_WHOLE_BYTES = 64 << 20  # arrays at most this big are read whole, once per pass (memory stays bounded)


# ---- direct chunk reads -----------------------------------------------------------------------
# zarr 3's synchronous getitem runs each read as a coroutine on its event-loop thread, reads the
# chunk file into a fresh bytes object and copies it into a zero-filled output: about half the speed
# of reading the same file into a numpy array (benchmarks/read_throughput.py). Chunks that are plain
# files of C-order rows (local store, bytes codec only, no sharding, native byte order) are read
# here with one preadv per chunk that lands each row directly at its permuted position: one copy,
# sequential in the file. Anything else, and any chunk file that is missing (fill value), goes
# through zarr.
_IOV_MAX = 1024


def _direct_layout(x) -> tuple[str, int] | None:
    """(directory of the array, bytes per row) when x's chunks can be read as raw files, else None."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr 2
        return None
    md, store = getattr(x, "metadata", None), getattr(x, "store", None)
    if getattr(md, "zarr_format", None) != 3 or not isinstance(store, LocalStore) or x.shards is not None:
        return None
    codecs = tuple(md.codecs)
    if len(codecs) != 1 or type(codecs[0]) is not BytesCodec or len(x.shape) == 0:
        return None
    dt = np.dtype(x.dtype)
    if dt.kind not in "biuf" or not dt.isnative:
        return None
    if dt.itemsize > 1 and getattr(codecs[0].endian, "value", None) != sys.byteorder:
        return None
    if tuple(x.chunks[1:]) != tuple(x.shape[1:]):  # a chunk must hold whole rows
        return None
    return os.path.join(str(store.root), x.path), dt.itemsize * int(np.prod(x.shape[1:], dtype=np.int64))


def _read_direct(x, layout, a: int, b: int, perm=None) -> np.ndarray:
    """Rows a..b of x (out[i] = x[a + perm[i]] when perm is given), chunk files read with preadv."""
    root, row_bytes = layout
    out = np.empty((b - a, *x.shape[1:]), dtype=x.dtype)
    if b <= a:
        return out
    dest = np.arange(b - a) if perm is None else np.argsort(perm)  # row a + r goes to out[dest[r]]
    flat = out.reshape(b - a, -1).view(np.uint8)
    C = x.chunks[0]
    for ci in range(a // C, -(-b // C)):
        lo, hi = max(a, ci * C), min(b, (ci + 1) * C)
        path = os.path.join(root, x.metadata.encode_chunk_key((ci,) + (0,) * (len(x.shape) - 1)))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # never written: zarr returns the fill value
            chunk = np.asarray(x[lo:hi])
            out[dest[lo - a:hi - a]] = chunk
            continue
        try:
            for s in range(lo, hi, _IOV_MAX):
                e = min(hi, s + _IOV_MAX)
                got = os.preadv(fd, [flat[j] for j in dest[s - a:e - a]], (s - ci * C) * row_bytes)
                if got != (e - s) * row_bytes:
                    raise OSError(f"{path}: chunk file is short ({got} of {(e - s) * row_bytes} bytes at row "
                                  f"{s - ci * C}); the store is damaged")
        finally:
            os.close(fd)
    return out


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
