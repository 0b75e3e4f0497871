"""VST-k forward vs its parts, and Full vs VST-k, measured side by side in one run.

ratio_vs_parts = t(VST-k forward) / [t(trunk 1..k) + sum over branches t(stitch + tail k+1..L)]
(the trunk's own tail counts as a branch without a stitch). Goal: <= 1.05 — the tree adds nothing
beyond its parts. Full vs VST-k: latency and peak memory of every VFM end to end against the tree
(tree/cost.py ``measure``). Rounds alternate the configurations and report medians, so drift of
the machine's speed hits all of them alike.

  python benchmarks/tree_forward.py                       # CPU geometry (ViT width 192, 12 blocks)
  python benchmarks/tree_forward.py --width 1024 --depth 24 --img 224 --patch 14 --heads 16 \
      --batch 64 --points 6 14 22 --device cuda           # ViT-L/14 at 224 px (random init) on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import device_name, save
from stitchcache.backends import create_backbone
from stitchcache.stitch.layers import Stitch, make_stitch_config
from stitchcache.tree import StitchTree, TreeOptions
from stitchcache.tree.cost import measure


def build(args, device):
    kw = dict(img_size=args.img, patch_size=args.patch, embed_dim=args.width, depth=args.depth, num_heads=args.heads)
    models = []
    for i in range(args.vfms):
        torch.manual_seed(i)
        bb = create_backbone("timm:vit_small_patch16_224", **kw)
        with torch.no_grad():  # different weights per VFM (create_backbone seeds random init alike)
            for p in bb.parameters():
                p.add_(0.01 * torch.randn_like(p))
        models.append(bb.to(device))
    return models


def tree_at(models, k):
    trunk = models[0]
    branches = {}
    for i, bb in enumerate(models[1:], 1):
        cfg = make_stitch_config("mlp", trunk.describe(), bb.describe())
        branches[f"vfm{i}"] = (Stitch(cfg).to(next(bb.parameters()).device).eval(), bb)
    return StitchTree(trunk, k, branches, "vfm0", TreeOptions(fusion="tuple", select_feature="cls_patch")).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--vfms", type=int, default=2)
    p.add_argument("--points", type=int, nargs="+", default=[3, 6, 9, 11])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = build(args, device)
    px = torch.randn(args.batch, 3, args.img, args.img, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    rows = []
    for k in args.points:
        tree = tree_at(models, k)
        with torch.no_grad(), amp:
            h_k = tree.trunk_tokens(px)
            stitched = {n: tree.stitches[n](h_k) for n in tree.names[1:]}

            def vst():
                tree.branch_tokens(tree.trunk_tokens(px))

            parts = {"trunk 1..k": lambda: tree.trunk_tokens(px),
                     **{f"{n} tail": (lambda n=n: tree._head(n, h_k)) for n in tree.names[:1]},
                     **{f"{n} stitch": (lambda n=n: tree.stitches[n](h_k)) for n in tree.names[1:]},
                     **{f"{n} tail": (lambda n=n: tree._head(n, stitched[n])) for n in tree.names[1:]}}
            vst()
            [f() for f in parts.values()]  # warm-up
            t_vst, t_parts = [], {name: [] for name in parts}
            for _ in range(args.rounds):  # alternate: drift hits both alike
                t_vst.append(time_once(vst, device))
                for name, f in parts.items():
                    t_parts[name].append(time_once(f, device))
        med = statistics.median(t_vst)
        med_parts = {n: statistics.median(v) for n, v in t_parts.items()}
        m = measure(tree, batch_size=args.batch, repeats=args.rounds, device=device)
        c = m["configs"]
        row = {"k": k, "vst_s": med, "parts_s": med_parts, "sum_parts_s": sum(med_parts.values()),
               "ratio_vs_parts": med / sum(med_parts.values()),
               "full_vs_vst_latency": c["full"]["latency_s"] / c["vst"]["latency_s"],
               "full_vs_vst_peak_memory": c["full"]["peak_bytes"] / c["vst"]["peak_bytes"],
               "full_vs_vst_params": c["full"]["params"] / c["vst"]["params"],
               "vst_vs_single_flops": c["vst"]["flops_ratio"], "full_vs_single_flops": c["full"]["flops_ratio"],
               "analytic_extra": m["analytic_extra"], "measured_extra_flops": m["measured_extra_flops"]}
        rows.append(row)
        print(f"k={k}: VST {1e3 * med:.1f} ms vs parts {1e3 * row['sum_parts_s']:.1f} ms -> {row['ratio_vs_parts']:.3f}; "
              f"Full/VST latency {row['full_vs_vst_latency']:.2f}, peak activations {row['full_vs_vst_peak_memory']:.2f}, "
              f"params {row['full_vs_vst_params']:.2f}")
    save("tree_forward", {"geometry": vars(args), "device_detail": device_name(device), "rows": rows,
                          "goal": "ratio_vs_parts <= 1.05", "max_ratio_vs_parts": max(r["ratio_vs_parts"] for r in rows)},
         device)


if __name__ == "__main__":
    main()
