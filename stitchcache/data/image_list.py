"""Images listed in a CSV per split (``path,label`` rows), e.g. balanced subsets of fMoW or iNaturalist.

Config::

    fmow:
      type: image_list
      root: /data/fmow              # paths in the lists are relative to this folder
      classes: classes.txt          # optional: one class name per line = the label order
      splits:
        train: {list: lists/train.csv}
        val:   {list: lists/val.csv}

A list is a CSV file with two columns, ``path,label`` (an optional header row ``path,label`` is
skipped; quote names holding commas). ``label`` is a class *name*. Label indices follow the
``classes`` file when given, else the sorted names found in the split's own list. Lists and the
classes file may be given relative to ``root`` or as absolute paths. Lists can be written with
``python -m stitchcache data subset`` (data/subset.py).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .base import Split, file_size, load_image, slice_items


def _resolve(root: Path, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else root / q


def read_classes(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: classes file {str(path)!r} does not exist")
    names, seen = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise ValueError(f"{what}: classes file {str(path)!r} names {name!r} twice (lines {seen[name]} and {n})")
        seen[name] = n
        names.append(name)
    if not names:
        raise ValueError(f"{what}: classes file {str(path)!r} is empty")
    return names


def read_list(path: Path, what: str) -> list[tuple[str, str]]:
    """(relative path, class name) rows of a ``path,label`` CSV."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: list {str(path)!r} does not exist")
    rows = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if n == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{what}: {str(path)!r} line {n}: expected `path,label`, got {row!r}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{what}: list {str(path)!r} has no images")
    return rows


class ImageListSplit(Split):
    def __init__(self, name: str, root: str, list: str, classes: str | None = None, start: int = 0,
                 count: int | None = None):
        what = f"image_list split {name!r}"
        if not root:
            raise ValueError(f"{what}: the dataset needs `root:` (the folder the listed paths are relative to)")
        if not list:
            raise ValueError(f"{what}: the split needs `list:` (a `path,label` CSV file)")
        self.name = name
        self.root = Path(os.path.expanduser(root))
        if not self.root.is_dir():
            raise FileNotFoundError(f"{what}: root folder {str(self.root)!r} does not exist")
        self.list_path = _resolve(self.root, list)
        rows = read_list(self.list_path, what)
        self.classes_path = _resolve(self.root, classes) if classes else None
        if self.classes_path is not None:
            self.classes = read_classes(self.classes_path, what)
        else:
            self.classes = sorted({label for _, label in rows})
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({label for _, label in rows} - set(index))
        if unknown:
            raise ValueError(f"{what}: {str(self.list_path)!r} uses labels not in the classes file "
                             f"{str(self.classes_path)!r}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        self.items = slice_items([(p, index[c]) for p, c in rows], start, count, what)
        self.num_classes = len(self.classes)
        self._manifest = None

    def __len__(self):
        return len(self.items)

    def image(self, i):
        return load_image(self.root / self.items[i][0])

    def image_path(self, i):
        return self.root / self.items[i][0]

    def image_id(self, i):
        return self.items[i][0]

    def label(self, i):
        return self.items[i][1]

    def image_id(self, i):
        return str(self.items[i][0])   # the listed path (relative to the root)

    def manifest(self):
        if self._manifest is None:
            items = []
            for rel, y in self.items:
                p = self.root / rel
                size = file_size(p, f"image_list split {self.name!r}: {str(self.list_path)!r} lists "
                                    f"{rel!r}, but {str(p)!r} does not exist")
                items.append([rel, y, size])
            self._manifest = {"type": "image_list", "classes": self.classes, "items": items}
        return self._manifest
