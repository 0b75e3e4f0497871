from __future__ import annotations

import hashlib
import json

import torch
from PIL import Image


class Split:
    """A fixed, ordered list of labelled images. Subclasses implement ``__len__``, ``image``,
    ``label`` and ``manifest`` (a JSON-able description that changes whenever the content does)."""

    name: str
    num_classes: int

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def manifest(self) -> dict:
        raise NotImplementedError

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()

    def torch(self, transform) -> "TransformedSplit":
        return TransformedSplit(self, transform)


class TransformedSplit(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.transform(self.split.image(i)), self.split.label(i), i
