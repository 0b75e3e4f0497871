"""The test split's noise on an accuracy difference, from the per-image predictions (paired).

Two models scored on the same n test images differ in accuracy by mean_i(c_a,i − c_b,i), where
c_i = 1 when image i is classified right (a cell with several seeds: the mean of its seeds' c_i).
Over the draw of the test images that difference has the standard error

    se = std_i(c_a,i − c_b,i) / sqrt(n)          (sample std, ddof 1)

— the *paired* standard error: images both models get right (or wrong) cancel, so it is smaller than
the two accuracies' binomial errors combined. Any linear contrast Σ_k w_k acc_k (finding 2's gain
difference) has se = std_i(Σ_k w_k c_k,i) / sqrt(n) the same way. The seed spread measures how much
training varies on *these* images; this measures how much the comparison would move on another
test split of the same size: about 1 point at 1000 images for two models that disagree on a tenth
of them (sqrt(0.1 / 1000)), 0.45 at 5000.

``Correctness.from_files(paths)`` indexes the ``predictions.parquet`` files of the evaluate and probe
stages (evaluate/predictions.py) by cell: ``("stitch", dataset, source, target, layer, stitch,
method)`` and ``("probe", dataset, model)``. The per-image prediction is the trained head's for TLT /
FFM→TLT (``pred_head``) and the refitted probe's otherwise, the same as the findings' accuracies.
Segmentation files (no per-image right / wrong) are skipped.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..evaluate.predictions import read_predictions

HEAD_METHODS = ("tlt", "ffm_tlt")


def cell_key(meta: dict) -> tuple:
    if meta.get("model"):
        return ("probe", meta["dataset"], meta["model"])
    return ("stitch", meta["dataset"], meta["source"], meta["target"], int(meta["layer"]), meta["stitch"],
            meta["method"])


class Correctness:
    """Per-image correctness of every cell, images in one sorted order per dataset."""

    def __init__(self):
        self._seeds: dict[tuple, dict] = {}     # key -> {seed: (ids, correct)}
        self._files: dict[tuple, Path] = {}
        self.missing: set[tuple] = set()        # cells asked for that have no predictions (files were given)

    @classmethod
    def from_files(cls, paths) -> "Correctness":
        out = cls()
        for p in paths:
            out.add(p)
        return out

    def add(self, path) -> None:
        path = Path(path)
        table, meta = read_predictions(path)
        labels = table["label"].to_numpy(zero_copy_only=False)
        if "miou" in table.column_names or (len(labels) and (labels == -1).all()):
            return  # segmentation: no per-image right / wrong
        key = cell_key(meta)
        col = "pred_head" if key[0] == "stitch" and key[-1] in HEAD_METHODS else "pred_probe"
        if table[col].null_count:
            raise ValueError(f"{path}: column {col!r} has {table[col].null_count} null prediction(s)")
        ids = np.asarray(table["image"].to_pylist(), dtype=object)
        order = np.argsort(ids.astype(str), kind="stable")
        correct = (table[col].to_numpy(zero_copy_only=False) == labels)[order].astype(np.float64)
        seed = meta.get("seed")
        seed = int(seed) if seed not in (None, "", "None") else None
        runs = self._seeds.setdefault(key, {})
        if seed in runs:
            raise ValueError(f"{path} and {self._files[key + (seed,)]} hold predictions of the same run {key}, "
                             f"seed {seed}")
        runs[seed] = (ids[order], correct)
        self._files[key + (seed,)] = path

    def accuracies(self):
        """(key, seed, accuracy, file) of every indexed run: what the results table must agree with."""
        for key, runs in self._seeds.items():
            for seed, (_, c) in runs.items():
                yield key, seed, float(c.mean()) if len(c) else None, self._files[key + (seed,)]

    def __len__(self) -> int:
        """The number of prediction files indexed."""
        return len(self._files)

    def __contains__(self, key) -> bool:
        return key in self._seeds

    def per_image(self, key) -> tuple[np.ndarray, np.ndarray] | None:
        """(sorted image ids, mean correctness over the cell's seeds), or None when absent."""
        runs = self._seeds.get(key)
        if not runs:
            return None
        (ids, _), *_ = runs.values()
        for seed, (other, _) in runs.items():
            if len(other) != len(ids) or not (other == ids).all():
                raise ValueError(f"predictions of {key} hold different images in different seeds "
                                 f"(seed {seed}: {self._files[key + (seed,)]})")
        return ids, np.mean([c for _, c in runs.values()], axis=0)

    def contrast_se(self, terms) -> float | None:
        """Standard error over the test images of Σ w · accuracy(key) for ``terms`` = [(w, key), ...];
        None when a cell has no predictions (then the test split's noise is not known)."""
        cells = [(w, self.per_image(k), k) for w, k in terms]
        if self._files:   # predictions were given: a cell without them is worth naming
            self.missing.update(k for _, c, k in cells if c is None)
        if not cells or any(c is None for _, c, _ in cells):
            return None
        ids = cells[0][1][0]
        for _, (other, _), k in cells[1:]:
            if len(other) != len(ids) or not (other == ids).all():
                raise ValueError(f"the predictions of {cells[0][2]} and {k} hold different test images: a paired "
                                 "comparison needs the same images")
        if len(ids) < 2:
            return None
        d = sum(w * c for w, (_, c), _ in cells)
        return float(np.std(d, ddof=1) / math.sqrt(len(ids)))
