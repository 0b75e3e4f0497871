import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# tests never touch the network, and never write digests into the user's home
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the planner's model-check memo (backends/check.py) is shared by this test process and the Snakemake
# runs it starts, never the user's ~/.cache: the many dry runs of the tiny configs then build each
# model once (test_facts_memo.py tests the memo itself in its own folders)
_FACTS = tempfile.mkdtemp(prefix="stitchcache-facts-")
atexit.register(shutil.rmtree, _FACTS, ignore_errors=True)
os.environ["STITCHCACHE_FACTS_DIR"] = _FACTS
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Long tests first (the real SLURM cluster, then the real workflow runs), so that with
    `pytest -n auto --dist loadfile` (README; files go to workers in the order of their first
    test) the short ones fill the other workers instead of one worker finishing a long test alone
    at the end. Order within each class is kept. (`--dist loadgroup` would be finer, but with
    pytest 9.2 / xdist 3.8 its `xdist_group` marks were measured not to keep a group on one worker.)"""
    def rank(item) -> int:
        if item.get_closest_marker("slurm"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2
    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _digest_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STITCHCACHE_DIGEST_DIR", str(tmp_path / "digests"))


def tiny_vit(width=32, img=32, patch=4, depth=3, **extra):
    """A tiny random-init timm ViT spec (config ``models.<name>`` entry)."""
    return {"backbone": "timm:vit_small_patch16_224",
            "kwargs": {"img_size": img, "patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": 2, **extra}}


@pytest.fixture
def image_folder(tmp_path):
    """A tiny labelled image folder (2 classes x 24 images) made here, so tests need no package data."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(24):
            arr = (rng.random((28, 28)) * 60 + 120 * c).astype("uint8")
            Image.fromarray(arr, mode="L").save(root / f"class{c}" / f"{i:03d}.png")
    return {"name": "toy", "type": "image_folder", "root": str(root),
            "splits": {"train": {"start": 0, "count": 48}, "val": {"start": 0, "count": 48}}}


def extract_records(specs: dict, dataset: dict, tmp_path, chunk_size: int = 16, **settings) -> dict:
    """Extract train/val stores for each model spec (extra extract `settings`, e.g. dtype);
    returns {(model, split): record path}."""
    import json

    from stitchcache.extract import extract

    recs = {}
    for m, spec in specs.items():
        for split in ("train", "val"):
            path = tmp_path / "rec" / f"{m}-{split}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(extract(spec, dataset, split, tmp_path / "cache",
                                               {"chunk_size": chunk_size, "num_workers": 0, **settings})))
            recs[m, split] = str(path)
    return recs


sys.path.insert(0, str(ROOT / "tests"))


def write_ade20k(root, n_train: int = 16, n_val: int = 8, size=(40, 32), seed: int = 0):
    """An ADEChallengeData2016-like folder: JPEG images and uint8 PNG masks (0 = other, 1..4 = classes).
    Each image is split into 8-px-aligned rectangles of a class (raw label 1..4) or "other" (0); the
    image colour follows the class (plus noise), so a per-patch head has something to learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[128, 128, 128], [220, 40, 40], [40, 200, 40], [40, 40, 220], [230, 230, 40]])
    w, h = size
    for sub, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((h, w), np.uint8)
            for y in range(0, h, 8):
                for x in range(0, w, 8):
                    mask[y:y + 8, x:x + 8] = rng.integers(0, 5)
            img = colours[mask] + rng.normal(0, 12, (h, w, 3))
            stem = f"ADE_{'train' if sub == 'training' else 'val'}_{i:08d}"
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / sub / f"{stem}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "annotations" / sub / f"{stem}.png")
    return root


@pytest.fixture
def ade20k(tmp_path):
    """A tiny ADE20K-like dataset (16 train / 8 val images of 40x32 px) as a config dataset entry."""
    root = write_ade20k(tmp_path / "ADEChallengeData2016")
    return {"name": "ade", "type": "ade20k", "root": str(root),
            "splits": {"train": {"source": "train"}, "val": {"source": "val"}}}
