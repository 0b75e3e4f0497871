"""``stitchcache plan``: what an experiment will store and how long it will take, printed before any
work. Needs no weights and no data: models are built random-init (on the ``meta`` device when nothing
is measured, so even ViT-L costs no memory) just to read their shapes, and split sizes come from the
data when it can be opened, else from the split's ``count:``.

Storage is exact arithmetic on the shapes (tested against real stores). GPU time is an estimate on a
*reference accelerator* (``--reference``; ``REFERENCES`` holds the measured numbers and names their
source), scaled from the reference model to each model by FLOPs per image, and bounded by bytes
where bytes are the bound:

* FLOPs of a ViT forward, counted for matrix products only (the part that costs; norms, softmax,
  GELU, biases are < 1 %):  ``F_block = (8 + 4 r) T D^2 + 4 T^2 D``  (qkv 6TD^2, attention
  scores and weighted sum 4T^2D, output projection 2TD^2, MLP 4rTD^2), ``F_embed = 2 G C p^2 D``,
  ``F = F_embed + L F_block``. ``T`` tokens, ``D`` width, ``L`` depth, ``G`` grid cells, ``p`` patch,
  ``C`` channels, ``r`` the MLP ratio read from the model (``(W - 4 D^2) / 2 D^2`` for ``W`` matrix
  weights per block: the ratio a plain GELU MLP with the same weights would have).
* extraction (one store = dataset x model x split): ``N x max(F / (capture img/s x F_ref),
  bytes/img / host copy B/s, bytes/img / write B/s)`` - the pipeline overlaps compute, device->host
  copies and disk writes, so the slowest of the three sets the pace (and is printed as the bound).
* stitch training (one job; an UPPER bound: every learning rate runs ``max_epochs``, early stopping
  ends sooner): ``max_epochs x |lr_grid| x (N_train x t_step + N_val x t_val)``. The FFM step
  (stitch + frozen tail fwd+bwd) is fitted to the reference points as ``t(n) = a + b n`` seconds per
  image for a tail of ``n`` blocks (see ``ffm_fit``; the fit error is printed), scaled per model:
  ``t = a (T D / T_ref D_ref) + b (n F_block + F_extra) / F_block_ref``, with ``F_extra`` the source
  block a LoRA stitch runs. TLT and FFM->TLT cost what FFM costs (their head is tiny); LFM runs no
  backbone: only the stitch (the ``a`` term), so it is bound by reading the cache. Each step is
  ``max(compute, cached bytes read / read B/s)``. The validation pass of every epoch is a forward
  only: per block ``F_block / (forward img/s x F_ref)`` (0.40 of the fitted fwd+bwd per block).
* evaluation (one job): the stitched forward (tail forward) over train + val, exporting final tokens
  (bounded by reading the source tokens and writing the export), then reading the export back for
  the probe (a linear layer on pooled features: negligible compute) and the val arrays for d_l / d_L.
"""
from __future__ import annotations

import argparse
import sys

from .cost import (ITEMSIZE, LABEL_BYTES, REFERENCES, SCALE_BYTES, TRAIN_METHODS, CostModel, block_flops, ffm_fit,
                   forward_flops)
from .estimate import load_config, plan, split_info, split_size, stitch_datasets, stitch_family
from .report import print_plan
from .shapes import build_random_init, measure, model_shape

__all__ = ["ITEMSIZE", "LABEL_BYTES", "REFERENCES", "SCALE_BYTES", "TRAIN_METHODS", "CostModel", "block_flops",
           "build_random_init", "configure_parser", "ffm_fit", "forward_flops", "load_config", "main", "measure",
           "model_shape", "plan", "print_plan", "split_info", "split_size", "stitch_datasets", "stitch_family"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", default="config.yaml")
    p.add_argument("--no-measure", action="store_true", help="skip measuring this machine's throughput")
    p.add_argument("--device", default="auto", help="where to measure (auto | cpu | cuda)")
    p.add_argument("--reference", default="h100", choices=sorted(REFERENCES),
                   help="reference accelerator of the GPU-time estimates")


def main(args) -> int:
    """Config errors (schema and cross-checks, all of them) are one message and exit code 2."""
    from ..config_checks import ConfigErrors, check_config

    print(f"stitchcache plan: {args.configfile}")
    try:
        cfg = load_config(args.configfile)
        check_config(cfg, source=args.configfile)
        p = plan(cfg, do_measure=not args.no_measure, device=args.device, reference=args.reference)
    except (ConfigErrors, FileNotFoundError) as e:
        print(f"stitchcache plan: {e}", file=sys.stderr)
        return 2
    print_plan(p)
    return 0
