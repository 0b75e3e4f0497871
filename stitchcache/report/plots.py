"""Figures from the results table (the `plot` stage), in the spirit of the paper's Figures 2-5.

- ``plot_accuracy``: per (dataset, source → target) a panel for each of the two evaluators, labelled
  in every title and the suptitle: the *refitted linear probe* on the stitched final tokens
  (``probe_acc``, every method) and, where TLT / FFM→TLT results exist, the *trained task head*
  (``head_acc``, what paper Table 1 shows): accuracy vs stitch layer, one colour per method; the
  self-stitch controls of the same method dashed (S → S) and dotted (T → T), with hollow markers;
  horizontal lines for the source and target base linear probes. The plotted values are the seed
  means of the table's columns, so they equal the Markdown / paper tables' cells.
- ``plot_distances``: per (dataset, source → target) two panels, d_l and d_L vs layer, LFM vs FFM,
  log y-axis.
Panels are the cross pairs of each dataset (its self pairs if it has none): several datasets are
facets of the same figure (panel titles start with the dataset; the accuracy axis names that
dataset's metric). Stitch layers are told apart by variant (family + init): one marker each,
legend "linear (default init) stitch" / "linear (lstsq init) stitch" when both inits are present.
Values are averaged over seeds; NaN / missing values (and, on the log axis, non-positive ones) are
skipped.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .tables import method_rank, metric_of, rows_of, split_note, stitch_labels, variant  # noqa: E402

METHOD_NAMES = {"lfm": "LFM", "ffm": "FFM", "tlt": "TLT", "ffm_tlt": "FFM→TLT"}
METHOD_COLORS = {"lfm": "tab:blue", "ffm": "tab:orange", "tlt": "tab:green", "ffm_tlt": "tab:red"}
EXTRA_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
STITCH_MARKERS = ["o", "s", "^", "D", "v"]
CONTROL_STYLES = {"src": (0, (5, 2)), "tgt": (0, (1, 1.5))}   # S→S dashed, T→T dotted
PROBE_STYLES = {"src": dict(color="0.55", ls="-.", lw=1.2), "tgt": dict(color="black", ls="-.", lw=1.2)}


def _ok(v, positive=False):
    return v is not None and not math.isnan(v) and (v > 0 or not positive)


def _series(rows, field, positive=False, **match):
    """(layers, seed-mean values) of the rows matching ``match``, skipping missing values."""
    by_layer = {}
    for r in rows:
        if all(r[k] == v for k, v in match.items()) and _ok(r[field], positive):
            by_layer.setdefault(r["layer"], []).append(r[field])
    layers = sorted(by_layer)
    return layers, [sum(by_layer[l]) / len(by_layer[l]) for l in layers]


def _panels(rows):
    """[(dataset, source, target)]: cross pairs per dataset, or its self pairs if it has none."""
    out = []
    for ds in sorted({r["dataset"] for r in rows}):
        drows = [r for r in rows if r["dataset"] == ds]
        kind = "cross" if any(r["kind"] == "cross" for r in drows) else "self"
        out += sorted({(ds, r["source"], r["target"]) for r in drows if r["kind"] == kind})
    return out


def _base_probe(rows, model):
    """The base linear-probe accuracy of ``model``, from the joined src/tgt_probe_acc columns."""
    for r in rows:
        for side in ("src", "tgt"):
            if r["source" if side == "src" else "target"] == model and _ok(r[side + "_probe_acc"]):
                return r[side + "_probe_acc"]
    return None


def _colors(methods):
    extra = iter(EXTRA_COLORS * 4)
    return {m: METHOD_COLORS.get(m) or next(extra) for m in methods}


def _grid(n, ncols, w, h, legend_rows):
    nrows = math.ceil(n / ncols)
    leg_h = 0.28 * legend_rows + 0.12
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows + leg_h), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n]), leg_h / (h * nrows + leg_h)


def _finish(fig, handles, legend_frac, out_png, ncol):
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, legend_frac, 1, 1))
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _layer_axis(ax, layers):
    layers = sorted(set(layers))
    if layers:
        ax.set_xticks(layers)
        if len(layers) == 1:
            ax.set_xlim(layers[0] - 1, layers[0] + 1)
    ax.set_xlabel("stitch layer l")
    ax.grid(alpha=0.3)


def _rows(table):
    """(rows with "stitch" = the variant (family + init), variant -> legend label)."""
    rows = rows_of(table)
    if not rows:
        raise ValueError("the results table has no rows to plot")
    labels = stitch_labels(rows)
    for r in rows:
        r["stitch"] = variant(r)
    return rows, labels


def _method_handles(methods, stitches, color, marker, labels) -> list:
    """Legend entries: one colour per method, one marker per stitch variant (when there are several)."""
    handles = [Line2D([], [], color=color[m], lw=1.8, label=METHOD_NAMES.get(m, m)) for m in methods]
    if len(stitches) > 1:
        handles += [Line2D([], [], color="0.3", ls="", marker=marker[s], label=f"{labels.get(s, s)} stitch")
                    for s in stitches]
    return handles


EVALUATORS = {"probe_acc": "refitted linear probe", "head_acc": "trained task head"}


def accuracy_figure(table):
    """The accuracy figure (see the module docstring). Every curve's gid is
    ``<field>|<dataset>|<source>|<target>|<variant>|<method>`` (field: probe_acc or head_acc), so
    tests can read back exactly what was drawn."""
    rows, labels = _rows(table)
    methods = sorted({r["method"] for r in rows}, key=method_rank)
    stitches = sorted({r["stitch"] for r in rows})
    color, marker = _colors(methods), dict(zip(stitches, STITCH_MARKERS * 4))
    panels = _panels(rows)
    has_head = {(ds, s, t) for ds, s, t in panels
                if any(_ok(r["head_acc"]) for r in rows if r["dataset"] == ds and r["source"] in (s, t)
                       and r["target"] in (s, t))}
    cells = [(p, f) for p in panels for f in ("probe_acc", "head_acc") if f == "probe_acc" or p in has_head]
    n_handles = len(methods) + len(stitches) * (len(stitches) > 1) + 5
    ncol_leg = min(n_handles, 6)
    ncols = 2 if has_head else min(len(panels), 3)
    fig, axes, leg = _grid(len(cells), ncols, 4.8, 3.6, math.ceil(n_handles / ncol_leg))
    used = set()
    for ax, ((ds, src, tgt), field) in zip(axes, cells):
        drows = [r for r in rows if r["dataset"] == ds]
        all_layers = []
        for st in stitches:
            for m in methods:
                curves = [("main", src, tgt, "-")]
                if src != tgt:
                    curves += [("src", src, src, CONTROL_STYLES["src"]), ("tgt", tgt, tgt, CONTROL_STYLES["tgt"])]
                for tag, s, t, ls in curves:
                    x, y = _series(drows, field, source=s, target=t, stitch=st, method=m)
                    if x:
                        ax.plot(x, [100 * v for v in y], ls=ls, color=color[m], marker=marker[st], ms=4,
                                lw=1.8 if tag == "main" else 1.2, mfc=None if tag == "main" else "white",
                                gid=f"{field}|{ds}|{s}|{t}|{st}|{m}")
                        used.add(tag)
                        all_layers += x
        for side, model in (("src", src), ("tgt", tgt))[: 1 if src == tgt else 2]:
            acc = _base_probe(drows, model)
            if acc is not None:
                ax.axhline(100 * acc, **PROBE_STYLES[side])
                used.add("probe_" + side)
        _layer_axis(ax, all_layers)
        short = "probe" if field == "probe_acc" else "head"
        ax.set_ylabel(f"{short} {metric_of(drows)} (%)")
        ax.set_title(f"{ds}: {src} → {tgt} — {EVALUATORS[field]}", fontsize=10)
    handles = _method_handles(methods, stitches, color, marker, labels)
    handles.append(Line2D([], [], color="0.3", lw=1.8, marker="o", ms=4, label="S → T stitched"))
    if "src" in used:
        handles.append(Line2D([], [], color="0.3", ls=CONTROL_STYLES["src"], marker="o", mfc="white",
                               ms=4, label="S → S control"))
    if "tgt" in used:
        handles.append(Line2D([], [], color="0.3", ls=CONTROL_STYLES["tgt"], marker="o", mfc="white",
                               ms=4, label="T → T control"))
    if "probe_src" in used:
        handles.append(Line2D([], [], **PROBE_STYLES["src"], label="source base linear probe"))
    if "probe_tgt" in used:
        handles.append(Line2D([], [], **PROBE_STYLES["tgt"], label="target base linear probe"))
    evaluators = "refitted linear probe (every method)" + (
        " and trained task head (TLT, FFM→TLT)" if has_head else "")
    fig.suptitle(f"Stitched model {metric_of(rows)} by stitch layer: {evaluators}\non {split_note(rows)}",
                 fontsize=9)
    return fig, handles, leg, ncol_leg


def plot_accuracy(table, out_png):
    fig, handles, leg, ncol = accuracy_figure(table)
    return _finish(fig, handles, leg, out_png, ncol)


def plot_distances(table, out_png):
    rows, labels = _rows(table)
    present = sorted({r["method"] for r in rows}, key=method_rank)
    methods = [m for m in ("lfm", "ffm") if m in present] or present
    stitches = sorted({r["stitch"] for r in rows})
    color, marker = _colors(methods), dict(zip(stitches, STITCH_MARKERS * 4))
    panels = _panels(rows)
    fig, axes, leg = _grid(2 * len(panels), 2, 4.8, 3.4, 1)
    for i, (ds, src, tgt) in enumerate(panels):
        drows = [r for r in rows if r["dataset"] == ds]
        for ax, field, name in ((axes[2 * i], "d_l", "$d_l$ (layer-$l$ features)"),
                                (axes[2 * i + 1], "d_L", "$d_L$ (final features)")):
            all_layers = []
            for st in stitches:
                for m in methods:
                    x, y = _series(drows, field, positive=True, source=src, target=tgt, stitch=st, method=m)
                    if x:
                        ax.plot(x, y, color=color[m], marker=marker[st], ms=4, lw=1.8)
                        all_layers += x
            if all_layers:
                ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
            _layer_axis(ax, all_layers)
            ax.set_ylabel("MSE per element")
            ax.set_title(f"{ds}: {src} → {tgt} — {name}", fontsize=10)
    handles = _method_handles(methods, stitches, color, marker, labels)
    fig.suptitle(f"Feature distances of the stitched model on {split_note(rows)}", fontsize=10)
    return _finish(fig, handles, leg, out_png, len(handles))
