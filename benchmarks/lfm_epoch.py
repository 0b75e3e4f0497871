"""One LFM epoch from cached stores vs the raw read bound of the same bytes, in one run.

  raw read    the source and target layer-l arrays read chunk by chunk in order with zarr (no torch)
  lfm epoch   stitchcache's loader (shuffled blocks) -> tensors on the device -> MLP stitch -> MSE
              to the target's layer-l tokens -> backward -> AdamW step, over every image once
              (bf16 autocast on CUDA, fp32 on CPU)

LFM needs no backbone, so the epoch should run at the read bound: goal >= 0.8.
Usage: python benchmarks/lfm_epoch.py [--images 4096] [--tokens 257] [--width 1024] [--batch 256]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import save
from stitchcache.cache import FeatureStore, StoreWriter, iter_batches
from stitchcache.runtime import autocast, pick_device
from stitchcache.stitch.layers import Stitch


def write_store(path: Path, n: int, tokens: int, width: int, chunk: int, layer: int, seed: int) -> FeatureStore:
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((chunk, tokens, width)).astype(np.float16)
    with StoreWriter(path, num_images=n, layers=[layer], num_tokens=tokens, width=width, chunk_size=chunk) as w:
        for ci in range(w.num_chunks):
            a, b = w.chunk_range(ci)
            w.write_chunk(ci, {layer: block[: b - a]}, block[: b - a], np.arange(a, b))
        w.finalize()
    return FeatureStore(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tmp = Path(tempfile.mkdtemp(prefix="sc-lfm-"))
    try:
        src = write_store(tmp / "src", args.images, args.tokens, args.width, args.chunk, args.layer, 0)
        tgt = write_store(tmp / "tgt", args.images, args.tokens, args.width, args.chunk, args.layer, 1)
        stitch = Stitch({"kind": "mlp", "d_in": args.width, "d_out": args.width, "src_prefix": 1,
                         "tgt_prefix": 1}).to(device)
        opt = torch.optim.AdamW(stitch.parameters(), lr=1e-4)
        arrays = [src.layer(args.layer), tgt.layer(args.layer)]

        def raw() -> float:
            t0 = time.perf_counter()
            for a in range(0, args.images, args.chunk):
                for arr in arrays:
                    np.asarray(arr[a:a + args.chunk])
            return args.images / (time.perf_counter() - t0)

        def epoch(seed: int) -> tuple[float, float]:
            t0, last = time.perf_counter(), float("nan")
            for x, y in iter_batches(arrays, args.batch, shuffle=True, seed=seed, dtype=torch.float16):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device):
                    loss = F.mse_loss(stitch(x.float()), y.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = loss.detach()
            sync()
            return args.images / (time.perf_counter() - t0), float(last)

        raw(), epoch(1000)  # warm the page cache and the kernels
        raws, epochs, losses = [], [], []
        for rep in range(args.repeats):  # alternated, medians: other load hits both alike
            raws.append(raw())
            ips, loss = epoch(rep)
            epochs.append(ips)
            losses.append(loss)
        raw_ips, lfm_ips = statistics.median(raws), statistics.median(epochs)
        bytes_per_image = 2 * args.tokens * args.width * 2
        save("lfm_epoch", {"images": args.images, "tokens": args.tokens, "width": args.width,
                           "batch": args.batch, "chunk": args.chunk,
                           "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
                           "raw_read_img_s": round(raw_ips, 1),
                           "raw_read_GB_s": round(raw_ips * bytes_per_image / 1e9, 3),
                           "lfm_epoch_img_s": round(lfm_ips, 1), "lfm_over_raw_read": round(lfm_ips / raw_ips, 3),
                           "final_losses": [round(v, 4) for v in losses]}, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
