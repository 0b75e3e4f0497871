"""Model shapes for the plan: the config's models built random-init (on the ``meta`` device when
nothing is measured) just to read their shapes, and this machine's capture throughput."""
from __future__ import annotations

import time

import torch

from .cost import block_flops, forward_flops


def model_shape(bb) -> dict:
    """What the estimates need from a built backbone (its parameters may live on the meta device)."""
    D = bb.width
    ratio, how = 4.0, "assumed (no block list)"
    try:
        from ..stitch.lora import block_list

        blk = block_list(bb)[0]
        weights = sum(p.numel() for p in blk.parameters() if p.dim() == 2)
        ratio, how = (weights / (D * D) - 4) / 2, "read"
    except (NotImplementedError, ImportError, IndexError):
        pass
    gh, gw = bb.grid
    shape = {"tokens": bb.num_tokens, "width": D, "depth": bb.depth, "mlp_ratio": ratio, "mlp_ratio_from": how,
             "patch_size": bb.patch_size, "channels": bb.preprocess.channels, "grid_cells": gh * gw,
             "image_size": tuple(bb.image_size), "num_prefix_tokens": bb.num_prefix_tokens}
    shape["block_flops"] = block_flops(shape["tokens"], D, ratio)
    shape["forward_flops"] = forward_flops(shape)
    return shape


def build_random_init(name: str, model: dict, weights_root=None, meta: bool = True):
    """The config's model as a random-init backbone: registry names resolve to their library
    architecture (their weights need not exist). ``meta``: parameters on the meta device (no memory,
    no init time; the same memoised build the config checks made, ``backends.check``)."""
    from ..backends import create_backbone
    from ..backends.check import meta_backbone
    from ..inputs import concrete_model_spec

    spec = concrete_model_spec(name, model, weights_root=weights_root)
    if meta:
        return meta_backbone(spec)
    return create_backbone(spec["backbone"], checkpoint=None, **spec["kwargs"])


def measure(bb, layers: list[int], device: torch.device, batch: int) -> float:
    """Images per second of a capture forward on this machine (random pixels, no disk)."""
    bb = bb.to(device)
    x = torch.randn(batch, bb.preprocess.channels, *bb.image_size, device=device)
    capture = sorted(set(layers) | {bb.depth})
    with torch.inference_mode():
        bb.forward_layers(x, capture)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            hs = bb.forward_layers(x, capture)
            bb.final_norm(hs[bb.depth]).float().cpu()
            n += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)

