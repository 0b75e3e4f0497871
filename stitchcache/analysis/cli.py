"""``python -m stitchcache analyze {table10,cka,cka-join}``: analyses from cached features and
per-image predictions (docs/stages/analysis.md). ``main(args)`` only converts arguments; the work is
in the typed functions ``run_table10``, ``run_cka`` and ``run_cka_join``."""
from __future__ import annotations

from pathlib import Path

from ..runtime import log


def run_table10(predictions: list[str], out_dir: str) -> list[Path]:
    from .predictions import write_table10
    paths = write_table10(predictions, out_dir)
    log(f"analyze table10: {len(predictions)} prediction file(s) -> {', '.join(map(str, paths))}")
    return paths


def run_cka(record_a: str, record_b: str, out: str, *, variants=("pooled", "token"), marks=(),
            device: str = "auto", plot: bool = True) -> list[Path]:
    """CKA between every layer of the store behind ``record_a`` and of the one behind ``record_b``."""
    from ..cache.store import open_record
    from ..runtime import pick_device
    from .atlas import write_cka
    from .cka import store_cka
    (rec_a, a), (rec_b, b) = open_record(record_a), open_record(record_b)
    dev = pick_device(device)
    result = store_cka(a, b, variants=variants, device=dev, log=log)
    result.update(model_a=rec_a.get("model") or a.attrs.get("model_name"),
                  model_b=rec_b.get("model") or b.attrs.get("model_name"))
    paths = write_cka(result, out, dataset=rec_a.get("dataset"), split=rec_a.get("split"), stores=(a, b),
                      marks=marks, plot=plot)
    log(f"analyze cka: {result['model_a']} x {result['model_b']} -> {', '.join(map(str, paths))}")
    return paths


def run_cka_join(cka: list[str], table: str, out_dir: str, heatmaps: bool = True) -> list[Path]:
    from .atlas import write_cka_vs_stitch
    paths = write_cka_vs_stitch(cka, table, out_dir, heatmaps=heatmaps)
    log(f"analyze cka-join: {len(cka)} CKA file(s) + {table} -> {', '.join(map(str, paths))}")
    return paths


def configure_parser(p):
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    t = sub.add_parser("table10", help="prediction analysis of stitched vs self-stitched models (Table 10)")
    t.add_argument("--predictions", nargs="+", required=True, metavar="PREDICTIONS.parquet",
                   help="predictions of stitched runs and their self-stitch controls")
    t.add_argument("--out-dir", required=True, help="writes table10.parquet, table10.md, table10.png")
    c = sub.add_parser("cka", help="linear CKA between every layer of two models' feature stores")
    c.add_argument("--a", required=True, metavar="RECORD.json", help="feature record of model A (heatmap rows)")
    c.add_argument("--b", required=True, metavar="RECORD.json", help="feature record of model B (columns)")
    c.add_argument("--variants", nargs="+", default=["pooled", "token"], choices=["pooled", "token"],
                   help="pooled: mean of patch tokens per image; token: patch tokens paired by position")
    c.add_argument("--mark-layers", nargs="*", type=int, default=[], metavar="L", help="stitch points to mark")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda (where the statistics accumulate)")
    c.add_argument("--no-plot", action="store_true", help="no heatmap (the workflow draws it in cka-join)")
    c.add_argument("--out", required=True, metavar="CKA.parquet", help="also writes the heatmap <stem>.png")
    j = sub.add_parser("cka-join", help="CKA at the stitch points beside d_l / accuracy of the results table")
    j.add_argument("--cka", nargs="+", required=True, metavar="CKA.parquet")
    j.add_argument("--table", required=True, metavar="TABLE.parquet", help="results/table.parquet")
    j.add_argument("--out-dir", required=True, help="writes cka_vs_stitch.parquet / _spearman.parquet / .md")
    j.add_argument("--no-heatmaps", action="store_true",
                   help="do not (re)draw <cka stem>.png beside each CKA file with the table's stitch points marked")
    return p


def main(args) -> int:
    if args.analysis == "table10":
        run_table10(args.predictions, args.out_dir)
    elif args.analysis == "cka":
        run_cka(args.a, args.b, args.out, variants=args.variants, marks=args.mark_layers, device=args.device,
                plot=not args.no_plot)
    else:
        run_cka_join(args.cka, args.table, args.out_dir, heatmaps=not args.no_heatmaps)
    return 0
