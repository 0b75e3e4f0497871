"""Prediction analysis (the paper's Table 10): stitched S→T against its self-stitch controls S→S, T→T.

Inputs are the per-image ``predictions.parquet`` files that evaluation writes beside each
``eval.json`` (columns ``image, label, pred_probe, pred_head`` [, ``miou, pixel_acc``]; schema
metadata ``split, dataset, source, target, layer, stitch, method, seed``). For every stitched run
S→T (S ≠ T) whose two controls S→S and T→T with the same dataset, layer, stitch layer, method and
seed are among the inputs, the images are joined by ``image`` and each is classified by which of
(S→S, T→T, S→T) is right:

| case | S→S | T→T | S→T | column |
|---|---|---|---|---|
| dropped (trivial) | ✓ | ✓ | ✓ | ``all_correct`` |
| dropped (trivial) | ✗ | ✗ | ✗ | ``all_wrong`` |
| preserve, S only | ✓ | ✗ | ✓ | ``preserve_src`` |
| preserve, T only | ✗ | ✓ | ✓ | ``preserve_tgt`` |
| rescue | ✗ | ✗ | ✓ | ``rescue`` |
| interference, S only | ✓ | ✗ | ✗ | ``interfere_src`` |
| interference, T only | ✗ | ✓ | ✗ | ``interfere_tgt`` |
| interference, both | ✓ | ✓ | ✗ | ``interfere_both`` |

(A "preserve, both controls right" case is the all-correct case, dropped like the paper does; so
preserve has two columns and interference three, the paper's six.) "Whose behaviour it follows":
over every image where the two controls predict *different classes* (``disagree``), the stitched
prediction equals S→S's (``follow_src``), T→T's (``follow_tgt``) or neither (``follow_neither``).

Which prediction: ``pred_head`` (the trained TLT / FFM→TLT head) when all three files have it for
every image, else ``pred_probe`` (the refitted linear probe) for all three; column ``prediction``
says which. Segmentation files (``label`` = -1, per-image ``miou``) have no per-image right/wrong
and are skipped with a note (docs/stages/analysis.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

META_KEYS = ("split", "dataset", "source", "target", "layer", "stitch", "method", "seed")
REQUIRED_COLUMNS = ("image", "label", "pred_probe")
CASES = ("preserve_src", "preserve_tgt", "rescue", "interfere_src", "interfere_tgt", "interfere_both")
S, I, F = pa.string(), pa.int64(), pa.float64()
SCHEMA = pa.schema(
    [("dataset", S), ("source", S), ("target", S), ("layer", I), ("stitch", S), ("method", S), ("seed", I),
     ("split", S), ("prediction", S), ("n_images", I), ("all_correct", I), ("all_wrong", I), ("n_kept", I)]
    + [(c, I) for c in CASES]
    + [("disagree", I), ("follow_src", I), ("follow_tgt", I), ("follow_neither", I),
       ("acc_src_control", F), ("acc_tgt_control", F), ("acc_stitched", F)])
METHOD_PREFERENCE = ("ffm_tlt", "tlt", "ffm", "lfm")


@dataclass
class Predictions:
    path: Path
    meta: dict          # META_KEYS (layer, seed as int or None)
    table: pa.Table

    @property
    def key(self):
        m = self.meta
        return m["dataset"], m["source"], m["target"], m["layer"], m["stitch"], m["method"], m["seed"]

    @property
    def segmentation(self) -> bool:
        labels = self.table["label"].to_numpy(zero_copy_only=False)
        return "miou" in self.table.column_names or (len(labels) > 0 and bool((labels == -1).all()))

    def has_head(self) -> bool:
        return "pred_head" in self.table.column_names and self.table["pred_head"].null_count == 0 \
            and self.table.num_rows > 0


def _int_or_none(v, path, key):
    if v in (None, "", "None", "null"):
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{path}: schema metadata {key!r} should be an integer, got {v!r}") from None


def read_predictions(path) -> Predictions:
    """One predictions.parquet with its run metadata; errors name the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"predictions file not found: {p}")
    try:
        table = pq.read_table(p)
    except Exception as e:
        raise ValueError(f"{p}: cannot read the predictions parquet ({e})") from None
    raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    missing = [k for k in META_KEYS if k not in raw and k != "seed"]
    if missing:
        raise ValueError(f"{p}: predictions parquet lacks schema metadata {', '.join(missing)}")
    cols = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if cols:
        raise ValueError(f"{p}: predictions parquet lacks column(s) {', '.join(cols)}")
    meta = {k: raw.get(k) for k in META_KEYS}
    meta["layer"] = _int_or_none(meta["layer"], p, "layer")
    meta["seed"] = _int_or_none(meta["seed"], p, "seed")
    return Predictions(p, meta, table)


def _aligned(preds: list[Predictions], column: str):
    """Labels and ``column`` of several files, joined by image id (all must hold the same images)."""
    first = preds[0]
    images = first.table["image"].to_pylist()
    if len(set(images)) != len(images):
        raise ValueError(f"{first.path}: duplicate image ids")
    order = {im: i for i, im in enumerate(images)}
    labels = np.asarray(first.table["label"].to_numpy(zero_copy_only=False), dtype=np.int64)
    out = []
    for p in preds:
        ims = p.table["image"].to_pylist()
        if set(ims) != set(order) or len(ims) != len(order):
            extra = sorted(set(ims) ^ set(order))[:3]
            raise ValueError(f"{p.path} and {first.path} hold different images (e.g. {extra}); Table 10 "
                             "joins the stitched model and its controls image by image")
        idx = np.array([order[im] for im in ims])
        lab = np.empty(len(order), np.int64)
        lab[idx] = p.table["label"].to_numpy(zero_copy_only=False)
        if not np.array_equal(lab, labels):
            raise ValueError(f"{p.path} and {first.path} give different labels for the same image")
        col = p.table[column]
        if col.null_count:
            raise ValueError(f"{p.path}: column {column!r} has {col.null_count} null prediction(s)")
        pred = np.empty(len(order), np.int64)
        pred[idx] = col.to_numpy(zero_copy_only=False)
        out.append(pred)
    return labels, out


def analyse(stitched: Predictions, src_ctrl: Predictions, tgt_ctrl: Predictions) -> dict:
    """Table 10 counts of one stitched run (see the module docstring)."""
    trio = [src_ctrl, tgt_ctrl, stitched]
    for p in trio[:2]:
        if p.meta["split"] != stitched.meta["split"]:
            raise ValueError(f"{p.path} is on split {p.meta['split']!r} but {stitched.path} on "
                             f"{stitched.meta['split']!r}")
    column = "pred_head" if all(p.has_head() for p in trio) else "pred_probe"
    labels, (ps, pt, px) = _aligned(trio, column)
    rs, rt, rx = ps == labels, pt == labels, px == labels
    disagree = ps != pt
    n = len(labels)
    counts = {
        "all_correct": rs & rt & rx, "all_wrong": ~rs & ~rt & ~rx,
        "preserve_src": rs & ~rt & rx, "preserve_tgt": ~rs & rt & rx, "rescue": ~rs & ~rt & rx,
        "interfere_src": rs & ~rt & ~rx, "interfere_tgt": ~rs & rt & ~rx, "interfere_both": rs & rt & ~rx,
        "disagree": disagree, "follow_src": disagree & (px == ps), "follow_tgt": disagree & (px == pt),
        "follow_neither": disagree & (px != ps) & (px != pt),
    }
    out = {k: int(v.sum()) for k, v in counts.items()}
    out.update(prediction=column[5:], n_images=n, n_kept=n - out["all_correct"] - out["all_wrong"],
               acc_src_control=float(rs.mean()) if n else math.nan,
               acc_tgt_control=float(rt.mean()) if n else math.nan,
               acc_stitched=float(rx.mean()) if n else math.nan)
    return out


def table10(paths) -> tuple[pa.Table, list[str]]:
    """Rows (SCHEMA) for every stitched run with both controls among ``paths``, and notes on what
    was skipped (segmentation datasets, stitched runs lacking a control)."""
    preds = [read_predictions(p) for p in paths]
    by_key = {}
    for p in preds:
        if p.key in by_key:
            raise ValueError(f"{p.path} and {by_key[p.key].path} are predictions of the same run {p.key}")
        by_key[p.key] = p
    rows, notes, seg = [], [], set()
    for p in preds:
        ds, src, tgt, layer, stitch, method, seed = p.key
        if src == tgt:
            continue
        if p.segmentation:
            seg.add(ds)
            continue
        ctrl = [by_key.get((ds, m, m, layer, stitch, method, seed)) for m in (src, tgt)]
        if None in ctrl:
            lacking = " and ".join(f"{m}→{m}" for m, c in zip((src, tgt), ctrl) if c is None)
            notes.append(f"{ds}: {src}→{tgt} layer {layer} {stitch} {method} (seed {seed}) skipped: "
                         f"no {lacking} control predictions")
            continue
        rows.append({"dataset": ds, "source": src, "target": tgt, "layer": layer, "stitch": stitch,
                     "method": method, "seed": seed, "split": p.meta["split"], **analyse(p, *ctrl)})
    for ds in sorted(seg):
        notes.append(f"{ds}: Table 10 skipped: a segmentation dataset (per-image mIoU exists, but an image "
                     "is not simply right or wrong)")
    rows.sort(key=lambda r: (r["dataset"], r["source"], r["target"], r["stitch"], _method_rank(r["method"]),
                             r["layer"], -1 if r["seed"] is None else r["seed"]))
    return pa.Table.from_pylist(rows, schema=SCHEMA), notes


def _method_rank(m):
    return (METHOD_PREFERENCE[::-1].index(m), m) if m in METHOD_PREFERENCE else (len(METHOD_PREFERENCE), m)


HEADER = ["stitched S→T", "stitch", "method", "layer", "seed", "pred",
          "Preserve S✓ T✗ → ✓", "Preserve S✗ T✓ → ✓", "Rescue S✗ T✗ → ✓",
          "Interf. S✓ T✗ → ✗", "Interf. S✗ T✓ → ✗", "Interf. S✓ T✓ → ✗",
          "kept / all", "follows S→S", "follows T→T", "neither"]


def to_markdown(table: pa.Table, notes=()) -> str:
    """A table shaped like the paper's Table 10, one section per dataset."""
    rows = table.to_pylist()
    out = ["# Prediction analysis (Table 10)", "",
           "Per image of the reported split, the stitched model S→T is compared with its self-stitch "
           "controls S→S (\"S\") and T→T (\"T\"): ✓ right, ✗ wrong. Images all three get right or all "
           "three get wrong are dropped (`kept / all`). Preserve + rescue vs interference: does stitching "
           "fuse or disrupt? `follows`: among images where the two controls predict different classes, "
           "how often the stitched prediction equals S→S's, T→T's, or neither. `pred`: `head` = the "
           "trained TLT head's class, `probe` = the refitted linear probe's.", ""]
    for ds in sorted({r["dataset"] for r in rows}):
        drows = [r for r in rows if r["dataset"] == ds]
        splits = sorted({r["split"] for r in drows})
        out += [f"## {ds} (split {', '.join(splits)})", "",
                "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for r in drows:
            cells = [f"{r['source']}→{r['target']}", r["stitch"], r["method"], r["layer"],
                     "–" if r["seed"] is None else r["seed"], r["prediction"]] + [r[c] for c in CASES]
            cells += [f"{r['n_kept']} / {r['n_images']}", r["follow_src"], r["follow_tgt"], r["follow_neither"]]
            out.append("| " + " | ".join(map(str, cells)) + " |")
        out.append("")
    if not rows:
        out += ["> No stitched run had both self-stitch controls among the predictions.", ""]
    out += [f"> {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_table10(paths, out_dir, plot=True) -> list[Path]:
    """table10.parquet, table10.md and (plot) table10.png under out_dir."""
    from .. import __version__
    table, notes = table10(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {b"stitchcache_version": str(__version__).encode(), b"notes": "\n".join(notes).encode(),
            b"inputs": "\n".join(map(str, paths)).encode()}
    written = [out / "table10.parquet", out / "table10.md"]
    pq.write_table(table.replace_schema_metadata(meta), written[0])
    written[1].write_text(to_markdown(table, notes))
    if plot:
        from .plots import plot_table10
        written.append(plot_table10(table, out / "table10.png", notes))
    return written
