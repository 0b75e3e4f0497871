"""Small shared helpers: devices, seeds, JSON records, logging.

torch is imported inside the helpers that need it: stages that only read tables (table, findings,
plot, analyze) import this module and must not pay torch's ~1-2 s start-up (tests/test_startup.py)."""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np


def pick_device(name: str | None = "auto") -> "torch.device":
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device: cuda, but no CUDA device is visible (set device: auto or cpu)")
    return torch.device(name)


def autocast(device: "torch.device"):
    """bf16 autocast on CUDA, a no-op (fp32) on CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)


def set_threads() -> None:
    """Respect Snakemake's `threads:` (it exports OMP_NUM_THREADS) instead of grabbing every core."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        import torch

        torch.set_num_threads(int(n))


def json_arg(text: str | None, what: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {what} is not valid JSON: {e}")
    if not isinstance(value, dict):
        raise SystemExit(f"error: {what} must be a JSON object")
    return value


def write_json(path: str | os.PathLike, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, p)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, what: str = "record") -> dict:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: {what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {what} {str(p)!r} is not valid JSON: {e}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
