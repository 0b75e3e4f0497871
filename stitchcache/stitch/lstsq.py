"""Closed-form (least-squares) initialisation of the Linear stitch from cached features.

    min_{W, b}  sum over training images and tokens  || P(h_s) W + b - h_t ||^2  +  lam ||W||^2

P is the stitch's prefix policy (``PrefixMap``: the Linear stitch sees prefix-mapped source tokens),
h_s / h_t the cached source / target tokens at layer l. The sums X^T X, X^T Y, sum X, sum Y are
accumulated in float64 over streamed batches (``cache.iter_batches``: memory O(D^2), never the whole
split); the problem is solved centred, so the bias is not regularised:

    C_xx = X^T X - n m_x m_x^T,   C_xy = X^T Y - n m_x m_y^T
    W = (C_xx + lam I)^-1 C_xy,   b = m_y - m_x W,   lam = ridge * trace(C_xx) / D_s   (ridge 1e-4)
"""
from __future__ import annotations

import torch

from ..cache import iter_batches


@torch.no_grad()
def lstsq_linear(src, tgt, prefix=None, batch_size: int = 64, ridge: float = 1e-4):
    """src, tgt: arrays (N, T_s, D_s) / (N, T_t, D_t) (zarr or numpy); prefix: module mapping source
    tokens to the target token layout (None: tokens already correspond). Returns (weight (D_t, D_s),
    bias (D_t,)) float32, ready for ``nn.Linear(D_s, D_t)``."""
    xtx = xty = sx = sy = None
    n = 0
    for hs, ht in iter_batches([src, tgt], batch_size):
        if prefix is not None:
            hs = prefix(hs)
        if hs.shape[1] != ht.shape[1]:
            raise ValueError(f"lstsq: {hs.shape[1]} source tokens (after the prefix map) vs {ht.shape[1]} target tokens")
        x = hs.reshape(-1, hs.shape[-1]).double()
        y = ht.reshape(-1, ht.shape[-1]).double()
        if xtx is None:
            xtx, xty = x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1], y.shape[1])
            sx, sy = x.new_zeros(x.shape[1]), x.new_zeros(y.shape[1])
        xtx += x.t() @ x
        xty += x.t() @ y
        sx += x.sum(0)
        sy += y.sum(0)
        n += x.shape[0]
    if n == 0:
        raise ValueError("lstsq: no training tokens")
    mx, my = sx / n, sy / n
    cxx = xtx - n * torch.outer(mx, mx)
    cxy = xty - n * torch.outer(mx, my)
    d = cxx.shape[0]
    lam = ridge * torch.trace(cxx) / d + 1e-12  # (floor: constant features)
    w = torch.linalg.solve(cxx + lam * torch.eye(d, dtype=cxx.dtype), cxy)  # (D_s, D_t)
    b = my - mx @ w
    return w.t().contiguous().float(), b.float()
