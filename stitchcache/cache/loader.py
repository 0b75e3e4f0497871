"""Streaming readers: chunk-sized blocks in shuffled order (rows shuffled within the block).

Random row access into Zarr is ~20x slower than reading whole chunks (notes/snakemake-zarr.md), so
training reads one block of whole chunks at a time; memory is a block plus the one read ahead,
flat in dataset size.

- ``iter_batches``: in-process generator (what training and evaluation use).
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
    prefetch: blocks read ahead by a background thread while the current one is consumed (0 = off).
    """
    n = _check_lengths(arrays)
    if block is None:
        block = default_block(arrays, batch_size)
    rng = np.random.default_rng(seed)
    ranges = block_ranges(n, block)
    if shuffle:
        ranges = [ranges[i] for i in rng.permutation(len(ranges))]
    blocks = _read_blocks(arrays, ranges)
    if prefetch > 0 and len(ranges) > 1:
        blocks = _prefetched(blocks, prefetch)
    yield from batches_from_blocks(blocks, batch_size, shuffle=shuffle, rng=rng, dtype=dtype, drop_last=drop_last)


def _check_lengths(arrays: Sequence) -> int:
    n = arrays[0].shape[0]
    for a in arrays:
        if a.shape[0] != n:
            raise ValueError(f"arrays disagree on the number of images: {[x.shape[0] for x in arrays]}")
    return n


def _read_blocks(arrays: Sequence, ranges: Iterable[tuple[int, int]]) -> Iterator[list[np.ndarray]]:
    for a, b in ranges:
        yield [np.asarray(x[a:b]) for x in arrays]


def _prefetched(it: Iterator, depth: int) -> Iterator:
    """Run `it` in a background thread, at most `depth` items ahead (file reads release the GIL).
    Stops the thread when the consumer stops early."""
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


def batches_from_blocks(blocks: Iterable[list[np.ndarray]], batch_size: int, *, shuffle: bool,
                        rng: np.random.Generator, dtype=torch.float32,
                        drop_last: bool = False) -> Iterator[list[torch.Tensor]]:
    """Cut a stream of blocks (lists of same-length arrays) into batches; with shuffle, rows are
    gathered in a random order within each block (one copy per row, no whole-block permute and no
    re-concatenation of leftovers: only the batch straddling two blocks is assembled)."""
    carry: list[np.ndarray] | None = None
    for data in blocks:
        m = data[0].shape[0]
        perm = rng.permutation(m) if shuffle else None
        i = 0
        if carry is not None:
            take = min(batch_size - carry[0].shape[0], m)
            carry = [np.concatenate([c, _rows(d, perm, 0, take)]) for c, d in zip(carry, data)]
            i = take
            if carry[0].shape[0] < batch_size:
                continue
            yield [_to_tensor(c, dtype) for c in carry]
            carry = None
        while i + batch_size <= m:
            yield [_to_tensor(_rows(d, perm, i, i + batch_size), dtype) for d in data]
            i += batch_size
        if i < m:
            carry = [np.array(_rows(d, perm, i, m)) for d in data]
    if carry is not None and carry[0].shape[0] and not drop_last:
        yield [_to_tensor(c, dtype) for c in carry]


def _rows(d: np.ndarray, perm: np.ndarray | None, a: int, b: int) -> np.ndarray:
    if perm is None:
        return d[a:b]
    return np.take(d, perm[a:b], axis=0)


def _to_tensor(x: np.ndarray, dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype) if t.is_floating_point() else t.long()


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
        blocks = _read_blocks(arrays, mine)
        if self.prefetch > 0 and len(mine) > 1:
            blocks = _prefetched(blocks, self.prefetch)
        rng = np.random.default_rng([self.seed, self.epoch, worker, 1])
        yield from batches_from_blocks(blocks, self.batch_size, shuffle=self.shuffle, rng=rng,
                                       dtype=self.dtype, drop_last=self.drop_last)


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
