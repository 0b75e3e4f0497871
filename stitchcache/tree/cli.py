"""``stitchcache tree cost | export | evaluate | report | plan``: typed stage functions; ``main`` only
converts the parsed arguments."""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from ..runtime import log, pick_device, set_threads, write_json
from .vst import TreeOptions


def add_tree_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--select-layer", type=int, default=-1, help="branch output layer (LLaVA style: -2 = L-1)")
    p.add_argument("--select-feature", default="patch", choices=["patch", "cls_patch"])
    p.add_argument("--fusion", default="tuple", choices=["tuple", "concat", "interleave"])
    p.add_argument("--final-norm", default="auto", choices=["auto", "always", "never"])


def tree_options(args) -> TreeOptions:
    return TreeOptions(select_layer=args.select_layer, select_feature=args.select_feature, fusion=args.fusion,
                       final_norm=args.final_norm)


def group_by_layer(checkpoints: list[str]) -> dict[int, list[str]]:
    """Stitch checkpoints grouped by their stitch point (one tree per k), in the order given."""
    from ..stitch.model import load_checkpoint

    groups = defaultdict(list)
    for c in checkpoints:
        groups[int(load_checkpoint(c)["spec"]["layer"])].append(c)
    return dict(sorted(groups.items()))


def run_cost(checkpoints: list[str], options: TreeOptions, vfms, points, depth: int, stitch: str | None,
             batch_size: int, repeats: int, device: str, out: str | None, markdown: str | None) -> dict:
    from .cost import analytic_markdown, analytic_table, measure, measured_markdown
    from .vst import tree_from_checkpoints

    rows = analytic_table(vfms, points, depth, stitch)
    text = analytic_markdown(rows, points, depth, stitch)
    measured = []
    for k, cks in group_by_layer(checkpoints).items():
        log(f"measuring VST-{k} ({len(cks) + 1} VFMs) vs one VFM vs Full")
        measured.append(measure(tree_from_checkpoints(cks, k, options), batch_size, repeats, pick_device(device)))
    if measured:
        text += "\nMeasured (batch of random images, each model at its own resolution for Full):\n\n"
        text += measured_markdown(measured)
    print(text)
    res = {"analytic": rows, "depth": depth, "stitch": stitch, "measured": measured, "options": options.__dict__}
    if out:
        write_json(out, res)
    if markdown:
        Path(markdown).write_text(text)
    return res


def run_export(checkpoints: list[str], options: TreeOptions, out: str) -> dict:
    from .export import export_tree
    from .vst import tree_from_checkpoints

    groups = group_by_layer(checkpoints)
    if len(groups) != 1:
        raise SystemExit(f"error: the checkpoints of one tree share one stitch point; got layers {sorted(groups)}")
    (k, cks), = groups.items()
    tree = tree_from_checkpoints(cks, k, options)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    export_tree(tree, out)
    log(f"exported VST-{k} ({' + '.join(tree.names)}, fusion {options.fusion}, select_layer "
        f"{options.select_layer}) to {out}")
    return tree.spec


def run_evaluate(tree: str, trunk: dict, branches: dict, checkpoints: list[str], settings: dict, out: str) -> dict:
    from .evaluate import evaluate_tree

    rows = evaluate_tree(trunk, branches, checkpoints or None, settings, pick_device(settings.get("device", "auto")))
    res = {"tree": tree, "rows": rows}
    write_json(out, res)
    for r in rows:
        log(f"tree {tree} on {r['dataset']}: {r['config']} {100 * r['score']:.2f}% "
            f"(added cost {100 * r['added_cost']:.1f}%)")
    return res


def run_report(evals: list[str], out_dir: str) -> dict:
    from .report import load_rows, write_report

    res = write_report(load_rows(evals), out_dir)
    for g in res["gains"]:
        mean = g["mean_normalized_gain"]
        log(f"tree {g['tree']} VST-{g['k']}: mean normalized gain "
            f"{'n/a' if mean is None else f'{100 * mean:.1f}%'} at {100 * g['added_cost']:.1f}% added cost")
    return res


def run_plan(evals: list[str], budget: str, out: str | None) -> list[dict]:
    from .report import load_rows, parse_budget, plan, plan_markdown

    best = plan(load_rows(evals), parse_budget(budget))
    text = plan_markdown(best)
    print(text)
    if out:
        Path(out).write_text(text)
        write_json(Path(out).with_suffix(".json"), {"plan": best})
    return best


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tree_command", required=True, metavar="{cost,export,evaluate,report,plan}")
    c = sub.add_parser("cost", help="analytic cost table (paper Table 11) + measured cost of trees")
    c.add_argument("--checkpoints", nargs="*", default=[], help="stitch checkpoints trunk -> VFM (any k)")
    c.add_argument("--vfms", type=int, nargs="+", default=[2, 3, 4, 5])
    c.add_argument("--points", type=int, nargs="+", default=[6, 14, 22])
    c.add_argument("--depth", type=int, default=23, help="analytic depth L' (23 = layer 23 of a 24-block ViT-L)")
    c.add_argument("--stitch", default="mlp", help="stitch kind whose cost the extended columns add ('none': off)")
    c.add_argument("--batch-size", type=int, default=2)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", help="JSON")
    c.add_argument("--markdown", help="the tables as Markdown")
    add_tree_options(c)
    e = sub.add_parser("export", help="one self-contained tree artefact (load with stitchcache.load_tree)")
    e.add_argument("--checkpoints", nargs="+", required=True, help="one stitch checkpoint per branch, trunk -> VFM at k")
    e.add_argument("--out", required=True)
    add_tree_options(e)
    v = sub.add_parser("evaluate", help="probe fused cached features: single + Full, or VST-k (with --checkpoints)")
    v.add_argument("--tree", required=True, help="the tree's name (config key tree.trees.<name>)")
    v.add_argument("--trunk-train", required=True, help="feature record JSON")
    v.add_argument("--trunk-val", required=True)
    v.add_argument("--branches", nargs="+", required=True, help="branch model names, in output order")
    v.add_argument("--branch-train", nargs="+", required=True, help="their train records (same order)")
    v.add_argument("--branch-val", nargs="+", required=True)
    v.add_argument("--trunk-test", help="test-split record: every reported score is on test (val only selects)")
    v.add_argument("--branch-test", nargs="+", default=[], help="their test records (with --trunk-test)")
    v.add_argument("--checkpoints", nargs="*", default=[], help="VST-k: one stitch per branch (same order)")
    v.add_argument("--settings", default="{}", help="JSON: the probe section plus seed/device")
    v.add_argument("--out", required=True)
    r = sub.add_parser("report", help="tree table, Table-12-shaped gains, knob plot")
    r.add_argument("--evals", nargs="+", required=True)
    r.add_argument("--out-dir", required=True)
    q = sub.add_parser("plan", help="the best tree within an added-cost budget, per dataset")
    q.add_argument("--evals", nargs="+", required=True, help="tree evaluate outputs")
    q.add_argument("--budget", required=True, help="added backbone cost vs one VFM: '40%%' or 0.4")
    q.add_argument("--out", help="Markdown (a .json beside it)")


def main(args) -> int:
    set_threads()
    if args.tree_command == "cost":
        run_cost(args.checkpoints, tree_options(args), args.vfms, args.points, args.depth,
                 None if args.stitch == "none" else args.stitch, args.batch_size, args.repeats, args.device,
                 args.out, args.markdown)
        return 0
    if args.tree_command == "export":
        run_export(args.checkpoints, tree_options(args), args.out)
        return 0
    if args.tree_command == "evaluate":
        from ..runtime import json_arg, seed_everything

        settings = json_arg(args.settings, "--settings")
        seed_everything(int(settings.get("seed", 0)))
        if not len(args.branches) == len(args.branch_train) == len(args.branch_val):
            raise SystemExit("error: --branches, --branch-train and --branch-val need one entry per branch")
        if args.checkpoints and len(args.checkpoints) != len(args.branches):
            raise SystemExit("error: --checkpoints needs one stitch checkpoint per branch")
        if bool(args.trunk_test) != bool(args.branch_test) or (args.branch_test and len(args.branch_test) != len(args.branches)):
            raise SystemExit("error: --trunk-test needs --branch-test with one entry per branch (and vice versa)")
        branches = {n: {"train": t, "val": v} for n, t, v in zip(args.branches, args.branch_train, args.branch_val)}
        trunk = {"train": args.trunk_train, "val": args.trunk_val}
        if args.trunk_test:
            trunk["test"] = args.trunk_test
            for n, t in zip(args.branches, args.branch_test):
                branches[n]["test"] = t
        run_evaluate(args.tree, trunk, branches, args.checkpoints, settings, args.out)
        return 0
    if args.tree_command == "report":
        run_report(args.evals, args.out_dir)
        return 0
    if args.tree_command == "plan":
        run_plan(args.evals, args.budget, args.out)
        return 0
    raise SystemExit(f"error: unknown tree command {args.tree_command!r}")
