from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image

CLASSIFICATION, SEGMENTATION = "classification", "segmentation"
IGNORE_INDEX = 255  # segmentation: pixels with this label count in no loss and no metric


def file_size(path, missing: str) -> int:
    """Size in bytes of a listed image (part of a manifest); a missing file raises with `missing`."""
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(missing) from None


class Split:
    """A fixed, ordered list of labelled images. Subclasses implement ``__len__``, ``image``,
    ``label`` and ``manifest`` (a JSON-able description that changes whenever the content does).

    ``task``: ``"classification"`` (``label(i)`` is a class index) or ``"segmentation"``
    (``label(i)`` is a PIL mask, mode ``L``, the size of ``image(i)``: class indices
    0..num_classes-1, ``ignore_index`` for unlabelled pixels)."""

    name: str
    num_classes: int
    task: str = CLASSIFICATION
    ignore_index: int | None = None
    classes: list[str] | None = None  # class names in label order, where the dataset has them

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int):
        raise NotImplementedError

    def manifest(self) -> dict:
        raise NotImplementedError

    def image_id(self, i: int) -> str:
        """A stable id of image ``i``, the same whichever split or slice holds it: the image's path
        relative to the dataset root, or ``<source>:<index>`` for datasets without files."""
        raise NotImplementedError(f"{type(self).__name__} has no image ids")

    def image_ids(self) -> list[str]:
        return [self.image_id(i) for i in range(len(self))]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()

    def torch(self, transform, label_transform=None) -> "TransformedSplit":
        """A torch Dataset of (pixels, label, index). Segmentation splits need ``label_transform``
        (the image's geometry applied to the mask: ``data.segmentation.mask_transform``)."""
        return TransformedSplit(self, transform, label_transform)


class TransformedSplit(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform, label_transform=None):
        if getattr(split, "task", CLASSIFICATION) == SEGMENTATION and label_transform is None:
            raise ValueError(f"segmentation split {split.name!r}: its masks need a label_transform that "
                             "follows the image preprocessing (data.segmentation.mask_transform)")
        self.split, self.transform, self.label_transform = split, transform, label_transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        label = self.split.label(i)
        if self.label_transform is not None:
            label = self.label_transform(label)
        return self.transform(self.split.image(i)), label, i


def slice_items(items: list, start: int, count: int | None, what: str) -> list:
    """items[start:start+count] with a clear error when the slice lies outside the list."""
    start = int(start or 0)
    count = len(items) - start if count is None else int(count)
    if start < 0 or count <= 0 or start + count > len(items):
        raise ValueError(f"{what}: start={start}, count={count} lies outside its {len(items)} images")
    return items[start:start + count]


def file_sha256(path) -> str:
    """sha256 of a small file (a list, a class file): part of a manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_image(path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist") from None
