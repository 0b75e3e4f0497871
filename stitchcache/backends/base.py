"""The Backbone contract: one interface over every ViT family.

A backbone exposes its layers one at a time so that any stage can
  * capture the tokens after every block in one pass (``forward_layers``), and
  * resume the frozen network from cached tokens at any layer (``forward_from``).

Notation (see docs/concepts.md):
  h_0 = embed(x)                 tokens entering block 1 (prefix + grid, positions added, pre-norm)
  h_l = block(l, h_{l-1})        tokens after block l, 1 <= l <= depth
  z   = final_norm(h_L)          final (pre-logit) tokens, all of them, before pooling / heads

Subclasses live in ``stitchcache/backends/`` and implement only ``embed``, ``block`` and
``final_norm`` (plus the facts); everything else is derived here once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor. Part of every cache key."""

    size: tuple[int, int]  # (H, W) fed to the model
    resize: int  # shorter side is resized to this, then centre-cropped to ``size``
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    channels: int = 3  # grayscale images are repeated to this many channels
    # shortest:    shorter side -> resize, centre crop (torchvision, timm, open_clip CLIP)
    # shortest_hf: the same with floored crop offsets (HF image processors: DINOv2, CLIP)
    # squash:      resize straight to size, aspect ratio not kept (SigLIP, HF DINOv3)
    # shared_box:  the largest centred box of size's aspect ratio (crop fraction 1.0), resized to
    #              size: the region depends only on the image and the aspect ratio, so two models
    #              of one grid see the same pixels per token (extract.view: shared; see for_view)
    resize_mode: str = "shortest"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(
            size=tuple(d["size"]),
            resize=int(d["resize"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bicubic"),
            channels=int(d.get("channels", 3)),
            resize_mode=d.get("resize_mode", "shortest"),
        )

    def for_view(self, view: str) -> "Preprocess":
        """The preprocessing for an ``extract.view`` policy: 'native' = this library's own;
        'shared' = the same image region for every model (``shared_box``), resized to this model's
        size with its own interpolation, mean and std."""
        if view == "native":
            return self
        if view == "shared":
            return replace(self, resize_mode="shared_box", resize=min(self.size))
        raise ValueError(f"unknown extract.view {view!r} (shared | native)")

    def transform(self):
        """A torchvision transform: PIL image -> float tensor (C, H, W)."""
        from torchvision import transforms as T

        interp = {
            "bicubic": T.InterpolationMode.BICUBIC,
            "bilinear": T.InterpolationMode.BILINEAR,
            "nearest": T.InterpolationMode.NEAREST,
        }[self.interpolation]
        channels = self.channels

        def to_channels(img):
            return img.convert("RGB") if channels == 3 else img.convert("L")

        if self.resize_mode == "shortest":
            resize = [T.Resize(self.resize, interpolation=interp), T.CenterCrop(self.size)]
        elif self.resize_mode == "squash":
            resize = [T.Resize(tuple(self.size), interpolation=interp)]
        elif self.resize_mode == "shortest_hf":
            ch, cw = self.size

            def floor_center_crop(img):
                w, h = img.size
                if w < cw or h < ch:
                    return T.functional.center_crop(img, [ch, cw])
                top, left = (h - ch) // 2, (w - cw) // 2
                return img.crop((left, top, left + cw, top + ch))

            resize = [T.Resize(self.resize, interpolation=interp), T.Lambda(floor_center_crop)]
        elif self.resize_mode == "shared_box":
            size = list(self.size)

            def shared_box(img):
                top, left, h, w = center_box(img.size, self.size)
                return T.functional.resized_crop(img, top, left, h, w, size, interpolation=interp)

            resize = [T.Lambda(shared_box)]
        else:
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r} (shortest | shortest_hf | squash | shared_box)")
        return T.Compose([T.Lambda(to_channels), *resize, T.ToTensor(), T.Normalize(self.mean, self.std)])


def center_box(image_wh: tuple[int, int], size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the largest centred box of ``size_hw``'s aspect ratio inside an
    image of ``image_wh`` (PIL order): integer pixels, a function of the image and the aspect only."""
    w, h = image_wh
    H, W = size_hw
    if w * H >= h * W:  # image at least as wide as the box: full height
        bh, bw = h, min(w, max(1, round(h * W / H)))
    else:
        bw, bh = w, min(h, max(1, round(w * H / W)))
    return (h - bh) // 2, (w - bw) // 2, bh, bw


@dataclass
class BackboneFacts:
    depth: int  # number of blocks L
    width: int  # token dimension D
    patch_size: int
    image_size: tuple[int, int]
    num_prefix_tokens: int  # CLS + registers (0 for SigLIP)
    preprocess: Preprocess
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return self.num_prefix_tokens + gh * gw


class Backbone(nn.Module):
    """Frozen ViT seen as embed -> block_1 ... block_L -> final_norm.

    Subclasses set ``self.facts`` and ``self.spec`` (a JSON-able dict that rebuilds the model with
    ``create_backbone(**spec)``) and implement the three primitives below.
    """

    facts: BackboneFacts
    spec: dict

    # ---- primitives (family specific) -------------------------------------------------------
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, T, D)
        raise NotImplementedError

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:  # block i (1-based): (B,T,D)->(B,T,D)
        raise NotImplementedError

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        raise NotImplementedError

    # ---- facts ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.facts.depth

    @property
    def width(self) -> int:
        return self.facts.width

    @property
    def patch_size(self) -> int:
        return self.facts.patch_size

    @property
    def image_size(self) -> tuple[int, int]:
        return self.facts.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.facts.grid

    @property
    def num_prefix_tokens(self) -> int:
        return self.facts.num_prefix_tokens

    @property
    def num_tokens(self) -> int:
        return self.facts.num_tokens

    @property
    def preprocess(self) -> Preprocess:
        return self.facts.preprocess

    def describe(self) -> dict:
        """Facts as a JSON-able dict (stored in feature-store attributes)."""
        return {
            "spec": self.spec,
            "depth": self.depth,
            "width": self.width,
            "patch_size": self.patch_size,
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_tokens": self.num_tokens,
            "preprocess": self.preprocess.to_dict(),
        }

    # ---- derived ----------------------------------------------------------------------------
    def _check_layer(self, l: int) -> int:
        l = int(l)
        if not 0 <= l <= self.depth:
            raise ValueError(
                f"layer {l} is out of range for {self.spec.get('name', type(self).__name__)} "
                f"(valid: 0..{self.depth}; 0 = embeddings, {self.depth} = last block)"
            )
        return l

    def forward_layers(
        self, pixels: torch.Tensor, layers: Iterable[int] | None = None
    ) -> dict[int, torch.Tensor]:
        """One pass; returns {l: h_l} for the requested layers only (default: all 0..L).

        The forward stops after the deepest requested layer, and tokens of layers not asked for
        are dropped as soon as the next block has consumed them.
        """
        wanted = sorted({self._check_layer(l) for l in (range(self.depth + 1) if layers is None else layers)})
        if not wanted:
            return {}
        out: dict[int, torch.Tensor] = {}
        h = self.embed(pixels)
        if wanted[0] == 0:
            out[0] = h
        for i in range(1, wanted[-1] + 1):
            h = self.block(i, h)
            if i in wanted:
                out[i] = h
        return out

    def forward_from(self, h: torch.Tensor, l: int) -> torch.Tensor:
        """The tail: tokens after block ``l`` -> final tokens (blocks l+1..L, then final norm)."""
        l = self._check_layer(l)
        for i in range(l + 1, self.depth + 1):
            h = self.block(i, h)
        return self.final_norm(h)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.embed(pixels), 0)

    def freeze(self) -> "Backbone":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
