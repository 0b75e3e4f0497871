"""The similarity atlas on disk, and its join with the stitching results.

- ``write_cka(result, out, ...)``: ``<pair>.parquet`` (long format, one row per variant x layer
  pair; schema ``CKA_SCHEMA``; metadata: both stores' keys and paths, dataset, split, variants,
  stitch points, code version) and the heatmap PNG beside it.
- ``cka_vs_stitch(cka_paths, table_path)``: every cross-stitch row of ``results/table.parquet`` with
  CKA(S_l, T_l) of its pair at its stitch layer (columns ``cka_pooled`` / ``cka_token``), next to
  its d_l, d_L, probe and head accuracy; and per (dataset, pair, stitch, init, method) the Spearman
  rank correlation over stitch layers of pooled CKA with the task accuracy and with d_l
  (null with fewer than 3 layers). Written as ``cka_vs_stitch.parquet`` and ``.md``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .cka import layer_of

S, I, F = pa.string(), pa.int64(), pa.float64()
CKA_SCHEMA = pa.schema([("dataset", S), ("split", S), ("model_a", S), ("model_b", S), ("variant", S),
                        ("array_a", S), ("layer_a", I), ("array_b", S), ("layer_b", I), ("cka", F),
                        ("n_samples", I)])
JOIN_SCHEMA = pa.schema([("dataset", S), ("source", S), ("target", S), ("layer", I), ("stitch", S), ("init", S),
                         ("method", S), ("seed", I), ("cka_pooled", F), ("cka_token", F), ("d_l", F), ("d_L", F),
                         ("probe_acc", F), ("head_acc", F), ("task_acc", F)])
CORR_SCHEMA = pa.schema([("dataset", S), ("source", S), ("target", S), ("stitch", S), ("init", S), ("method", S),
                         ("n_layers", I), ("spearman_cka_task_acc", F), ("spearman_cka_d_l", F)])
META = b"stitchcache.cka"


def cka_rows(result, dataset, split) -> list[dict]:
    rows = []
    for v, m in result["cka"].items():
        for i, na in enumerate(result["names_a"]):
            for j, nb in enumerate(result["names_b"]):
                rows.append({"dataset": dataset, "split": split, "model_a": result["model_a"],
                             "model_b": result["model_b"], "variant": v, "array_a": na, "layer_a": layer_of(na),
                             "array_b": nb, "layer_b": layer_of(nb), "cka": float(m[i, j]),
                             "n_samples": int(result["n_samples"][v])})
    return rows


def write_cka(result, out_parquet, *, dataset, split, stores, marks=(), plot=True) -> list[Path]:
    """The CKA parquet (and heatmap ``<same stem>.png``); ``stores``: the two FeatureStores."""
    from .. import __version__
    out = Path(out_parquet)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": dataset, "split": split, "variants": list(result["cka"]), "marks": [int(m) for m in marks],
            "stores": [{"model": s.attrs.get("model_name"), "key": s.attrs.get("key"), "path": str(s.path)}
                       for s in stores],
            "stitchcache_version": __version__,
            "definition": "linear CKA, full data, biased HSIC; pooled = mean of patch tokens per image; "
                          "token = patch token i of A paired with patch token i of B (prefix tokens excluded)"}
    table = pa.Table.from_pylist(cka_rows(result, dataset, split), schema=CKA_SCHEMA)
    pq.write_table(table.replace_schema_metadata({META: json.dumps(meta).encode()}), out)
    written = [out]
    if plot:
        from .plots import plot_cka
        title = f"{dataset}/{split}: {result['model_a']} vs {result['model_b']} (outlined: stitch points)"
        written.append(plot_cka(result, out.with_suffix(".png"), marks=marks, title=title))
    return written


def read_cka(paths) -> dict:
    """{(dataset, model_a, model_b, variant, layer_a, layer_b): cka} over CKA parquet files (both
    orientations, so a lookup with source/target swapped works)."""
    out = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"CKA file not found: {p}")
        for r in pq.read_table(p).to_pylist():
            if r["layer_a"] is None or r["layer_b"] is None:
                continue
            out[r["dataset"], r["model_a"], r["model_b"], r["variant"], r["layer_a"], r["layer_b"]] = r["cka"]
            out[r["dataset"], r["model_b"], r["model_a"], r["variant"], r["layer_b"], r["layer_a"]] = r["cka"]
    return out


def _ranks(x):
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    xs = np.asarray(x)[order]
    i = 0
    while i < len(xs):   # average ranks of ties
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman rank correlation of paired values (None for fewer than 3 pairs or a constant side)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return None
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def cka_vs_stitch(cka_paths, table_path) -> tuple[pa.Table, pa.Table]:
    from ..report.tables import rows_of
    p = Path(table_path)
    if not p.is_file():
        raise FileNotFoundError(f"results table not found: {p}")
    cka = read_cka(cka_paths)
    rows = []
    for r in rows_of(pq.read_table(p)):
        if r["kind"] != "cross":
            continue
        look = lambda v: cka.get((r["dataset"], r["source"], r["target"], v, r["layer"], r["layer"]))
        task = r["head_acc"] if r["head_acc"] is not None else r["probe_acc"]
        rows.append({k: r.get(k) for k in ("dataset", "source", "target", "layer", "stitch", "init", "method",
                                           "seed", "d_l", "d_L", "probe_acc", "head_acc")}
                    | {"cka_pooled": look("pooled"), "cka_token": look("token"), "task_acc": task})
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in ("dataset", "source", "target", "stitch", "init", "method")), []).append(r)
    corr = []
    for key, g in groups.items():
        by_layer = {}
        for r in g:   # seed-mean per layer
            by_layer.setdefault(r["layer"], []).append(r)
        mean = lambda rs, f: (float(np.mean([x[f] for x in rs])) if all(x[f] is not None for x in rs) else None)
        cols = {f: [mean(rs, f) for _, rs in sorted(by_layer.items())] for f in ("cka_pooled", "task_acc", "d_l")}
        corr.append(dict(zip(("dataset", "source", "target", "stitch", "init", "method"), key))
                    | {"n_layers": len(by_layer),
                       "spearman_cka_task_acc": spearman(cols["cka_pooled"], cols["task_acc"]),
                       "spearman_cka_d_l": spearman(cols["cka_pooled"], cols["d_l"])})
    return pa.Table.from_pylist(rows, schema=JOIN_SCHEMA), pa.Table.from_pylist(corr, schema=CORR_SCHEMA)


def _f(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def join_markdown(joined: pa.Table, corr: pa.Table) -> str:
    out = ["# Representational similarity vs stitching", "",
           "CKA(S_l, T_l): linear CKA between source and target at the stitch layer l (pooled: mean of patch "
           "tokens per image; token: patch tokens paired by position). task acc: the TLT head's accuracy for "
           "TLT / FFM→TLT, else the stitched linear probe's (%). d_l, d_L: mean squared error per element.", "",
           "| dataset | S→T | stitch | method | layer | seed | CKA pooled | CKA token | d_l | d_L | task acc |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in joined.to_pylist():
        stitch = r["stitch"] + ("" if r["init"] in (None, "default") else f" ({r['init']} init)")
        out.append(f"| {r['dataset']} | {r['source']}→{r['target']} | {stitch} | {r['method']} | {r['layer']} | "
                   f"{'–' if r['seed'] is None else r['seed']} | {_f(r['cka_pooled'])} | {_f(r['cka_token'])} | "
                   f"{_f(r['d_l'])} | {_f(r['d_L'])} | {_f(r['task_acc'], pct=True)} |")
    out += ["", "## Do accuracy and d_l track similarity? (Spearman over stitch layers, pooled CKA)", "",
            "| dataset | S→T | stitch | method | layers | ρ(CKA, task acc) | ρ(CKA, d_l) |", "|---|---|---|---|---|---|---|"]
    for r in corr.to_pylist():
        out.append(f"| {r['dataset']} | {r['source']}→{r['target']} | {r['stitch']} | {r['method']} | "
                   f"{r['n_layers']} | {_f(r['spearman_cka_task_acc'])} | {_f(r['spearman_cka_d_l'])} |")
    out += ["", "> ρ is – with fewer than 3 stitch layers or a constant column."]
    return "\n".join(out) + "\n"


def load_result(path) -> tuple[dict, dict]:
    """A CKA parquet back as (result dict as ``store_cka`` returns it + model names, metadata)."""
    t = pq.read_table(path)
    meta = json.loads((t.schema.metadata or {}).get(META, b"{}"))
    rows = t.to_pylist()
    if not rows:
        raise ValueError(f"{path}: empty CKA file")
    names_a = list(dict.fromkeys(r["array_a"] for r in rows))
    names_b = list(dict.fromkeys(r["array_b"] for r in rows))
    res = {"names_a": names_a, "names_b": names_b, "model_a": rows[0]["model_a"], "model_b": rows[0]["model_b"],
           "cka": {}, "n_samples": {}}
    for r in rows:
        m = res["cka"].setdefault(r["variant"], np.full((len(names_a), len(names_b)), np.nan))
        m[names_a.index(r["array_a"]), names_b.index(r["array_b"])] = r["cka"]
        res["n_samples"][r["variant"]] = r["n_samples"]
    return res, meta


def stitch_points(joined: pa.Table, dataset, a, b) -> list[int]:
    """Layers at which the results table holds a stitch between models a and b (either direction)."""
    return sorted({r["layer"] for r in joined.to_pylist()
                   if r["dataset"] == dataset and {r["source"], r["target"]} == {a, b}})


def write_cka_vs_stitch(cka_paths, table_path, out_dir, heatmaps=True) -> list[Path]:
    """cka_vs_stitch.parquet / _spearman.parquet / .md under out_dir and (heatmaps) each CKA file's
    heatmap ``<stem>.png`` beside it, with the stitch points of the results table marked."""
    joined, corr = cka_vs_stitch(cka_paths, table_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "cka_vs_stitch.parquet", out / "cka_vs_stitch_spearman.parquet", out / "cka_vs_stitch.md"]
    pq.write_table(joined, paths[0])
    pq.write_table(corr, paths[1])
    paths[2].write_text(join_markdown(joined, corr))
    if heatmaps:
        from .plots import plot_cka
        for p in map(Path, cka_paths):
            res, meta = load_result(p)
            marks = stitch_points(joined, meta.get("dataset"), res["model_a"], res["model_b"])
            title = (f"{meta.get('dataset')}/{meta.get('split')}: {res['model_a']} vs {res['model_b']} "
                     "(outlined: stitch points)")
            paths.append(plot_cka(res, p.with_suffix(".png"), marks=marks, title=title))
    return paths
