"""Linear probe: one linear head on final tokens; everything else frozen.

classification  one linear classifier on pooled final tokens (mean of patch tokens or CLS), features
                standardised with the training split's mean/std; reported: accuracy on the reported split.
segmentation    one linear map per patch token (prefix tokens dropped; tokens standardised per
                channel with the training split's patch-token mean/std) -> logit map on the token
                grid -> bilinear upsampling to the mask size -> per-pixel cross-entropy over
                labelled pixels; reported: mIoU on the reported split (tasks.py). Tokens and masks
                are streamed from the stores in chunk-sized blocks: memory is flat in the dataset size.

Selection (LR grid, early stopping) uses the ``val`` split; the *reported* split is ``test`` when one is
given (``--test``), else ``val`` (then the result says ``split: val``: also used for selection). The
result's ``split`` names it; ``val_score`` is the metric on val either way. The per-image predictions
of the reported split are returned under ``predictions`` (predictions.py writes them).

Both train with the shared loop (AdamW, LR grid, early stopping on validation loss). The result
carries ``task``, ``metric`` (accuracy | miou) and the metric's value in ``probe_acc`` (the key every
consumer reads), plus ``probe_miou`` / ``probe_pixel_acc`` for segmentation.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import iter_batches, open_record, pooled_features
from ..provenance import code_digest, fingerprint
from ..runtime import json_arg, log, pick_device, seed_everything, set_threads, write_json
from ..tasks import (SEGMENTATION, SegHead, Standardized, channel_stats, check_same_classes, head_metrics,
                     seg_loss, store_grid, task_info)
from ..train import FitConfig, fit
from .predictions import predictions_path, predictions_table, write_predictions


def linear_probe(x_tr, y_tr, x_va, y_va, num_classes: int, settings: dict, device=None, x_te=None, y_te=None) -> dict:
    """Fit on train, select on val; score on test when given (else val). (N, D) features, (N,) labels."""
    device = device or torch.device("cpu")
    mu, sd = x_tr.mean(0, keepdim=True), x_tr.std(0, keepdim=True).clamp_min(1e-6)
    x_tr, x_va = ((x_tr - mu) / sd).to(device), ((x_va - mu) / sd).to(device)
    if x_te is not None:
        x_te, y_te = ((x_te - mu) / sd).to(device), y_te.long().to(device)
    y_tr, y_va = y_tr.long().to(device), y_va.long().to(device)
    bs = int(settings.get("batch_size", 128))
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
        val_acc = (clf(x_va).argmax(1) == y_va).float().mean().item()
        x_rep, y_rep = (x_va, y_va) if x_te is None else (x_te, y_te)
        pred = clf(x_rep).argmax(1)
        acc = (pred == y_rep).float().mean().item()
    return {"probe_acc": acc, "val_score": val_acc, "split": "val" if x_te is None else "test",
            "lr": res.lr, "epochs": res.epochs, "val_loss": res.val_loss, "task": "classification",
            "metric": "accuracy",
            "predictions": {"label": y_rep.cpu().numpy(), "pred_probe": pred.cpu().numpy()}}


def seg_probe(train_store, val_store, num_prefix: int, grid, info: dict, settings: dict, device=None,
              test_store=None) -> dict:
    """The segmentation linear probe, streamed from the stores (see the module docstring)."""
    device = device or torch.device("cpu")
    bs = int(settings.get("batch_size", 128))
    cfg = FitConfig.from_settings(settings)
    C, ignore = int(info["num_classes"]), int(info["ignore_index"])
    width = train_store.final.shape[-1]
    mean, std = channel_stats(train_store.final, num_prefix, bs)

    def build():
        return Standardized(mean, std, SegHead(width, C, num_prefix, grid, ignore))

    train_arrays, val_arrays = [train_store.final, train_store.labels], [val_store.final, val_store.labels]

    def val_loss(m):  # mean CE over every labelled validation pixel
        total, n = 0.0, 0
        for z, y in iter_batches(val_arrays, bs):
            z, y = z.to(device), y.to(device)
            total += float(seg_loss(m(z), y, ignore, reduction="sum"))
            n += int((y != ignore).sum())
        return total / max(n, 1)

    res = fit(build, lambda seed: iter_batches(train_arrays, bs, shuffle=True, seed=seed),
              lambda m, b: seg_loss(m(b[0]), b[1], ignore), val_loss, cfg, device, desc="probe (segmentation)")
    best = build().to(device)
    best.load_state_dict(res.state)
    rep = val_store if test_store is None else test_store
    r = head_metrics(best, iter_batches([rep.final, rep.labels], bs), device, info, per_image=True)
    val_score = r["miou"] if test_store is None else head_metrics(best, iter_batches(val_arrays, bs), device, info)["miou"]
    return {"probe_acc": r["miou"], "probe_miou": r["miou"], "probe_pixel_acc": r["pixel_acc"],
            "classes_present": r["classes_present"], "val_score": val_score,
            "split": "val" if test_store is None else "test", "lr": res.lr, "epochs": res.epochs,
            "val_loss": res.val_loss, "task": SEGMENTATION, "metric": "miou", "predictions": r["per_image"]}


def probe_stores(train_store, val_store, num_prefix: int, num_classes: int, settings: dict, device=None,
                 grid=None, test_store=None) -> dict:
    """Probe final tokens of a train/val(/test) set of stores; the task comes from the stores'
    attributes. ``grid``: the token grid (segmentation; default: the store's model facts).
    Reported: ``test_store`` when given, else ``val_store`` (see the module docstring)."""
    info = task_info({**train_store.attrs, "num_classes": num_classes or train_store.attrs.get("num_classes")})
    for other in (val_store, test_store):
        if other is not None:
            check_same_classes(train_store.attrs, other.attrs, f"probe {train_store.path.name}/{other.path.name}")
    if info["task"] == SEGMENTATION:
        grid = grid or store_grid(train_store)
        return {"pool": None, "num_classes": int(info["num_classes"]),
                **seg_probe(train_store, val_store, num_prefix, grid, info, settings, device, test_store)}
    pool = settings.get("pool", "mean")
    x_tr = pooled_features(train_store.final, num_prefix, pool)
    x_va = pooled_features(val_store.final, num_prefix, pool)
    y_tr = torch.from_numpy(train_store.labels[:])
    y_va = torch.from_numpy(val_store.labels[:])
    x_te = y_te = None
    if test_store is not None:
        x_te = pooled_features(test_store.final, num_prefix, pool)
        y_te = torch.from_numpy(test_store.labels[:])
    return {"pool": pool, "num_classes": int(num_classes),
            **linear_probe(x_tr, y_tr, x_va, y_va, num_classes, settings, device, x_te, y_te)}


def describe(res: dict) -> str:
    """'71.2% accuracy' / '23.4% mIoU' for logs."""
    name = "mIoU" if res.get("metric") == "miou" else "accuracy"
    return f"{100 * res['probe_acc']:.1f}% {name}"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="feature record JSON of the training split")
    p.add_argument("--val", required=True, help="feature record JSON of the validation split (selection)")
    p.add_argument("--test", default=None, help="feature record JSON of the test split: every reported "
                   "number is measured on it (without it: on val, which also selected)")
    p.add_argument("--settings", default="{}", help="JSON: the probe section plus seed/device")
    p.add_argument("--out", required=True)
    p.add_argument("--predictions", default=None,
                   help="per-image predictions (Parquet); default: <out stem>.predictions.parquet")


def main(args) -> int:
    set_threads()
    settings = json_arg(args.settings, "--settings")
    seed_everything(int(settings.get("seed", 0)))
    rec, tr = open_record(args.train)
    _, va = open_record(args.val)
    te = open_record(args.test)[1] if args.test else None
    res = probe_stores(tr, va, rec["facts"]["num_prefix_tokens"], int(rec["num_classes"]), settings,
                       pick_device(settings.get("device", "auto")), grid=rec["facts"].get("grid"), test_store=te)
    fp = fingerprint(settings, inputs={"train": rec.get("key"), "val": va.attrs.get("key"),
                                       "test": None if te is None else te.attrs.get("key")},
                     code=code_digest("stitchcache.evaluate.probe", "stitchcache.train", "stitchcache.tasks"))
    per_image = res.pop("predictions")
    rep = te if te is not None else va
    out = args.predictions or predictions_path(args.out)
    write_predictions(out, predictions_table(rep.image_ids(), **per_image, split=res["split"],
                                             dataset=rec["dataset"], model=rec["model"]))
    write_json(args.out, {"dataset": rec["dataset"], "model": rec["model"], **res, "provenance": fp})
    log(f"probe {rec['model']} on {rec['dataset']}: {describe(res)} on {res['split']} (lr {res['lr']:g}); "
        f"per-image predictions -> {out}")
    return 0
