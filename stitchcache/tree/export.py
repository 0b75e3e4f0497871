"""A tree as one self-contained artefact, and back as a LLaVA-style vision tower.

Artefact (``torch.save`` of plain tensors and JSON-able values; ``torch.load(weights_only=True)``):
  {"format": "stitchcache-tree/1", "spec": {trunk, k, branches (target spec + stitch config each),
   options}, "state": the tree's state dict (trunk, every branch backbone, every stitch)}

Loading rebuilds each backbone's *architecture* from its spec without its weights file (random init,
``checkpoint: None``) and then loads the artefact's tensors strictly: the original weight files are
not needed. (A ``hf:`` backbone is rebuilt from its ``arch``; a local model directory must still
hold its config.json.)

``VSTVisionTower`` follows the vision-tower conventions of LLaVA-family code
(``CLIPVisionTower``): ``forward(images) -> tokens`` (a tensor, or a list of (C, H, W) images),
output in the input dtype, ``hidden_size``, ``num_patches``, ``num_patches_per_side``, ``dtype``,
``device``, ``select_layer``, ``select_feature``, ``config``, ``dummy_feature``, ``is_loaded`` and an
``image_processor`` (the trunk's preprocessing: every branch sees the trunk's image). Frozen by
default; gradients flow only when some of its parameters were set to require them (e.g. to tune
the stitches inside an MLLM, as the paper does).
"""
from __future__ import annotations

import torch
from torch import nn

from ..backends import Preprocess, backbone_from_spec
from ..stitch.layers import Stitch
from .vst import StitchTree, TreeOptions

TREE_FORMAT = "stitchcache-tree/1"


def export_tree(tree: StitchTree, path) -> None:
    if not tree.spec:
        raise ValueError("this tree carries no spec (build it with tree_from_checkpoints)")
    spec = {**tree.spec, "facts": {n: tree.model(n).describe() for n in tree.names}, "names": tree.names,
            "options": dict(tree.options.__dict__)}
    state = {k: v.detach().cpu().contiguous() for k, v in tree.state_dict().items()}
    torch.save({"format": TREE_FORMAT, "spec": spec, "state": state}, path)


def _architecture(spec: dict):
    return backbone_from_spec({**spec, "checkpoint": None})


def load_tree_module(path, device="cpu") -> StitchTree:
    art = torch.load(path, map_location="cpu", weights_only=True)
    if art.get("format") != TREE_FORMAT:
        raise ValueError(f"{path}: not a stitchcache tree artefact (format {art.get('format')!r}, "
                         f"expected {TREE_FORMAT!r})")
    spec = art["spec"]
    trunk = _architecture(spec["trunk"]["spec"])
    branches = {}
    for b in spec["branches"]:
        cfg = b["stitch"]
        source = trunk if cfg["kind"] == "lora" else None  # the LoRA stitch copies trunk block k+1
        branches[b["name"]] = (Stitch(cfg, source=source), _architecture(b["target"]))
    tree = StitchTree(trunk, spec["k"], branches, spec["trunk"]["name"], TreeOptions(**spec["options"]), spec=spec)
    tree.load_state_dict(art["state"], strict=True)
    return tree.to(device).eval()


class TreeImageProcessor:
    """The trunk's preprocessing with the call shapes LLaVA code uses:
    ``processor.preprocess(images, return_tensors="pt")["pixel_values"]`` -> (B, C, H, W)."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess_config = preprocess
        self._transform = preprocess.transform()
        self.image_mean, self.image_std = list(preprocess.mean), list(preprocess.std)
        self.crop_size = {"height": preprocess.size[0], "width": preprocess.size[1]}
        self.size = {"shortest_edge": preprocess.resize}

    def preprocess(self, images, return_tensors: str = "pt") -> dict:
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self._transform(im) for im in images])}

    __call__ = preprocess


class VSTVisionTower(nn.Module):
    def __init__(self, tree: StitchTree, frozen: bool = True):
        super().__init__()
        self.tree = tree
        self.image_processor = TreeImageProcessor(tree.trunk.preprocess)
        self.is_loaded = True
        if frozen:
            self.requires_grad_(False)
        self.eval()

    # ---- LLaVA's vision-tower properties ------------------------------------------------------
    @property
    def select_layer(self) -> int:
        return self.tree.options.select_layer

    @property
    def select_feature(self) -> str:
        return self.tree.options.select_feature

    @property
    def fusion(self) -> str:
        return self.tree.options.fusion

    @property
    def hidden_size(self):
        """concat: sum of the branch widths; interleave: the common width; tuple: one width per branch."""
        widths = self.tree.widths()
        return {"concat": sum(widths), "interleave": widths[0]}.get(self.fusion, tuple(widths))

    @property
    def num_patches_per_side(self) -> int:
        return self.tree.trunk.grid[0]

    @property
    def num_patches(self) -> int:
        gh, gw = self.tree.trunk.grid
        return gh * gw

    @property
    def num_tokens(self):
        """Tokens per image in the output (interleave: all branches' tokens; tuple: one per branch)."""
        counts = [self.tree.num_tokens(n) for n in self.tree.names]
        return {"concat": counts[0], "interleave": sum(counts)}.get(self.fusion, tuple(counts))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def config(self) -> dict:
        return self.tree.spec

    @property
    def dummy_feature(self) -> torch.Tensor:
        if self.fusion == "tuple":
            raise AttributeError("fusion 'tuple' has one feature width per branch; no single dummy feature")
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    # ---- forward ------------------------------------------------------------------------------
    def _forward(self, images: torch.Tensor):
        out = self.tree(images.to(device=self.device, dtype=self.dtype))
        if isinstance(out, tuple):
            return tuple(o.to(images.dtype) for o in out)
        return out.to(images.dtype)

    def forward(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            if isinstance(images, (list, tuple)):
                return [self._forward(im.unsqueeze(0)) for im in images]
            return self._forward(images)


def load_tree(path, device="cpu", frozen: bool = True) -> VSTVisionTower:
    """An exported tree as a LLaVA-style vision tower (``nn.Module``: images -> tokens)."""
    return VSTVisionTower(load_tree_module(path, device), frozen=frozen)
