"""Tables shaped like the paper's (``paper_tables.md``, written by the `table` stage).

``paper_tables(table, probes=None) -> str`` renders, for whatever datasets / models / layers /
stitch families / methods / seeds the results table holds (see docs/stages/report.md):

- Table 1: TLT vs FFM→TLT ("pre-training" No / FFM) by layer, per dataset, ordered cross pair and
  stitch family.
- Table 2: S→S, T→T, S→T, T→S across datasets at selected layers (only with several datasets).
- Table 3: stitch families (Linear, MLP, LoRA) by layer per ordered cross pair, for one recipe; a
  family trained with several inits (``linear`` and ``linear_lstsq``) gives one row per init,
  "Linear (default init)" and "Linear (lstsq init)".
- Table 4: LFM vs FFM by layer: stitched probe accuracy, d_l and d_L, with the base probes.
- Tables 5–9: per ordered cross pair and stitch family, the S→S and T→T self-stitch controls and
  the S→T stitched model for every recipe, plus the two base linear probes.

Accuracy shown ("task accuracy"): the TLT head accuracy ``head_acc`` for tlt / ffm_tlt (what the
paper reports for its trained head), the stitched linear-probe accuracy ``probe_acc`` for the
label-free lfm / ffm. A tlt / ffm_tlt cell without a head accuracy falls back to ``probe_acc`` and
is marked ``*``. A table whose inputs are missing is replaced by a one-line note saying why.
Cells with several seeds show mean ± sample standard deviation (n − 1).

Stitch layers are told apart by *variant* = family + init (``stitchcache.stitch.choices``: the
results table's ``stitch`` + ``init`` columns, rejoined as ``linear`` / ``linear_lstsq`` / ...), so
every table below keeps the two inits of the Linear stitch apart. Several datasets: each table has a
block per dataset (Table 2 puts them side by side); a dataset whose results name another ``metric``
than accuracy (e.g. mIoU) is listed in the header, and its "accuracy" cells hold that metric.
"""
from __future__ import annotations

import math

from ..stitch.choices import DEFAULT_INIT, parse_choice
from .tables import (DASH, DEFAULT_METRIC, init_rank, method_rank, metric_name, probe_table, rows_of, split_note,
                     stitch_labels, variant)

TLT_METHODS = ("tlt", "ffm_tlt")
RECIPE_PREFERENCE = ("ffm_tlt", "tlt", "ffm", "lfm")   # the paper's recipe first
STITCH_ORDER = ("linear", "mlp", "lora")                 # Table 3's order (by capacity), inits within a family
STITCH_NAMES = {"linear": "Linear", "mlp": "MLP", "lora": "LoRA"}
METHOD_NAMES = {"lfm": "LFM", "ffm": "FFM", "tlt": "TLT", "ffm_tlt": "FFM→TLT"}
FALLBACK = "*"


# ----------------------------------------------------------------------------- values and cells

def _ok(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def task_acc(r):
    """(accuracy, fell_back): head_acc for tlt / ffm_tlt when present, else probe_acc."""
    if r["method"] in TLT_METHODS:
        if _ok(r["head_acc"]):
            return r["head_acc"], False
        return r["probe_acc"], _ok(r["probe_acc"])
    return r["probe_acc"], False


def mean_std(vals):
    """(mean, sample std or None for a single value) of the valid values; (None, None) if none."""
    vals = [v for v in vals if _ok(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt_cell(vals, kind="acc", marked=False):
    """One cell: '71.0', '71.0 ± 0.5' (accuracies in %), '0.123 ± 0.004' (distances), or '–'."""
    m, s = mean_std(vals)
    if m is None:
        return DASH
    if kind == "acc":
        out = f"{100 * m:.1f}" + ("" if s is None else f" ± {100 * s:.1f}")
    else:
        out = f"{m:#.3g}" + ("" if s is None else f" ± {s:.2g}")
    return out + (FALLBACK if marked else "")


def stitch_rank(s):
    """Order of stitch variants: family (STITCH_ORDER, then by name), then init (default first)."""
    family, init = parse_choice(s)
    fam = (STITCH_ORDER.index(family), "") if family in STITCH_ORDER else (len(STITCH_ORDER), family)
    return fam + init_rank(init)


def recipe_rank(m):
    return (RECIPE_PREFERENCE.index(m), "") if m in RECIPE_PREFERENCE else (len(RECIPE_PREFERENCE), m)


def select_layers(layers, k=3):
    """All layers when there are at most k + 1; else k spread from the second to the deepest
    (the paper's 6 / 14 / 22 out of 2, 6, ..., 22)."""
    layers = sorted(set(layers))
    n = len(layers)
    if n <= k + 1:
        return layers
    return [layers[i] for i in sorted({round(1 + j * (n - 2) / (k - 1)) for j in range(k)})]


def _arrow(s, t):
    return f"{s} → {t}"


def _md(header, body):
    esc = lambda x: str(x).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(esc, row)) + " |" for row in body] + [""]


def _note(text):
    return [f"> {text}", ""]


class _Results:
    """The rows of one results table, indexed for the paper tables."""

    def __init__(self, table, probes):
        self.rows = rows_of(table)
        for r in self.rows:   # from here on "stitch" is the variant (family + init), "family" the family
            r["family"], r["stitch"] = r["stitch"], variant(r)
        self.names = {}       # variant -> "Linear (lstsq init)", ... (per dataset: see name())
        self.datasets = sorted({r["dataset"] for r in self.rows})
        self.metrics = {ds: sorted({r["metric"] for r in self.rows if r["dataset"] == ds}) for ds in self.datasets}
        self.seeds = sorted({r["seed"] for r in self.rows if r["seed"] is not None})
        self.probe = {(p["dataset"], p["model"]): p["probe_acc"] for p in probes.to_pylist()
                      if _ok(p["probe_acc"])}
        for r in self.rows:   # probes joined into the rows, when the probe table lacks them
            for side, model in (("src", r["source"]), ("tgt", r["target"])):
                if _ok(r.get(side + "_probe_acc")):
                    self.probe.setdefault((r["dataset"], model), r[side + "_probe_acc"])
        self.cells = {}
        for r in self.rows:
            key = (r["dataset"], r["source"], r["target"], r["stitch"], r["method"], r["layer"])
            self.cells.setdefault(key, []).append(r)
        self.used_fallback = False

    def where(self, **match):
        return [r for r in self.rows if all(r[k] == v for k, v in match.items())]

    def values(self, ds, src, tgt, stitch, method, layer, field="task"):
        """(values over seeds, any fell back to probe_acc) of one cell."""
        vals, fell = [], False
        for r in self.cells.get((ds, src, tgt, stitch, method, layer), []):
            if field == "task":
                v, fb = task_acc(r)
                fell |= fb and _ok(v)
            else:
                v = r[field]
            vals.append(v)
        return vals, fell

    def cell(self, ds, src, tgt, stitch, method, layer, field="task"):
        vals, fell = self.values(ds, src, tgt, stitch, method, layer, field)
        self.used_fallback |= fell
        return fmt_cell(vals, "dist" if field.startswith("d_") else "acc", fell)

    def has(self, ds, src, tgt, stitch, method, layers, field="task"):
        return any(_ok(v) for l in layers for v in self.values(ds, src, tgt, stitch, method, l, field)[0])

    def layers(self, **match):
        return sorted({r["layer"] for r in self.where(**match)})

    def cross_pairs(self, ds):
        return sorted({(r["source"], r["target"]) for r in self.where(dataset=ds, kind="cross")})

    def stitches(self, **match):
        return sorted({r["stitch"] for r in self.where(**match)}, key=stitch_rank)

    def methods(self, **match):
        return sorted({r["method"] for r in self.where(**match)}, key=method_rank)

    def name(self, st, ds=None):
        """Display name of a stitch variant: the family's name, with its init when the results (of
        ``ds``, or all) hold that family with a non-default init."""
        key = ds or ""
        if key not in self.names:
            rows = [dict(r, stitch=r["family"]) for r in self.rows if ds is None or r["dataset"] == ds]
            self.names[key] = stitch_labels(rows, lambda f: STITCH_NAMES.get(f, f))
        family, init = parse_choice(st)
        return self.names[key].get(st) or STITCH_NAMES.get(family, family) + (
            "" if init == DEFAULT_INIT else f" ({init} init)")

    def probe_cell(self, ds, model):
        v = self.probe.get((ds, model))
        return fmt_cell([v]) if v is not None else DASH


def _recipe_note(chosen, present):
    """Which recipe a table shows, and why."""
    name, first = METHOD_NAMES.get(chosen, chosen), RECIPE_PREFERENCE[0]
    if chosen == first:
        return f"recipe {name} (the paper's)"
    order = " > ".join(METHOD_NAMES[m] for m in RECIPE_PREFERENCE)
    if first in present:
        return f"recipe {name} ({METHOD_NAMES[first]} covers fewer stitch families; preference order {order})"
    return f"recipe {name} (no {METHOD_NAMES[first]} results; the first present in the preference order {order})"


# ----------------------------------------------------------------------------- the tables

def _skipped_without(R, methods, table: str) -> list[str]:
    """The note of a table that compares `methods` when some have no runs (else [])."""
    present = {r["method"] for r in R.rows}
    missing = [m for m in methods if m not in present]
    if not missing:
        return []
    return _note(f"{table} skipped: the results have no " + " / ".join(f"`{m}`" for m in missing)
                 + f" runs (it compares {' with '.join(methods)}).")


def table1(R):
    out = ["## Table 1 — TLT with and without FFM pre-training", "",
           "Rows: the stitch layer's pre-training before task-loss training — No (TLT from a random "
           "init) and FFM (FFM→TLT); columns: stitch layer. Accuracy: the TLT task-head accuracy "
           "(`head_acc`, %) on the reported split (see the header), as in the paper.", ""]
    skipped = _skipped_without(R, TLT_METHODS, "Table 1")
    if skipped:
        return out + skipped
    body_before = len(out)
    for ds in R.datasets:
        for src, tgt in R.cross_pairs(ds):
            for st in R.stitches(dataset=ds, source=src, target=tgt):
                layers = R.layers(dataset=ds, source=src, target=tgt, stitch=st)
                if not any(R.has(ds, src, tgt, st, m, layers) for m in TLT_METHODS):
                    continue
                out += [f"### {ds}: {_arrow(src, tgt)}, {R.name(st, ds)} stitch", ""]
                out += _md(["Pre-train"] + [f"L{l}" for l in layers],
                           [[label] + [R.cell(ds, src, tgt, st, m, l) for l in layers]
                            for label, m in (("No", "tlt"), ("FFM", "ffm_tlt"))])
    if len(out) == body_before:
        out += _note("Table 1 skipped: no cross-model (S ≠ T) tlt / ffm_tlt results.")
    return out


def table2(R):
    out = ["## Table 2 — stitched vs self-stitch across datasets", ""]
    if len(R.datasets) < 2:
        return out + _note(f"Table 2 skipped: it compares datasets and the results hold only "
                           f"{', '.join(R.datasets) or 'none'} (see Tables 5–9 for the per-pair controls).")
    stitches = R.stitches()
    st = "mlp" if "mlp" in stitches else stitches[0]
    methods = sorted({r["method"] for r in R.rows if r["stitch"] == st}, key=recipe_rank)
    m = methods[0]
    sel = {ds: select_layers(R.layers(dataset=ds, stitch=st, method=m)) for ds in R.datasets}
    cols = [(ds, l) for ds in R.datasets for l in sel[ds]]
    out += [f"Rows: the self-stitch controls S→S and T→T, the stitched S→T and the reverse pair T→S; "
            f"columns: dataset × stitch layer (at most three layers per dataset, spread from the "
            f"second to the deepest). {R.name(st)} stitch, {_recipe_note(m, methods)}; "
            f"accuracy: {'TLT task-head accuracy' if m in TLT_METHODS else 'stitched linear-probe accuracy'} (%).", ""]
    pairs = sorted({frozenset(p) for ds in R.datasets for p in R.cross_pairs(ds)}, key=sorted)
    if not pairs:
        return out + _note("Table 2 skipped: no cross-model (S ≠ T) results.")
    for pair in pairs:
        a, b = sorted(pair)
        crosses = {p for ds in R.datasets for p in R.cross_pairs(ds)}
        s, t = (a, b) if (a, b) in crosses else (b, a)
        body = []
        for s_, t_, role in ((s, s, "S→S"), (t, t, "T→T"), (s, t, "S→T"), (t, s, "T→S")):
            if any(R.has(ds, s_, t_, st, m, [l]) for ds, l in cols):
                body.append([f"{_arrow(s_, t_)} ({role})"] + [R.cell(ds, s_, t_, st, m, l) for ds, l in cols])
        out += [f"### {a} and {b}", ""]
        out += _md(["model"] + [f"{ds} L{l}" for ds, l in cols], body)
    return out


def table3(R):
    out = ["## Table 3 — stitch layer families", ""]
    present = R.stitches()
    if len(present) < 2:
        return out + _note(f"Table 3 skipped: it compares stitch families and the results hold only "
                           f"{', '.join(present) or 'none'} (configure several under stitch.stitch_layers, "
                           "e.g. linear and linear_lstsq to compare the Linear stitch's inits).")
    # the recipe: the preferred method among those run with the most stitch families
    fams = {m: len(R.stitches(method=m, kind="cross")) for m in R.methods()}
    best = max(fams.values())
    m = sorted((x for x in fams if fams[x] == best), key=recipe_rank)[0]
    acc = "TLT task-head accuracy" if m in TLT_METHODS else "stitched linear-probe accuracy"
    out += [f"Rows: stitch family (and its init where one family was trained with several: default = "
            f"the layer's random init, lstsq = least-squares init from cached features) per ordered pair "
            f"S → T; columns: stitch layer; {_recipe_note(m, fams)}; accuracy: {acc} (%).", ""]
    absent = [s for s in STITCH_ORDER if s not in {parse_choice(v)[0] for v in present}]
    if absent:
        out += _note(f"No {' / '.join(absent)} results: {'that row is' if len(absent) == 1 else 'those rows are'} "
                     "left out.")
    for ds in R.datasets:
        body, layers = [], R.layers(dataset=ds, kind="cross", method=m)
        for src, tgt in R.cross_pairs(ds):
            for i, st in enumerate(R.stitches(dataset=ds, source=src, target=tgt, method=m)):
                body.append([_arrow(src, tgt) if i == 0 else "", R.name(st, ds)]
                            + [R.cell(ds, src, tgt, st, m, l) for l in layers])
        if len({row[1] for row in body}) < 2:
            out += _note(f"{ds}: skipped, fewer than two stitch families with {METHOD_NAMES.get(m, m)} cross-pair results.")
            continue
        out += [f"### {ds}", ""] + _md(["S → T", "stitch"] + [f"L{l}" for l in layers], body)
    return out


def table4(R):
    out = ["## Table 4 — LFM vs FFM", "",
           "Per ordered pair S → T: the stitched model's linear-probe accuracy (%, the label-free "
           "methods' task accuracy) and the layer / final feature distances d_l, d_L (mean squared "
           "error per element, reported split) by stitch layer, LFM next to FFM.", ""]
    skipped = _skipped_without(R, ("lfm", "ffm"), "Table 4")
    if skipped:
        return out + skipped
    n = len(out)
    for ds in R.datasets:
        for st in R.stitches(dataset=ds, kind="cross"):
            pairs = [p for p in R.cross_pairs(ds) if R.where(dataset=ds, source=p[0], target=p[1], stitch=st)]
            layers = sorted({r["layer"] for r in R.where(dataset=ds, stitch=st, kind="cross")
                             if r["method"] in ("lfm", "ffm")})
            if not pairs or not layers:
                continue
            models = sorted({x for p in pairs for x in p})
            body = []
            fields = [("probe_acc", "probe acc (%)"), ("d_l", "d_l"), ("d_L", "d_L")]
            fields += [(f, f) for f in ("d_l_rel", "d_L_rel")
                       if any(_ok(r[f]) for r in R.where(dataset=ds, stitch=st, kind="cross"))]
            for src, tgt in pairs:
                for field, label in fields:
                    for m in ("lfm", "ffm"):
                        body.append([_arrow(src, tgt), label, METHOD_NAMES[m]]
                                    + [R.cell(ds, src, tgt, st, m, l, field) for l in layers])
            out += [f"### {ds}, {R.name(st, ds)} stitch", "",
                    "Base linear probes: " + ", ".join(f"{x} {R.probe_cell(ds, x)}" for x in models) + ".", ""]
            out += _md(["S → T", "metric", "method"] + [f"L{l}" for l in layers], body)
    if len(out) == n:
        out += _note("Table 4 skipped: no cross-model (S ≠ T) lfm / ffm results.")
    return out


def tables5_9(R):
    out = ["## Tables 5–9 — stitched vs self-stitch controls vs linear probes", "",
           "Per ordered pair S → T and stitch family: for every recipe, the self-stitch controls S→S "
           "and T→T (the same stitch layer, layer and training inserted into one model) and the "
           "stitched S→T; then the base linear probes of S and T (no stitch layer: the same value "
           "in every column). Accuracy (%): TLT task-head accuracy for TLT and FFM→TLT, stitched "
           "linear-probe accuracy for LFM and FFM.", ""]
    n = len(out)
    for ds in R.datasets:
        for src, tgt in R.cross_pairs(ds):
            for st in R.stitches(dataset=ds, source=src, target=tgt):
                layers = R.layers(dataset=ds, source=src, target=tgt, stitch=st)
                body = []
                for m in R.methods(dataset=ds, source=src, target=tgt, stitch=st):
                    for i, (s_, t_, role) in enumerate(((src, src, "S→S control"), (tgt, tgt, "T→T control"),
                                                        (src, tgt, "S→T stitched"))):
                        body.append([METHOD_NAMES.get(m, m) if i == 0 else "", f"{_arrow(s_, t_)} ({role})"]
                                    + [R.cell(ds, s_, t_, st, m, l) for l in layers])
                for model, role in ((src, "S"), (tgt, "T")):
                    body.append(["linear probe", f"{model} ({role})"] + [R.probe_cell(ds, model)] * len(layers))
                out += [f"### {ds}: {_arrow(src, tgt)}, {R.name(st, ds)} stitch", ""]
                out += _md(["recipe", "model"] + [f"L{l}" for l in layers], body)
    if len(out) == n:
        out += _note("Tables 5–9 skipped: no cross-model (S ≠ T) results.")
    return out


def paper_tables(table, probes=None) -> str:
    """The paper-shaped tables as Markdown (see the module docstring)."""
    probes = probe_table(table) if probes is None else probes
    R = _Results(table, probes)
    seeds = (f"Cells with several seeds show mean ± sample standard deviation over the seeds present "
             f"({', '.join(map(str, R.seeds))})." if len(R.seeds) > 1 else
             f"One seed ({R.seeds[0]}): no spread shown." if R.seeds else "")
    out = ["# Stitching results, shaped like the paper's tables", "",
           f"Accuracies in % (one decimal) on {split_note(R.rows, probes.to_pylist() if probes is not None else [])}; "
           "the *task accuracy* shown is the TLT "
           "task-head accuracy (`head_acc`) for TLT / FFM→TLT and the stitched model's linear-probe "
           f"accuracy (`probe_acc`) for the label-free LFM / FFM. {DASH} = missing. {seeds}".rstrip(), ""]
    if not R.rows:
        return "\n".join(out + _note("No stitching results: every table skipped."))
    if any(ms != [DEFAULT_METRIC] for ms in R.metrics.values()):
        out += ["Metric per dataset (\"accuracy\" below means this metric for that dataset's cells): "
                + ", ".join(f"{ds}: {' / '.join(map(metric_name, R.metrics[ds]))}" for ds in R.datasets) + ".", ""]
    for part in (table1, table2, table3, table4, tables5_9):
        out += part(R)
    if R.used_fallback:
        out += [f"{FALLBACK} TLT / FFM→TLT result without a task-head accuracy: the stitched "
                "linear-probe accuracy is shown instead.", ""]
    return "\n".join(out)
