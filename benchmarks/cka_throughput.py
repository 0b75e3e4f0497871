"""CKA atlas throughput vs reading the same chunks, in one run (stitchcache.analysis.cka).

  read     every chunk of every array of both stores read once, in the atlas's block order (the
           I/O a one-pass atlas cannot avoid), no compute
  pooled   store_cka(variants=[pooled]): read + mean-pool + accumulate all layer-pair statistics
  token    store_cka(variants=[token]):  read + per-token statistics (n_patches times more samples)

Reported: read_seconds / atlas_seconds (1.0 = as fast as the reads alone). Goal on a GPU
(--device cuda): pooled >= 0.5, i.e. the float64 statistics cost at most as much as the I/O. On a
CPU both variants are compute-bound (float64 matrix products over all layer pairs), the token one
n_patches times more. Usage: python benchmarks/cka_throughput.py [--images 1024] [--device cpu]
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

from common import save
from stitchcache.analysis.cka import _block_size, array_names, store_cka
from stitchcache.cache import FeatureStore, StoreWriter


def make_store(path, n, tokens, width, layers, chunk, seed):
    rng = np.random.default_rng(seed)
    attrs = {"model_name": path.name, "model": {"grid": [int((tokens - 1) ** 0.5)] * 2, "num_prefix_tokens": 1},
             "dataset": {"name": "bench", "split": "val", "manifest": "same", "num_images": n}}
    block = rng.standard_normal((chunk, tokens, width)).astype(np.float16)
    with StoreWriter(path, num_images=n, layers=list(range(layers)), num_tokens=tokens, width=width,
                     chunk_size=chunk, attrs=attrs) as w:
        for ci in range(w.num_chunks):
            a, b = w.chunk_range(ci)
            w.write_chunk(ci, {l: block[: b - a] for l in range(layers)}, block[: b - a], np.zeros(b - a, np.int64))
        w.finalize()
    return FeatureStore(path)


def read_all(a, b):
    arrs = [a.array(n) for n in array_names(a)] + [b.array(n) for n in array_names(b)]
    block = _block_size(*arrs)
    for start in range(0, a.num_images, block):
        for x in arrs:
            x[start:start + block]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=65, help="1 prefix + an 8x8 grid")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="sc-cka-"))
    try:
        a = make_store(tmp / "a", args.images, args.tokens, args.width, args.layers, args.chunk, 0)
        b = make_store(tmp / "b", args.images, args.tokens, args.width, args.layers, args.chunk, 1)
        quiet = lambda m: None
        runs = {"read": lambda: read_all(a, b),
                "pooled": lambda: store_cka(a, b, ["pooled"], device=device, log=quiet),
                "token": lambda: store_cka(a, b, ["token"], device=device, log=quiet)}
        times = {k: [] for k in runs}
        for _ in range(args.repeats):   # alternated, so drift hits every measurement alike
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        save("cka_throughput", {
            "images": args.images, "tokens": args.tokens, "width": args.width, "arrays_per_store": args.layers + 1,
            "seconds": med, "read_over_pooled": med["read"] / med["pooled"],
            "read_over_token": med["read"] / med["token"],
            "pooled_img_per_s": args.images / med["pooled"], "token_img_per_s": args.images / med["token"],
        }, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
