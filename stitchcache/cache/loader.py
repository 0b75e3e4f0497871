"""Streaming readers: chunk-sized blocks in shuffled order (rows shuffled within the block).

Random row access into Zarr is ~20x slower than reading whole chunks (notes/snakemake-zarr.md), so
training reads one block of whole chunks at a time; memory is one block, flat in dataset size.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


def block_ranges(n: int, block: int) -> list[tuple[int, int]]:
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def iter_batches(arrays: Sequence, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 block: int | None = None, dtype=torch.float32) -> Iterator[list[torch.Tensor]]:
    """Yield lists of tensors, one per array, holding the same images.

    arrays: zarr arrays (or numpy arrays) with equal first dimension (image index).
    block:  images read at once (default: the first array's chunk length, at least batch_size).
    """
    n = arrays[0].shape[0]
    for a in arrays:
        if a.shape[0] != n:
            raise ValueError(f"arrays disagree on the number of images: {[x.shape[0] for x in arrays]}")
    if block is None:
        chunk = getattr(arrays[0], "chunks", (n,))[0]
        block = max(chunk, batch_size)
        block = -(-block // chunk) * chunk  # whole chunks
    rng = np.random.default_rng(seed)
    ranges = block_ranges(n, block)
    if shuffle:
        ranges = [ranges[i] for i in rng.permutation(len(ranges))]
    carry: list[np.ndarray] | None = None
    for a, b in ranges:
        data = [np.asarray(x[a:b]) for x in arrays]
        if shuffle:
            perm = rng.permutation(b - a)
            data = [d[perm] for d in data]
        if carry is not None:
            data = [np.concatenate([c, d]) for c, d in zip(carry, data)]
            carry = None
        m = data[0].shape[0]
        full = m - m % batch_size
        for i in range(0, full, batch_size):
            yield [_to_tensor(d[i : i + batch_size], dtype) for d in data]
        if full < m:
            carry = [d[full:] for d in data]
    if carry is not None and carry[0].shape[0]:
        yield [_to_tensor(d, dtype) for d in carry]


def _to_tensor(x: np.ndarray, dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype) if t.is_floating_point() else t.long()


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
