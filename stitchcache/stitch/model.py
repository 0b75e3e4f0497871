"""The stitched model: source prefix (blocks 1..l) -> stitch -> frozen target tail (l+1..L, norm).

Checkpoints are plain dicts of tensors and JSON-able values (``torch.load(weights_only=True)``):
  {"format": 1, "spec": {"source": backbone spec, "target": backbone spec, "layer": l,
                         "stitch": stitch config, "method": ..., "head": {...} | None},
   "stitch_state": {...}, "head_state": {...} | None, "train": {...}}

``stitch_state`` holds the trainable tensors only. For ``kind: lora`` these are the LoRA adapters
and the width projection; the frozen copy of source block l+1 is rebuilt from the source spec in the
stitch config (``spec["stitch"]["source"]``), so rebuilding needs the source weights, as running the
stitched model does anyway.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backends import Backbone, backbone_from_spec
from ..tasks import Head, make_head  # noqa: F401  (Head: re-exported, it used to live here)
from .layers import Stitch

CHECKPOINT_FORMAT = 1


class StitchedTail(nn.Module):
    """stitch + frozen target tail; input: cached source tokens at layer l. Gradients flow through
    the tail to the stitch, never into the target's weights."""

    def __init__(self, stitch: Stitch, target: Backbone, layer: int):
        super().__init__()
        self.stitch, self.target, self.layer = stitch, target, int(layer)

    def forward(self, h_src):  # (B, T_s, D_s) -> (B, T_t, D_t) final tokens
        return self.target.forward_from(self.stitch(h_src), self.layer)


class StitchedModel(nn.Module):
    """images -> final tokens; ``head`` (if trained) gives logits via ``classify``.

    The input is what the *source* model expects: ``preprocess`` (size, resize, mean, std,
    interpolation, channels: ``backends.Preprocess``) describes it and ``transform`` (PIL image ->
    (C, H, W) tensor) makes it, exactly as extraction did for the cached features it was trained on."""

    def __init__(self, source: Backbone, tail: StitchedTail, head: Head | None = None):
        super().__init__()
        self.source, self.tail, self.head = source, tail, head
        self.preprocess = source.preprocess
        self.transform = source.preprocess.transform()

    def forward(self, pixels):
        h = self.source.forward_layers(pixels, [self.tail.layer])[self.tail.layer]
        return self.tail(h)

    def classify(self, pixels):
        if self.head is None:
            raise RuntimeError("this stitched model was trained without a task head (lfm/ffm)")
        return self.head(self(pixels))


def save_checkpoint(path, spec: dict, stitch: Stitch, head: Head | None, train_info: dict) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec,
                "stitch_state": {k: v.detach().cpu() for k, v in stitch.state_dict().items()},
                "head_state": None if head is None else {k: v.detach().cpu() for k, v in head.state_dict().items()},
                "train": train_info}, path)


def load_checkpoint(path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a stitchcache checkpoint (format {ckpt.get('format')!r})")
    return ckpt


def build_parts(ckpt: dict, target: Backbone | None = None, source: Backbone | None = None):
    """(stitch, head) with weights loaded. ``source``: the built source backbone (a lora stitch copies
    its block l+1 from it instead of rebuilding the source from its spec)."""
    spec = ckpt["spec"]
    stitch = Stitch(spec["stitch"], source=source)
    stitch.load_state_dict(ckpt["stitch_state"])
    head = None
    if spec.get("head"):
        head = make_head(spec["head"])  # classification Head, or the per-patch SegHead
        head.load_state_dict(ckpt["head_state"])
    return stitch, head


def load_stitched(path, device: str | torch.device = "cpu") -> StitchedModel:
    """A trained stitch as an ``nn.Module`` taking images (source preprocessing) -> final tokens."""
    ckpt = load_checkpoint(path)
    spec = ckpt["spec"]
    source, target = backbone_from_spec(spec["source"]), backbone_from_spec(spec["target"])
    stitch, head = build_parts(ckpt, source=source)
    model = StitchedModel(source, StitchedTail(stitch, target, spec["layer"]), head)
    return model.to(device).eval()
