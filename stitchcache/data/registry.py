from __future__ import annotations

from .base import Split
from .fashion_mnist import FashionMNISTSplit
from .image_folder import ImageFolderSplit

DATASET_TYPES = ("fashion_mnist", "image_folder")


def open_split(dataset_spec: dict, split: str) -> Split:
    """dataset_spec: a config ``datasets.<name>`` entry (with ``name``); split: a key of its ``splits``."""
    name = dataset_spec.get("name", "?")
    splits = dataset_spec.get("splits", {})
    if split not in splits:
        raise KeyError(f"dataset {name!r} has no split {split!r} (config datasets.{name}.splits: {sorted(splits)})")
    s = dict(splits[split])
    kind = dataset_spec.get("type")
    if kind == "fashion_mnist":
        return FashionMNISTSplit(split, root=dataset_spec.get("root", "/usr/share/datasets/fashion-mnist"),
                                 source=s.get("source", "train"), start=s.get("start", 0), count=s.get("count"))
    if kind == "image_folder":
        root = s.get("root") or dataset_spec.get("root")
        return ImageFolderSplit(split, root=root, start=s.get("start", 0), count=s.get("count"))
    raise ValueError(f"dataset {name!r}: unknown type {kind!r} (known: {', '.join(DATASET_TYPES)})")
