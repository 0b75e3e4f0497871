"""Tree results: one table (Parquet/CSV/Markdown), the Table-12-shaped gain table, the knob plot,
and ``plan``: the best configuration within a cost budget, per dataset.

Rows (one per tree x dataset x config) come from ``tree evaluate``: config single | vst<k> | full,
score (probe accuracy on the reported split), added_cost (backbone blocks beyond one VFM, as a
fraction of the trunk's depth: the paper's cost model).
"""
from __future__ import annotations

import json
from pathlib import Path

from .evaluate import normalized_gain


def load_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data["rows"]:
            rows.append({**r, "tree": data["tree"]})
    return rows


def _order(config: str) -> tuple:
    return (0, 0) if config == "single" else (2, 0) if config == "full" else (1, int(config[3:]))


def gains(rows: list[dict]) -> list[dict]:
    """Per tree and VST-k: per-dataset normalized gain, its mean, the added cost."""
    out = []
    for tree in dict.fromkeys(r["tree"] for r in rows):
        tr = [r for r in rows if r["tree"] == tree]
        datasets = list(dict.fromkeys(r["dataset"] for r in tr))
        by = {(r["dataset"], r["config"]): r for r in tr}
        missing = [(d, c) for d in datasets for c in ("single", "full") if (d, c) not in by]
        if missing:
            raise SystemExit(f"error: tree {tree!r}: no {missing[0][1]} row for dataset {missing[0][0]!r}")
        for cfg in sorted({r["config"] for r in tr if r["config"].startswith("vst")}, key=_order):
            ds = [d for d in datasets if (d, cfg) in by]
            g = normalized_gain([by[d, "single"]["score"] for d in ds], [by[d, "full"]["score"] for d in ds],
                                [by[d, cfg]["score"] for d in ds])
            out.append({"tree": tree, "config": cfg, "k": by[ds[0], cfg]["k"], "datasets": ds,
                        "normalized_gain": dict(zip(ds, g["per_metric"])), "mean_normalized_gain": g["mean"],
                        "added_cost": by[ds[0], cfg]["added_cost"],
                        "full_cost": by[ds[0], "full"]["added_cost"]})
    return out


# A normalized gain divides by Full - single; when that difference is within its noise — the paired
# standard error over the test images that tree evaluate records as the Full row's ``gain_se`` — the
# ratio is flagged rather than printed as if meaningful. Rows written before gain_se existed fall back
# to a fixed one point (scores in [0, 1]).
UNSTABLE_GAP = 0.01


def gap_noise(full_row: dict) -> float:
    """What Full − single is compared with: the row's paired s.e., else the fixed UNSTABLE_GAP."""
    se = full_row.get("gain_se")
    return float(se) if se is not None else UNSTABLE_GAP


def _pct(v, digits=1):
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def gain_markdown(rows: list[dict], gain_rows: list[dict]) -> str:
    """Table 12's form per tree: (A) single, (B) Full, (C) max gain; per k: VST-k, its gain, NG."""
    lines = []
    for tree in dict.fromkeys(r["tree"] for r in rows):
        tr = [r for r in rows if r["tree"] == tree]
        ds = list(dict.fromkeys(r["dataset"] for r in tr))
        by = {(r["dataset"], r["config"]): r for r in tr}
        first = tr[0]
        lines += [f"## Tree `{tree}`: trunk {first['trunk']} + {', '.join(first['branches'])} "
                  f"(probe accuracy, {first['split']} split)", "",
                  "| configuration | " + " | ".join(ds) + " | avg normalized gain | added cost |",
                  "|---|" + "---|" * (len(ds) + 2)]

        def row(label, vals, avg="-", cost="-"):
            lines.append(f"| {label} | " + " | ".join(vals) + f" | {avg} | {cost} |")

        sc = lambda d, c: by[d, c]["score"] if (d, c) in by else None  # noqa: E731
        unstable = lambda d: abs(sc(d, "full") - sc(d, "single")) <= gap_noise(by[d, "full"])  # noqa: E731
        row(f"(A) single ({first['trunk']})", [_pct(sc(d, "single"), 2) for d in ds], cost="0%")
        row("(B) Full", [_pct(sc(d, "full"), 2) for d in ds], cost=_pct(by[ds[0], "full"]["added_cost"]))
        se = lambda d: by[d, "full"].get("gain_se")  # noqa: E731
        row("(C) max gain (B - A)", [f"{100 * (sc(d, 'full') - sc(d, 'single')):+.2f}"
                                     + (f" (s.e. {100 * se(d):.2f})" if se(d) is not None else "") for d in ds])
        for g in [g for g in gain_rows if g["tree"] == tree]:
            cfg, cost = g["config"], _pct(g["added_cost"])
            row(f"VST-{g['k']}", [_pct(sc(d, cfg), 2) for d in ds], cost=cost)
            row(f"VST-{g['k']} gain", [f"{100 * (sc(d, cfg) - sc(d, 'single')):+.2f}" if sc(d, cfg) is not None
                                       else "n/a" for d in ds])
            flag = lambda d: "†" if g["normalized_gain"].get(d) is not None and unstable(d) else ""  # noqa: E731
            row(f"VST-{g['k']} normalized gain", [_pct(g["normalized_gain"].get(d)) + flag(d) for d in ds],
                avg=_pct(g["mean_normalized_gain"]) + ("†" if any(flag(d) for d in ds) else ""), cost=cost)
        lines.append("")
    lines.append("Normalized gain = (VST - single) / (Full - single) per dataset (n/a where Full equals single); "
                 "added cost = extra backbone blocks / trunk depth (Full: every other VFM end to end).")
    if any("†" in l for l in lines):
        noise = sorted({f"{100 * gap_noise(r):.2f}" for r in rows if r["config"] == "full"})
        measured = all(r.get("gain_se") is not None for r in rows if r["config"] == "full")
        lines.append("† Full − single is within its noise here (" + (
            f"its paired standard error over the test images: {' / '.join(noise)} points" if measured else
            f"no per-image noise recorded: a fixed {100 * UNSTABLE_GAP:g} point") + "): the ratio divides by a "
            "difference that another test split could reverse and is not a meaningful normalized gain; compare "
            "the scores instead.")
    return "\n".join(lines) + "\n"


def knob_plot(rows: list[dict], path) -> None:
    """Score vs added cost: single (0), VST-k for every k, Full; one panel per dataset, a line per tree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for tree in dict.fromkeys(r["tree"] for r in rows):
            pts = sorted((r for r in rows if r["tree"] == tree and r["dataset"] == d), key=lambda r: _order(r["config"]))
            xs, ys = [100 * r["added_cost"] for r in pts], [100 * r["score"] for r in pts]
            line, = ax.plot(xs, ys, marker="o", label=tree)
            for r, x, y in zip(pts, xs, ys):
                name = {"single": "single"}.get(r["config"], "Full" if r["config"] == "full" else f"VST-{r['k']}")
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7, color=line.get_color())
        ax.set_title(d)
        ax.set_xlabel("added backbone cost vs one VFM (%)")
        ax.set_ylabel("probe accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out_dir) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{**{k: v for k, v in r.items() if k != "checkpoints"},
                                   "branches": "+".join(r["branches"])} for r in rows])
    pq.write_table(table, out / "tree_table.parquet")
    pcsv.write_csv(table, out / "tree_table.csv")
    g = gains(rows)
    (out / "tree_gains.json").write_text(json.dumps(g, indent=2) + "\n")
    (out / "tree_table.md").write_text(gain_markdown(rows, g))
    knob_plot(rows, out / "tree_knob.png")
    return {"gains": g}


def parse_budget(text: str) -> float:
    """'40%' -> 0.4; '0.4' -> 0.4; a bare number above 1 is read as percent."""
    t = str(text).strip()
    v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if v < 0:
        raise SystemExit(f"error: --budget {text!r} is negative")
    return v / 100 if not t.endswith("%") and v > 1 else v


def plan(rows: list[dict], budget: float) -> list[dict]:
    """Per dataset: the best-scoring configuration (any tree's single / VST-k / Full) whose added
    cost is within the budget, with its normalized gain where defined."""
    g = {(x["tree"], x["config"]): x for x in gains(rows)}
    best = []
    for d in dict.fromkeys(r["dataset"] for r in rows):
        fits = [r for r in rows if r["dataset"] == d and r["added_cost"] <= budget + 1e-12]
        if not fits:
            best.append({"dataset": d, "budget": budget, "choice": None})
            continue
        r = max(fits, key=lambda r: (r["score"], -r["added_cost"]))
        ng = g.get((r["tree"], r["config"]), {}).get("normalized_gain", {}).get(d)
        best.append({"dataset": d, "budget": budget, "tree": r["tree"], "config": r["config"], "k": r["k"],
                     "score": r["score"], "added_cost": r["added_cost"], "normalized_gain": ng,
                     "trunk": r["trunk"], "branches": r["branches"]})
    return best


def plan_markdown(best: list[dict]) -> str:
    lines = [f"Best configuration within an added cost of {_pct(best[0]['budget']) if best else '?'} per dataset", "",
             "| dataset | tree | configuration | probe accuracy | added cost | normalized gain |", "|---|---|---|---|---|---|"]
    for b in best:
        if b.get("config") is None:
            lines.append(f"| {b['dataset']} | - | nothing fits | - | - | - |")
            continue
        name = "single" if b["config"] == "single" else "Full" if b["config"] == "full" else f"VST-{b['k']}"
        lines.append(f"| {b['dataset']} | {b['tree']} | {name} | {_pct(b['score'], 2)} | {_pct(b['added_cost'])} | "
                     f"{_pct(b['normalized_gain'])} |")
    return "\n".join(lines) + "\n"
