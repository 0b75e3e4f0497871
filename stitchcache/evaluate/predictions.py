"""Per-image predictions: a small Parquet file per evaluated model, joinable image by image.

Written by `evaluate` beside each ``eval.json`` (``predictions.parquet``) and by `probe` as
``results/probes/<dataset>/<model>.predictions.parquet``; kept even with ``evaluate.keep_exports:
false``. One row per image of the *reported* split, in store row order:

    image       string   stable id from the dataset (relative path, or ``<source>:<index>``),
                         ``FeatureStore.image_ids()``
    label       int64    class index; -1 for segmentation
    pred_probe  int64    the refitted linear probe's class (null for segmentation)
    pred_head   int64    the trained TLT / FFM->TLT head's class (null for other methods, probes and
                         segmentation)
    miou, pixel_acc  float64, segmentation only: per-image scores of the probe

Schema metadata (strings): ``split`` (the reported split), ``dataset``, and ``source``, ``target``,
``layer``, ``stitch``, ``method``, ``seed`` for a stitched model or ``model`` for a base probe.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

I64, F64 = pa.int64(), pa.float64()
CLASSIFICATION_SCHEMA = pa.schema([("image", pa.string()), ("label", I64), ("pred_probe", I64), ("pred_head", I64)])
SEGMENTATION_SCHEMA = CLASSIFICATION_SCHEMA.append(pa.field("miou", F64)).append(pa.field("pixel_acc", F64))
META_KEYS = ("split", "dataset", "source", "target", "layer", "stitch", "method", "seed", "model")


def predictions_path(eval_json) -> Path:
    """``.../eval.json`` -> ``.../predictions.parquet``; ``.../<model>.json`` -> ``<model>.predictions.parquet``."""
    p = Path(eval_json)
    return p.with_name("predictions.parquet") if p.name == "eval.json" else p.with_name(p.stem + ".predictions.parquet")


def predictions_table(image_ids, label=None, pred_probe=None, pred_head=None, miou=None, pixel_acc=None,
                      **meta) -> pa.Table:
    """The table of one model's per-image predictions (see the module docstring). ``label=None``
    with ``miou`` given: segmentation (label -1, pred_probe null)."""
    n = len(image_ids)
    seg = miou is not None

    def col(v, what, typ):
        if v is None:
            return pa.nulls(n, typ)
        v = np.asarray(v)
        if len(v) != n:
            raise ValueError(f"predictions: {what} has {len(v)} values for {n} images")
        return pa.array(v.astype(np.int64 if typ == I64 else np.float64), typ)

    cols = {"image": pa.array([str(i) for i in image_ids], pa.string()),
            "label": pa.array(np.full(n, -1, np.int64)) if seg else col(label, "label", I64),
            "pred_probe": pa.nulls(n, I64) if seg else col(pred_probe, "pred_probe", I64),
            "pred_head": col(pred_head, "pred_head", I64)}
    if seg:
        cols.update(miou=col(miou, "miou", F64), pixel_acc=col(pixel_acc, "pixel_acc", F64))
    unknown = set(meta) - set(META_KEYS)
    if unknown:
        raise ValueError(f"predictions: unknown metadata {sorted(unknown)} (known: {', '.join(META_KEYS)})")
    schema = (SEGMENTATION_SCHEMA if seg else CLASSIFICATION_SCHEMA).with_metadata(
        {k: str(v) for k, v in meta.items() if v is not None})
    return pa.table(cols, schema=schema)


def write_predictions(path, table: pa.Table) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_predictions(path) -> tuple[pa.Table, dict]:
    """(table, metadata as str -> str)."""
    t = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items() if k.decode() in META_KEYS}
    return t, meta
