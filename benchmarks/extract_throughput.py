"""Extraction throughput vs the bare forward and vs the store's raw write bound, in one run.

  forward      img/s of the model's forward alone (random pixels already on the device)
  extraction   img/s of `stitchcache extract` end to end (decode, preprocess, capture all layers,
               device->host, chunk writes) into a fresh store; "steady" = the marginal rate between
               an N/2- and an N-image extraction (start-up excluded), "startup" = the fixed seconds
  write bound  img/s of writing the same bytes per image into an identical Zarr store from memory

Goal (issue 4): extraction / forward >= 0.9 when not disk-bound.
Usage: python benchmarks/extract_throughput.py [--images 2048] [--width 192] [--depth 6] [--device auto]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import save, timed
from stitchcache.backends import create_backbone
from stitchcache.cache import StoreWriter
from stitchcache.extract import extract
from stitchcache.runtime import pick_device


def make_folder(root: Path, n: int, size: int) -> dict:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:06d}.png")
    return {"name": "bench", "type": "image_folder", "root": str(root), "splits": {"train": {}}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048, help="images of the larger run (the smaller has half)")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the forward, bare and in extraction (default: 1 on CPU, else torch's)")
    ap.add_argument("--layers", default="all",
                    help="captured layers: all (h_0..h_L) or a comma list, e.g. 2,6,10,14,18,22,23 (final always)")
    ap.add_argument("--tag", default="", help="suffix of the result name (extract_throughput<tag>)")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per timed measurement")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    on_cpu = device.type == "cpu"
    # On CPU the decode workers and the forward share the cores: one forward thread and one worker
    # on a 2-core machine (more threads than cores slows torch down several times on such VMs).
    workers = args.workers if args.workers is not None else (1 if on_cpu else 8)
    threads = args.threads if args.threads is not None else (1 if on_cpu else torch.get_num_threads())
    torch.set_num_threads(threads)
    spec = {"name": "bench", "backbone": "timm:vit_small_patch16_224",
            "kwargs": {"img_size": args.img_size, "patch_size": args.patch, "embed_dim": args.width,
                       "depth": args.depth, "num_heads": max(1, args.width // 64)}}
    tmp = Path(tempfile.mkdtemp(prefix="sc-bench-"))
    try:
        ds = make_folder(tmp / "images", args.images, args.img_size)
        bb = create_backbone(spec["backbone"], **spec["kwargs"]).to(device)
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else None

        def fwd():
            with torch.inference_mode():
                bb(x)

        dt, n = timed(fwd, args.seconds, sync)
        forward_before = n * args.batch / dt

        # Two extractions into fresh stores, N/2 and N images (different manifests, so different
        # keys): their difference is the steady-state rate, free of the fixed start-up (building
        # the model, listing the data, digests, starting workers, creating the store).
        layers = "all" if args.layers == "all" else [int(v) for v in args.layers.split(",")]
        settings = {"batch_size": args.batch, "chunk_size": args.batch, "num_workers": workers,
                    "device": str(device.type), "layers": layers}
        half = args.images // 2
        seconds = {}
        for count in (half, args.images):
            ds_n = {**ds, "splits": {"train": {"start": 0, "count": count}}}
            t0 = time.perf_counter()
            rec = extract(spec, ds_n, "train", tmp / "cache", settings)
            seconds[count] = time.perf_counter() - t0
        dt, n = timed(fwd, args.seconds, sync)
        # the baseline is the faster of a forward measured before and one after the extractions
        # (this keeps machine drift from flattering the ratio)
        forward_ips = max(forward_before, n * args.batch / dt)
        extract_ips = args.images / seconds[args.images]  # end to end, start-up included
        steady_ips = (args.images - half) / (seconds[args.images] - seconds[half])
        startup_s = seconds[args.images] - args.images / steady_ips

        # raw write bound: the same arrays/chunks, written from memory
        L = bb.depth
        stored = list(range(L + 1)) if layers == "all" else layers
        block = np.random.default_rng(0).standard_normal((args.batch, bb.num_tokens, bb.width)).astype(np.float16)
        labels = np.zeros(args.batch, np.int64)
        t0 = time.perf_counter()
        with StoreWriter(tmp / "raw", num_images=args.images, layers=stored, num_tokens=bb.num_tokens,
                         width=bb.width, chunk_size=args.batch) as w:
            for ci in range(w.num_chunks):
                a, b = w.chunk_range(ci)
                w.write_chunk(ci, {l: block[: b - a] for l in stored}, block[: b - a], labels[: b - a])
        write_ips = args.images / (time.perf_counter() - t0)
        bytes_per_image = (len(stored) + 1) * bb.num_tokens * bb.width * 2
        save("extract_throughput" + args.tag, {
            "model": spec["kwargs"], "layers": args.layers, "images": args.images, "batch": args.batch, "workers": workers,
            "torch_threads": threads, "bytes_per_image": bytes_per_image,
            "forward_img_s": round(forward_ips, 1),
            "forward_before_after_img_s": [round(forward_before, 1), round(n * args.batch / dt, 1)],
            "extract_img_s": round(extract_ips, 1), "extract_steady_img_s": round(steady_ips, 1),
            "extract_startup_s": round(startup_s, 2),
            "write_bound_img_s": round(write_ips, 1), "write_bound_MB_s": round(write_ips * bytes_per_image / 1e6, 1),
            "extract_over_forward": round(extract_ips / forward_ips, 3),
            "steady_extract_over_forward": round(steady_ips / forward_ips, 3),
            "extract_over_write_bound": round(extract_ips / write_ips, 3),
            "store": rec["store"].replace(str(tmp), "<tmp>"),
        }, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
