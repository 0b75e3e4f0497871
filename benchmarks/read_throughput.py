"""Training loader read throughput vs raw sequential reads of the same store, in one run.

  raw_zarr     chunks of tokens and labels read in order with zarr (arr[a:b]), no shuffling, no torch
  raw_file     the same bytes read in order the cheapest way: each token chunk file read with one
               readinto into a fresh numpy array (labels are zstd-compressed: through zarr as above)
  loader       stitchcache.cache.iter_batches(shuffle=True) over [tokens, labels]: shuffled blocks,
               rows permuted inside, converted to torch tensors (what training consumes)

The store is laid out as extraction writes it (issue 11): a class-sorted split (64 classes) whose
rows are in a seeded random order (``extract.image_order``), so the loader reads whole chunks in
sequence yet its batches mix classes; the result also records the mean number of distinct classes
per loader batch against an i.i.d. shuffle of the same labels.

zarr 3's getitem reads about half as fast as a plain file read of the same chunk, and the loader
reads uncompressed chunk files directly (loader.py), so the goal is measured against the faster of
the two baselines (``loader_over_raw``); both ratios are recorded.

Goals: loader >= 0.8 x raw (issues 4, 11); classes per batch >= 0.9 x i.i.d. (issue 11).
Usage: python benchmarks/read_throughput.py [--images 4096]
"""
from __future__ import annotations

import argparse
import os
import statistics
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import save
from stitchcache.cache import FeatureStore, StoreWriter, iter_batches
from stitchcache.extract import image_order


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--classes", type=int, default=64)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # the machine is shared: record how busy it was
    tmp = Path(tempfile.mkdtemp(prefix="sc-read-"))
    try:
        rng = np.random.default_rng(0)
        block = rng.standard_normal((args.chunk, args.tokens, args.width)).astype(np.float16)
        sorted_labels = np.arange(args.images) * args.classes // args.images  # class-sorted split
        order = image_order(args.images, 0)  # row i holds image order[i], as extraction writes it
        with StoreWriter(tmp / "s", num_images=args.images, layers=[0], num_tokens=args.tokens,
                         width=args.width, chunk_size=args.chunk, order=order) as w:
            for ci in range(w.num_chunks):
                a, b = w.chunk_range(ci)
                w.write_chunk(ci, {0: block[: b - a]}, block[: b - a], sorted_labels[order[a:b]])
            w.finalize()
        s = FeatureStore(tmp / "s")
        nbytes = args.images * (args.tokens * args.width * 2 + 8)
        results, distinct = {}, []
        for rep in range(args.repeats):  # alternate raw / loader so load from other processes hits both alike
            t0 = time.perf_counter()
            arr, lab = s.layer(0), s.labels
            for a in range(0, args.images, args.chunk):
                np.asarray(arr[a:a + args.chunk])
                np.asarray(lab[a:a + args.chunk])
            results.setdefault("raw_zarr", []).append(nbytes / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for ci, a in enumerate(range(0, args.images, args.chunk)):
                out = np.empty((min(args.chunk, args.images - a), args.tokens, args.width), np.float16)
                with open(tmp / "s" / "layer_00" / arr.metadata.encode_chunk_key((ci, 0, 0)), "rb") as f:
                    f.readinto(memoryview(out).cast("B"))
                np.asarray(lab[a:a + args.chunk])
            results.setdefault("raw_file", []).append(nbytes / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            seen = []
            for x, y in iter_batches([s.layer(0), s.labels], args.batch, shuffle=True, seed=rep, dtype=torch.float16):
                seen.append(y)
            results.setdefault("loader", []).append(nbytes / (time.perf_counter() - t0))
            distinct += [len(torch.unique(y)) for y in seen]
        med = {k: statistics.median(v[1:]) for k, v in results.items()}  # skip the cold pass
        raw, loader = max(med["raw_zarr"], med["raw_file"]), med["loader"]
        fastest = [max(z, f) for z, f in zip(results["raw_zarr"][1:], results["raw_file"][1:])]
        rng = np.random.default_rng(1)
        iid = [len(np.unique(p[i:i + args.batch])) for _ in range(args.repeats)
               for p in [sorted_labels[rng.permutation(args.images)]] for i in range(0, args.images, args.batch)]
        save("read_throughput", {"images": args.images, "tokens": args.tokens, "width": args.width,
                                 "chunk": args.chunk, "batch": args.batch, "classes": args.classes,
                                 "raw_GB_s": round(raw / 1e9, 3), "loader_GB_s": round(loader / 1e9, 3),
                                 "loader_over_raw": round(loader / raw, 3),
                                 "loader_over_raw_zarr": round(loader / med["raw_zarr"], 3),
                                 "loader_over_raw_file": round(loader / med["raw_file"], 3),
                                 "paired_ratio_median": round(statistics.median(
                                     l / r for l, r in zip(results["loader"][1:], fastest)), 3),
                                 "raw_zarr_passes_GB_s": [round(v / 1e9, 3) for v in results["raw_zarr"]],
                                 "raw_file_passes_GB_s": [round(v / 1e9, 3) for v in results["raw_file"]],
                                 "loader_passes_GB_s": [round(v / 1e9, 3) for v in results["loader"]],
                                 "classes_per_batch": round(float(np.mean(distinct)), 2),
                                 "classes_per_batch_iid": round(float(np.mean(iid)), 2),
                                 "classes_per_batch_over_iid": round(float(np.mean(distinct) / np.mean(iid)), 3),
                                 "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                                 "cpu_count": os.cpu_count()},
             torch.device("cpu"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
