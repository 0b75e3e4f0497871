"""Printing a plan (``print_plan``)."""
from __future__ import annotations

from ..cache.manage import human


def _h(seconds_or_hours: float, hours: bool = False) -> str:
    h = seconds_or_hours if hours else seconds_or_hours / 3600
    return f"{h:.2f}" if h < 10 else f"{h:.1f}" if h < 100 else f"{h:.0f}"


def print_plan(p: dict) -> None:
    ref = p["reference"]
    unk = set(p["unknown_sizes"])
    mark = " (+?)" if unk else ""
    print(f"GPU time: estimated for the reference '{ref['name']}' ({ref['device']}); source: {ref['source']}")
    local = p["extract_seconds"] is not None
    print(f"\nfeature stores ({p['dtype']}, compressor {p['compressor']}): one per dataset x model x split")
    head = (f"{'dataset':10} {'model':12} {'split':5} {'images':>7} {'arrays':>6} {'per image':>10} {'store':>10} "
            f"{'GPU-h':>6} {'bound':>7}")
    print(head + (f" {'local img/s':>11}" if local else ""))
    for r in p["rows"]:
        imgs = r["images"] if r["images"] is not None else "?"
        line = (f"{r['dataset']:10} {r['model']:12} {r['split']:5} {imgs:>7} {r['layers']:>6} "
                f"{human(r['bytes_per_image']):>10} {human(r['bytes']):>10} {_h(r['gpu_seconds']):>6} {r['bound']:>7}")
        if local:
            line += f" {r['images_per_s']:>11.1f}"
        print(line)
    print(f"{'total':48} {human(p['feature_bytes']):>10}{mark} {_h(p['gpu_hours']['extract'], True):>6}")
    if local:
        print(f"this machine ({p['device']}): extraction forward alone about {p['extract_seconds'] / 3600:.2f} h "
              "(measured img/s above; no disk)")

    methods = list(p["gpu_hours"]["train"])
    print(f"\nGPU-h per dataset (training: UPPER BOUND, every lr of the grid runs max_epochs = "
          f"{p['epochs_x_lrs']} epochs in all; early stopping ends sooner)")
    print(f"{'dataset':10} {'train/val':>13} {'features':>10} {'exports':>10} {'ckpts':>9} {'extract':>7} "
          + " ".join(f"{m:>7}" for m in methods) + f" {'eval':>7} {'total':>7}")
    for d, a in p["datasets"].items():
        tv = "/".join(str(a["images"][s]) if a["images"][s] is not None else "?" for s in ("train", "val"))
        print(f"{d:10} {tv:>13} {human(a['feature_bytes']):>10} {human(a['export_bytes']):>10} "
              f"{human(a['checkpoint_bytes']):>9} {_h(a['extract_s']):>7} "
              + " ".join(f"{_h(a['train_s'][m]):>7}" for m in methods)
              + f" {_h(a['eval_s'] + a['probe_s']):>7} {_h(a['total_s']):>7}")
    g = p["gpu_hours"]
    print(f"{'total':10} {'':>13} {human(p['feature_bytes']):>10} {human(p['export_bytes']):>10} "
          f"{human(p['checkpoint_bytes']):>9} {_h(g['extract'], True):>7} "
          + " ".join(f"{_h(g['train'][m], True):>7}" for m in methods)
          + f" {_h(g['evaluate'], True):>7} {_h(g['total'] - g['pretrain'], True):>7}")
    bounds = []
    for m in methods:
        c = {}
        for a in p["datasets"].values():
            for k, v in a["train_bound"][m].items():
                c[k] = c.get(k, 0) + v
        bounds.append(f"{m} " + ("/".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"))
    print("training step bound (jobs): " + "; ".join(bounds)
          + ("; lfm jobs declare no GPU in the workflow (cache reads): their hours can overlap the others"
             if "lfm" in methods else ""))
    if g["pretrain"]:
        print(f"pretraining (rough: 3 forwards per image and view): {_h(g['pretrain'], True)} GPU-h")
    if p.get("keep_exports", True):
        storage = p["feature_bytes"] + p["export_bytes"] + p["checkpoint_bytes"]
        print(f"\nstorage: {human(storage)}{mark} = feature stores {human(p['feature_bytes'])} + stitched exports "
              f"{human(p['export_bytes'])} + stitch checkpoints {human(p['checkpoint_bytes'])}")
    else:
        storage = p["feature_bytes"] + p["checkpoint_bytes"]
        print(f"\nstorage: {human(storage)}{mark} = feature stores {human(p['feature_bytes'])} + stitch checkpoints "
              f"{human(p['checkpoint_bytes'])}; stitched exports ({human(p['export_bytes'])} in all) are removed "
              f"by each evaluate job (evaluate.keep_exports: false): at most {human(p['largest_export'])} per "
              "running job")
    print(f"GPU time: {_h(g['total'], True)} GPU-h{mark} in all, an upper bound (training at max_epochs)")
    jobs = p["jobs"]
    print("jobs per rule: " + ", ".join(f"{k} {v}" for k, v in jobs.items() if v)
          + f" (total {sum(jobs.values())}; extract includes extract_pretrained)")
    fit = ref["ffm_fit"]
    print(f"\nmodel: FFM step t(n) = {fit['a'] * 1e6:.1f} us + {fit['b'] * 1e6:.1f} us x n tail blocks per image "
          f"(fit to {len(fit['points'])} reference points, max error {100 * fit['max_abs_error']:.1f} %); "
          f"forward / fwd+bwd per block {ref['forward_over_fwd_bwd']:.2f}; other models scaled by FLOPs "
          "(docs/stages/extract.md, 'Planning')")
    for note in p["notes"]:
        print(f"note: {note}")

