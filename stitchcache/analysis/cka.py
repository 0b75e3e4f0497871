"""Linear CKA between every layer of two models, streamed from their feature stores.

Linear CKA (Kornblith et al. 2019) of two representations X (n, Da), Y (n, Db) of the same n
samples, with Xc, Yc centred over the samples::

    CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)

All of it is a function of the per-feature sums and the (cross-)covariance sums, so one pass over
the data accumulates, per chunk of images, ``sum x``, ``sum y``, ``X^T Y`` for every layer pair and
``X^T X`` / ``Y^T Y`` per layer. The result is the exact (biased, full-data) linear CKA, the same
number a direct computation on all n samples gives, independent of chunking and order; memory is
flat in n: ``8 * (sum_a Da + sum_b Db)^2`` bytes of float64 statistics (the cross block and the two
self blocks), whatever the dataset size.

Variants (``VARIANTS``):
- ``pooled``: one sample per image, the mean of its patch tokens (prefix tokens excluded).
- ``token``: one sample per patch token: token i of image k in model A is paired with token i of
  image k in model B (so both models need the same patch grid); prefix tokens (CLS, registers) are
  excluded; centring is over all n_images * n_patches token samples.

Numerics: tokens are converted to float64 and accumulated in float64 after subtracting a fixed
shift (each feature's mean over the first block); CKA is invariant to such a shift, and it keeps
the uncentred sums from cancelling catastrophically when a feature's mean dwarfs its spread.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

VARIANTS = ("pooled", "token")
FINAL = "final"


def array_names(store) -> list[str]:
    """Every layer of a store in order, then ``final``: ``layer_00 … layer_LL, final``."""
    return [f"layer_{l:02d}" for l in store.layers] + [FINAL]


def layer_of(name: str) -> int | None:
    """``layer_06`` -> 6; ``final`` -> None."""
    return None if name == FINAL else int(name[6:])


def _block_size(*arrays) -> int:
    """Images per read: the least common multiple of the arrays' chunk (shard) lengths, so each
    stored chunk of each array is read exactly once; capped at 4096 images (then a multiple of the
    largest chunk)."""
    sizes = []
    for a in arrays:
        z = getattr(a, "q", a)   # QuantizedArray wraps the int8 array
        sizes.append(int((getattr(z, "shards", None) or z.chunks)[0]))
    block = math.lcm(*sizes)
    return block if block <= 4096 else max(sizes) * max(1, 4096 // max(sizes))


def _samples(tokens: np.ndarray, num_prefix: int, variant: str, device="cpu") -> torch.Tensor:
    """(n, T, D) tokens -> (samples, D) float64: pooled (n, D) or per patch token (n * P, D)."""
    # stored dtype to the device first (half the bytes for float16), then float64 there; torch
    # converts float16 several times faster than numpy
    t = torch.as_tensor(np.asarray(tokens)).to(device)[:, num_prefix:]          # (n, P, D)
    if variant == "pooled":
        return t.to(torch.float64).mean(dim=1)                                   # (n, D)
    if variant == "token":
        return t.to(torch.float64).reshape(-1, t.shape[-1])                      # (n * P, D)
    raise ValueError(f"unknown CKA variant {variant!r} (choose from {', '.join(VARIANTS)})")


@dataclass
class CKAStats:
    """Streaming statistics of the stacked features [X_1 | … | X_La] and [Y_1 | … | Y_Lb]."""
    widths_a: list[int]
    widths_b: list[int]
    n: int = 0
    shift_a: torch.Tensor | None = None
    shift_b: torch.Tensor | None = None
    sum_a: torch.Tensor | None = None      # (sum Da,)
    sum_b: torch.Tensor | None = None      # (sum Db,)
    cross: torch.Tensor | None = None      # (sum Da, sum Db): X^T Y of every layer pair at once
    self_a: list = field(default_factory=list)   # per layer (Da, Da): X_i^T X_i
    self_b: list = field(default_factory=list)

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """xs: per A layer (s, Da_i); ys: per B layer (s, Db_j); the same s samples in the same order."""
        x, y = torch.cat(xs, dim=1), torch.cat(ys, dim=1)                 # (s, sum Da), (s, sum Db)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"CKA: {x.shape[0]} samples of model A vs {y.shape[0]} of model B in one block")
        if self.shift_a is None:
            self.shift_a, self.shift_b = x.mean(0), y.mean(0)
            self.sum_a, self.sum_b = torch.zeros_like(self.shift_a), torch.zeros_like(self.shift_b)
            opts = dict(dtype=torch.float64, device=x.device)
            self.cross = torch.zeros(x.shape[1], y.shape[1], **opts)
            self.self_a = [torch.zeros(w, w, **opts) for w in self.widths_a]
            self.self_b = [torch.zeros(w, w, **opts) for w in self.widths_b]
        x, y = x - self.shift_a, y - self.shift_b
        self.n += x.shape[0]
        self.sum_a += x.sum(0)
        self.sum_b += y.sum(0)
        self.cross += x.T @ y
        for acc, part in zip(self.self_a, x.split(self.widths_a, dim=1)):
            acc += part.T @ part
        for acc, part in zip(self.self_b, y.split(self.widths_b, dim=1)):
            acc += part.T @ part

    def matrix(self) -> np.ndarray:
        """(La, Lb) linear CKA of every layer pair."""
        if self.n < 2:
            raise ValueError(f"CKA needs at least 2 samples, got {self.n}")
        n = self.n
        ca = self.cross - torch.outer(self.sum_a, self.sum_b) / n          # Xc^T Yc, all pairs
        sa, sb = self.sum_a.split(self.widths_a), self.sum_b.split(self.widths_b)
        na = torch.stack([torch.linalg.matrix_norm(g - torch.outer(s, s) / n) for g, s in zip(self.self_a, sa)])
        nb = torch.stack([torch.linalg.matrix_norm(g - torch.outer(s, s) / n) for g, s in zip(self.self_b, sb)])
        out = np.empty((len(self.widths_a), len(self.widths_b)))
        for i, rows in enumerate(ca.split(self.widths_a, dim=0)):
            for j, block in enumerate(rows.split(self.widths_b, dim=1)):
                den = na[i] * nb[j]
                out[i, j] = float((block * block).sum() / den) if den > 0 else math.nan
        return out


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (n, D) matrices in one go (the streaming code's reference)."""
    s = CKAStats([x.shape[1]], [y.shape[1]])
    s.update([torch.as_tensor(x, dtype=torch.float64)], [torch.as_tensor(y, dtype=torch.float64)])
    return float(s.matrix()[0, 0])


def check_compatible(a, b, variants) -> None:
    """Cheap checks before reading any token: same images in the same order; for ``token``, equal
    patch grids. Errors name both stores."""
    da, db = a.attrs.get("dataset", {}), b.attrs.get("dataset", {})
    who = f"{a.attrs.get('model_name', '?')} ({a.path}) and {b.attrs.get('model_name', '?')} ({b.path})"
    if a.num_images != b.num_images:
        raise ValueError(f"CKA: {who} hold {a.num_images} vs {b.num_images} images; they must be the same images")
    if da.get("manifest") != db.get("manifest"):
        raise ValueError(f"CKA: {who} were extracted from different image lists (dataset manifest "
                         f"{da.get('manifest')} of {da.get('name')}/{da.get('split')} vs {db.get('manifest')} of "
                         f"{db.get('name')}/{db.get('split')}); CKA pairs image k of one with image k of the other")
    if "token" in variants:
        ga, gb = a.attrs["model"]["grid"], b.attrs["model"]["grid"]
        if list(ga) != list(gb):
            raise ValueError(f"CKA variant 'token' pairs patch token i of one model with patch token i of the "
                             f"other and needs equal grids; {who} have grids {ga} and {gb} (use --variants pooled; in the "
                             "workflow: analysis.cka_variants: [pooled])")


SAMPLE_BUDGET = 256 * 2**20   # bytes of float64 samples (all arrays together) per update


def store_cka(a, b, variants=VARIANTS, device="cpu", log=print) -> dict:
    """Linear CKA between every array (layers, final) of store ``a`` and of store ``b``.

    One pass: each block of images is read once per array (kept in the stored dtype) and feeds
    every variant; the token variant is fed in sub-blocks of at most SAMPLE_BUDGET bytes of samples.
    Peak memory: one block of every array of both stores + the statistics (logged at the start).
    Returns {"names_a", "names_b", "n_samples": {variant: n}, "cka": {variant: (La, Lb) array}}.
    """
    variants = list(dict.fromkeys(variants))
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown CKA variant {v!r} (choose from {', '.join(VARIANTS)})")
    check_compatible(a, b, variants)
    names_a, names_b = array_names(a), array_names(b)
    arrs_a, arrs_b = [a.array(n) for n in names_a], [b.array(n) for n in names_b]
    pa, pb = int(a.attrs["model"]["num_prefix_tokens"]), int(b.attrs["model"]["num_prefix_tokens"])
    wa, wb = [int(x.shape[-1]) for x in arrs_a], [int(x.shape[-1]) for x in arrs_b]
    stats = {v: CKAStats(wa, wb) for v in variants}
    mb = 8 * len(variants) * (sum(wa) * sum(wb) + sum(w * w for w in wa) + sum(w * w for w in wb)) / 2**20
    N, block = a.num_images, _block_size(*arrs_a, *arrs_b)
    patches = int(arrs_a[0].shape[1]) - pa
    sub_images = max(1, SAMPLE_BUDGET // (8 * patches * (sum(wa) + sum(wb))))
    log(f"cka: {a.attrs.get('model_name')} ({len(names_a)} arrays) x {b.attrs.get('model_name')} "
        f"({len(names_b)} arrays), {N} images, variants {', '.join(variants)}; statistics {mb:.1f} MiB, "
        f"blocks of {block} images")
    t0, last = time.time(), time.time()
    for start in range(0, N, block):
        stop = min(N, start + block)
        toks_a = [x[start:stop] for x in arrs_a]   # (n, T, D) each, read once
        toks_b = [x[start:stop] for x in arrs_b]
        for v in variants:
            step = (stop - start) if v == "pooled" else sub_images
            for s in range(0, stop - start, step):
                stats[v].update([_samples(t[s:s + step], pa, v, device) for t in toks_a],
                                [_samples(t[s:s + step], pb, v, device) for t in toks_b])
        if time.time() - last > 10 or stop == N:
            last = time.time()
            log(f"cka: {stop}/{N} images ({stop / max(last - t0, 1e-9):.0f} img/s)")
    return {"names_a": names_a, "names_b": names_b, "n_samples": {v: stats[v].n for v in variants},
            "cka": {v: stats[v].matrix() for v in variants}}
