"""The LoRA stitch layer (paper §5.3): a frozen copy of the SOURCE model's block l+1 with LoRA adapters.

    s(h) = proj( block_{l+1}^{S, LoRA}(h) )      h: source tokens after block l, (B, p_s + G, D_s)

* The copied block is the source's own block l+1 (same weights as the source checkpoint), frozen;
  LoRA adapters ``W x + (alpha / r) B A x`` (A: r x d_in, Kaiming-uniform; B: d_out x r, zeros) sit on
  every linear map of the block: attention q/k/v (or fused qkv) and output projections, and the MLP's
  input/output layers (fc1/fc2, SwiGLU gates, open_clip c_fc/c_proj, HF dense layers). open_clip's
  ``nn.MultiheadAttention`` keeps its in/out projections as raw weights: those get the same low-rank
  update through a weight parametrization. Only A and B (and the width projection) are trainable.
* ``proj``: ``Linear(D_s, D_t)`` when the widths differ, identity (no parameters) otherwise.
* The block mixes tokens, so it must see source-shaped tokens: the prefix-token policy (``PrefixMap``)
  is applied AFTER the block and projection (``layers.Stitch`` does this for ``kind: lora``).
* Blocks that need more than the tokens (rope of DINOv3 / Eva) are run through the source ``Backbone``
  itself (``src.block(l+1, h)``), on a copy of the backbone whose other blocks are replaced by
  ``nn.Identity`` — the copy holds one block plus the (small) embedding / rope helpers.
* State dict: only the adapters and the projection. The frozen block is rebuilt from the source spec
  (stored in the stitch config) when the stitch is built, so checkpoints stay small; loading a state
  dict without the frozen keys is exact.
* With B = 0 (initialisation) the stitch equals the source block l+1: s(S_l(x)) = S_{l+1}(x).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``; ``base`` is frozen, A and B are trainable."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.scale = int(rank), float(alpha) / int(rank)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # some blocks read the weight instead of calling the layer (timm Eva: F.linear(x, qkv.weight, qkv_bias)):
    # they get the adapted weight
    @property
    def weight(self):
        return self.base.weight + (self.scale * (self.lora_B @ self.lora_A)).to(self.base.weight.dtype)

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (self.scale * delta).to(x.dtype)


class LoRADelta(nn.Module):
    """Weight parametrization W -> W + (alpha / rank) B A (for weights used without a Linear forward)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device=None):
        super().__init__()
        self.rank, self.scale = int(rank), float(alpha) / int(rank)
        self.lora_A = nn.Parameter(torch.empty(self.rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, w):
        return w + (self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)


def add_lora(block: nn.Module, rank: int, alpha: float) -> list[str]:
    """Put adapters on every linear map of ``block`` (in place); returns the adapted names."""
    if int(rank) < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    mhas = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.MultiheadAttention)]
    inside_mha = {f"{n}.out_proj" if n else "out_proj" for n, _ in mhas}
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in inside_mha]
    done = []
    for name, lin in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, attr, LoRALinear(lin, rank, alpha))
        done.append(name)
    for name, mha in mhas:
        for owner, wname in ((mha, "in_proj_weight"), (mha.out_proj, "weight")):
            w = getattr(owner, wname)
            if w is None:  # separate q/k/v weights (kdim != embed_dim)
                raise NotImplementedError(f"lora on {name}: nn.MultiheadAttention without a packed in_proj_weight")
            parametrize.register_parametrization(
                owner, wname, LoRADelta(w.shape[0], w.shape[1], rank, alpha, device=w.device), unsafe=True)
            done.append(f"{name}.{wname}" if owner is mha else f"{name}.out_proj.weight")
    if not done:
        raise ValueError(f"lora: block {type(block).__name__} has no linear layers to adapt")
    return done


def block_list(bb) -> nn.ModuleList:
    """The ModuleList holding a backbone's blocks (``bb.block(i, h)`` runs element i-1)."""
    from ..backends.hf_backend import HFBackbone
    from ..backends.open_clip_backend import OpenClipBackbone
    from ..backends.timm_backend import TimmBackbone

    if isinstance(bb, TimmBackbone):
        return bb.model.blocks
    if isinstance(bb, HFBackbone):
        return bb.layers
    if isinstance(bb, OpenClipBackbone):
        return bb.visual.transformer.resblocks
    raise NotImplementedError(f"lora stitch: no block list known for backbone type {type(bb).__name__}")


def extract_block(bb, i: int):
    """A frozen copy of backbone ``bb`` keeping only block ``i`` (1-based); the other blocks become
    ``nn.Identity`` (they are never copied). ``copy.block(i, h)`` then equals ``bb.block(i, h)``."""
    blocks = block_list(bb)
    if not 1 <= i <= len(blocks):
        raise ValueError(f"lora stitch: block {i} outside 1..{len(blocks)} of {bb.spec.get('name')}")
    memo = {id(b): nn.Identity() for j, b in enumerate(blocks) if j != i - 1}
    out = copy.deepcopy(bb, memo)
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()


def _is_trainable_key(key: str) -> bool:
    return "lora_A" in key or "lora_B" in key or key.startswith("proj.")


class LoRAStitch(nn.Module):
    """(B, T_s, D_s) source tokens at layer l -> (B, T_s, D_t); the prefix policy is applied by ``Stitch``.

    ``source``: an already built source Backbone (full, or from ``extract_block``) to copy block l+1
    from; None rebuilds it from ``source_spec``.
    """

    def __init__(self, source_spec: dict, layer: int, d_in: int, d_out: int, rank: int = 8,
                 alpha: float | None = None, source=None):
        super().__init__()
        self.block_index = int(layer) + 1
        if source is None:
            from ..backends import backbone_from_spec

            source = backbone_from_spec(source_spec)
        if source.width != int(d_in):
            raise ValueError(f"lora stitch: source width {source.width} != d_in {d_in}")
        self.src = extract_block(source, self.block_index)
        self.adapted = add_lora(block_list(self.src)[self.block_index - 1], rank, rank if alpha is None else alpha)
        self.proj = nn.Linear(int(d_in), int(d_out)) if int(d_in) != int(d_out) else nn.Identity()
        # the frozen block is rebuilt from the source spec: keep it out of state dicts
        self._frozen_keys = [k for k in nn.Module.state_dict(self) if not _is_trainable_key(k)]
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_fill_frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self.src.eval()  # the copied block is frozen: no dropout / drop-path ever
        return self

    def forward(self, h):
        blk = block_list(self.src)[self.block_index - 1]
        dt = next(blk.parameters()).dtype  # cached tokens are float32; a bf16 source runs in bf16
        out = self.src.block(self.block_index, h.to(dt)).to(h.dtype)
        return self.proj(out)


def _drop_frozen(module, state_dict, prefix, local_metadata):
    for k in module._frozen_keys:
        state_dict.pop(prefix + k, None)


def _fill_frozen(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if not module._frozen_keys:
        return
    own = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    for k in module._frozen_keys:
        if prefix + k not in state_dict and k in own:
            state_dict[prefix + k] = own[k].detach()
