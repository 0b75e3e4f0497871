"""One FFM step vs the target tail's forward+backward alone, side by side in one run.

  tail only   loss = mse(tail(h), z) with h requiring grad (the frozen tail's fwd+bwd)
  ffm step    stitch(h) -> tail -> mse to cached final tokens, backward, AdamW step on the stitch

Both read the same cached-token tensors (no source recompute). Goal (issue 5): ratio <= 1.1.
Usage: python benchmarks/ffm_step.py [--width 384] [--depth 12] [--tokens 257] [--batch 64]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from common import save, timed
from stitchcache.backends import create_backbone
from stitchcache.runtime import autocast, pick_device
from stitchcache.stitch.layers import Stitch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6, 10])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per timed measurement")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    patch = 4
    tgt = create_backbone("timm:vit_small_patch16_224", img_size=args.grid * patch, patch_size=patch,
                          embed_dim=args.width, depth=args.depth, num_heads=max(1, args.width // 64)).to(device)
    T, D = tgt.num_tokens, tgt.width
    h = torch.randn(args.batch, T, D, device=device)
    z = torch.randn(args.batch, T, D, device=device)
    stitch = Stitch({"kind": "mlp", "d_in": D, "d_out": D, "src_prefix": 1, "tgt_prefix": 1}).to(device)
    opt = torch.optim.AdamW(stitch.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rows = []
    for l in args.layers:
        def tail_only():
            x = h.detach().requires_grad_(True)
            with autocast(device):
                loss = F.mse_loss(tgt.forward_from(x, l), z)
            loss.backward()

        def ffm_step():
            with autocast(device):
                loss = F.mse_loss(tgt.forward_from(stitch(h), l), z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # alternate the two measurements and keep medians, so load from other processes hits both alike
        tails, ffms = [], []
        for _ in range(args.repeats):
            t, n = timed(tail_only, args.seconds, sync)
            tails.append(n * args.batch / t)
            t, n = timed(ffm_step, args.seconds, sync)
            ffms.append(n * args.batch / t)
        tail_ips, ffm_ips = statistics.median(tails), statistics.median(ffms)
        rows.append({"layer": l, "tail_img_s": round(tail_ips, 1), "ffm_img_s": round(ffm_ips, 1),
                     "ffm_cost_over_tail": round(tail_ips / ffm_ips, 3)})
    save("ffm_step", {"width": args.width, "depth": args.depth, "tokens": T, "batch": args.batch,
                      "dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "rows": rows,
                      "max_ffm_cost_over_tail": max(r["ffm_cost_over_tail"] for r in rows)}, device)


if __name__ == "__main__":
    main()
