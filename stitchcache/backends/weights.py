"""Local weights: finding them, loading them safely, and digesting them for cache keys.

Nothing here touches the network: a missing file is an error that says what was looked for.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..digest import file_digest

if TYPE_CHECKING:
    import torch

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
    import torch

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


class WeightsMismatch(ValueError):
    """A weights file does not fit the architecture it is loaded into."""


STRICT_HINT = ("if a partial load is intended, set `strict_load: false` in the model's config entry "
               "(models.<name>; create_backbone(..., strict_load=False) in Python)")


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def load_checked(module: torch.nn.Module, state_dict: dict, what: str, path, strict: bool = True,
                 ignore_missing=lambda key: False) -> None:
    """``module.load_state_dict`` that stops on missing or unexpected keys (and on shape mismatches),
    naming the model, the file and the first keys. ``strict=False``: the documented opt-out for
    intended partial loads; what did not fit is still logged, never dropped silently.
    ``ignore_missing(key)``: tensors that may legitimately be absent (heads the tokens never use)."""
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # size mismatches raise even with strict=False
        raise WeightsMismatch(f"{what}: weights in {str(path)!r} do not fit the architecture "
                              f"(shape mismatch): {str(e).splitlines()[-1].strip()}") from None
    report_mismatch(what, path, [k for k in result.missing_keys if not ignore_missing(k)],
                    list(result.unexpected_keys), strict=strict)


def report_mismatch(what: str, path, missing, unexpected, strict: bool = True, mismatched=()) -> None:
    """Stop (strict) or warn when a load left tensors missing, unexpected or shape-mismatched."""
    if not (missing or unexpected or mismatched):
        return
    msg = (f"{what}: weights in {str(path)!r} do not fit the architecture: missing {_first(missing)}, "
           f"unexpected {_first(unexpected)}" + (f", shape-mismatched {_first(mismatched)}" if mismatched else ""))
    if strict:
        raise WeightsMismatch(f"{msg}; {STRICT_HINT}")
    from ..runtime import log

    log(f"warning: {msg} (loaded anyway: strict_load is false)")


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
