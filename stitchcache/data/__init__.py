"""Datasets: a split is a numbered list of (image, label) with a content digest (its manifest).

``open_split(dataset_spec, split)`` returns a :class:`Split`; ``Split.torch(transform)`` is a
``torch.utils.data.Dataset`` yielding ``(pixels, label, index)`` so decoding and preprocessing run
in DataLoader workers.
"""
from __future__ import annotations

from .base import Split, TransformedSplit
from .registry import DATASET_TYPES, open_split

__all__ = ["DATASET_TYPES", "Split", "TransformedSplit", "open_split"]
