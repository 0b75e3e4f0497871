"""Datasets: a split is a numbered list of (image, label) with a content digest (its manifest).

``open_split(dataset_spec, split)`` returns a :class:`Split`; ``Split.torch(transform)`` is a
``torch.utils.data.Dataset`` yielding ``(pixels, label, index)`` so decoding and preprocessing run
in DataLoader workers. Types (docs/stages/extract.md): ``fashion_mnist``, ``image_folder``,
``image_list`` and ``fgvc_aircraft`` (classification: ``label(i)`` is a class index) and ``ade20k``
(``task = "segmentation"``: ``label(i)`` is a PIL mask, resized / cropped with the image by
``segmentation.mask_transform`` and passed as ``Split.torch(transform, label_transform)``).
``python -m stitchcache data subset`` writes balanced ``image_list`` CSVs (subset.py).
"""
from __future__ import annotations

from .base import CLASSIFICATION, IGNORE_INDEX, SEGMENTATION, Split, TransformedSplit
from .registry import DATASET_TYPES, open_split

__all__ = ["CLASSIFICATION", "DATASET_TYPES", "IGNORE_INDEX", "SEGMENTATION", "Split", "TransformedSplit",
           "open_split"]
