"""Figures of the analyses: Table 10 case counts by layer, and the layer x layer CKA heatmaps."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

CASE_STYLE = {  # column -> (legend, colour); preserve / rescue drawn up, interference down
    "preserve_src": ("preserve (S→S only right)", "#2ca25f"),
    "preserve_tgt": ("preserve (T→T only right)", "#99d8c9"),
    "rescue": ("rescue (both controls wrong)", "#3182bd"),
    "interfere_src": ("interference (S→S only right)", "#de2d26"),
    "interfere_tgt": ("interference (T→T only right)", "#fc9272"),
    "interfere_both": ("interference (both right)", "#a50f15"),
}
UP, DOWN = ("preserve_src", "preserve_tgt", "rescue"), ("interfere_src", "interfere_tgt", "interfere_both")


def _pick(rows, field, preference):
    present = {r[field] for r in rows}
    for p in preference:
        if p in present:
            return p
    return sorted(present)[0]


def plot_table10(table, path, notes=()):
    """One panel per (dataset, S→T): case counts by layer, stacked, preserve/rescue above zero and
    interference below, for one stitch layer (mlp, else the first) and one recipe (FFM→TLT > TLT >
    FFM > LFM), averaged over seeds. Empty results give a figure saying so."""
    from .predictions import METHOD_PREFERENCE
    rows = table.to_pylist()
    panels = sorted({(r["dataset"], r["source"], r["target"]) for r in rows})
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows + 0.8), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if not panels:
        axes[0, 0].set_visible(True)
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, "no stitched run with both self-stitch controls\n" + "\n".join(notes)[:400],
                        ha="center", va="center", wrap=True, fontsize=8)
    for ax, (ds, src, tgt) in zip(axes.flat, panels):
        prow = [r for r in rows if (r["dataset"], r["source"], r["target"]) == (ds, src, tgt)]
        stitch = _pick(prow, "stitch", ("mlp",))
        method = _pick([r for r in prow if r["stitch"] == stitch], "method", METHOD_PREFERENCE)
        sel = [r for r in prow if r["stitch"] == stitch and r["method"] == method]
        layers = sorted({r["layer"] for r in sel})
        x = np.arange(len(layers))
        mean = {c: np.array([np.mean([r[c] for r in sel if r["layer"] == l]) for l in layers]) for c in CASE_STYLE}
        for cases, sign in ((UP, 1), (DOWN, -1)):
            bottom = np.zeros(len(layers))
            for c in cases:
                label, colour = CASE_STYLE[c]
                ax.bar(x, sign * mean[c], 0.7, bottom=bottom, color=colour, label=label)
                bottom += sign * mean[c]
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [str(l) for l in layers])
        ax.set_xlabel("stitch layer")
        ax.set_ylabel("images (interference < 0)")
        ax.set_title(f"{ds}: {src} → {tgt} ({stitch}, {method})", fontsize=9)
    handles, labels = next(((h, l) for h, l in (a.get_legend_handles_labels() for a in axes.flat) if h), ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tick_labels(names):
    return ["final" if n == "final" else str(int(n[6:])) for n in names]


def plot_cka(result, path, marks=(), title=""):
    """Heatmaps of CKA (one per variant): rows = model A's arrays, columns = model B's; the stitch
    points (l, l) outlined in cyan."""
    variants = list(result["cka"])
    fig, axes = plt.subplots(1, len(variants), figsize=(4.6 * len(variants) + 0.6, 4.4), squeeze=False)
    na, nb = result["names_a"], result["names_b"]
    for ax, v in zip(axes[0], variants):
        m = result["cka"][v]
        im = ax.imshow(m, origin="lower", vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(nb)), _tick_labels(nb), fontsize=7)
        ax.set_yticks(range(len(na)), _tick_labels(na), fontsize=7)
        ax.set_xlabel(f"{result['model_b']} layer")
        ax.set_ylabel(f"{result['model_a']} layer")
        ax.set_title(f"linear CKA, {v}", fontsize=9)
        for l in marks:
            ia, ib = f"layer_{int(l):02d}", f"layer_{int(l):02d}"
            if ia in na and ib in nb:
                i, j = na.index(ia), nb.index(ib)
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="tab:cyan", lw=2.2))
        if len(na) * len(nb) <= 64:
            for i in range(len(na)):
                for j in range(len(nb)):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if m[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
