"""open_clip image towers: ``model.visual`` as ``VisionTransformer`` (CLIP) or ``TimmModel`` (SigLIP).

open_clip's own order (transformer.py ``VisionTransformer._embeds`` / ``forward``):
  conv1 -> cat(class_embedding) + positional_embedding -> patch_dropout -> ln_pre
  -> transformer.resblocks -> ln_post
``transformer.batch_first`` may be False (sequence-first, older configs): each block is then run on
(T, B, D) and transposed back, so tokens are always (B, T, D) outside this module.
open_clip applies ``ln_post`` to the pooled token only; our final tokens are ``ln_post`` over ALL tokens.

SigLIP / SigLIP2 models use a ``TimmModel`` tower whose ``trunk`` is a timm ViT: that case is delegated
to ``timm_backend.TimmBackbone`` (same code as ``timm:``), only the preprocessing comes from open_clip.

``arch`` is one of
  * a built-in open_clip model name (``ViT-L-14``, ``ViT-L-16-SigLIP2-256``),
  * a path to a model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``; registered with
    ``open_clip.add_model_config``), or
  * a local directory in the HF-hub layout of open_clip models (``open_clip_config.json`` +
    ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``).
Weights always come from a local file (``checkpoint=``), loaded with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from .base import Backbone, BackboneFacts, Preprocess
from .weights import WeightsNotFound, load_checked, load_state_dict, require_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def make_preprocess(size, mean, std, interpolation="bicubic", resize_mode="shortest", resize=None,
                    channels=3) -> Preprocess:
    """A ``Preprocess`` from library-style arguments (see ``Preprocess.resize_mode``)."""
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    common = dict(
        size=size,
        resize=int(resize if resize is not None else min(size)),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        interpolation=str(interpolation),
        channels=int(channels),
    )
    if resize_mode in ("shortest", "squash", "shortest_hf"):
        return Preprocess(**common, resize_mode=resize_mode)
    raise ValueError(
        f"resize_mode {resize_mode!r} is not supported (supported: 'shortest', 'shortest_hf', 'squash'); "
        "override it with force_preprocess_cfg={'resize_mode': 'shortest'}"
    )


def _preprocess_from_cfg(cfg: dict) -> Preprocess:
    """open_clip ``preprocess_cfg`` -> Preprocess, equal to ``open_clip.image_transform_v2(cfg, False)``."""
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest" and size[0] != size[1]:
        raise ValueError(f"open_clip 'shortest' resize to a non-square size {size} is not supported")
    return make_preprocess(size, cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"), mode)


class OpenClipBackbone(Backbone):
    """open_clip ``VisionTransformer`` image tower."""

    def __init__(self, visual: torch.nn.Module, spec: dict, preprocess: Preprocess):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError(
                f"{spec['name']}: open_clip towers with attentional pooling (CoCa) apply ln_post after the "
                "pooler; they have no 'final tokens' in this contract"
            )
        self.visual = visual
        self.spec = spec
        patch = visual.patch_size
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        img = visual.image_size
        img = tuple(int(s) for s in (img if isinstance(img, (tuple, list)) else (img, img)))
        self.facts = BackboneFacts(
            depth=len(visual.transformer.resblocks),
            width=int(visual.transformer.width),
            patch_size=patch,
            image_size=img,
            num_prefix_tokens=1,
            preprocess=preprocess,
            extra={"architecture": spec["name"]},
        )

    def embed(self, pixels):
        return self.visual._embeds(pixels)

    def block(self, i, h):
        blk = self.visual.transformer.resblocks[i - 1]
        if getattr(self.visual.transformer, "batch_first", True):
            return blk(h)
        return blk(h.transpose(0, 1)).transpose(0, 1)

    def final_norm(self, h):
        return self.visual.ln_post(h)


def _load_visual_weights(visual: torch.nn.Module, path: Path, what: str, strict: bool = True) -> None:
    if path.suffix in (".npz", ".npy"):
        raise ValueError(f"{what}: big_vision .npz weights are not supported here; use the open_clip/timm "
                         "state dict (open_clip_pytorch_model.bin or open_clip_model.safetensors)")
    try:
        sd = load_state_dict(path)
    except Exception as e:  # TorchScript archives (OpenAI's original ViT-L-14.pt) are not state dicts
        raise ValueError(
            f"{what}: could not read a state dict from {str(path)!r} with weights_only=True ({e}). "
            "OpenAI's original TorchScript .pt files are not supported; use the open_clip state dict "
            "(e.g. 'open_clip_pytorch_model.bin' from the model's hub page)."
        ) from e
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    # heads unused by the tokens (proj, timm head) may be absent in a trunk-only file
    load_checked(visual, sd, what, path, strict=strict,
                 ignore_missing=lambda k: k == "proj" or k.startswith("head.") or ".head." in k)


@contextlib.contextmanager
def _without_random_init_warning(active: bool):
    class _Drop(logging.Filter):
        def filter(self, record):
            return "initialized randomly" not in record.getMessage()

    root, f = logging.getLogger(), _Drop()
    if active:
        root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _resolve_arch(arch: str, kwargs: dict) -> tuple[str, dict, Path | None]:
    """-> (open_clip model name to create, extra create_model kwargs, directory with weights or None)."""
    import open_clip

    p = Path(os.path.expanduser(arch))
    if p.suffix == ".json":
        if not p.is_file():
            raise FileNotFoundError(f"open_clip model config {str(p)!r} not found")
        cfg = json.loads(p.read_text())
        if "model_cfg" in cfg:  # open_clip_config.json of a hub snapshot
            return f"local-dir:{p.parent}", {}, p.parent
        open_clip.add_model_config(p)
        return p.stem, {}, None
    if p.is_dir():
        if not (p / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{str(p)!r} has no open_clip_config.json (expected an open_clip hub snapshot)")
        return f"local-dir:{p}", {}, p
    if arch not in open_clip.list_models():
        raise ValueError(
            f"open_clip has no model {arch!r} (open_clip {open_clip.__version__}); pass a built-in name, "
            "a path to a model-config JSON or a directory with open_clip_config.json"
        )
    return arch, {}, None


def build(arch: str, checkpoint: str | None = None, strict: bool = True, **kwargs) -> Backbone:
    """open_clip image tower.

    kwargs: ``tag`` (an open_clip pretrained tag such as 'openai' or 'webli': only its preprocessing is
    used, nothing is downloaded), ``force_image_size``, ``force_preprocess_cfg``, ``force_quick_gelu``,
    plus model-config overrides passed to ``open_clip.create_model``.
    """
    import open_clip

    spec = {"name": f"open_clip:{arch}", "checkpoint": checkpoint, "kwargs": dict(kwargs)}
    kwargs = dict(kwargs)
    tag = kwargs.pop("tag", None)
    force_pp = dict(kwargs.pop("force_preprocess_cfg", None) or {})
    name, extra, weights_dir = _resolve_arch(arch, kwargs)
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not tag_cfg:
            raise ValueError(f"open_clip model {name!r} has no pretrained tag {tag!r} "
                             f"(known: {open_clip.list_pretrained_tags_by_model(name)})")
        keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        force_pp = {**{k: tag_cfg[k] for k in keys if k in tag_cfg}, **force_pp}
        if tag_cfg.get("quick_gelu"):
            kwargs.setdefault("force_quick_gelu", True)

    what = f"open_clip model {arch!r}"
    path = None
    if checkpoint is not None:
        path = require_path(
            checkpoint, what,
            hint="Pass checkpoint= a local open_clip state dict, e.g. 'open_clip_pytorch_model.bin' or "
            "'open_clip_model.safetensors' from the model's hub page (timm/<model>).",
        )
        if path.is_dir():
            found = [path / f for f in OPEN_CLIP_WEIGHT_FILES if (path / f).is_file()]
            if not found:
                raise WeightsNotFound(f"{what}: no {' or '.join(OPEN_CLIP_WEIGHT_FILES)} in {str(path)!r}")
            path = found[0]
    elif weights_dir is not None:
        found = [weights_dir / f for f in OPEN_CLIP_WEIGHT_FILES if (weights_dir / f).is_file()]
        if found:  # a hub snapshot carries its weights: record them so the spec (and its digest) says so
            path = found[0]
            spec["checkpoint"] = str(path)

    # open_clip logs "No pretrained weights loaded ... initialized randomly" for pretrained=None; with
    # a checkpoint that is false (its image tower is loaded below, strictly), so the line is dropped
    with _without_random_init_warning(path is not None):
        model = open_clip.create_model(
            name, pretrained=None, load_weights=False, force_preprocess_cfg=force_pp or None, **extra, **kwargs
        )
    visual = model.visual
    del model  # the text tower is not needed
    if path is not None:
        _load_visual_weights(visual, path, what, strict=strict)
    preprocess = _preprocess_from_cfg(visual.preprocess_cfg)

    if hasattr(visual, "trunk"):  # TimmModel (SigLIP): the trunk is a timm ViT
        from .timm_backend import TimmBackbone

        bb = TimmBackbone(visual.trunk, spec)
        bb.facts = dataclasses.replace(bb.facts, preprocess=preprocess,
                                       extra={**bb.facts.extra, "open_clip_tower": "timm"})
        return bb
    return OpenClipBackbone(visual, spec, preprocess)
