"""The VFM Stitch Tree (VST): one trunk up to layer k, then one branch per VFM.

    pixels ─► trunk.embed ─► trunk blocks 1..k ─► h_k ─┬─► trunk blocks k+1..j_0 (+ norm)   branch 0 (trunk)
                                                       ├─► stitch_1 ─► VFM_1 blocks k+1..j_1 (+ norm)
                                                       └─► stitch_n ─► VFM_n blocks k+1..j_n (+ norm)
                                                              └─► select_feature ─► fusion

* ``select_layer`` picks each branch's output layer j (LLaVA's ``mm_vision_select_layer``): j >= 0 is
  that layer, j < 0 counts from the end of ``h_0 .. h_L`` (-1 = layer L, -2 = layer L-1 = 23 of 24).
  Resolved per branch against that VFM's own depth.
* ``final_norm``: ``"auto"`` applies the VFM's final norm only when j = L (then the branch gives that
  VFM's final tokens ``z``, what the cache stores and FFM stitches are trained to match); ``"always"``
  applies it to h_j too; ``"never"`` returns the pre-norm h_j (LLaVA's ``hidden_states[-2]`` is
  pre-norm; MoF's DINOv2 tower returns the pre-norm ``x_prenorm``).
* ``select_feature``: ``patch`` drops each branch's own prefix tokens (CLS, registers), ``cls_patch``
  keeps them.
* ``fusion``: ``tuple`` (one (B, T_i, D_i) tensor per branch, trunk first), ``concat`` (channel
  concatenation, Cambrian / EAGLE: (B, T, sum D_i), equal token counts), ``interleave`` (MoF: tokens
  alternate [a0, b0, a1, b1, ...]: (B, n*T, D), equal token counts and widths).

The trunk runs once per forward; a branch never runs its own blocks 1..k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends import Backbone, backbone_from_spec

FUSIONS = ("tuple", "concat", "interleave")
SELECT_FEATURES = ("patch", "cls_patch")
FINAL_NORMS = ("auto", "always", "never")


class TreeError(ValueError):
    """A tree that cannot be built as asked; the message names the offending part."""


def resolve_layer(select_layer: int, depth: int, name: str) -> int:
    """LLaVA-style index into h_0 .. h_L -> a layer 0..L."""
    j = int(select_layer) if select_layer >= 0 else depth + 1 + int(select_layer)
    if not 0 <= j <= depth:
        raise TreeError(f"select_layer {select_layer} is out of range for {name} (depth {depth}: "
                        f"valid {-(depth + 1)}..{depth})")
    return j


@dataclass(frozen=True)
class TreeOptions:
    select_layer: int = -1
    select_feature: str = "patch"
    fusion: str = "tuple"
    final_norm: str = "auto"

    def __post_init__(self):
        for key, value, allowed in (("select_feature", self.select_feature, SELECT_FEATURES),
                                    ("fusion", self.fusion, FUSIONS), ("final_norm", self.final_norm, FINAL_NORMS)):
            if value not in allowed:
                raise TreeError(f"{key} {value!r} is not one of {', '.join(allowed)}")


def fuse(tokens: list[torch.Tensor], fusion: str, names: list[str]):
    """list of (B, T_i, D_i) -> tuple | (B, T, sum D) | (B, n*T, D)."""
    if fusion == "tuple":
        return tuple(tokens)
    counts = {n: t.shape[1] for n, t in zip(names, tokens)}
    if len(set(counts.values())) != 1:
        raise TreeError(f"fusion {fusion!r} needs equal token counts per branch, got {counts} "
                        "(select_feature: patch drops the differing prefix tokens)")
    if fusion == "concat":
        return torch.cat(tokens, dim=-1)
    widths = {n: t.shape[2] for n, t in zip(names, tokens)}
    if len(set(widths.values())) != 1:
        raise TreeError(f"fusion 'interleave' needs equal widths per branch, got {widths} "
                        "(use fusion: tuple and one projector per branch, as MoF-LLaVA does)")
    return torch.stack(tokens, dim=2).flatten(1, 2)  # (B, T, n, D) -> (B, n*T, D): a0 b0 a1 b1 ...


class StitchTree(nn.Module):
    """Trunk (a Backbone) shared up to layer ``k``; ``branches``: name -> (stitch, Backbone) for every
    other VFM, in output order after the trunk. A stitch maps trunk tokens h_k to that VFM's layer-k
    tokens; ``stitch=None`` is allowed only for a branch whose model is the trunk itself."""

    def __init__(self, trunk: Backbone, k: int, branches: dict[str, tuple[nn.Module | None, Backbone]],
                 trunk_name: str = "trunk", options: TreeOptions = TreeOptions(), spec: dict | None = None):
        super().__init__()
        if not branches:
            raise TreeError("a tree needs at least one branch besides the trunk (2 VFMs or more)")
        if trunk_name in branches:
            raise TreeError(f"branch name {trunk_name!r} is the trunk's name")
        self.trunk, self.k, self.trunk_name, self.options = trunk, int(k), trunk_name, options
        self.names = [trunk_name, *branches]
        self.models = nn.ModuleDict({n: m for n, (_, m) in branches.items()})
        self.stitches = nn.ModuleDict({n: s for n, (s, _) in branches.items() if s is not None})
        for n, (s, m) in branches.items():
            if s is None and m is not trunk:
                raise TreeError(f"branch {n!r} has no stitch but is not the trunk")
        self.spec = spec or {}
        self.layers = {}  # name -> selected output layer j
        for n in self.names:
            bb = self.model(n)
            if not 0 <= self.k <= bb.depth:
                raise TreeError(f"split point k={self.k} is outside 0..{bb.depth} for {n}")
            j = resolve_layer(options.select_layer, bb.depth, n)
            if j < self.k:
                raise TreeError(f"{n}: select_layer {options.select_layer} (layer {j}) lies inside the "
                                f"shared trunk (k={self.k})")
            self.layers[n] = j
        self.check_fusion()

    def check_fusion(self) -> None:
        """Fail at build time (not at the first forward) when the fusion cannot join the branches."""
        if self.options.fusion == "tuple":
            return
        counts = {n: self.num_tokens(n) for n in self.names}
        if len(set(counts.values())) != 1:
            raise TreeError(f"fusion {self.options.fusion!r} needs equal token counts per branch, got {counts} "
                            "(select_feature: patch drops the differing prefix tokens)")
        widths = dict(zip(self.names, self.widths()))
        if self.options.fusion == "interleave" and len(set(widths.values())) != 1:
            raise TreeError(f"fusion 'interleave' needs equal widths per branch, got {widths} "
                            "(use fusion: tuple and one projector per branch, as MoF-LLaVA does)")

    def model(self, name: str) -> Backbone:
        return self.trunk if name == self.trunk_name else self.models[name]

    # ---- facts ------------------------------------------------------------------------------
    def num_tokens(self, name: str) -> int:
        bb = self.model(name)
        grid = bb.grid[0] * bb.grid[1]
        return grid if self.options.select_feature == "patch" else bb.num_tokens

    def widths(self) -> list[int]:
        return [self.model(n).width for n in self.names]

    # ---- forward ----------------------------------------------------------------------------
    def _head(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """One branch from the (stitched) layer-k tokens to its selected, featured output."""
        bb, j = self.model(name), self.layers[name]
        for i in range(self.k + 1, j + 1):
            h = bb.block(i, h)
        norm = self.options.final_norm
        if norm == "always" or (norm == "auto" and j == bb.depth):
            h = bb.final_norm(h)
        if self.options.select_feature == "patch":
            h = h[:, bb.num_prefix_tokens:]
        return h

    def trunk_tokens(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> h_k (B, T, D)
        return self.trunk.forward_layers(pixels, [self.k])[self.k]

    def branch_tokens(self, h_k: torch.Tensor) -> list[torch.Tensor]:
        """From the trunk's layer-k tokens (e.g. read from the cache) to every branch's output."""
        out = []
        for n in self.names:
            x = h_k if n == self.trunk_name or n not in self.stitches else self.stitches[n](h_k)
            out.append(self._head(n, x))
        return out

    def forward(self, pixels: torch.Tensor):
        return fuse(self.branch_tokens(self.trunk_tokens(pixels)), self.options.fusion, self.names)


def full_tokens(models: dict[str, Backbone], pixels: dict[str, torch.Tensor], options: TreeOptions) -> list:
    """"Full": every VFM end to end on its own input, cut at the same select_layer / norm / feature."""
    out = []
    for n, bb in models.items():
        j = resolve_layer(options.select_layer, bb.depth, n)
        h = bb.forward_layers(pixels[n], [j])[j]
        if options.final_norm == "always" or (options.final_norm == "auto" and j == bb.depth):
            h = bb.final_norm(h)
        out.append(h[:, bb.num_prefix_tokens:] if options.select_feature == "patch" else h)
    return out


# ---- building from the workflow's stitch checkpoints ----------------------------------------------

def check_branch(ckpt: dict, path, trunk_name: str, trunk_spec: dict | None, k: int) -> None:
    """Every stitch must start at the trunk, at layer k."""
    spec = ckpt["spec"]
    if spec.get("source_name") != trunk_name or (trunk_spec is not None and spec["source"] != trunk_spec):
        raise TreeError(f"{path}: its source is {spec.get('source_name')!r}, not the trunk {trunk_name!r} "
                        "(a branch's stitch must map the trunk's tokens)")
    if int(spec["layer"]) != int(k):
        raise TreeError(f"{path}: stitched at layer {spec['layer']}, but the tree splits at k={k}")


def tree_from_checkpoints(checkpoints: list, k: int, options: TreeOptions = TreeOptions(),
                          trunk: Backbone | None = None) -> StitchTree:
    """A tree from stitch checkpoints (one per branch, all trunk -> VFM_i at layer k). The trunk is
    rebuilt from the first checkpoint's source spec unless given."""
    from ..stitch.model import build_parts, load_checkpoint

    if not checkpoints:
        raise TreeError("a tree needs at least one stitch checkpoint (one per branch)")
    ckpts = [load_checkpoint(p) for p in checkpoints]
    first = ckpts[0]["spec"]
    trunk_name, trunk_spec = first["source_name"], first["source"]
    if trunk is None:
        trunk = backbone_from_spec(trunk_spec)
    branches, stitch_specs = {}, []
    for path, ck in zip(checkpoints, ckpts):
        check_branch(ck, path, trunk_name, trunk_spec, k)
        name = ck["spec"]["target_name"]
        if name == trunk_name:
            name = f"{name}_self"  # a self-stitch branch (a control): named apart from the trunk
        if name in branches:
            raise TreeError(f"{path}: a second branch for {name!r}")
        stitch, _ = build_parts(ck, source=trunk)
        branches[name] = (stitch.eval(), backbone_from_spec(ck["spec"]["target"]))
        stitch_specs.append({"name": name, "target": ck["spec"]["target"], "stitch": ck["spec"]["stitch"],
                             "checkpoint": str(path), "method": ck["spec"].get("method"),
                             "dataset": ck["spec"].get("dataset")})
    spec = {"trunk": {"name": trunk_name, "spec": trunk_spec}, "k": int(k), "branches": stitch_specs,
            "options": options.__dict__.copy()}
    tree = StitchTree(trunk, k, branches, trunk_name, options, spec=spec)
    for p in tree.parameters():
        p.requires_grad_(False)
    return tree.eval()
