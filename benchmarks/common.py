"""Shared helpers for the ratio benchmarks: device naming and result files."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """Where result files go: benchmarks/results, or $STITCHCACHE_BENCH_OUT (the GPU suite's run folder)."""
    out = os.environ.get("STITCHCACHE_BENCH_OUT")
    return Path(out) if out else RESULTS


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def timed(fn, min_seconds: float = 1.0, sync=None) -> tuple[float, int]:
    """Run fn() repeatedly for at least min_seconds; returns (seconds, calls)."""
    fn()  # warm-up
    if sync:
        sync()
    t0, n = time.perf_counter(), 0
    while True:
        fn()
        n += 1
        if sync:
            sync()
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt, n


def save(name: str, result: dict, device: torch.device) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = out / f"{name}-{tag}.json"
    result = {"benchmark": name, "device": device_name(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
