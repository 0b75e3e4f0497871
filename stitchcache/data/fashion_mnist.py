"""Fashion-MNIST from its IDX files (Debian: ``apt-get install dataset-fashion-mnist``)."""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..digest import file_digest
from .base import Split

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _find(root: Path, name: str) -> Path:
    for cand in (root / name, root / name.removesuffix(".gz")):
        if cand.exists():
            return cand
    raise FileNotFoundError(
        f"Fashion-MNIST file {name!r} not found in {str(root)!r}. Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (files land in "
        f"{DEFAULT_ROOT}) or set the dataset's `root:` to a folder holding the IDX files."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=4)
def _load(root: str, source: str):
    imgs, labels = FILES[source]
    r = Path(root)
    return _read_idx(_find(r, imgs)), _read_idx(_find(r, labels))


class FashionMNISTSplit(Split):
    num_classes = 10

    def __init__(self, name: str, root: str = DEFAULT_ROOT, source: str = "train", start: int = 0, count: int | None = None):
        if source not in FILES:
            raise ValueError(f"fashion_mnist split {name!r}: source must be one of {sorted(FILES)}, got {source!r}")
        self.name, self.root, self.source = name, os.path.expanduser(root), source
        images, labels = _load(self.root, source)
        total = len(labels)
        count = total - start if count is None else count
        if start < 0 or count <= 0 or start + count > total:
            raise ValueError(
                f"fashion_mnist split {name!r}: start={start}, count={count} lies outside the "
                f"{total} images of source {source!r}"
            )
        self.start, self.count = start, count
        self._images, self._labels = images, labels

    def __len__(self):
        return self.count

    def image(self, i):
        return Image.fromarray(self._images[self.start + i], mode="L")

    def label(self, i):
        return int(self._labels[self.start + i])

    def image_id(self, i):
        return f"{self.source}:{self.start + i}"   # index into the IDX file of its source

    def labels(self) -> np.ndarray:
        return self._labels[self.start : self.start + self.count].astype(np.int64)

    def manifest(self):
        imgs, labels = FILES[self.source]
        r = Path(self.root)
        return {
            "type": "fashion_mnist",
            "files": [file_digest(_find(r, imgs)), file_digest(_find(r, labels))],
            "source": self.source,
            "start": self.start,
            "count": self.count,
        }
