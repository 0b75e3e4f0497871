"""Backbones: one contract (``base.Backbone``) over timm, open_clip and transformers models.

``create_backbone("timm:ARCH" | "open_clip:ARCH" | "hf:PATH_OR_ID" | "NAME_IN_REGISTRY", ...)``.
Everything family specific lives in this package and nowhere else.
"""
from __future__ import annotations

import importlib

from .weights import WeightsMismatch, WeightsNotFound, weights_digest

# the Backbone contract (an nn.Module) needs torch; it is imported on first use, so that what needs
# no model (an extract cache hit, a DAG build, a digest) starts without torch (issue 15)
_LAZY = {"Backbone": ".base", "BackboneFacts": ".base", "Preprocess": ".base"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# library prefix -> module holding ``build(arch, checkpoint=None, **kwargs) -> Backbone``
_LIBRARIES = {
    "timm": "stitchcache.backends.timm_backend",
    "open_clip": "stitchcache.backends.open_clip_backend",
    "hf": "stitchcache.backends.hf_backend",
}


def parse_name(name: str) -> tuple[str, str]:
    """'timm:vit_small_patch16_224' -> ('timm', 'vit_small_patch16_224')."""
    if ":" not in name:
        raise ValueError(
            f"backbone {name!r} has no library prefix; write one of "
            + ", ".join(f"'{k}:<architecture>'" for k in _LIBRARIES)
        )
    lib, arch = name.split(":", 1)
    if lib not in _LIBRARIES:
        raise ValueError(f"backbone {name!r}: unknown library {lib!r} (known: {', '.join(_LIBRARIES)})")
    return lib, arch


def create_backbone(name: str, checkpoint: str | None = None, **kwargs) -> "Backbone":
    """Build a frozen backbone.

    name: 'timm:ARCH', 'open_clip:ARCH_OR_CONFIG_JSON', 'hf:LOCAL_DIR_OR_HUB_ID', or a registry name
      ('dinov2-l14', 'clip-l14@open_clip', ... see ``registry.list_models()``; its weights are looked up
      under ``weights_root=`` / $STITCHCACHE_WEIGHTS unless ``checkpoint`` is given).
    checkpoint: local weights file (or directory); None builds random-init weights (tests).
    kwargs: passed to the library's own constructor (e.g. a tiny config: depth=2, embed_dim=32),
      except ``strict_load`` (default True): weights load strictly, a missing, unexpected or
      shape-mismatched tensor stops with an error naming the model, the file and the first keys;
      ``strict_load=False`` is the opt-out for intended partial loads (what did not fit is logged).
    """
    import torch

    from .registry import is_registered, resolve_model

    weights_root = kwargs.pop("weights_root", None)
    # strict_load=False: the opt-out for intended partial loads (missing/unexpected keys are logged)
    strict = bool(kwargs.pop("strict_load", True))
    if is_registered(name):
        spec = resolve_model({"name": name, "checkpoint": checkpoint, "kwargs": kwargs}, weights_root=weights_root)
        name, checkpoint, kwargs = spec["name"], spec["checkpoint"], spec["kwargs"]
    lib, arch = parse_name(name)
    module = importlib.import_module(_LIBRARIES[lib])
    if checkpoint is None:
        # random init is seeded, so a spec without weights always means the same network
        # (its cache key says "random-init", and that must not mix different weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            bb = module.build(arch, checkpoint=checkpoint, strict=strict, **kwargs)
    else:
        bb = module.build(arch, checkpoint=checkpoint, strict=strict, **kwargs)
    if not strict and checkpoint is not None:
        bb.spec = {**bb.spec, "strict_load": False}  # so backbone_from_spec rebuilds it the same way
    return bb.freeze()


def backbone_from_spec(spec: dict) -> "Backbone":
    """Rebuild a backbone from ``Backbone.spec`` (as stored in checkpoints and store attributes)."""
    spec = dict(spec)
    name = spec.pop("name")
    checkpoint = spec.pop("checkpoint", None)
    kwargs = spec.pop("kwargs", {}) or {}
    if spec.pop("strict_load", True) is False:
        kwargs = {**kwargs, "strict_load": False}
    return create_backbone(name, checkpoint=checkpoint, **kwargs)


from .registry import check_grids, image_size_for_grid, resolve_model  # noqa: E402

__all__ = [
    "Backbone",
    "BackboneFacts",
    "Preprocess",
    "WeightsMismatch",
    "WeightsNotFound",
    "backbone_from_spec",
    "check_grids",
    "image_size_for_grid",
    "resolve_model",
    "create_backbone",
    "parse_name",
    "weights_digest",
]
