"""Extraction throughput vs the bare forward and vs the store's raw write bound, in one run.

  forward      img/s of the model's forward alone (random pixels already on the device)
  extraction   img/s of `stitchcache extract` end to end (decode, preprocess, capture all layers,
               device->host, chunk writes) into a fresh store
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
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
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

        dt, n = timed(fwd, 2.0, sync)
        forward_ips = n * args.batch / dt

        settings = {"batch_size": args.batch, "chunk_size": args.batch, "num_workers": args.workers,
                    "device": str(device.type)}
        t0 = time.perf_counter()
        rec = extract(spec, ds, "train", tmp / "cache", settings)
        extract_ips = args.images / (time.perf_counter() - t0)

        # raw write bound: the same arrays/chunks, written from memory
        L = bb.depth
        block = np.random.default_rng(0).standard_normal((args.batch, bb.num_tokens, bb.width)).astype(np.float16)
        labels = np.zeros(args.batch, np.int64)
        t0 = time.perf_counter()
        with StoreWriter(tmp / "raw", num_images=args.images, layers=list(range(L + 1)), num_tokens=bb.num_tokens,
                         width=bb.width, chunk_size=args.batch) as w:
            for ci in range(w.num_chunks):
                a, b = w.chunk_range(ci)
                w.write_chunk(ci, {l: block[: b - a] for l in range(L + 1)}, block[: b - a], labels[: b - a])
        write_ips = args.images / (time.perf_counter() - t0)
        bytes_per_image = (L + 2) * bb.num_tokens * bb.width * 2
        save("extract_throughput", {
            "model": spec["kwargs"], "images": args.images, "batch": args.batch, "workers": args.workers,
            "bytes_per_image": bytes_per_image,
            "forward_img_s": round(forward_ips, 1), "extract_img_s": round(extract_ips, 1),
            "write_bound_img_s": round(write_ips, 1), "write_bound_MB_s": round(write_ips * bytes_per_image / 1e6, 1),
            "extract_over_forward": round(extract_ips / forward_ips, 3),
            "extract_over_write_bound": round(extract_ips / write_ips, 3),
            "store": rec["store"].replace(str(tmp), "<tmp>"),
        }, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
