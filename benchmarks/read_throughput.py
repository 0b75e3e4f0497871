"""Training loader read throughput vs raw sequential reads of the same store, in one run.

  raw          chunks read in order with zarr (arr[a:b]), no shuffling, no torch
  loader       stitchcache.cache.iter_batches(shuffle=True): shuffled blocks, rows permuted inside,
               converted to torch tensors (what training consumes)

Goal (issue 4): loader >= 0.8 x raw.  Usage: python benchmarks/read_throughput.py [--images 4096]
"""
from __future__ import annotations

import argparse
import statistics
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import save
from stitchcache.cache import FeatureStore, StoreWriter, iter_batches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sc-read-"))
    try:
        rng = np.random.default_rng(0)
        block = rng.standard_normal((args.chunk, args.tokens, args.width)).astype(np.float16)
        with StoreWriter(tmp / "s", num_images=args.images, layers=[0], num_tokens=args.tokens,
                         width=args.width, chunk_size=args.chunk) as w:
            for ci in range(w.num_chunks):
                a, b = w.chunk_range(ci)
                w.write_chunk(ci, {0: block[: b - a]}, block[: b - a], np.arange(a, b))
            w.finalize()
        s = FeatureStore(tmp / "s")
        nbytes = args.images * args.tokens * args.width * 2
        results = {}
        for rep in range(args.repeats):  # alternate raw / loader so load from other processes hits both alike
            t0 = time.perf_counter()
            arr = s.layer(0)
            for a in range(0, args.images, args.chunk):
                np.asarray(arr[a:a + args.chunk])
            results.setdefault("raw", []).append(nbytes / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for (x,) in iter_batches([s.layer(0)], args.batch, shuffle=True, seed=rep, dtype=torch.float16):
                pass
            results.setdefault("loader", []).append(nbytes / (time.perf_counter() - t0))
        raw, loader = statistics.median(results["raw"][1:]), statistics.median(results["loader"][1:])  # skip the cold pass
        save("read_throughput", {"images": args.images, "tokens": args.tokens, "width": args.width,
                                 "chunk": args.chunk, "raw_GB_s": round(raw / 1e9, 3),
                                 "loader_GB_s": round(loader / 1e9, 3), "loader_over_raw": round(loader / raw, 3)},
             torch.device("cpu"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
