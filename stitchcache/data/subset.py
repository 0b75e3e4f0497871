"""``python -m stitchcache data subset``: balanced per-class train / val lists for ``image_list``.

From an image folder (``<root>/<class>/.../<image>``, any depth below the class folder) draw, per
class and with a seed, ``--train`` images for ``train.csv`` and ``--val`` further images for
``val.csv`` (disjoint), e.g. fMoW's 230 / 26 or the iNaturalist subset's 200 / 50 per class.
With ``--val-root`` the val images come from a second folder of the same layout (e.g. the dataset's
own validation split: fMoW has several images of one location, which must not straddle train and
val). Paths in the lists are relative to ``--base`` (default: the common parent of the roots) —
use that folder as the dataset's ``root:``. A class with too few images is an error naming it,
unless ``--skip-short`` leaves it out (it is then also absent from the classes file).

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
                    skip_short: bool = False) -> dict:
    """Write ``<out>/train.csv``, ``<out>/val.csv`` (``path,label``) and ``<out>/classes.txt``;
    returns {"base", "classes", "train", "val", "skipped"}. Deterministic for a given seed and folder
    contents (files are sorted before the per-class shuffle)."""
    root = Path(os.path.expanduser(str(root))).resolve()
    vroot = Path(os.path.expanduser(str(val_root))).resolve() if val_root else None
    base = Path(os.path.expanduser(str(base))).resolve() if base else Path(os.path.commonpath(
        [str(root)] + ([str(vroot)] if vroot else [])))
    pools = _images_by_class(root)
    vpools = _images_by_class(vroot) if vroot else None
    rng = np.random.default_rng(seed)
    rows = {"train": [], "val": []}
    classes, skipped = [], []
    for c in sorted(pools):
        files = [pools[c][i] for i in rng.permutation(len(pools[c]))]
        if vpools is None:
            need, have = train + val, len(files)
            tr, va = files[:train], files[train:train + val]
        else:
            vfiles = vpools.get(c, [])
            vfiles = [vfiles[i] for i in rng.permutation(len(vfiles))]
            need, have = (train, val), (len(files), len(vfiles))
            tr, va = files[:train], vfiles[:val]
        if len(tr) < train or len(va) < val:
            if skip_short:
                skipped.append(c)
                continue
            raise ValueError(f"data subset: class {c!r} has too few images (needs {need}, has {have}); "
                             "lower --train/--val or pass --skip-short")
        classes.append(c)
        for split, chosen in (("train", tr), ("val", va)):
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
        with open(out / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(items)
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return {"base": str(base), "classes": len(classes), "train": len(rows["train"]), "val": len(rows["val"]),
            "skipped": skipped, "out": str(out)}


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = sub.add_parser("subset", help="balanced per-class train/val CSV lists from an image folder")
    s.add_argument("--root", required=True, help="image folder: <root>/<class>/.../<image>")
    s.add_argument("--val-root", help="draw val images from this folder instead (same layout)")
    s.add_argument("--train", type=int, required=True, help="training images per class")
    s.add_argument("--val", type=int, required=True, help="validation images per class")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="folder for train.csv, val.csv, classes.txt")
    s.add_argument("--base", help="folder the listed paths are relative to (default: common parent of the roots)")
    s.add_argument("--skip-short", action="store_true", help="leave out classes with too few images")


def main(args) -> int:
    if args.train < 1 or args.val < 1:
        raise SystemExit("error: --train and --val must be at least 1")
    try:
        res = balanced_subset(args.root, args.out, args.train, args.val, seed=args.seed, val_root=args.val_root,
                              base=args.base, skip_short=args.skip_short)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {res['out']}/train.csv ({res['train']} images), val.csv ({res['val']}), classes.txt "
          f"({res['classes']} classes{'; skipped ' + ', '.join(res['skipped']) if res['skipped'] else ''}); "
          f"use root: {res['base']} and classes: {Path(res['out']) / 'classes.txt'}")
    return 0
