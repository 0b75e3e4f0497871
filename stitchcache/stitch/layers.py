"""Stitch layers s: source tokens at layer l (B, T_s, D_s) -> target tokens at layer l (B, T_t, D_t).

Prefix-token policy (when source and target have different prefix tokens, e.g. CLIP: CLS,
DINOv2-reg: CLS + 4 registers, SigLIP: none): patch tokens correspond one to one (same grid);
target prefix slot k is fed source prefix token k if the source has one, else source prefix 0
(its CLS), else — a source without prefix tokens — the mean of the source patch tokens. The
per-token stitch then maps every token D_s -> D_t. See docs/stages/stitch.md.

Stitch choices (``choices.py``): ``linear`` and ``linear_lstsq`` build the same ``LinearStitch``; they
differ only in the weights training starts from (random vs the least-squares fit, set by the trainer),
so ``kind`` in a checkpoint's stitch config names the choice and rebuilding ignores the init.

The LoRA stitch (``kind: lora``, ``lora.py``) is a copy of the source's block l+1 and mixes tokens:
it must see source-shaped tokens, so there the prefix map comes AFTER the stitch layer
(block -> width projection -> PrefixMap). The projection is per token and affine, so for the
per-token families both orders would give the same function anyway.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backends.registry import check_grids


class PrefixMap(nn.Module):
    """(B, p_s + G, D) -> (B, p_t + G, D) by the policy above; no parameters."""

    def __init__(self, src_prefix: int, tgt_prefix: int):
        super().__init__()
        self.src_prefix, self.tgt_prefix = int(src_prefix), int(tgt_prefix)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ps, pt = self.src_prefix, self.tgt_prefix
        if ps == pt:
            return h
        patches = h[:, ps:]
        if pt == 0:
            return patches
        if ps == 0:
            prefix = patches.mean(dim=1, keepdim=True).expand(-1, pt, -1)
        else:
            idx = torch.tensor([k if k < ps else 0 for k in range(pt)], device=h.device)
            prefix = h[:, idx]
        return torch.cat([prefix, patches], dim=1)


class LinearStitch(nn.Module):
    def __init__(self, d_in: int, d_out: int, init: str = "default"):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        if init == "identity":
            if d_in != d_out:
                raise ValueError(f"identity init needs equal widths, got {d_in} -> {d_out}")
            nn.init.eye_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, h):  # (B, T, D_s) -> (B, T, D_t)
        return self.proj(h)


class MLPStitch(nn.Module):
    """Two layers with ReLU, per token (the paper's default)."""

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None):
        super().__init__()
        hidden = int(hidden or d_out)
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)

    def forward(self, h):  # (B, T, D_s) -> (B, T, D_t)
        return self.fc2(self.act(self.fc1(h)))


from .lora import LoRAStitch  # noqa: E402

from .choices import CHOICES  # noqa: E402

_FAMILIES = {"linear": LinearStitch, "mlp": MLPStitch, "lora": LoRAStitch}
# every stitch choice (the --stitch / stitch.stitch_layers names) -> its module class
STITCH_LAYERS = {name: _FAMILIES[family] for name, (family, _) in CHOICES.items()}


class Stitch(nn.Module):
    """PrefixMap followed by a per-token stitch layer (linear, mlp), or the LoRA block followed by the
    PrefixMap (lora). ``config`` is JSON-able and rebuilds it; ``source`` (lora only): an already built
    source Backbone to copy block l+1 from instead of rebuilding it from ``config["source"]``."""

    def __init__(self, config: dict, source=None):
        super().__init__()
        self.config = dict(config)
        kind = config["kind"]
        if kind not in STITCH_LAYERS:
            raise ValueError(f"unknown stitch layer {kind!r} (known: {', '.join(STITCH_LAYERS)})")
        family = CHOICES[kind][0]
        self.prefix = PrefixMap(config["src_prefix"], config["tgt_prefix"])
        self.prefix_after = family == "lora"
        if family == "mlp":
            self.layer = MLPStitch(config["d_in"], config["d_out"], config.get("hidden"))
        elif family == "lora":
            self.layer = LoRAStitch(config["source"], config["layer"], config["d_in"], config["d_out"],
                                    rank=config.get("rank", 8), alpha=config.get("alpha"), source=source)
        else:
            self.layer = LinearStitch(config["d_in"], config["d_out"], config.get("init", "default"))

    def forward(self, h):
        if self.prefix_after:
            return self.prefix(self.layer(h))
        return self.layer(self.prefix(h))


def make_stitch_config(kind: str, src_facts: dict, tgt_facts: dict, **options) -> dict:
    """The stitch config. options: ``hidden`` (mlp); ``layer``, ``rank``, ``alpha`` (lora: the stitch
    point l, LoRA rank, alpha = rank when None); options of other kinds and None values are dropped."""
    kind_options = {"linear": {"init"}, "linear_lstsq": set(), "mlp": {"hidden"}, "lora": {"layer", "rank", "alpha"}}
    if kind not in kind_options:
        raise ValueError(f"unknown stitch layer {kind!r} (known: {', '.join(kind_options)})")
    options = {k: v for k, v in options.items() if k in kind_options[kind]}
    if kind == "lora":
        if options.get("layer") is None:
            raise ValueError("the lora stitch needs the stitch point (layer=l): it copies source block l+1")
        l, depth = int(options["layer"]), int(src_facts["depth"])
        if not 0 <= l < depth:
            raise ValueError(f"lora stitch at layer {l}: the source {src_facts['spec']['name']} has no block {l + 1} "
                             f"(depth {depth})")
        options["rank"] = int(options.get("rank") or 8)
        options["alpha"] = float(options["rank"] if options.get("alpha") is None else options["alpha"])
        options["source"] = src_facts["spec"]
    check_grids(src_facts, tgt_facts)  # a stitch pairs token i with token i: grids must be equal
    return {"kind": kind, "d_in": src_facts["width"], "d_out": tgt_facts["width"],
            "src_prefix": src_facts["num_prefix_tokens"], "tgt_prefix": tgt_facts["num_prefix_tokens"],
            **{k: v for k, v in options.items() if v is not None}}
