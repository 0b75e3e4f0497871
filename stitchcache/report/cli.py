"""The `table` and `plot` subcommands (wired into ``python -m stitchcache`` by stitchcache.cli)."""
from __future__ import annotations

from pathlib import Path


def configure_table_parser(p):
    p.add_argument("--evals", nargs="+", required=True, metavar="EVAL.json", help="evaluation results")
    p.add_argument("--probes", nargs="*", default=[], metavar="PROBE.json", help="base-model linear probes")
    p.add_argument("--out-dir", required=True, help="writes table.parquet, table.csv, table.md, paper_tables.md here")
    p.add_argument("--settings", help="JSON {train, probe, probe_job}: the settings every result must have been "
                   "produced with (results of other settings are refused); not checked when absent")
    return p


def run_table(args):
    from ..runtime import json_arg
    from .outputs import write_table
    from .stale import check_results
    from .tables import build_table, probe_table
    if args.settings:
        check_results(args.evals, args.probes, json_arg(args.settings, "--settings"))
    table = build_table(args.evals, args.probes)
    paths = write_table(table, probe_table(table), args.out_dir)
    n_ds = len(set(table.column("dataset").to_pylist()))
    print(f"table: {table.num_rows} stitch results ({n_ds} dataset(s)) + {len(args.probes)} base probes "
          f"-> {', '.join(map(str, paths))}")
    return 0


def configure_plot_parser(p):
    p.add_argument("--table", required=True, metavar="TABLE.parquet", help="output of the table stage")
    p.add_argument("--out-dir", required=True, help="writes accuracy.png and distances.png here")
    return p


def read_results_table(path):
    """The results table at ``path`` (table.parquet), checked for the columns every reader needs."""
    import pyarrow.parquet as pq
    from .tables import COLUMNS, LATER_COLUMNS
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results table not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the results table ({e})") from None
    missing = [c for c in COLUMNS if c not in table.column_names and c not in LATER_COLUMNS]
    if missing:
        raise ValueError(f"{path}: results table lacks column(s) {', '.join(missing)}")
    return table


def run_plot(args):
    from .plots import plot_accuracy, plot_distances
    path = Path(args.table)
    table = read_results_table(path)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = plot_accuracy(table, out / "accuracy.png"), plot_distances(table, out / "distances.png")
    print(f"plot: {table.num_rows} rows from {path} -> {', '.join(map(str, paths))}")
    return 0


def configure_findings_parser(p):
    p.add_argument("--table", required=True, metavar="TABLE.parquet", help="output of the table stage")
    p.add_argument("--out", required=True, metavar="FINDINGS.md", help="the findings section (Markdown)")
    p.add_argument("--predictions", nargs="*", default=[], metavar="PREDICTIONS.parquet",
                   help="per-image predictions of the runs and base probes: the test split's noise (paired "
                        "standard errors) joins the seed spread in deciding what is resolved")
    return p


def run_findings(args):
    from .findings import check_findings, findings_markdown
    from .noise import Correctness
    table = read_results_table(args.table)
    correct = Correctness.from_files(getattr(args, "predictions", None) or [])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(findings_markdown(table, correct=correct) + "\n")
    verdicts = ", ".join(f"finding {f.number}: {f.verdict}" for f in check_findings(table, correct=correct))
    print(f"findings: {verdicts} -> {out}")
    return 0
