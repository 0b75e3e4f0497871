"""GPU-seconds of the paper's grid: the cached pipeline vs a naive one that runs both VFMs every step.

  cached   what ``stitchcache plan`` estimates (stitchcache/plan): extract every model x split once;
           LFM from the cache (no backbone); FFM / TLT / FFM->TLT run the stitch and the frozen target
           tail l+1..L per step; evaluation runs the tail over cached source tokens
  naive    no cache: every training step and every evaluation pass recomputes what the cache holds by
           running BOTH VFMs, the source head 1..l and the whole target 1..L (frozen, forward only),
           then the same trainable part as the cached step (stitch + tail fwd+bwd, or the stitch alone
           for LFM); base-model probes run one full forward per image
  minimal  the naive pipeline recomputing only what each step needs (LFM: both heads 1..l; FFM: the
           source head and the whole target; TLT: the source head; evaluation: the source head, and
           the whole target on the val split for d_l / d_L): a lower bound of any cache-free pipeline

Every number comes from the plan's cost model (``CostModel``: FLOPs of a ViT forward scaled from the
reference accelerator's measurements; the stitch + tail step fitted to its FFM steps), on the same
grid, split sizes and epochs as ``stitchcache plan`` (training at max_epochs x |lr_grid|: an upper
bound on both sides). Image decoding (CPU) and the naive pipeline's image reads are not counted.

``--measure``: one training step of each kind timed naive vs cached on this machine at a reduced
ViT (random init), next to the cost model's prediction for the same shapes, so the per-step ratios
that scale the grid's table are checked against a clock. Goal (issue 15): total ratio >= 5.
Usage: python benchmarks/grid_cost.py [--configfile config/paper.yaml] [--measure --device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import save, timed
from stitchcache.grid import stitch_seeds
from stitchcache.plan import CostModel, forward_flops, load_config, plan, stitch_datasets, stitch_family

ROOT = Path(__file__).resolve().parents[1]
GOAL = 5.0
METHODS = ("lfm", "ffm", "tlt", "ffm_tlt")


# ---- the cost model side -------------------------------------------------------------------------
def head_forward(cost: CostModel, shape: dict, blocks: int) -> float:
    """Seconds per image of a frozen forward through the embedding and blocks 1..``blocks``."""
    return cost.forward({"forward_flops": forward_flops({**shape, "depth": blocks})})


def recompute(cost: CostModel, S: dict, T: dict, l: int, method: str, minimal: bool) -> float:
    """Seconds per image a cache-free training step spends recomputing what the cache would hold."""
    src = head_forward(cost, S, l)
    if not minimal:
        return src + head_forward(cost, T, T["depth"])
    if method == "lfm":
        return src + head_forward(cost, T, l)
    if method == "ffm":
        return src + head_forward(cost, T, T["depth"])
    return src  # tlt, ffm_tlt: labels only


def grid_pairs(cfg: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """(models used, stitch pairs): the config's pairs plus the self-stitch controls, as the plan counts them."""
    st = cfg["stitch"]
    used = [m for m in cfg["models"] if any(m in p for p in st["pairs"])]
    pairs = [tuple(p) for p in st["pairs"]] + ([(m, m) for m in used] if st.get("self_stitch", True) else [])
    return used, list(dict.fromkeys(pairs))


def grid_cost(cfg: dict, reference: str = "h100") -> dict:
    """Per stage GPU-seconds of the cached pipeline (``plan``) and of the naive and minimal ones."""
    p = plan(cfg, do_measure=False, reference=reference)
    cost = CostModel(reference)
    shapes, st = p["shapes"], cfg["stitch"]
    used, pairs = grid_pairs(cfg)
    epochs, seeds = p["epochs_x_lrs"], len(stitch_seeds(cfg))
    stages = ["extract", *[f"train {m}" for m in st.get("methods", METHODS)], "evaluate"]
    naive = {k: 0.0 for k in stages}
    minimal = {k: 0.0 for k in stages}
    for d in stitch_datasets(st):
        imgs = p["datasets"][d]["images"]
        Ntr, Nva = imgs["train"] or 0, imgs["val"] or 0
        for name in used:  # base-model probes: one full forward per train + val image
            full = head_forward(cost, shapes[name], shapes[name]["depth"])
            naive["evaluate"] += (Ntr + Nva) * full
            minimal["evaluate"] += (Ntr + Nva) * full
        for src, tgt in pairs:
            S, T = shapes[src], shapes[tgt]
            for l in st.get("layers", [1]):
                tail = T["depth"] - l
                for choice in st.get("stitch_layers", ["mlp"]):
                    extra = S["block_flops"] if stitch_family(choice)[0] == "lora" else 0.0
                    for method in st.get("methods", METHODS):
                        n = 0 if method == "lfm" else tail
                        step, val = cost.step(T, n, extra), cost.step_forward(T, n, extra)
                        for out, mini in ((naive, False), (minimal, True)):
                            r = recompute(cost, S, T, l, method, mini)
                            out[f"train {method}"] += seeds * epochs * (Ntr * (step + r) + Nva * (val + r))
                        export = cost.step_forward(T, tail, extra)  # the stitched forward over train + val
                        src_head, tgt_full = head_forward(cost, S, l), head_forward(cost, T, T["depth"])
                        naive["evaluate"] += seeds * (Ntr + Nva) * (export + src_head + tgt_full)
                        minimal["evaluate"] += seeds * ((Ntr + Nva) * (export + src_head) + Nva * tgt_full)
    g = p["gpu_hours"]
    cached = {"extract": g["extract"] * 3600, "evaluate": g["evaluate"] * 3600,
              **{f"train {m}": h * 3600 for m, h in g["train"].items()}}
    if g["pretrain"]:  # the same on both sides
        for side in (cached, naive, minimal):
            side["pretrain"] = g["pretrain"] * 3600
        stages.insert(0, "pretrain")
    rows = [_row(k, cached[k], naive[k], minimal[k]) for k in stages]
    rows.append(_row("total", sum(cached.values()), sum(naive.values()), sum(minimal.values())))
    return {"rows": rows, "total_ratio": rows[-1]["naive_over_cached"],
            "total_ratio_minimal": rows[-1]["minimal_over_cached"], "goal": GOAL,
            "goal_met": rows[-1]["naive_over_cached"] >= GOAL, "stitch_jobs": p["stitch_jobs"],
            "plan_total_gpu_s": g["total"] * 3600, "epochs_x_lrs": epochs, "seeds": seeds,
            "reference": p["reference"]["name"],
            "reference_device": p["reference"]["device"]}


def _row(stage: str, cached: float, naive: float, minimal: float) -> dict:
    def ratio(x):
        return round(x / cached, 2) if cached else None

    return {"stage": stage, "cached_gpu_s": round(cached, 1), "naive_gpu_s": round(naive, 1),
            "naive_over_cached": ratio(naive), "minimal_gpu_s": round(minimal, 1),
            "minimal_over_cached": ratio(minimal)}


def print_table(res: dict) -> None:
    print(f"GPU time per stage ({res['stitch_jobs']} stitch jobs, {res['epochs_x_lrs']} epochs x lrs, "
          f"{res['seeds']} seed(s); reference {res['reference_device']})")
    print("| stage | cached GPU-h | naive GPU-h | naive ÷ cached | minimal GPU-h | minimal ÷ cached |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        def f(x):
            return "-" if x is None else f"{x:.2f}"

        print(f"| {r['stage']} | {r['cached_gpu_s'] / 3600:.1f} | {r['naive_gpu_s'] / 3600:.1f} | "
              f"{f(r['naive_over_cached'])} | {r['minimal_gpu_s'] / 3600:.1f} | {f(r['minimal_over_cached'])} |")
    print(f"total naive ÷ cached = {res['total_ratio']:.2f} (goal >= {GOAL:g}: "
          f"{'met' if res['goal_met'] else 'NOT met'}); minimal recompute ÷ cached = {res['total_ratio_minimal']:.2f}")


# ---- the measured side ---------------------------------------------------------------------------
def _vit(width: int, depth: int, img: int, patch: int, seed: int, device: torch.device) -> torch.nn.Module:
    from stitchcache.backends import create_backbone

    torch.manual_seed(seed)
    bb = create_backbone("timm:vit_small_patch16_224", img_size=img, patch_size=patch, embed_dim=width,
                         depth=depth, num_heads=max(1, width // 64))
    return bb.freeze().to(device)


def measure_steps(device: torch.device, width: int, depth: int, img: int, patch: int, batch: int,
                  layers: list[int], seconds: float, repeats: int, reference: str = "h100") -> list[dict]:
    """One training step of each method, naive (both VFMs from pixels, then the step) vs cached (the step
    on tokens already on the device), alternated ``repeats`` times; medians, and the cost model's
    prediction of the same ratio for these shapes (compute only: the cached step's reads are not timed)."""
    from stitchcache.plan import model_shape
    from stitchcache.runtime import autocast
    from stitchcache.stitch.layers import Stitch
    from stitchcache.stitch.losses import ffm_loss, lfm_loss, tlt_loss

    src, tgt = _vit(width, depth, img, patch, 0, device), _vit(width, depth, img, patch, 1, device)
    cost, S, T = CostModel(reference), model_shape(src), model_shape(tgt)
    L = tgt.depth
    x = torch.randn(batch, 3, img, img, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def tokens(l):
        with torch.no_grad(), autocast(device):
            hs, ht = src.forward_layers(x, [l]), tgt.forward_layers(x, [l, L])
            return hs[l], ht[l], tgt.final_norm(ht[L])

    rows = []
    for l in layers:
        cached_in = tokens(l)
        for method in ("lfm", "ffm", "tlt"):
            torch.manual_seed(0)
            stitch = Stitch({"kind": "mlp", "d_in": src.width, "d_out": tgt.width,
                             "src_prefix": src.num_prefix_tokens, "tgt_prefix": tgt.num_prefix_tokens}).to(device)
            head = torch.nn.Linear(tgt.width, 10).to(device)
            opt = torch.optim.AdamW([*stitch.parameters(), *head.parameters()], lr=1e-4)

            def tail(h, stitch=stitch, l=l):
                return tgt.forward_from(stitch(h), l)

            def train(h_src, h_tl, z, method=method, stitch=stitch, head=head, opt=opt, tail=tail):
                with autocast(device):
                    if method == "lfm":
                        loss = lfm_loss(stitch, h_src, h_tl)
                    elif method == "ffm":
                        loss = ffm_loss(tail, h_src, z)
                    else:
                        loss = tlt_loss(tail, lambda zz: head(zz.mean(1)), h_src, labels)
                opt.zero_grad(set_to_none=True)
                loss.float().backward()
                opt.step()

            def cached(train=train, cached_in=cached_in):
                train(*cached_in)

            def naive(train=train, l=l):
                train(*tokens(l))

            c_ips, n_ips = [], []
            for _ in range(repeats):
                dt, n = timed(cached, seconds, sync)
                c_ips.append(n * batch / dt)
                dt, n = timed(naive, seconds, sync)
                n_ips.append(n * batch / dt)
            c, nv = statistics.median(c_ips), statistics.median(n_ips)
            step = cost.step(T, 0 if method == "lfm" else L - l)
            rows.append({"layer": l, "method": method, "cached_img_s": round(c, 1), "naive_img_s": round(nv, 1),
                         "naive_over_cached": round(c / nv, 2),
                         "model_naive_over_cached": round((step + recompute(cost, S, T, l, method, False)) / step, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", default=str(ROOT / "config" / "paper.yaml"))
    ap.add_argument("--reference", default="h100", help="reference accelerator of the cost model")
    ap.add_argument("--measure", action="store_true", help="also time naive vs cached steps at a reduced ViT")
    ap.add_argument("--device", default="auto", help="where --measure runs (auto | cpu | cuda)")
    ap.add_argument("--width", type=int, default=None, help="measured ViT width (default: 384 on CUDA, 64 on CPU)")
    ap.add_argument("--depth", type=int, default=None, help="measured ViT depth (default: 12 on CUDA, 4 on CPU)")
    ap.add_argument("--img-size", type=int, default=None, help="default: 224 on CUDA, 32 on CPU")
    ap.add_argument("--patch", type=int, default=None, help="default: 16 on CUDA, 8 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="stitch points (default: 1, L/2, L-1)")
    ap.add_argument("--seconds", type=float, default=None, help="min seconds per timing (1.0 CUDA, 0.2 CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    args = ap.parse_args()
    from stitchcache.runtime import pick_device

    res = grid_cost(load_config(args.configfile), args.reference)
    res["config"] = args.configfile
    print_table(res)
    device = torch.device("cpu")
    if args.measure:
        device = pick_device(args.device)
        gpu = device.type == "cuda"
        if not gpu:
            torch.set_num_threads(args.threads)
        pick = lambda v, g, c: v if v is not None else (g if gpu else c)  # noqa: E731
        width, depth = pick(args.width, 384, 64), pick(args.depth, 12, 4)
        img, patch, batch = pick(args.img_size, 224, 32), pick(args.patch, 16, 8), pick(args.batch, 64, 8)
        layers = args.layers or sorted({1, depth // 2, depth - 1})
        t0 = time.perf_counter()
        rows = measure_steps(device, width, depth, img, patch, batch, layers, pick(args.seconds, 1.0, 0.2),
                             args.repeats, args.reference)
        res["measured"] = {"width": width, "depth": depth, "img_size": img, "patch": patch, "batch": batch,
                           "dtype": "bf16 autocast" if gpu else "fp32", "rows": rows,
                           "seconds": round(time.perf_counter() - t0, 1)}
        print(f"\nmeasured one step, naive ÷ cached (img/s), ViT width {width} depth {depth} @ {img} px / {patch}, "
              f"batch {batch}, {device}:")
        print("| l | method | cached img/s | naive img/s | naive ÷ cached | cost model |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['layer']} | {r['method']} | {r['cached_img_s']} | {r['naive_img_s']} | "
                  f"{r['naive_over_cached']} | {r['model_naive_over_cached']} |")
    save("grid_cost", res, device)


if __name__ == "__main__":
    main()
