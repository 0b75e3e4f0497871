"""ADE20K scene parsing (SceneParsing / ADEChallengeData2016 release): semantic segmentation, 150 classes.

Config::

    ade:
      type: ade20k
      root: /data/ADEChallengeData2016  # holds images/ and annotations/
      splits:
        train: {source: train}          # images/training, annotations/training
        val:   {source: val}            # images/validation, annotations/validation

Annotations are single-channel uint8 PNGs with values 0..150: 0 = "other" (unlabelled), 1..150 the
classes. Following the usual convention (mmsegmentation's ``reduce_zero_label``) class k becomes
label k-1 (0..149) and 0 becomes the ignore index 255, which counts in no loss and no metric.
``label(i)`` returns that mask as a PIL image (mode L) the size of the image; extraction applies the
image's resize / crop to it with nearest-neighbour sampling (data/segmentation.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .base import IGNORE_INDEX, SEGMENTATION, Split, load_image, slice_items

SOURCES = {"train": "training", "val": "validation"}
NUM_CLASSES = 150


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """ADE20K raw labels 0..150 -> 0..149, with 0 ("other") -> 255 (ignored)."""
    out = raw.astype(np.int16) - 1
    out[raw == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


class ADE20KSplit(Split):
    task = SEGMENTATION
    ignore_index = IGNORE_INDEX
    num_classes = NUM_CLASSES

    def __init__(self, name: str, root: str, source: str = "train", start: int = 0, count: int | None = None):
        what = f"ade20k split {name!r}"
        if source not in SOURCES:
            raise ValueError(f"{what}: source must be one of {', '.join(SOURCES)}, got {source!r}")
        if not root:
            raise ValueError(f"{what}: the dataset needs `root:` (the ADEChallengeData2016 folder)")
        self.name, self.source = name, source
        self.root = Path(os.path.expanduser(root))
        sub = SOURCES[source]
        self.image_dir, self.mask_dir = self.root / "images" / sub, self.root / "annotations" / sub
        for d in (self.image_dir, self.mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{what}: folder {str(d)!r} does not exist (`root:` must hold "
                                        f"images/{sub} and annotations/{sub})")
        stems = sorted(f.stem for f in self.image_dir.iterdir() if f.suffix.lower() == ".jpg")
        if not stems:
            raise ValueError(f"{what}: no .jpg images in {str(self.image_dir)!r}")
        missing = [s for s in stems if not (self.mask_dir / f"{s}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: {len(missing)} images have no annotation, e.g. "
                                    f"{str(self.mask_dir / (missing[0] + '.png'))!r}")
        self.items = slice_items(stems, start, count, what)
        self._manifest = None

    def __len__(self):
        return len(self.items)

    def image(self, i):
        return load_image(self.image_path(i))

    def image_path(self, i):
        return self.image_dir / f"{self.items[i]}.jpg"

    def image_id(self, i):
        return str(self.image_path(i).relative_to(self.root))

    def image_id(self, i):
        return f"images/{self.image_dir.name}/{self.items[i]}.jpg"

    def image_id(self, i):
        return str((self.image_dir / f"{self.items[i]}.jpg").relative_to(self.root))

    def label(self, i) -> Image.Image:
        path = self.mask_dir / f"{self.items[i]}.png"
        with Image.open(path) as m:
            raw = np.asarray(m)
        if raw.ndim != 2:
            raise ValueError(f"annotation {str(path)!r} has shape {raw.shape}; expected one channel of class indices")
        if raw.max(initial=0) > NUM_CLASSES:
            raise ValueError(f"annotation {str(path)!r} holds label {int(raw.max())} > {NUM_CLASSES}; expected the "
                             "ADEChallengeData2016 (150-class) annotations")
        with Image.open(self.image_dir / f"{self.items[i]}.jpg") as im:  # header only
            size = im.size
        if (raw.shape[1], raw.shape[0]) != size:
            raise ValueError(f"annotation {str(path)!r} is {raw.shape[1]}x{raw.shape[0]} but its image is "
                             f"{size[0]}x{size[1]}")
        return Image.fromarray(reduce_zero_label(raw), mode="L")

    def manifest(self):
        if self._manifest is None:
            items = [[s, (self.image_dir / f"{s}.jpg").stat().st_size, (self.mask_dir / f"{s}.png").stat().st_size]
                     for s in self.items]
            self._manifest = {"type": "ade20k", "source": self.source, "num_classes": NUM_CLASSES,
                              "labels": "reduce_zero_label: k -> k-1, 0 -> 255", "items": items}
        return self._manifest
