"""Local weights: finding them, loading them safely, and digesting them for cache keys.

Nothing here touches the network: a missing file is an error that says what was looked for.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..digest import file_digest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class WeightsNotFound(FileNotFoundError):
    pass


def require_path(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        msg = f"{what}: weights not found at {str(p)!r}"
        if hint:
            msg += f". {hint}"
        raise WeightsNotFound(msg)
    return p


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (``weights_only=True``, never pickle code)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    # unwrap common containers
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{p}: expected a state dict, found {type(sd).__name__}")
    return sd


def weights_digest(path: str | os.PathLike | None) -> str:
    """Content digest of a weights file or of every weights file in a directory ('random' if None)."""
    if path is None:
        return "random-init"
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json")
        )
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(p)).encode())
            h.update(file_digest(f).encode())
        return h.hexdigest()
    raise WeightsNotFound(f"weights not found at {str(p)!r}")
