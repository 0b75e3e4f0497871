"""Masks follow the image: the geometry of a model's preprocessing, applied to a label mask.

``mask_transform(preprocess)`` repeats exactly the resize and crop of ``Preprocess.transform()``
(backends/base.py) on a PIL mask, with nearest-neighbour sampling (labels are never blended) and
the ignore index wherever a crop pads beyond the image, and returns a uint8 tensor (H, W) of the
model's input size. Pixel (y, x) of the mask is then pixel (y, x) of the model input, so patch
(i, j) of the token grid covers mask rows i*p..(i+1)*p-1, columns j*p..(j+1)*p-1.
"""
from __future__ import annotations

import numpy as np

from .base import IGNORE_INDEX


def _center_crop(img, size, fill: int):
    """torchvision's center_crop, padding with ``fill`` (torchvision pads masks with 0, a class)."""
    from torchvision.transforms import functional as F

    ch, cw = size
    w, h = img.size
    if cw > w or ch > h:
        pad = [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
               (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0]
        img = F.pad(img, pad, fill=fill)
    return F.center_crop(img, [ch, cw])


def mask_transform(preprocess, fill: int = IGNORE_INDEX):
    """PIL mask (mode L) -> uint8 tensor (H, W), aligned with ``preprocess.transform()``'s output."""
    from torchvision import transforms as T

    nearest = T.InterpolationMode.NEAREST
    size = tuple(preprocess.size)
    mode = preprocess.resize_mode
    if mode == "shortest":
        ops = [T.Resize(preprocess.resize, interpolation=nearest), lambda m: _center_crop(m, size, fill)]
    elif mode == "squash":
        ops = [T.Resize(size, interpolation=nearest)]
    elif mode == "shortest_hf":
        ch, cw = size

        def floor_center_crop(m):
            w, h = m.size
            if w < cw or h < ch:
                return _center_crop(m, size, fill)
            top, left = (h - ch) // 2, (w - cw) // 2
            return m.crop((left, top, left + cw, top + ch))

        ops = [T.Resize(preprocess.resize, interpolation=nearest), floor_center_crop]
    elif mode == "shared_box":
        from torchvision.transforms import functional as F

        from ..backends.base import center_box

        def shared_box(m):
            top, left, h, w = center_box(m.size, size)
            return F.resized_crop(m, top, left, h, w, list(size), interpolation=nearest)

        ops = [shared_box]
    else:
        raise ValueError(f"unsupported resize_mode {mode!r} (shortest | shortest_hf | squash | shared_box)")

    def apply(mask):
        if mask.mode != "L":
            raise ValueError(f"a segmentation mask must be a PIL image of mode L (uint8 labels), got mode {mask.mode!r}")
        for op in ops:
            mask = op(mask)
        out = np.array(mask, dtype=np.uint8)
        if out.shape != size:
            raise RuntimeError(f"mask preprocessing gave {out.shape}, expected {size}")
        import torch

        return torch.from_numpy(out)

    return apply
