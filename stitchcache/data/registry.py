from __future__ import annotations

from .ade20k import ADE20KSplit
from .base import Split
from .fashion_mnist import FashionMNISTSplit
from .fgvc_aircraft import FGVCAircraftSplit
from .image_folder import ImageFolderSplit
from .holdout import apply_holdout
from .image_list import ImageListSplit

DATASET_TYPES = ("fashion_mnist", "image_folder", "image_list", "fgvc_aircraft", "ade20k")

# split keys each type reads (besides start / count); anything else is an error naming the key
_SPLIT_KEYS = {"fashion_mnist": {"source"}, "image_folder": {"root"}, "image_list": {"list"},
               "fgvc_aircraft": {"source"}, "ade20k": {"source"}}
_DATASET_KEYS = {"fashion_mnist": set(), "image_folder": set(), "image_list": {"classes"},
                 "fgvc_aircraft": {"crop_banner"}, "ade20k": set()}
_COMMON_DATASET_KEYS = {"name", "type", "root", "splits", "on_bad_image"}  # on_bad_image: data/scan.py


def class_order_advice(kind: str | None) -> str:
    """How to make the train and val splits of a ``kind`` dataset number their classes alike."""
    if kind == "image_folder":
        return ("give both split folders the same class sub-folders (image_folder numbers the sorted "
                "sub-folder names; an empty folder keeps a class's index)")
    if kind == "image_list":
        return "give the dataset a `classes:` file (one class name per line) so both splits use one label order"
    return ("image_folder: give both split folders the same class sub-folders (an empty folder keeps a class's "
            "index); image_list: give the dataset a `classes:` file so both splits use one label order")


def open_split(dataset_spec: dict, split: str) -> Split:
    """dataset_spec: a config ``datasets.<name>`` entry (with ``name``); split: a key of its ``splits``.
    A split with ``holdout:`` is a seeded share of another split, which then excludes it (holdout.py)."""
    name = dataset_spec.get("name", "?")
    splits = dataset_spec.get("splits", {})
    if split not in splits:
        raise KeyError(f"dataset {name!r} has no split {split!r} (config datasets.{name}.splits: {sorted(splits)})")
    return apply_holdout(name, split, splits, lambda n: _open_listed(dataset_spec, n))


def _open_listed(dataset_spec: dict, split: str) -> Split:
    """A split as its config entry lists it (no holdout applied)."""
    name = dataset_spec.get("name", "?")
    s = dict(dataset_spec["splits"][split])
    kind = dataset_spec.get("type")
    if kind not in DATASET_TYPES:
        raise ValueError(f"dataset {name!r}: unknown type {kind!r} (known: {', '.join(DATASET_TYPES)})")
    extra = sorted(set(s) - _SPLIT_KEYS[kind] - {"start", "count"})
    if extra:
        raise ValueError(f"dataset {name!r} ({kind}): datasets.{name}.splits.{split} has keys {extra} that a "
                         f"{kind} split does not read (it reads: {sorted(_SPLIT_KEYS[kind] | {'start', 'count'})})")
    extra = sorted(set(dataset_spec) - _COMMON_DATASET_KEYS - _DATASET_KEYS[kind])
    if extra:
        raise ValueError(f"dataset {name!r} ({kind}): keys {extra} are not read by a {kind} dataset")
    start, count = s.get("start", 0), s.get("count")
    if kind == "fashion_mnist":
        return FashionMNISTSplit(split, root=dataset_spec.get("root", "/usr/share/datasets/fashion-mnist"),
                                 source=s.get("source", "train"), start=start, count=count)
    if kind == "image_folder":
        root = s.get("root") or dataset_spec.get("root")
        return ImageFolderSplit(split, root=root, start=start, count=count)
    if kind == "image_list":
        return ImageListSplit(split, root=dataset_spec.get("root"), list=s.get("list"),
                              classes=dataset_spec.get("classes"), start=start, count=count)
    if kind == "fgvc_aircraft":
        return FGVCAircraftSplit(split, root=dataset_spec.get("root"), source=s.get("source", "trainval"),
                                 crop_banner=dataset_spec.get("crop_banner", True), start=start, count=count)
    return ADE20KSplit(split, root=dataset_spec.get("root"), source=s.get("source", "train"), start=start, count=count)
