"""``stitchcache plan``: what an experiment will store and roughly how long extraction takes,
printed before any work (no weights or data needed: models are built random-init to read their
shapes, and a few forward passes measure this machine's throughput).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from .cache.manage import human

ITEMSIZE = {"float16": 2, "float32": 4, "int8": 1}
SCALE_BYTES = {"int8": 4}  # int8 stores add one float32 scale per token


def load_config(path: str | Path) -> dict:
    """The config with the schema's defaults filled in (the same validation Snakemake runs)."""
    from snakemake.utils import validate

    cfg = yaml.safe_load(Path(path).read_text())
    schema = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
    if schema.exists():
        validate(cfg, str(schema))
    return cfg


def split_size(dataset: dict, split: str) -> int | None:
    s = dataset["splits"][split]
    try:
        from .data import open_split

        return len(open_split(dataset, split))
    except (FileNotFoundError, OSError, ValueError):
        return s.get("count")


def measure(bb, layers: list[int], device: torch.device, batch: int) -> float:
    """Images per second of a capture forward (random pixels, no disk)."""
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


def plan(cfg: dict, do_measure: bool = True, device: str = "auto") -> dict:
    from .backends import create_backbone
    from .extract import resolve_layers
    from .runtime import pick_device

    dev = pick_device(device)
    st = cfg["stitch"]
    used = [m for m in cfg["models"] if any(m in p for p in st["pairs"])]
    ds_name = st["dataset"]
    sizes = {split: split_size(cfg["datasets"][ds_name], split) for split in ("train", "val")}
    dtype = cfg["extract"].get("dtype", "float16")
    itemsize, scale_bytes = ITEMSIZE[dtype], SCALE_BYTES.get(dtype, 0)
    rows, total_bytes, total_seconds = [], 0, 0.0
    facts = {}
    for name in used:
        m = cfg["models"][name]
        bb = create_backbone(m["backbone"], checkpoint=None, **(m.get("kwargs") or {}))
        layers = resolve_layers(cfg["extract"].get("layers", "all"), bb.depth)
        per_layer = bb.num_tokens * (bb.width * itemsize + scale_bytes)
        per_image = per_layer * (len(layers) + 1)
        ips = measure(bb, layers, dev, 64 if dev.type == "cuda" else 8) if do_measure else None
        facts[name] = (bb.num_tokens, bb.width)
        for split, n in sizes.items():
            b = per_image * (n or 0)
            secs = (n or 0) / ips if ips else None
            total_bytes += b
            total_seconds += secs or 0.0
            rows.append({"model": name, "split": split, "images": n, "layers": len(layers) + 1,
                         "bytes_per_layer_image": per_layer, "bytes_per_image": per_image, "bytes": b,
                         "images_per_s": ips, "seconds": secs})
        del bb
    pairs = [tuple(p) for p in st["pairs"]] + ([(m, m) for m in used] if st.get("self_stitch", True) else [])
    pairs = list(dict.fromkeys(pairs))
    n_stitch = len(pairs) * len(st["layers"]) * len(st["stitch_layers"]) * len(st["methods"])
    export = sum(facts[t][0] * facts[t][1] * 2 * sum(n or 0 for n in sizes.values())
                 for (_, t) in pairs) * len(st["layers"]) * len(st["stitch_layers"]) * len(st["methods"])
    return {"rows": rows, "feature_bytes": total_bytes, "extract_seconds": total_seconds if do_measure else None,
            "stitch_jobs": n_stitch, "export_bytes": export, "device": str(dev)}


def print_plan(p: dict) -> None:
    print(f"{'model':12} {'split':6} {'images':>8} {'layers':>6} {'per image':>10} {'store':>10} {'img/s':>8} {'time':>9}")
    for r in p["rows"]:
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        secs = f"{r['seconds'] / 60:.1f} min" if r["seconds"] is not None else "-"
        print(f"{r['model']:12} {r['split']:6} {r['images'] if r['images'] is not None else '?':>8} {r['layers']:>6} "
              f"{human(r['bytes_per_image']):>10} {human(r['bytes']):>10} {ips:>8} {secs:>9}")
    print(f"feature stores: {human(p['feature_bytes'])}"
          + (f", extraction about {p['extract_seconds'] / 60:.1f} min on {p['device']} (forward only; "
             "disk writes can be the bound)" if p["extract_seconds"] is not None else ""))
    print(f"stitch jobs: {p['stitch_jobs']} trainings + {p['stitch_jobs']} evaluations; "
          f"exported stitched final tokens: {human(p['export_bytes'])}")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", default="config.yaml")
    p.add_argument("--no-measure", action="store_true", help="skip the throughput measurement")
    p.add_argument("--device", default="auto")


def main(args) -> int:
    print_plan(plan(load_config(args.configfile), do_measure=not args.no_measure, device=args.device))
    return 0
