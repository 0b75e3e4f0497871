"""Held-out selection splits: a seeded fraction of another split's images, per class.

A dataset that ships only train/test (Fashion-MNIST, image folders, FGVC-Aircraft trainval/test)
still needs a selection split (LR grid, early stopping) that is neither trained on nor reported::

    splits:
      train: {source: train}                                   # minus every image held out of it
      val:   {holdout: {of: train, fraction: 0.1, seed: 0}}    # 10 % of train's images, per class
      test:  {source: test}                                    # what is reported

``val`` is ``fraction`` of the images of split ``train`` (as that split is defined: source,
start, count), drawn per class (classification; segmentation: over all images) with
``numpy.random.default_rng(seed)``; ``train`` then excludes the images of every split that holds
out of it. Both are :class:`SubsetSplit` views of the base split whose manifests record the base
manifest, the holdout rule and the list of held-out indices, so any change to either changes
the digest (and every cache key built on it).
"""
from __future__ import annotations

import numpy as np

from .base import CLASSIFICATION, Split

HOLDOUT_KEYS = {"of", "fraction", "seed"}


def holdout_rule(dataset_name: str, split: str, splits: dict) -> dict | None:
    """The split's ``holdout`` entry, checked (None when it has none); errors name the config key."""
    s = splits[split]
    if "holdout" not in s:
        return None
    where = f"datasets.{dataset_name}.splits.{split}"
    defaults = {"start": 0, "count": None}  # what schema validation fills in
    extra = sorted(k for k in set(s) - {"holdout"} if k not in defaults or s[k] != defaults[k])
    if extra:
        raise ValueError(f"{where}: a holdout split takes its images from another split, so it has no "
                         f"keys {extra} (set them on the split it holds out of)")
    h = dict(s["holdout"])
    bad = sorted(set(h) - HOLDOUT_KEYS)
    if bad or "of" not in h or "fraction" not in h:
        raise ValueError(f"{where}.holdout: needs `of` and `fraction` (optional `seed`), got keys {sorted(h)}")
    of = h["of"]
    if of == split or of not in splits:
        raise ValueError(f"{where}.holdout.of: {of!r} is not another split of dataset {dataset_name!r} "
                         f"(splits: {sorted(splits)})")
    if "holdout" in splits[of]:
        raise ValueError(f"{where}.holdout.of: split {of!r} is itself a holdout split; hold out of a split "
                         "that lists images")
    fraction = float(h["fraction"])
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{where}.holdout.fraction: {fraction} must lie strictly between 0 and 1")
    return {"of": of, "fraction": fraction, "seed": int(h.get("seed", 0))}


def holders(dataset_name: str, split: str, splits: dict) -> list[str]:
    """Names of the splits that hold images out of ``split`` (sorted)."""
    return sorted(n for n in splits if n != split and (holdout_rule(dataset_name, n, splits) or {}).get("of") == split)


def related_splits(splits: dict, split: str, dataset_name: str = "?") -> list[str]:
    """Every split whose definition decides the images of ``split``: itself, the split it holds
    out of, and the splits holding out of that one. A job reading ``split`` needs all of them in
    its dataset spec (the workflow passes only these, so editing another split re-runs nothing)."""
    rule = holdout_rule(dataset_name, split, splits)
    base = rule["of"] if rule else split
    return sorted({split, base, *holders(dataset_name, base, splits)})


def held_out_indices(base: Split, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices into ``base``: ``round(fraction * n_c)`` images of every class c (at least one
    per class of two or more images), drawn with ``default_rng(seed)``; segmentation: of all images."""
    rng = np.random.default_rng(seed)
    n = len(base)
    if getattr(base, "task", CLASSIFICATION) != CLASSIFICATION:
        k = int(round(fraction * n))
        if not 0 < k < n:
            raise ValueError(f"holdout of {fraction} from split {base.name!r} ({n} images) leaves no images on one side")
        return np.sort(rng.choice(n, size=k, replace=False))
    labels = base.labels() if hasattr(base, "labels") else np.array([base.label(i) for i in range(n)], np.int64)
    out = []
    for c in np.unique(labels):  # classes in label order: the draw does not depend on file order
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1)
        out.append(rng.choice(members, size=k, replace=False))
    idx = np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
    if len(idx) == 0:
        raise ValueError(f"holdout of {fraction} from split {base.name!r} ({n} images) holds out no image")
    return idx


class SubsetSplit(Split):
    """The images ``indices`` of ``base`` (in base order), with the rule that chose them."""

    def __init__(self, name: str, base: Split, indices: np.ndarray, rule: dict):
        self.name, self.base, self.rule = name, base, rule
        self.indices = np.asarray(indices, dtype=np.int64)
        self.num_classes = base.num_classes
        self.task = getattr(base, "task", CLASSIFICATION)
        self.ignore_index = getattr(base, "ignore_index", None)
        self.classes = getattr(base, "classes", None)

    def __len__(self):
        return len(self.indices)

    def image(self, i):
        return self.base.image(int(self.indices[i]))

    def label(self, i):
        return self.base.label(int(self.indices[i]))

    def labels(self) -> np.ndarray:
        if hasattr(self.base, "labels"):
            return self.base.labels()[self.indices]
        return np.array([self.label(i) for i in range(len(self))], np.int64)

    def image_id(self, i) -> str:
        return self.base.image_id(int(self.indices[i]))

    def manifest(self):
        return {"type": "holdout", "base": self.base.manifest(), "rule": self.rule,
                "indices": [int(i) for i in self.indices]}


def apply_holdout(dataset_name: str, split: str, splits: dict, open_raw) -> Split:
    """The split ``split`` with holdouts applied; ``open_raw(name)`` opens a split as listed."""
    rule = holdout_rule(dataset_name, split, splits)
    if rule is not None:  # the held-out images
        base = open_raw(rule["of"])
        idx = held_out_indices(base, rule["fraction"], rule["seed"])
        return SubsetSplit(split, base, idx, {"keep": "held_out", **rule})
    held = holders(dataset_name, split, splits)
    if not held:
        return open_raw(split)
    base = open_raw(split)  # the rest: every image no holdout split took
    drop = set()
    rules = []
    for h in held:
        r = holdout_rule(dataset_name, h, splits)
        drop.update(int(i) for i in held_out_indices(base, r["fraction"], r["seed"]))
        rules.append({"split": h, **r})
    keep = np.array([i for i in range(len(base)) if i not in drop], np.int64)
    return SubsetSplit(split, base, keep, {"keep": "rest", "held_out_by": rules})


def planned_size(splits: dict, split: str, dataset_name: str = "?") -> int | None:
    """The expected size of ``split`` from the config's ``count:`` values alone (for plans while
    the data is absent): a holdout split ~ fraction x count of the split it holds out of, that
    split its count minus the held-out shares (per-class rounding moves the real sizes slightly)."""
    rule = holdout_rule(dataset_name, split, splits)
    base = rule["of"] if rule else split
    count = splits[base].get("count")
    if count is None:
        return None
    if rule:
        return int(round(rule["fraction"] * count))
    return int(count) - sum(int(round(holdout_rule(dataset_name, h, splits)["fraction"] * count))
                            for h in holders(dataset_name, split, splits))
