"""``python -m stitchcache data subset``: balanced per-class train / val (/ test) lists for ``image_list``.

From an image folder (``<root>/<class>/.../<image>``, any depth below the class folder) draw, per
class and with a seed, ``--train`` images for ``train.csv`` and ``--val`` further images for
``val.csv`` (disjoint), e.g. fMoW's 230 / 26 or the iNaturalist subset's 200 / 50 per class.
With ``--val-root`` the val images come from a second folder of the same layout (e.g. the dataset's
own validation split: fMoW has several images of one location, which must not straddle train and
val). Paths in the lists are relative to ``--base`` (default: the common parent of the roots) —
use that folder as the dataset's ``root:``. A class with too few images is an error naming it,
unless ``--skip-short`` leaves it out (it is then also absent from the classes file).
``--test`` (with optional ``--test-root``) draws a third disjoint list, ``test.csv``: the split
every reported number uses, while ``val.csv`` is for selection (LR grid, early stopping).

    python -m stitchcache data subset --root /data/fmow/train --val-root /data/fmow/val \\
        --train 230 --val 26 --seed 0 --out /data/fmow/lists
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np

from .image_folder import EXTENSIONS


def _images_by_class(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise FileNotFoundError(f"data subset: folder {str(root)!r} does not exist")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        out[d.name] = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)
    if not out:
        raise ValueError(f"data subset: {str(root)!r} has no class sub-folders")
    return out


def balanced_subset(root, out, train: int, val: int, seed: int = 0, val_root=None, base=None,
                    skip_short: bool = False, test: int = 0, test_root=None) -> dict:
    """Write ``<out>/train.csv``, ``<out>/val.csv`` (``path,label``), with ``test`` > 0 also
    ``<out>/test.csv``, and ``<out>/classes.txt``; returns {"base", "classes", "train", "val", "test",
    "skipped"}. Deterministic for a given seed and folder contents (files are sorted before the
    per-class shuffle); the lists are disjoint (val / test drawn after the earlier lists of the same
    folder), and adding ``test`` leaves train and val as they were."""
    def resolve(r):
        return Path(os.path.expanduser(str(r))).resolve() if r else None

    root, vroot, troot = resolve(root), resolve(val_root), resolve(test_root)
    base = Path(os.path.expanduser(str(base))).resolve() if base else Path(os.path.commonpath(
        [str(r) for r in (root, vroot, troot) if r]))
    roots = {"train": root, "val": vroot or root, "test": troot or root}
    pools = {r: _images_by_class(r) for r in dict.fromkeys(roots.values())}
    want = {"train": train, "val": val, "test": test}
    rng = np.random.default_rng(seed)
    rows = {"train": [], "val": [], "test": []}
    classes, skipped = [], []
    for c in sorted(pools[root]):
        shuffled = {}  # per folder, in first-use order: train, then val, then test (seeds stay stable)
        for split in ("train", "val", "test"):
            r = roots[split]
            if r not in shuffled and (split != "test" or test):
                files = pools[r].get(c, [])
                shuffled[r] = [files[i] for i in rng.permutation(len(files))]
        taken, chosen = {r: 0 for r in shuffled}, {}
        for split in ("train", "val", "test"):
            r = roots[split]
            if r in shuffled:
                chosen[split] = shuffled[r][taken[r]:taken[r] + want[split]]
                taken[r] += want[split]
        if any(len(chosen[k]) < want[k] for k in chosen):
            if skip_short:
                skipped.append(c)
                continue
            need = {k: want[k] for k in chosen}
            have = {str(r): len(f) for r, f in shuffled.items()}
            raise ValueError(f"data subset: class {c!r} has too few images (needs {need}, has {have}); "
                             "lower --train/--val/--test or pass --skip-short")
        classes.append(c)
        for split, chosen in chosen.items():
            for f in chosen:
                try:
                    rel = f.relative_to(base)
                except ValueError:
                    raise ValueError(f"data subset: {str(f)!r} is not inside --base {str(base)!r}") from None
                rows[split].append((str(rel), c))
    if not classes:
        raise ValueError("data subset: no class has enough images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        if split == "test" and not test:
            continue
        with open(out / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(items)
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return {"base": str(base), "classes": len(classes), "train": len(rows["train"]), "val": len(rows["val"]),
            "test": len(rows["test"]), "skipped": skipped, "out": str(out)}


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = sub.add_parser("subset", help="balanced per-class train/val CSV lists from an image folder")
    s.add_argument("--root", required=True, help="image folder: <root>/<class>/.../<image>")
    s.add_argument("--val-root", help="draw val images from this folder instead (same layout)")
    s.add_argument("--train", type=int, required=True, help="training images per class")
    s.add_argument("--val", type=int, required=True, help="validation images per class")
    s.add_argument("--test", type=int, default=0, help="test images per class (test.csv, the reported split); 0 = none")
    s.add_argument("--test-root", help="draw test images from this folder instead (same layout)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="folder for train.csv, val.csv, classes.txt")
    s.add_argument("--base", help="folder the listed paths are relative to (default: common parent of the roots)")
    s.add_argument("--skip-short", action="store_true", help="leave out classes with too few images")


def main(args) -> int:
    if args.train < 1 or args.val < 1 or args.test < 0:
        raise SystemExit("error: --train and --val must be at least 1, --test at least 0")
    try:
        res = balanced_subset(args.root, args.out, args.train, args.val, seed=args.seed, val_root=args.val_root,
                              base=args.base, skip_short=args.skip_short, test=args.test, test_root=args.test_root)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    test = f"test.csv ({res['test']}), " if res["test"] else ""
    print(f"wrote {res['out']}/train.csv ({res['train']} images), val.csv ({res['val']}), {test}classes.txt "
          f"({res['classes']} classes{'; skipped ' + ', '.join(res['skipped']) if res['skipped'] else ''}); "
          f"use root: {res['base']} and classes: {Path(res['out']) / 'classes.txt'}")
    return 0
