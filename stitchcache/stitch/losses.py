"""The training objectives (PROTOCOL.md). All distances are mean squared error per element."""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("lfm", "ffm", "tlt", "ffm_tlt")


MATCH_TOKENS = ("all", "patch")


def match_skip(match_tokens: str, num_prefix: int) -> int:
    """Leading (prefix) target tokens the matching losses and distances skip: 0 for ``all``, the
    target's prefix count (CLS, registers) for ``patch`` (train.match_tokens)."""
    if match_tokens not in MATCH_TOKENS:
        raise ValueError(f"train.match_tokens must be one of {' | '.join(MATCH_TOKENS)}, got {match_tokens!r}")
    return int(num_prefix) if match_tokens == "patch" else 0


def lfm_loss(stitch, h_src, h_tgt_l, skip: int = 0):
    """Layer feature matching: || s(S_l(x)) - T_l(x) ||^2 — needs no backbone at all.
    ``skip``: leading target tokens left out (``match_skip``); (B, T, D) -> mean over (B, T - skip, D)."""
    return F.mse_loss(stitch(h_src)[:, skip:], h_tgt_l[:, skip:])


def ffm_loss(tail, h_src, z_tgt, skip: int = 0):
    """Final feature matching: || T_{l->L}(s(S_l(x))) - T_final(x) ||^2 over the final tokens
    (all, or the patch tokens with ``skip`` = the target's prefix count)."""
    return F.mse_loss(tail(h_src)[:, skip:], z_tgt[:, skip:])


def tlt_loss(tail, head, h_src, labels):
    """Task loss: cross-entropy of a linear head on the pooled stitched final tokens."""
    return F.cross_entropy(head(tail(h_src)), labels)


class ChannelVariance:
    """Streaming per-channel variance of (B, T, D) tokens over images and tokens (float64 sums); its
    mean over channels is the scale of the relative distances (d_rel = MSE / variance, 1.0 = predicting
    the mean) and of ``train.min_delta_var``."""

    def __init__(self):
        self.s = self.s2 = None
        self.n = 0

    def update(self, x):
        x = x.reshape(-1, x.shape[-1]).double()
        s, s2 = x.sum(0), (x * x).sum(0)
        self.s, self.s2 = (s, s2) if self.s is None else (self.s + s, self.s2 + s2)
        self.n += x.shape[0]

    def mean_variance(self) -> float:
        mean = self.s / self.n
        return float((self.s2 / self.n - mean * mean).clamp_min(0).mean())


def token_variance(batches, skip: int = 0) -> float:
    """Mean per-channel variance of the tokens of ``batches`` ((B, T, D) tensors, ``skip`` leading tokens left out)."""
    var = ChannelVariance()
    for (x,) in batches:
        var.update(torch.as_tensor(x)[:, skip:].float())
    return var.mean_variance() if var.n else float("nan")
