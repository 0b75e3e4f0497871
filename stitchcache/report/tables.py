"""Collect evaluation and probe JSON records into one results table (the `table` stage).

Layout (see docs/stages/report.md):
- ``build_table(eval_paths, probe_paths)`` returns one row per evaluation result, columns ``COLUMNS``.
  Each row carries ``src_probe_acc`` / ``tgt_probe_acc``: the base linear probe of the source and
  target model on the same dataset (null when that probe is missing).
- An eval.json's ``stitch`` is the stitch-layer *choice* (``stitchcache.stitch.choices``, e.g.
  ``linear_lstsq``); a row splits it into ``stitch`` (the family: linear, mlp, lora) and ``init``
  (default, lstsq), so one table compares the inits of a family. ``metric``: what the ``*_acc``
  values measure, the record's ``metric`` field or ``accuracy`` when it has none (a segmentation
  dataset may report mIoU in the same columns).
- Results of several datasets share one table (``dataset`` column); every Markdown rendering has a
  section per dataset.
- The base linear probes are kept as a *second* table (``load_probes``, columns
  ``PROBE_COLUMNS``), not as extra rows. ``build_table`` also stores them as JSON in the schema
  metadata key ``stitchcache.probes`` so ``table.parquet`` alone is enough to redraw everything;
  ``probe_table(table)`` gets them back.
- ``write_table(table, probes, out_dir)`` (in outputs.py, beside the renderers it calls) writes ``table.parquet`` (schema metadata:
  ``stitchcache_version``, ``created_at``, ``stitchcache.probes``; no config), ``table.csv``,
  ``table.md`` (averages over seeds where a cell has several) and ``paper_tables.md`` (tables
  shaped like the paper's, mean ± std over seeds; see paper.py).
Rows are sorted by dataset, cross before self, source, target, stitch, init (default first), method
(lfm, ffm, tlt, ffm_tlt, then others by name), layer, seed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa

from ..stitch.choices import DEFAULT_INIT, choice_name, parse_choice

METHOD_ORDER = ("lfm", "ffm", "tlt", "ffm_tlt")
S, I, F = pa.string(), pa.int64(), pa.float64()
SCHEMA = pa.schema([
    ("dataset", S), ("source", S), ("target", S), ("layer", I), ("stitch", S), ("init", S), ("method", S),
    ("kind", S), ("seed", I), ("metric", S), ("probe_acc", F), ("head_acc", F), ("d_l", F), ("d_L", F),
    ("lr", F), ("epochs", I), ("train_seconds", F), ("src_probe_acc", F), ("tgt_probe_acc", F),
    ("split", S), ("d_l_rel", F), ("d_L_rel", F), ("match_tokens", S), ("epochs_run", I), ("stop", S),
    ("tail_fall", F),
])
PROBE_SCHEMA = pa.schema([("dataset", S), ("model", S), ("pool", S), ("metric", S), ("probe_acc", F), ("lr", F),
                          ("epochs", I), ("split", S)])
COLUMNS = SCHEMA.names
PROBE_COLUMNS = PROBE_SCHEMA.names
EVAL_REQUIRED = ("dataset", "source", "target", "layer", "stitch", "method", "probe_acc", "d_l", "d_L")
PROBE_REQUIRED = ("dataset", "model", "probe_acc")
PROBES_KEY = b"stitchcache.probes"
DEFAULT_METRIC = "accuracy"
METRIC_NAMES = {"accuracy": "accuracy", "miou": "mIoU"}   # metric field -> display name (others as given)
# absent from tables written before they existed; filled in on reading (split: val, the only one then)
LATER_COLUMNS = ("init", "metric", "split", "d_l_rel", "d_L_rel", "match_tokens", "epochs_run", "stop", "tail_fall")
SELECTION_SPLIT = "val"


# ----------------------------------------------------------------------------- reading records

def _read_record(path, required, what):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    try:
        rec = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in required if k not in rec]
    if missing:
        raise ValueError(f"{p}: {what} lacks field(s) {', '.join(missing)}")
    return rec


def _coerce(rec, schema, path):
    """Keep the schema's fields of one record, typed; NaN becomes null; unknown fields are dropped."""
    out = {}
    for field in schema:
        v = rec.get(field.name)
        try:
            if v is None:
                out[field.name] = None
            elif field.type == pa.string():
                out[field.name] = str(v)
            elif field.type == pa.int64():
                if isinstance(v, bool) or float(v) != int(v):
                    raise ValueError
                out[field.name] = int(v)
            else:
                f = float(v)
                out[field.name] = None if math.isnan(f) else f
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{path}: field {field.name!r} should be {field.type}, got {v!r}") from None
    return out


def load_probes(probe_paths) -> pa.Table:
    """The base linear probes, one row per (dataset, model), sorted."""
    rows, seen = [], {}
    for path in probe_paths:
        r = _coerce(_read_record(path, PROBE_REQUIRED, "probe result"), PROBE_SCHEMA, path)
        r["metric"] = r["metric"] or DEFAULT_METRIC
        r["split"] = r["split"] or SELECTION_SPLIT
        key = (r["dataset"], r["model"])
        if key in seen:
            raise ValueError(f"{path}: second probe for dataset {key[0]!r} model {key[1]!r} (first: {seen[key]})")
        seen[key] = path
        rows.append(r)
    rows.sort(key=lambda r: (r["dataset"], r["model"]))
    return pa.Table.from_pylist(rows, schema=PROBE_SCHEMA)


def method_rank(m):
    return (METHOD_ORDER.index(m), "") if m in METHOD_ORDER else (len(METHOD_ORDER), m)


def init_rank(i):
    return (i not in (None, DEFAULT_INIT), i or "")


def sort_key(r):
    seed = -1 if r["seed"] is None else r["seed"]
    return (r["dataset"], r["kind"] != "cross", r["source"], r["target"], r["stitch"], init_rank(r.get("init")),
            method_rank(r["method"]), r["layer"], seed)


def split_stitch(r, path="a row"):
    """Fill in ``stitch`` (family) and ``init`` of a record whose ``stitch`` may be a choice name
    (``linear_lstsq``); an explicit ``init`` must agree with the one the name carries."""
    family, init = parse_choice(r["stitch"])
    given = r.get("init")
    if given not in (None, "") and init != DEFAULT_INIT and given != init:
        raise ValueError(f"{path}: stitch {r['stitch']!r} has init {init!r} but the record says init {given!r}")
    r["stitch"], r["init"] = family, (init if init != DEFAULT_INIT else (given or DEFAULT_INIT))
    return r


def rows_of(table) -> list[dict]:
    """The rows of a results table as dicts, sorted, with ``init`` / ``metric`` filled in (tables
    written before those columns existed read as default init, accuracy)."""
    rows = []
    for r in table.to_pylist():
        r = split_stitch(dict(r))
        r["metric"] = r.get("metric") or DEFAULT_METRIC
        r["split"] = r.get("split") or SELECTION_SPLIT
        for c in LATER_COLUMNS:
            r.setdefault(c, None)
        rows.append(r)
    rows.sort(key=sort_key)
    return rows


def variant(r) -> str:
    """The stitch choice of a row (family + init): ``linear``, ``linear_lstsq``, ..."""
    return choice_name(r["stitch"], r.get("init"))


def stitch_labels(rows, name=lambda family: family) -> dict:
    """variant -> display label: ``name(family)``, plus `` (<init> init)`` for a non-default init and,
    when a family appears with several inits, `` (default init)`` for the default one too."""
    inits = {}
    for r in rows:
        inits.setdefault(r["stitch"], set()).add(r.get("init") or DEFAULT_INIT)
    out = {}
    for family, fam_inits in inits.items():
        for init in fam_inits:
            explicit = init != DEFAULT_INIT or len(fam_inits) > 1
            out[choice_name(family, init)] = name(family) + (f" ({init} init)" if explicit else "")
    return out


def metric_name(metric) -> str:
    """Display name of a ``metric`` value: ``miou`` -> ``mIoU``."""
    metric = metric or DEFAULT_METRIC
    return METRIC_NAMES.get(metric, metric)


def metric_of(rows, probes=()) -> str:
    """The display name of the metric of a set of rows (``accuracy``; ``a / b`` when they mix several)."""
    names = sorted({metric_name(r.get("metric")) for r in list(rows) + list(probes)})
    return " / ".join(names) if names else DEFAULT_METRIC


def split_note(rows, probes=()) -> str:
    """Which split the numbers are on: 'the test split (selection on val)', or for val 'the val
    split (reported on val, also used for selection: no test split)'; several: per dataset."""
    by_ds = {}
    for r in list(rows) + list(probes):
        by_ds.setdefault(r["dataset"], set()).add(r.get("split") or SELECTION_SPLIT)

    def one(splits):
        names = sorted(splits)
        if names == [SELECTION_SPLIT]:
            return f"the {SELECTION_SPLIT} split (reported on {SELECTION_SPLIT}, also used for selection: no test split)"
        return f"the {' / '.join(names)} split (selection on {SELECTION_SPLIT})"

    notes = {ds: one(s) for ds, s in by_ds.items()}
    if len(set(notes.values())) <= 1:
        return next(iter(notes.values()), f"the {SELECTION_SPLIT} split")
    return "; ".join(f"{ds}: {n}" for ds, n in sorted(notes.items()))


def metric_short(metric):
    return "acc" if metric == DEFAULT_METRIC else metric


def build_table(eval_paths, probe_paths) -> pa.Table:
    """One row per evaluation result with the base probes joined in (see module docstring)."""
    probes = load_probes(probe_paths)
    acc = {(p["dataset"], p["model"]): p["probe_acc"] for p in probes.to_pylist()}
    rows, seen = [], {}
    for path in eval_paths:
        r = split_stitch(_coerce(_read_record(path, EVAL_REQUIRED, "evaluation result"), SCHEMA, path), path)
        r["metric"] = r["metric"] or DEFAULT_METRIC
        r["split"] = r["split"] or SELECTION_SPLIT   # records written before `split` existed: val
        if r["kind"] is None:
            r["kind"] = "self" if r["source"] == r["target"] else "cross"
        r["src_probe_acc"] = acc.get((r["dataset"], r["source"]))
        r["tgt_probe_acc"] = acc.get((r["dataset"], r["target"]))
        key = tuple(r[k] for k in ("dataset", "source", "target", "layer", "stitch", "init", "method", "seed"))
        if key in seen:
            raise ValueError(f"{path}: duplicates evaluation result {seen[key]} (same {key})")
        seen[key] = path
        rows.append(r)
    rows.sort(key=sort_key)
    splits = {}
    for r in rows:
        splits.setdefault(r["dataset"], {}).setdefault(r["split"], f"{r['source']}->{r['target']} @{r['layer']} {r['method']}")
    for p in probes.to_pylist():
        splits.setdefault(p["dataset"], {}).setdefault(p["split"], f"base probe {p['model']}")
    for ds, by_split in splits.items():
        if len(by_split) > 1:
            raise ValueError(f"dataset {ds!r}: results on different splits ("
                             + ", ".join(f"{s}: e.g. {what}" for s, what in sorted(by_split.items()))
                             + "); re-run the stale ones so every number of a dataset is on one split")
    meta = {PROBES_KEY: json.dumps(probes.to_pylist()).encode()}
    return pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(meta))


def probe_table(table) -> pa.Table:
    """The base probes stored in ``table``'s schema metadata (empty table when absent)."""
    raw = (table.schema.metadata or {}).get(PROBES_KEY)
    probes = json.loads(raw) if raw else []
    for p in probes:
        p["metric"] = p.get("metric") or DEFAULT_METRIC
        p["split"] = p.get("split") or SELECTION_SPLIT
    return pa.Table.from_pylist(probes, schema=PROBE_SCHEMA)


# ----------------------------------------------------------------------------- Markdown

DASH = "–"


def fmt_acc(v):
    return DASH if v is None or math.isnan(v) else f"{100 * v:.1f}"


def fmt_dist(v):
    return DASH if v is None or math.isnan(v) else f"{v:#.3g}"


def _md(header, body):
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return lines + [""]


def _mean(vals):
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def pair_label(r):
    return f"{r['source']} → {r['target']}" + (" (self)" if r["kind"] == "self" else "")


def _by_layer(rows, layers, fields, fmt, labels):
    """Markdown rows: one per (pair, stitch variant, method[, field]), one column per layer, seed-mean."""
    cells = {}
    for r in rows:  # rows are sorted, so dict insertion order is the row order
        for f in fields:
            key = (pair_label(r), labels[variant(r)], r["method"]) + ((f,) if len(fields) > 1 else ())
            cells.setdefault(key, {}).setdefault(r["layer"], []).append(r[f])
    return [list(k) + [fmt(_mean(c.get(l, []))) for l in layers] for k, c in cells.items()]


FALLING = "↓"


def still_falling(r) -> bool:
    """The row's training run was still lowering its validation loss when it ended (train.py)."""
    return bool(r.get("tail_fall") and r["tail_fall"] > 0)


def fmt_epochs(r) -> str:
    """``best/run`` epochs of one row, ``↓`` when still falling, ``cap`` when max_epochs ended it."""
    if r.get("epochs") is None:
        return DASH
    run = f"/{r['epochs_run']}" if r.get("epochs_run") is not None else ""
    return f"{r['epochs']}{run}" + (" cap" if r.get("stop") == "max_epochs" else "") + (FALLING if still_falling(r) else "")


def _epochs_by_layer(rows, layers, labels):
    """Markdown rows: one per (pair, stitch variant, method), a cell per layer listing every seed's epochs."""
    cells = {}
    for r in rows:
        cells.setdefault((pair_label(r), labels[variant(r)], r["method"]), {}).setdefault(r["layer"], []).append(fmt_epochs(r))
    return [list(k) + [", ".join(c.get(l, [])) or DASH for l in layers] for k, c in cells.items()]


def to_markdown(table, probes=None) -> str:
    rows = rows_of(table)
    probes = (probe_table(table) if probes is None else probes).to_pylist()
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    out = ["# Stitching results", "",
           f"Scores (accuracy unless a dataset names another metric) in % (one decimal) on {split_note(rows, probes)}; "
           f"d_l, d_L: mean squared error per element (3 significant digits), d_l_rel, d_L_rel: the same "
           f"divided by the target tokens' mean per-channel variance (1.0 = predicting the mean); {DASH} = "
           "missing; (self) = self-stitch control; stitch: the stitch family and, where it is not the "
           "default, its init. Two evaluators: *refitted linear probe* (a new linear classifier on the "
           "stitched model's final tokens, every method) and *trained task head* (the head trained with "
           "the stitch, TLT / FFM→TLT only)." + (f" Cells are means over seeds {seeds}." if len(seeds) > 1 else ""), ""]
    for ds in sorted({r["dataset"] for r in rows} | {p["dataset"] for p in probes}):
        drows = [r for r in rows if r["dataset"] == ds]
        dprobes = [p for p in probes if p["dataset"] == ds]
        metric = metric_of(drows, dprobes)
        labels = stitch_labels(drows)
        layers = sorted({r["layer"] for r in drows})
        lcols = [f"layer {l}" for l in layers]
        out += [f"## {ds}", "", "### Base linear probes", ""]
        out += _md(["model", "pool", f"probe {metric_short(metric)} (%)", "lr", "epochs"],
                   [[p["model"], p["pool"] or DASH, fmt_acc(p["probe_acc"]),
                     DASH if p["lr"] is None else f"{p['lr']:g}", DASH if p["epochs"] is None else p["epochs"]]
                    for p in dprobes] or [[DASH] * 5])
        if not drows:
            continue
        out += [f"### Stitched model, refitted linear probe: {metric} (%) by layer", ""]
        out += _md(["source → target", "stitch", "method"] + lcols,
                   _by_layer(drows, layers, ["probe_acc"], fmt_acc, labels))
        head = [r for r in drows if r["head_acc"] is not None]
        if head:
            out += [f"### Stitched model, trained task head (TLT, FFM→TLT): {metric} (%) by layer", ""]
            out += _md(["source → target", "stitch", "method"] + lcols,
                       _by_layer(head, layers, ["head_acc"], fmt_acc, labels))
        dist = [r for r in drows if r["method"] in ("lfm", "ffm")]
        if dist:
            out += ["### Feature distances d_l / d_L by layer (LFM vs FFM; _rel: relative to the target's variance)", ""]
            fields = ["d_l", "d_L"] + [f for f in ("d_l_rel", "d_L_rel") if any(r[f] is not None for r in dist)]
            out += _md(["source → target", "stitch", "method", "metric"] + lcols,
                       _by_layer(dist, layers, fields, fmt_dist, labels))
        if any(r.get("epochs_run") is not None for r in drows):
            n_fall = sum(still_falling(r) for r in drows)
            out += ["### Training: best epoch / epochs trained, per seed", "",
                    f"{FALLING} = the validation loss was still making new lows when the run ended (by less than "
                    "`train.min_delta` over the last `patience` epochs; cap = `max_epochs` ended it): its loss is "
                    f"an upper bound of what longer training reaches. {n_fall} of {len(drows)} runs.", ""]
            out += _md(["source → target", "stitch", "method"] + lcols, _epochs_by_layer(drows, layers, labels))
    return "\n".join(out)
