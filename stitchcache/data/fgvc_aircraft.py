"""FGVC-Aircraft (fgvc-aircraft-2013b) in its official layout, classified by variant.

Config::

    aircraft:
      type: fgvc_aircraft
      root: /data/fgvc-aircraft-2013b   # the folder holding data/ (or data/ itself)
      crop_banner: true                 # default: drop the 20-px copyright banner at the bottom
      splits:
        train: {source: trainval}       # train | val | test | trainval (official files)
        val:   {source: test}

Files read: ``data/variants.txt`` (one variant name per line = the label order),
``data/images_variant_<source>.txt`` (lines ``<image id> <variant name>``; names may hold spaces)
and ``data/images/<image id>.jpg``. Every image of the official release carries a copyright banner
in its bottom 20 pixels; by the dataset's convention it is cropped before use (``crop_banner``,
default true; part of the manifest, so the two choices never share features).
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import Split, file_size, load_image, slice_items

SOURCES = ("train", "val", "test", "trainval")
BANNER_PX = 20


def _data_dir(root: Path, what: str) -> Path:
    for cand in (root / "data", root):
        if (cand / "variants.txt").is_file():
            return cand
    raise FileNotFoundError(f"{what}: no variants.txt in {str(root / 'data')!r} or {str(root)!r}; `root:` must be "
                            "the fgvc-aircraft-2013b folder (holding data/images, data/variants.txt, "
                            "data/images_variant_*.txt)")


class FGVCAircraftSplit(Split):
    def __init__(self, name: str, root: str, source: str = "trainval", crop_banner: bool = True,
                 start: int = 0, count: int | None = None):
        what = f"fgvc_aircraft split {name!r}"
        if source not in SOURCES:
            raise ValueError(f"{what}: source must be one of {', '.join(SOURCES)}, got {source!r}")
        if not root:
            raise ValueError(f"{what}: the dataset needs `root:` (the fgvc-aircraft-2013b folder)")
        self.name, self.source, self.crop_banner = name, source, bool(crop_banner)
        self.data = _data_dir(Path(os.path.expanduser(root)), what)
        self.classes = [l.strip() for l in (self.data / "variants.txt").read_text().splitlines() if l.strip()]
        index = {c: i for i, c in enumerate(self.classes)}
        split_file = self.data / f"images_variant_{source}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{what}: split file {str(split_file)!r} does not exist")
        items = []
        for n, line in enumerate(split_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{what}: {str(split_file)!r} line {n}: expected `<image id> <variant>`, got {line!r}")
            image_id, variant = parts[0], parts[1].strip()
            if variant not in index:
                raise ValueError(f"{what}: {str(split_file)!r} line {n}: variant {variant!r} is not in "
                                 f"{str(self.data / 'variants.txt')!r}")
            items.append((image_id, index[variant]))
        if not items:
            raise ValueError(f"{what}: split file {str(split_file)!r} lists no images")
        self.items = slice_items(items, start, count, what)
        self.num_classes = len(self.classes)
        self._manifest = None

    def __len__(self):
        return len(self.items)

    def _path(self, i) -> Path:
        return self.data / "images" / f"{self.items[i][0]}.jpg"

    def image_path(self, i):
        return self._path(i)

    def image_id(self, i):
        return f"images/{self.items[i][0]}.jpg"

    def image(self, i):
        im = load_image(self._path(i))
        if self.crop_banner:
            w, h = im.size
            if h <= BANNER_PX:
                raise ValueError(f"{str(self._path(i))!r} is only {h} px high: no {BANNER_PX}-px banner to crop "
                                 "(set crop_banner: false)")
            im = im.crop((0, 0, w, h - BANNER_PX))
        return im

    def label(self, i):
        return self.items[i][1]

    def image_id(self, i):
        return f"images/{self.items[i][0]}.jpg"   # relative to the data folder

    def manifest(self):
        if self._manifest is None:
            items = []
            for i, (image_id, y) in enumerate(self.items):
                p = self._path(i)
                size = file_size(p, f"fgvc_aircraft split {self.name!r}: image {str(p)!r} (listed in "
                                    f"images_variant_{self.source}.txt) does not exist")
                items.append([image_id, y, size])
            self._manifest = {"type": "fgvc_aircraft", "source": self.source, "crop_banner": self.crop_banner,
                              "banner_px": BANNER_PX if self.crop_banner else 0, "classes": self.classes,
                              "items": items}
        return self._manifest
