"""``python -m stitchcache <subcommand>``: one subcommand per pipeline stage.

Each stage module exposes ``configure_parser(parser)`` and ``main(args) -> int``; modules are
imported only when their subcommand runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, configure function, main function, help)
COMMANDS = {
    "pretrain": ("stitchcache.pretrain", "configure_parser", "main", "train a small demo encoder (supervised or SimCLR)"),
    "extract": ("stitchcache.extract", "configure_parser", "main", "capture every layer's tokens into a feature store"),
    "probe": ("stitchcache.evaluate.probe", "configure_parser", "main", "linear probe on a base model's final tokens"),
    "train": ("stitchcache.stitch.trainer", "configure_parser", "main", "train a stitch layer (lfm, ffm, tlt, ffm_tlt)"),
    "evaluate": ("stitchcache.evaluate.stitched", "configure_parser", "main", "evaluate a trained stitch"),
    "table": ("stitchcache.report.cli", "configure_table_parser", "run_table", "results table (Parquet, CSV, Markdown)"),
    "plan": ("stitchcache.plan", "configure_parser", "main", "bytes and time an experiment will need, before any work"),
    "cache": ("stitchcache.cache.manage", "configure_parser", "main", "cache ls | du | verify | gc"),
    "data": ("stitchcache.data.subset", "configure_parser", "main", "data subset: balanced per-class train/val lists"),
    "plot": ("stitchcache.report.cli", "configure_plot_parser", "run_plot", "plots of accuracy and distances by layer"),
    "findings": ("stitchcache.report.cli", "configure_findings_parser", "run_findings", "the paper's three findings checked on the results table"),
    "analyze": ("stitchcache.analysis.cli", "configure_parser", "main", "analyze table10 | cka | cka-join"),
    "tree": ("stitchcache.tree.cli", "configure_parser", "main", "VFM Stitch Tree: cost | export | evaluate | report | plan"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stitchcache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    module_name, configure, run, help_ = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    p = argparse.ArgumentParser(prog=f"stitchcache {argv[0]}", description=help_)
    getattr(module, configure)(p)
    args = p.parse_args(argv[1:])
    return int(getattr(module, run)(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
