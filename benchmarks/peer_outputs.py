"""What the peers of benchmarks/peers.py wrote: bytes on disk, their tokens read back in list order,
the largest difference to stitchcache's store, and a byte comparison of two stores (the kill test)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

def modules(depth: int) -> list[str]:
    """The captured module names: every block output and the final norm."""
    return [f"blocks.{i}" for i in range(depth)] + ["norm"]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_of(out: Path) -> Path:
    return Path(json.loads((out / "record.json").read_text())["store"])


def tool_tokens(tool: str, out: Path, module: str) -> np.ndarray:
    """(n, T, D) tokens a peer wrote for ``module``, in list order."""
    if tool == "naive":
        return np.concatenate([np.load(f) for f in sorted(out.glob(f"{module}_*.npy"))])
    if tool == "thingsvision":
        files = sorted((out / module).rglob("*.npy"), key=lambda f: int(f.stem.rsplit("_", 1)[-1].split("-")[0]))
        return np.concatenate([np.load(f) for f in files])
    from safetensors.numpy import load_file

    return np.concatenate([load_file(str(f))[module] for f in sorted(out.glob("batch_*.safetensors"))])


def store_tokens(path: Path, module: str, names: list[str]) -> np.ndarray:
    """(n, T, D) float16 tokens of a stitchcache store for ``module`` (blocks.j = layer j+1, norm =
    final), rows put back in list order (the store keeps a seeded row order)."""
    from stitchcache.cache import open_store

    fs = open_store(path)
    row = {name: i for i, name in enumerate(fs.image_ids())}
    arr = fs.final if module == "norm" else fs.layer(int(module.split(".")[1]) + 1)
    return arr[:][np.array([row[n] for n in names])]


def token_diff(tool: str, out: Path, ref: Path, depth: int, names: list[str]) -> float:
    """Largest |tool - stitchcache| over every block output and the final tokens, after a float16 cast."""
    worst = 0.0
    for m in modules(depth):
        theirs = (store_tokens(store_of(out), m, names) if tool == "stitchcache"
                  else tool_tokens(tool, out, m).astype(np.float16))
        ours = store_tokens(ref, m, names)
        if theirs.shape != ours.shape:
            raise ValueError(f"{tool}: {m} has shape {theirs.shape}, stitchcache's {ours.shape}")
        worst = max(worst, float(np.abs(theirs.astype(np.float32) - ours.astype(np.float32)).max()))
    return worst


def arrays_written(tool: str, depth: int) -> int:
    return depth + 2 if tool == "stitchcache" else depth + 1  # stitchcache also keeps h_0 (the embedding)


def same_store(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """(files that differ between two stores, stray ``*.partial`` files in ``a``): zarr's temporary
    files of a write the kill interrupted are listed apart; group attributes are compared without
    their timestamps."""
    skip = {"last_used", "COMPLETE"}

    def files(s: Path) -> set[str]:
        return {str(f.relative_to(s)) for f in s.rglob("*") if f.is_file() and f.name not in skip
                and "progress" not in f.relative_to(s).parts}

    fa, fb = files(a), files(b)
    stray = sorted(f for f in fa - fb if f.endswith(".partial"))
    bad = sorted((fa ^ fb) - set(stray))
    for rel in sorted(fa & fb):
        x, y = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel == "zarr.json":
            drop = ("created", "completed")
            x, y = ({k: v for k, v in json.loads(t)["attributes"].items() if k not in drop} for t in (x, y))
        if x != y:
            bad.append(rel)
    return bad, stray


