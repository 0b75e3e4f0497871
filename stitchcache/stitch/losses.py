"""The training objectives (PROTOCOL.md). All distances are mean squared error per element."""
from __future__ import annotations

import torch.nn.functional as F

METHODS = ("lfm", "ffm", "tlt", "ffm_tlt")


def lfm_loss(stitch, h_src, h_tgt_l):
    """Layer feature matching: || s(S_l(x)) - T_l(x) ||^2 — needs no backbone at all."""
    return F.mse_loss(stitch(h_src), h_tgt_l)


def ffm_loss(tail, h_src, z_tgt):
    """Final feature matching: || T_{l->L}(s(S_l(x))) - T_final(x) ||^2 over all final tokens."""
    return F.mse_loss(tail(h_src), z_tgt)


def tlt_loss(tail, head, h_src, labels):
    """Task loss: cross-entropy of a linear head on the pooled stitched final tokens."""
    return F.cross_entropy(head(tail(h_src)), labels)
