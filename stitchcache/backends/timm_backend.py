"""timm ViTs: ``VisionTransformer`` (DINOv2, CLIP, SigLIP, DeiT, one's own) and ``Eva`` (DINOv3, rope).

timm's own order (vision_transformer.py / eva.py ``forward_features``):
  patch_embed -> _pos_embed (-> rope for Eva) -> patch_drop -> norm_pre -> blocks -> norm
"""
from __future__ import annotations

import math
import os

import torch

from .base import Backbone, BackboneFacts, Preprocess
from .weights import load_checked, load_state_dict, require_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TimmBackbone(Backbone):
    def __init__(self, model: torch.nn.Module, spec: dict):
        super().__init__()
        self.model = model
        self.spec = spec
        self.has_rope = getattr(model, "rope", None) is not None
        self.rope_mixed = bool(getattr(model, "rope_mixed", False))
        self._rope = None  # (device, dtype, tensor) cache of the rotary embedding for our grid
        pe = model.patch_embed
        patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else int(pe.patch_size)
        img = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
        cfg = model.pretrained_cfg or {}
        import timm.data

        dc = timm.data.resolve_model_data_config(model)
        size = tuple(int(s) for s in img)  # the size the model was built for, not the cfg default
        crop_pct = dc.get("crop_pct", 1.0) or 1.0
        self.facts = BackboneFacts(
            depth=len(model.blocks),
            width=model.embed_dim,
            patch_size=int(patch),
            image_size=tuple(int(s) for s in img),
            num_prefix_tokens=int(model.num_prefix_tokens),
            preprocess=Preprocess(
                size=size,
                resize=int(math.floor(min(size) / crop_pct)),
                mean=tuple(float(m) for m in dc["mean"]),
                std=tuple(float(s) for s in dc["std"]),
                interpolation=dc.get("interpolation", "bicubic"),
                channels=int(dc["input_size"][0]),
            ),
            extra={"architecture": cfg.get("architecture", spec["name"])},
        )

    # -- primitives ---------------------------------------------------------------------------
    def embed(self, pixels):
        m = self.model
        x = m.patch_embed(pixels)
        if self.has_rope:
            x, _ = m._pos_embed(x)
        else:
            x = m._pos_embed(x)
            x = m.patch_drop(x)
        return m.norm_pre(x)

    def _rope_for(self, h: torch.Tensor):
        if not self.has_rope:
            return None
        key = (h.device, h.dtype)
        if self._rope is None or self._rope[0] != key:
            rope = self.model.rope
            # same choice as timm's Eva._pos_embed
            if not getattr(self.model, "dynamic_img_size", False) and getattr(rope, "feat_shape", None) is not None:
                emb = rope.get_embed()
            else:
                emb = rope.get_embed(shape=list(self.grid))
            self._rope = (key, emb.to(h.device))
        return self._rope[1]

    def block(self, i, h):
        blk = self.model.blocks[i - 1]
        if self.has_rope:
            rope = self._rope_for(h)
            if self.rope_mixed and rope is not None:
                rope = rope[i - 1]
            return blk(h, rope=rope)
        return blk(h)

    def final_norm(self, h):
        return self.model.norm(h)


def load_weights(model: torch.nn.Module, path, what: str, strict: bool = True) -> None:
    """A local timm checkpoint into ``model``, strictly (timm's own pretrained loading turns strict off
    whenever num_classes differs from the checkpoint's, which num_classes=0 always does). The
    model module's ``checkpoint_filter_fn`` converts other layouts (e.g. OpenAI CLIP, DINOv2) as timm
    does; the classifier, which the tokens never use, may be absent or dropped."""
    import sys

    sd = load_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    classifiers = (model.pretrained_cfg or {}).get("classifier") or "head"
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    if getattr(model, "num_classes", None) == 0:  # no classifier in the model: drop the file's
        sd = {k: v for k, v in sd.items() if not any(k.startswith(c + ".") for c in classifiers)}
    load_checked(model, sd, what, path, strict=strict,
                 ignore_missing=lambda k: any(k.startswith(c + ".") for c in classifiers))


def build(arch: str, checkpoint: str | None = None, strict: bool = True, **kwargs) -> TimmBackbone:
    import timm

    spec = {"name": f"timm:{arch}", "checkpoint": checkpoint, "kwargs": dict(kwargs)}
    kwargs = dict(kwargs)
    kwargs.setdefault("num_classes", 0)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", {}) or {})
    if checkpoint is not None:
        path = require_path(
            checkpoint,
            f"timm model {arch!r}",
            hint="Pass checkpoint= a local .pth/.safetensors file (e.g. the model's "
            "'open_clip_pytorch_model.bin' or 'model.safetensors' from its hub page).",
        )
    if not timm.is_model(arch):  # (list_models() has no pretrained tags: "arch.tag" names are valid)
        raise ValueError(f"timm has no architecture {arch!r} (timm {timm.__version__})")
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None, **kwargs)
    if checkpoint is not None:
        load_weights(model, path, f"timm model {arch!r}", strict=strict)
    return TimmBackbone(model, spec)
