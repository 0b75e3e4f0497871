"""The raw-pixel reference of the embedded demo: the base-probe recipe on raw pixels instead of tokens.

Reads the demo config (default: config.yaml), flattens the images of dataset `fmnist`'s `train`
and `val` splits to grey values in [0, 1] (28 x 28 = 784 features) and fits the very linear probe
the `probe` stage fits on a model's pooled final tokens (stitchcache.evaluate.probe.linear_probe:
per-feature standardisation from the training split, AdamW, the config's `probe:` LR grid, early
stopping on validation loss). A competent encoder's base probe should beat this number.

    python scripts/raw_pixel_probe.py [--config config.yaml] [--dataset fmnist]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import yaml

from stitchcache.data import open_split
from stitchcache.evaluate.probe import linear_probe
from stitchcache.grid import once_seed
from stitchcache.runtime import seed_everything, set_threads


def pixels(split) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([np.asarray(split.image(i).convert("L"), dtype=np.float32).reshape(-1) / 255.0
                  for i in range(len(split))])  # (N, H*W)
    return torch.from_numpy(x), torch.from_numpy(np.asarray(split.labels(), dtype=np.int64))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--dataset", default="fmnist")
    a = ap.parse_args()
    set_threads()
    cfg = yaml.safe_load(open(a.config))
    seed_everything(once_seed(cfg))
    spec = {**cfg["datasets"][a.dataset], "name": a.dataset}
    tr, va = open_split(spec, "train"), open_split(spec, "val")
    (x_tr, y_tr), (x_va, y_va) = pixels(tr), pixels(va)
    settings = {**cfg["probe"], "seed": once_seed(cfg)}
    te = open_split(spec, "test") if "test" in spec["splits"] else None
    x_te, y_te = pixels(te) if te is not None else (None, None)
    # selection on val; probe_acc on test when the dataset has one (as the base probes report)
    res = linear_probe(x_tr, y_tr, x_va, y_va, tr.num_classes, settings, x_te=x_te, y_te=y_te)
    res.pop("predictions", None)  # per-image arrays: not for the summary line
    print(json.dumps({"dataset": a.dataset, "train_images": len(tr), "val_images": len(va),
                      "test_images": None if te is None else len(te), "features": x_tr.shape[1],
                      **res}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
