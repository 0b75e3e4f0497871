"""Linear probe: one linear classifier on pooled final tokens; everything else frozen.

Pooled features are standardised with the training split's mean/std, the classifier is trained
with the shared loop (AdamW, LR grid, early stopping on validation loss) and its accuracy on the
validation split is reported.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import open_record, pooled_features
from ..runtime import json_arg, log, pick_device, seed_everything, set_threads, write_json
from ..train import FitConfig, fit


def linear_probe(x_tr, y_tr, x_va, y_va, num_classes: int, settings: dict, device=None) -> dict:
    device = device or torch.device("cpu")
    mu, sd = x_tr.mean(0, keepdim=True), x_tr.std(0, keepdim=True).clamp_min(1e-6)
    x_tr, x_va = ((x_tr - mu) / sd).to(device), ((x_va - mu) / sd).to(device)
    y_tr, y_va = y_tr.long().to(device), y_va.long().to(device)
    bs = int(settings.get("batch_size", 256))
    cfg = FitConfig.from_settings(settings)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(y_tr), generator=g).to(device)
        return ([x_tr[perm[i:i + bs]], y_tr[perm[i:i + bs]]] for i in range(0, len(perm), bs))

    res = fit(lambda: nn.Linear(x_tr.shape[1], num_classes), batches,
              lambda m, b: F.cross_entropy(m(b[0]), b[1]),
              lambda m: F.cross_entropy(m(x_va), y_va), cfg, device, desc="probe")
    clf = nn.Linear(x_tr.shape[1], num_classes).to(device)
    clf.load_state_dict(res.state)
    with torch.no_grad():
        acc = (clf(x_va).argmax(1) == y_va).float().mean().item()
    return {"probe_acc": acc, "lr": res.lr, "epochs": res.epochs, "val_loss": res.val_loss}


def probe_stores(train_store, val_store, num_prefix: int, num_classes: int, settings: dict, device=None) -> dict:
    pool = settings.get("pool", "mean")
    x_tr = pooled_features(train_store.final, num_prefix, pool)
    x_va = pooled_features(val_store.final, num_prefix, pool)
    y_tr = torch.from_numpy(train_store.labels[:])
    y_va = torch.from_numpy(val_store.labels[:])
    return {"pool": pool, **linear_probe(x_tr, y_tr, x_va, y_va, num_classes, settings, device)}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="feature record JSON of the training split")
    p.add_argument("--val", required=True, help="feature record JSON of the validation split")
    p.add_argument("--settings", default="{}", help="JSON: the probe section plus seed/device")
    p.add_argument("--out", required=True)


def main(args) -> int:
    set_threads()
    settings = json_arg(args.settings, "--settings")
    seed_everything(int(settings.get("seed", 0)))
    rec, tr = open_record(args.train)
    _, va = open_record(args.val)
    res = probe_stores(tr, va, rec["facts"]["num_prefix_tokens"], int(rec["num_classes"]), settings,
                       pick_device(settings.get("device", "auto")))
    write_json(args.out, {"dataset": rec["dataset"], "model": rec["model"], **res})
    log(f"probe {rec['model']} on {rec['dataset']}: {100 * res['probe_acc']:.1f}% (lr {res['lr']:g})")
    return 0
