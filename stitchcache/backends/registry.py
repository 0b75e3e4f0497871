"""Model registry: the paper models (and their per-library variants) as data, resolved to local weights.

An entry says which library builds the model (``backbone``: 'lib:arch'), with which kwargs, and where its
weights are expected under a weights root (``weights``: a file or directory relative to the root), plus
the facts one needs before loading anything (patch size, image size, grid, mean/std, prefix tokens).

``resolve_model("dinov2-l14@hf", weights_root=...)`` -> ``{"name", "checkpoint", "kwargs"}``, the same
spec ``create_backbone`` / ``backbone_from_spec`` take. Nothing here touches the network: a missing
file is a ``WeightsNotFound`` naming the path looked for and where to get the file.

Token-grid alignment (our choice, see docs/backbones.md): a stitch maps token i of one model to token i
of another, so both must see the same patch grid. Every paper model is run on a 16 x 16 grid:
/14 models at 224 px, /16 models at 256 px (``image_size_for_grid``). ``check_grids`` refuses pairs whose
grids differ instead of resampling tokens (resampling would mix neighbouring patches and blur what a
stitch measures).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from .weights import WeightsNotFound

WEIGHTS_ROOT_ENV = "STITCHCACHE_WEIGHTS"
DEFAULT_WEIGHTS_ROOT = Path.home() / ".cache" / "stitchcache" / "weights"
PAPER_GRID = 16

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def image_size_for_grid(patch_size: int, grid: int = PAPER_GRID) -> int:
    """Image side giving a ``grid`` x ``grid`` token grid: 14 -> 224, 16 -> 256 (for grid=16)."""
    patch_size, grid = int(patch_size), int(grid)
    if patch_size <= 0 or grid <= 0:
        raise ValueError(f"patch_size and grid must be positive (got {patch_size}, {grid})")
    return patch_size * grid


def _grid_of(x) -> tuple[int, int]:
    if hasattr(x, "grid"):
        return tuple(int(g) for g in x.grid)
    if isinstance(x, dict):
        if "grid" in x:
            return tuple(int(g) for g in x["grid"])
        if "image_size" in x and "patch_size" in x:
            s = x["image_size"]
            s = (s, s) if isinstance(s, int) else s
            return (int(s[0]) // int(x["patch_size"]), int(s[1]) // int(x["patch_size"]))
    raise TypeError(f"cannot read a token grid from {type(x).__name__}")


def _name_of(x) -> str:
    spec = getattr(x, "spec", None) or (x.get("spec") if isinstance(x, dict) else None) or {}
    return (spec.get("name") if isinstance(spec, dict) else None) or (x.get("name") if isinstance(x, dict) else None) \
        or type(x).__name__


def check_grids(a, b) -> tuple[int, int]:
    """Refuse two backbones (or their ``describe()`` dicts / registry entries) whose token grids differ.

    Returns the common grid. Tokens are never resampled to make grids agree: choose image sizes with
    ``image_size_for_grid(patch_size, grid)`` instead.
    """
    ga, gb = _grid_of(a), _grid_of(b)
    if ga != gb:
        pa = getattr(a, "patch_size", None) or (a.get("patch_size") if isinstance(a, dict) else None)
        pb = getattr(b, "patch_size", None) or (b.get("patch_size") if isinstance(b, dict) else None)
        hint = ""
        if pa and pb:
            hint = (f" For a {ga[0]}x{ga[0]} grid run the second model at {image_size_for_grid(pb, ga[0])} px; "
                    f"for {PAPER_GRID}x{PAPER_GRID} use {image_size_for_grid(pa)} px and "
                    f"{image_size_for_grid(pb)} px.")
        raise ValueError(
            f"token grids differ: {_name_of(a)} has {ga[0]}x{ga[1]}, {_name_of(b)} has {gb[0]}x{gb[1]}; "
            "a stitch pairs token i with token i, so both models must see the same patch grid "
            "(tokens are not resampled)." + hint
        )
    return ga


def _entry(backbone, weights, source, patch, prefix, norm, kwargs=None, library=None, note=""):
    size = image_size_for_grid(patch)
    return {
        "backbone": backbone,
        "library": library or backbone.split(":", 1)[0],
        "kwargs": dict(kwargs or {}),
        "weights": weights,  # relative to the weights root: a file, or a directory (HF)
        "source": source,  # where the file comes from (for the error message and docs; never fetched)
        "patch_size": patch,
        "image_size": size,
        "grid": [size // patch, size // patch],
        "num_prefix_tokens": prefix,
        "mean": list(norm["mean"]),
        "std": list(norm["std"]),
        "note": note,
    }


# The paper models, for every library that provides them. Keys: '<model>@<library>'.
REGISTRY: dict[str, dict] = {
    # ---- DINOv2 ViT-L/14 (CLS, no registers) at 224 -> 16x16 -----------------------------------
    "dinov2-l14@timm": _entry(
        "timm:vit_large_patch14_dinov2.lvd142m", "timm/vit_large_patch14_dinov2.lvd142m/model.safetensors",
        "https://huggingface.co/timm/vit_large_patch14_dinov2.lvd142m (model.safetensors)",
        14, 1, IMAGENET, {"img_size": 224}),
    "dinov2-l14@hf": _entry(
        "hf:Dinov2Model", "hf/facebook/dinov2-large",
        "https://huggingface.co/facebook/dinov2-large (config.json, model.safetensors, preprocessor_config.json)",
        14, 1, IMAGENET, {"image_size": 224}),
    # ---- CLIP ViT-L/14 (OpenAI) at 224 -------------------------------------------------------------
    "clip-l14@timm": _entry(
        "timm:vit_large_patch14_clip_224.openai", "timm/vit_large_patch14_clip_224.openai/model.safetensors",
        "https://huggingface.co/timm/vit_large_patch14_clip_224.openai (model.safetensors)",
        14, 1, OPENAI),
    "clip-l14@open_clip": _entry(
        "open_clip:ViT-L-14", "open_clip/ViT-L-14.openai/open_clip_pytorch_model.bin",
        "https://huggingface.co/timm/vit_large_patch14_clip_224.openai (open_clip_pytorch_model.bin)",
        14, 1, OPENAI, {"tag": "openai"}),
    "clip-l14@hf": _entry(
        "hf:CLIPVisionModel", "hf/openai/clip-vit-large-patch14",
        "https://huggingface.co/openai/clip-vit-large-patch14 (config.json, model.safetensors, "
        "preprocessor_config.json)",
        14, 1, OPENAI),
    # ---- SigLIP2 ViT-L/16 at 256 (no prefix token) -------------------------------------------------
    "siglip2-l16@timm": _entry(
        "timm:vit_large_patch16_siglip_256.v2_webli", "timm/vit_large_patch16_siglip_256.v2_webli/model.safetensors",
        "https://huggingface.co/timm/vit_large_patch16_siglip_256.v2_webli (model.safetensors)",
        16, 0, HALF),
    "siglip2-l16@open_clip": _entry(
        "open_clip:ViT-L-16-SigLIP2-256", "open_clip/ViT-L-16-SigLIP2-256/open_clip_pytorch_model.bin",
        "https://huggingface.co/timm/ViT-L-16-SigLIP2-256 (open_clip_pytorch_model.bin)",
        16, 0, HALF, {"tag": "webli"}),
    "siglip2-l16@hf": _entry(
        "hf:SiglipVisionModel", "hf/google/siglip2-large-patch16-256",
        "https://huggingface.co/google/siglip2-large-patch16-256 (config.json, model.safetensors, "
        "preprocessor_config.json); the fixed-resolution SigLIP2 checkpoints are model_type 'siglip'",
        16, 0, HALF),
    # ---- DINOv3 ViT-L/16 (CLS + 4 registers, rope) at 256 ------------------------------------------
    "dinov3-l16@timm": _entry(
        "timm:vit_large_patch16_dinov3.lvd1689m", "timm/vit_large_patch16_dinov3.lvd1689m/model.safetensors",
        "https://huggingface.co/timm/vit_large_patch16_dinov3.lvd1689m (model.safetensors; gated: accept the "
        "DINOv3 licence on the hub page first)",
        16, 5, IMAGENET),
    "dinov3-l16@hf": _entry(
        "hf:DINOv3ViTModel", "hf/facebook/dinov3-vitl16-pretrain-lvd1689m",
        "https://huggingface.co/facebook/dinov3-vitl16-pretrain-lvd1689m (config.json, model.safetensors, "
        "preprocessor_config.json; gated)",
        16, 5, IMAGENET, {"image_size": 256}),
}

# short names -> the default library for that model (timm provides all four)
ALIASES = {
    "dinov2-l14": "dinov2-l14@timm",
    "clip-l14": "clip-l14@timm",
    "siglip2-l16": "siglip2-l16@timm",
    "dinov3-l16": "dinov3-l16@timm",
}

PAPER_MODELS = ("dinov2-l14", "clip-l14", "siglip2-l16", "dinov3-l16")


def list_models() -> list[str]:
    return sorted(REGISTRY) + sorted(ALIASES)


def is_registered(name) -> bool:
    return isinstance(name, str) and (name in REGISTRY or name in ALIASES)


def get_entry(name: str) -> dict:
    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        raise KeyError(f"{name!r} is not in the model registry (known: {', '.join(list_models())})")
    return copy.deepcopy(REGISTRY[key])


def weights_root(root=None) -> Path:
    """The weights root: ``root``, else $STITCHCACHE_WEIGHTS, else ~/.cache/stitchcache/weights."""
    if root is None:
        root = os.environ.get(WEIGHTS_ROOT_ENV) or DEFAULT_WEIGHTS_ROOT
    return Path(os.path.expanduser(str(root)))


def resolve_model(name_or_spec, weights_root=None, require_weights: bool = True) -> dict:
    """A registry name (or a spec dict) -> ``{"name": "lib:arch", "checkpoint": path, "kwargs": {...}}``.

    * a registry name ('dinov2-l14', 'clip-l14@open_clip', ...): its weights path under the weights root;
      with ``require_weights`` a missing file raises ``WeightsNotFound`` naming the path and its source;
    * a spec dict ``{"name": ..., "checkpoint": ..., "kwargs": ...}``: returned as is if its name is a
      library name, resolved (its own checkpoint/kwargs win) if its name is a registry name;
    * a 'lib:arch' string: ``{"name": it, "checkpoint": None, "kwargs": {}}``.
    """
    if isinstance(name_or_spec, dict):
        spec = dict(name_or_spec)
        name = spec.get("name") or spec.get("backbone")
        if not is_registered(name):
            return {"name": name, "checkpoint": spec.get("checkpoint"), "kwargs": dict(spec.get("kwargs") or {})}
        out = resolve_model(name, weights_root, require_weights=require_weights and spec.get("checkpoint") is None)
        if spec.get("checkpoint") is not None:
            out["checkpoint"] = spec["checkpoint"]
        out["kwargs"].update(spec.get("kwargs") or {})
        return out
    name = str(name_or_spec)
    if not is_registered(name):
        if ":" in name:
            return {"name": name, "checkpoint": None, "kwargs": {}}
        raise KeyError(f"{name!r} is neither 'lib:arch' nor a registry name (known: {', '.join(list_models())})")
    entry = get_entry(name)
    root = globals()["weights_root"](weights_root)
    path = root / entry["weights"]
    if require_weights and not path.exists():
        kind = "directory" if entry["library"] == "hf" else "file"
        raise WeightsNotFound(
            f"{name}: weights not found at {str(path)!r} (expected {kind} '{Path(entry['weights']).name}' under "
            f"the weights root {str(root)!r}). Get it from {entry['source']} on a machine with internet and "
            f"put it at that path, or set ${WEIGHTS_ROOT_ENV} / weights_root= to the folder holding "
            f"'{entry['weights']}', or pass checkpoint=<path> explicitly. Nothing is downloaded."
        )
    return {"name": entry["backbone"], "checkpoint": str(path), "kwargs": dict(entry["kwargs"])}
