import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# tests never touch the network, and never write digests into the user's home
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


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


def extract_records(specs: dict, dataset: dict, tmp_path, chunk_size: int = 16) -> dict:
    """Extract train/val stores for each model spec; returns {(model, split): record path}."""
    import json

    from stitchcache.extract import extract

    recs = {}
    for m, spec in specs.items():
        for split in ("train", "val"):
            path = tmp_path / "rec" / f"{m}-{split}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(extract(spec, dataset, split, tmp_path / "cache",
                                               {"chunk_size": chunk_size, "num_workers": 0})))
            recs[m, split] = str(path)
    return recs


sys.path.insert(0, str(ROOT / "tests"))
