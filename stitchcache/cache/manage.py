"""``stitchcache cache ls | du | verify | gc``: see, check and prune a cache root.

A cache root holds ``features/<key>`` (base-model stores) and ``stitched/<key>`` (exported final
tokens of stitched models). A store is *referenced* when some feature record or evaluation result
under the given workflow directories names it; ``gc`` removes the others (dry run by default).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .lock import is_locked

KINDS = ("features", "stitched")


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def list_stores(root: str | os.PathLike) -> list[dict]:
    """One dict per store under the root, read from metadata only (fast)."""
    out = []
    root = Path(root)
    for kind in KINDS:
        d = root / kind
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if not p.is_dir():
                continue
            try:
                attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
            except (OSError, ValueError):
                attrs = {}
            ds = attrs.get("dataset") or {}
            last = p / "last_used"
            out.append({
                "kind": kind, "path": str(p), "key": p.name, "model": attrs.get("model_name", "?"),
                "dataset": f"{ds.get('name', '?')}/{ds.get('split', '?')}", "layers": attrs.get("layers", []),
                "num_images": attrs.get("num_images"), "dtype": attrs.get("dtype"),
                "complete": (p / "COMPLETE").exists(), "bytes": _size(p),
                "last_used": (last.stat().st_mtime if last.exists() else (p / "zarr.json").stat().st_mtime
                              if (p / "zarr.json").exists() else None),
            })
    return out


def _fmt_layers(layers: list[int]) -> str:
    if not layers:
        return "final"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}+final"
    return ",".join(map(str, layers)) + "+final"


def cmd_ls(args) -> int:
    stores = list_stores(args.root)
    if not stores:
        print(f"no stores under {args.root}")
        return 0
    print(f"{'kind':9} {'key':24} {'model':32} {'dataset':18} {'images':>7} {'layers':12} {'size':>9} "
          f"{'state':10} last used")
    for s in stores:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["last_used"])) if s["last_used"] else "-"
        print(f"{s['kind']:9} {s['key'][:24]:24} {str(s['model'])[:32]:32} {s['dataset'][:18]:18} "
              f"{s['num_images'] or 0:>7} {_fmt_layers(s['layers']):12} {human(s['bytes']):>9} "
              f"{'complete' if s['complete'] else 'PARTIAL':10} {used}")
    return 0


def cmd_du(args) -> int:
    stores = list_stores(args.root)
    for kind in KINDS:
        sel = [s for s in stores if s["kind"] == kind]
        print(f"{kind:9} {len(sel):5} stores {human(sum(s['bytes'] for s in sel)):>10}")
    print(f"{'total':9} {len(stores):5} stores {human(sum(s['bytes'] for s in stores)):>10}")
    return 0


def verify_store(path: str | os.PathLike, deep: bool = False) -> list[str]:
    """Problems found in one store (empty list = healthy)."""
    import zarr

    p = Path(path)
    problems = []
    if not (p / "COMPLETE").exists():
        problems.append("not complete (no COMPLETE marker)")
    try:
        g = zarr.open_group(str(p), mode="r")
    except Exception as e:  # unreadable metadata
        return problems + [f"cannot open: {e}"]
    attrs = dict(g.attrs)
    n, chunk = int(attrs.get("num_images", 0)), int(attrs.get("chunk_size", 1))
    nchunks = -(-n // chunk)
    markers = {f.name for f in (p / "progress").iterdir()} if (p / "progress").is_dir() else set()
    missing = [ci for ci in range(nchunks) if f"chunk_{ci:06d}" not in markers]
    if missing:
        problems.append(f"{len(missing)} of {nchunks} chunks not recorded as written (first: {missing[0]})")
    names = [f"layer_{l:02d}" for l in attrs.get("layers", [])] + ["final", "labels"]
    for name in names:
        if name not in g:
            problems.append(f"array {name} missing")
            continue
        arr = g[name]
        if arr.shape[0] != n:
            problems.append(f"array {name} has {arr.shape[0]} images, attributes say {n}")
        if arr.nchunks_initialized < arr.nchunks:
            problems.append(f"array {name}: {arr.nchunks - arr.nchunks_initialized} chunks absent on disk")
        if deep and not problems:
            for a in range(0, n, chunk):
                block = arr[a:a + chunk]
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    problems.append(f"array {name}: non-finite values in images {a}..{a + len(block) - 1}")
                    break
    return problems


def cmd_verify(args) -> int:
    paths = args.stores or [s["path"] for s in list_stores(args.root)]
    bad = 0
    for path in paths:
        problems = verify_store(path, deep=args.deep)
        print(f"{'ok ' if not problems else 'BAD'} {path}" + "".join(f"\n    - {m}" for m in problems))
        bad += bool(problems)
    print(f"{len(paths) - bad} ok, {bad} with problems")
    return 1 if bad else 0


def referenced_stores(workflow_dirs: list[str]) -> set[str]:
    """Store paths named by any JSON under <dir>/results (feature records, evaluation results)."""
    refs: set[str] = set()
    for d in workflow_dirs:
        for f in Path(d).glob("results/**/*.json"):
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict):
                continue
            for key in ("store", "exported_train", "exported_val"):
                if isinstance(data.get(key), str):
                    refs.add(str(Path(data[key]).resolve()))
            for p in data.get("feature_stores") or []:  # train.json: the four stores a stitch read
                refs.add(str(Path(p).resolve()))
    return refs


def stale_records(root) -> list[Path]:
    """Records under <root>/records, and extraction's request memos under <root>/requests, whose
    store is gone or incomplete (removed by gc, or never finished): the workflow would otherwise
    take them for done extraction jobs (a dangling memo is ignored by extract, but is clutter)."""
    from .store import FeatureStore

    out = []
    root = Path(root)
    for f in sorted([*root.glob("records/**/*.json"), *root.glob("requests/*.json")]):
        try:
            store = json.loads(f.read_text())["store"]
        except (OSError, ValueError, KeyError, TypeError):
            out.append(f)
            continue
        if not FeatureStore.is_complete(store):
            out.append(f)
    return out


def _locked(path: Path) -> bool:
    return is_locked(str(path) + ".lock")  # the writer's record lock (lock.py), not an flock


def cmd_gc(args) -> int:
    if not args.keep_referenced_by:
        raise SystemExit("error: gc needs --keep-referenced-by WORKFLOW_DIR [...] (the experiments whose "
                         "stores must stay); nothing was removed")
    refs = referenced_stores(args.keep_referenced_by)
    doomed = [s for s in list_stores(args.root) if str(Path(s["path"]).resolve()) not in refs]
    doomed = [s for s in doomed if not _locked(Path(s["path"]))]  # never remove a store being written
    freed = sum(s["bytes"] for s in doomed)
    for s in doomed:
        print(f"{'remove' if args.yes else 'would remove'} {s['path']} ({s['model']}, {s['dataset']}, {human(s['bytes'])})")
        if args.yes:
            shutil.rmtree(s["path"])
            Path(s["path"] + ".lock").unlink(missing_ok=True)
    if args.yes:
        for f in stale_records(args.root):  # records of the stores just removed
            f.unlink()
    print(f"{'freed' if args.yes else 'would free'} {human(freed)} in {len(doomed)} stores; "
          f"{len(refs)} referenced stores kept" + ("" if args.yes else " (dry run: add --yes to delete)"))
    return 0


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    for name, fn, help_ in (("ls", cmd_ls, "list stores"), ("du", cmd_du, "disk use per kind"),
                            ("verify", cmd_verify, "check stores for missing chunks / metadata"),
                            ("gc", cmd_gc, "remove stores no workflow refers to")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--root", help="cache root (default: --configfile's cache_root, else cache)")
        s.add_argument("--configfile", metavar="CONFIG.yaml",
                       help="an experiment config: its cache_root is the root (relative paths: from here)")
        s.set_defaults(fn=fn)
        if name == "verify":
            s.add_argument("stores", nargs="*", help="store paths (default: every store under --root)")
            s.add_argument("--deep", action="store_true", help="also read every chunk and check values are finite")
        if name == "gc":
            s.add_argument("--keep-referenced-by", nargs="+", metavar="WORKFLOW_DIR",
                           help="workflow directories whose results/ name the stores to keep")
            s.add_argument("--yes", action="store_true", help="really delete (default: dry run)")


def cache_root_of(root: str | None, configfile: str | None) -> str:
    """--root, else the cache_root of --configfile, else the default `cache` (the schema's default)."""
    if root is not None:
        return root
    if configfile is None:
        return "cache"
    import yaml

    p = Path(configfile)
    if not p.is_file():
        raise SystemExit(f"error: --configfile {configfile!r} does not exist")
    cfg = yaml.safe_load(p.read_text()) or {}
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: --configfile {configfile!r} is not a YAML mapping")
    return str(cfg.get("cache_root", "cache"))


def main(args) -> int:
    args.root = cache_root_of(args.root, args.configfile)
    return args.fn(args)
