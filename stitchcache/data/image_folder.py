"""A folder of images, one sub-folder per class (``root/<class>/<image>``), torchvision style.

The images are listed class by class (classes sorted, files sorted within a class), and a split's
``start`` / ``count`` slice that list: a ``count`` below the total takes whole classes from the
front, not a sample of every class (a note says so). For a balanced per-class sample, write lists
with ``python -m stitchcache data subset`` and use an ``image_list`` dataset."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .base import Split, load_image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class ImageFolderSplit(Split):
    def __init__(self, name: str, root: str, start: int = 0, count: int | None = None, classes: list[str] | None = None):
        self.name = name
        self.root = Path(os.path.expanduser(root))
        if not self.root.is_dir():
            raise FileNotFoundError(f"image_folder split {name!r}: folder {str(self.root)!r} does not exist")
        self.classes = classes or sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"image_folder split {name!r}: {str(self.root)!r} has no class sub-folders")
        items = []
        for ci, c in enumerate(self.classes):
            for f in sorted((self.root / c).rglob("*")):
                if f.suffix.lower() in EXTENSIONS:
                    items.append((str(f.relative_to(self.root)), ci, f.stat().st_size))
        count = len(items) - start if count is None else count
        if count <= 0 or start + count > len(items):
            raise ValueError(f"image_folder split {name!r}: start={start}, count={count} outside {len(items)} images")
        self.items = items[start : start + count]
        self.num_classes = len(self.classes)
        covered = sorted({ci for _, ci, _ in self.items})
        if len(covered) < len(self.classes):  # start/count cut the class-sorted list: say so
            print(f"[stitchcache] note: image_folder split {name!r}: start={start}, count={count} take images in "
                  f"class order (classes sorted, then files), so this split holds {len(covered)} of "
                  f"{len(self.classes)} classes ({self.classes[covered[0]]!r}..{self.classes[covered[-1]]!r}); "
                  "for a per-class sample write lists with `python -m stitchcache data subset` and use an "
                  "image_list dataset", file=sys.stderr)

    def __len__(self):
        return len(self.items)

    def image(self, i):
        return load_image(self.root / self.items[i][0])

    def image_path(self, i):
        return self.root / self.items[i][0]

    def image_id(self, i):
        return self.items[i][0]

    def label(self, i):
        return self.items[i][1]

    def image_id(self, i):
        return str(self.items[i][0])   # path relative to the root

    def manifest(self):
        return {"type": "image_folder", "classes": self.classes, "items": self.items}
