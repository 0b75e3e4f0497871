"""The `evaluate` stage for one trained stitch.

1. export: cached source layer-l tokens -> stitch -> frozen target tail -> final tokens, written to a
   feature store (``<cache_root>/stitched/<key>``, keyed by checkpoint digest + source store), so
   probes and analyses treat a stitched model like any base model;
2. linear probe on the exported final tokens (same probe as the base models);
3. the TLT head's task metric (tlt, ffm_tlt): accuracy, or mIoU for segmentation (tasks.py);
4. d_l = mean_x mean_elem (s(S_l(x)) - T_l(x))^2 and d_L = mean_x mean_elem (stitched(x) - T_final(x))^2
   (mean squared error per element), and their relative forms d_l_rel = d_l / var(T_l),
   d_L_rel = d_L / var(T_final): var = the per-channel variance of the target's tokens over every
   image and token of the reported split, averaged over channels (1.0 = predicting the per-channel
   mean). Tokens: all, or the target's patch tokens with train.match_tokens: patch (as in training).

Selection happened on ``val`` (training, and the probe's LR grid / early stopping); every reported
number (probe, head, distances) is measured on the reported split: ``test`` when the stitch dataset
has one (``--src-test`` / ``--tgt-test``), else ``val`` (then ``split: val`` in the result says so).
Per-image predictions of the reported split go to ``predictions.parquet`` beside ``eval.json``
(predictions.py), kept with keep_exports: false.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import backbone_from_spec, weights_digest
from ..cache import FeatureStore, StoreWriter, content_key, iter_batches, open_record
from ..provenance import check
from ..runtime import autocast, json_arg, log, pick_device, read_json, seed_everything, set_threads, write_json
from ..stitch.losses import ChannelVariance, match_skip
from ..stitch.model import StitchedTail, build_parts, load_checkpoint
from ..tasks import SEGMENTATION, head_metrics, task_info
from .predictions import predictions_path, predictions_table, write_predictions
from .probe import describe, probe_stores


def export_final(tail: StitchedTail, src_store: FeatureStore, out_path: Path, attrs: dict, device,
                 batch_size: int = 256) -> FeatureStore:
    """Run the stitched tail over a whole split of cached source tokens; resumable by chunk."""
    if FeatureStore.is_complete(out_path):
        return FeatureStore(out_path)
    tgt = tail.target
    src = src_store.layer(tail.layer)
    labels = src_store.labels  # class indices, or segmentation masks (N, H, W) carried over as they are
    with StoreWriter(out_path, num_images=src_store.num_images, layers=[], num_tokens=tgt.num_tokens,
                     width=tgt.width, dtype="float16", chunk_size=src.chunks[0], attrs=attrs,
                     label_shape=labels.shape[1:], label_dtype=labels.dtype, order=src_store.order,
                     image_ids=src_store.image_ids()) as w:
        for ci in w.pending_chunks():
            a, b = w.chunk_range(ci)
            outs = []
            for (h,) in iter_batches([src[a:b]], batch_size):
                with torch.no_grad(), autocast(device):
                    outs.append(tail(h.to(device)).float().cpu().numpy().astype(np.float16))
            w.write_chunk(ci, {}, np.concatenate(outs), src_store.labels[a:b])
        w.finalize()
    return FeatureStore(out_path)


def distances(stitch, layer: int, src_rep, tgt_rep, exported_rep, device, batch_size: int = 256, skip: int = 0) -> dict:
    """d_l, d_L (MSE per element) and d_l_rel, d_L_rel (over the target's mean per-channel variance)
    on one split, streamed; ``skip`` leading target tokens are left out (train.match_tokens: patch)."""
    sums = {"d_l": 0.0, "d_L": 0.0}
    var = {"d_l": ChannelVariance(), "d_L": ChannelVariance()}
    n = 0
    arrays = [src_rep.layer(layer), tgt_rep.layer(layer), exported_rep.final, tgt_rep.final]
    for h_s, h_t, z_s, z_t in iter_batches(arrays, batch_size):
        h_t, z_s, z_t = h_t[:, skip:].float(), z_s[:, skip:].float(), z_t[:, skip:].float()  # (B, T - skip, D)
        with torch.no_grad():
            sums["d_l"] += F.mse_loss(stitch(h_s.to(device))[:, skip:].float().cpu(), h_t).item() * len(h_s)
        sums["d_L"] += F.mse_loss(z_s, z_t).item() * len(h_s)
        var["d_l"].update(h_t)
        var["d_L"].update(z_t)
        n += len(h_s)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    for k in ("d_l", "d_L"):
        v = var[k].mean_variance() if n else float("nan")
        out[f"{k}_target_var"] = v
        out[f"{k}_rel"] = out[k] / v if v > 0 else float("nan")
    return out


def check_same_images(a: FeatureStore, b: FeatureStore, what: str) -> list[str]:
    """The image ids of two stores that are paired row by row; they must agree."""
    ia, ib = a.image_ids(), b.image_ids()
    if ia != ib:
        bad = next(i for i, (x, y) in enumerate(zip(ia, ib)) if x != y) if len(ia) == len(ib) else min(len(ia), len(ib))
        raise ValueError(f"{what}: stores {a.path} and {b.path} hold different images (first difference at row {bad})")
    return ia


def check_trained_as_asked(ckpt: dict, train_settings: dict | None, path, records: dict) -> dict:
    """The checkpoint's training fingerprint, after checking it was trained with ``train_settings``
    (the workflow's train section now; None: not checked) from the feature stores of ``records``."""
    recorded = ckpt["train"].get("provenance")
    if train_settings is None:
        return recorded
    keys = {role: rec.get("key") or rec["store"] for role, rec in records.items()}
    asked = {"settings": train_settings, "inputs": keys}
    have = None if recorded is None else {"settings": recorded["settings"],
                                          "inputs": {k: recorded["inputs"].get(k) for k in keys}}
    check(have, asked, f"checkpoint {str(path)!r}")
    return recorded


def evaluate(args) -> dict:
    """Evaluate one trained stitch; returns the eval.json record and writes predictions.parquet."""
    settings = json_arg(args.settings, "--settings")
    seed = int(settings.get("seed", 0))
    seed_everything(seed)
    device = pick_device(settings.get("device", "auto"))
    ckpt = load_checkpoint(args.checkpoint)
    spec = ckpt["spec"]
    l = spec["layer"]
    splits = {"train": args.src_train, "val": args.src_val}
    if getattr(args, "src_test", None):
        if not getattr(args, "tgt_test", None):
            raise ValueError("--src-test needs --tgt-test (the target's test split)")
        splits["test"] = args.src_test
    report = "test" if "test" in splits else "val"
    src = {split: open_record(path) for split, path in splits.items()}
    _, tgt_rep = open_record(args.tgt_test if report == "test" else args.tgt_val)
    st_rec, st = src["train"]
    sv = src[report][1]
    ids = check_same_images(sv, tgt_rep, f"{report} split of {spec['source_name']} -> {spec['target_name']}")
    trained = check_trained_as_asked(ckpt, settings.get("train"), args.checkpoint, {
        "src_train": st_rec, "src_val": src["val"][0], "tgt_train": read_json(args.tgt_train, "feature record"),
        "tgt_val": read_json(args.tgt_val, "feature record")})
    stitch, head = build_parts(ckpt)
    target = backbone_from_spec(spec["target"])
    tail = StitchedTail(stitch, target, l).to(device).eval()
    if head is not None:
        head = head.to(device).eval()
    ck_digest = weights_digest(args.checkpoint)
    root = Path(args.cache_root).resolve() / "stitched"
    exported = {}
    t0 = time.time()
    for split, (rec, store) in src.items():
        key = content_key({"checkpoint": ck_digest, "source_store": rec["key"], "format": 2})
        attrs = {"key": key, "key_parts": {"checkpoint": ck_digest, "source_store": rec["key"]},
                 "model_name": f"{spec['source_name']}->{spec['target_name']}@{l}/{spec['stitch']['kind']}/{spec['method']}",
                 "dataset": {"name": rec["dataset"], "split": split}, "num_classes": rec.get("num_classes"),
                 **{k: store.attrs[k] for k in ("task", "ignore_index", "classes") if k in store.attrs},
                 "grid": list(target.grid), "num_prefix_tokens": target.num_prefix_tokens,
                 "stitched": {"checkpoint": str(Path(args.checkpoint).resolve()), "layer": l}}
        exported[split] = export_final(tail, store, root / key[:24], attrs, device)
    probe_settings = dict(settings.get("probe", {}), seed=seed)
    num_classes = int(st_rec.get("num_classes") or 0)
    probe = probe_stores(exported["train"], exported["val"], target.num_prefix_tokens, num_classes,
                         probe_settings, device, grid=target.grid, test_store=exported.get("test"))
    per_image = probe.pop("predictions")
    info = task_info({**st.attrs, "num_classes": num_classes})
    hm = None
    rep = exported[report]
    if head is not None:
        batch = 64 if info["task"] == SEGMENTATION else 512
        hm = head_metrics(head, iter_batches([rep.final, rep.labels], batch), device, info, per_image=True)
        if info["task"] != SEGMENTATION:
            per_image["pred_head"] = hm["per_image"]["pred"]
    match_tokens = ckpt["train"].get("match_tokens", "all")
    dist = distances(stitch.to(device), l, sv, tgt_rep, rep, device,
                     skip=match_skip(match_tokens, target.num_prefix_tokens))
    result = {
        "dataset": spec["dataset"], "source": spec["source_name"], "target": spec["target_name"], "layer": l,
        "stitch": spec["stitch"]["kind"], "method": spec["method"],
        "kind": "self" if spec["source_name"] == spec["target_name"] else "cross", "seed": ckpt["train"]["seed"],
        "split": report,  # every number below is on this split; selection used val
        "probe_acc": probe["probe_acc"], "probe_val_acc": probe["val_score"], "probe_lr": probe["lr"],
        "pool": probe["pool"],
        "head_acc": hm["score"] if hm else None,  # the task metric: accuracy, or mIoU (see "metric")
        "task": info["task"], "metric": info["metric"], "num_classes": num_classes,
        "match_tokens": match_tokens, **dist, "lr": ckpt["train"]["lr"], "epochs": ckpt["train"]["epochs"],
        **{k: ckpt["train"].get(k) for k in ("epochs_run", "stop", "tail_fall")},  # how training ended
        "train_seconds": ckpt["train"]["train_seconds"], "eval_seconds": time.time() - t0,
        **{f"exported_{split}": str(store.path) for split, store in exported.items()},
        "train_provenance": trained, "probe_settings": settings.get("probe", {}),
    }
    if info["task"] == SEGMENTATION:
        result.update(probe_miou=probe["probe_miou"], probe_pixel_acc=probe["probe_pixel_acc"],
                      head_miou=hm["miou"] if hm else None, head_pixel_acc=hm["pixel_acc"] if hm else None)
    out = getattr(args, "predictions", None) or predictions_path(args.out)
    write_predictions(out, predictions_table(
        ids, **per_image, split=report, dataset=spec["dataset"], source=spec["source_name"],
        target=spec["target_name"], layer=l, stitch=spec["stitch"]["kind"], method=spec["method"],
        seed=ckpt["train"]["seed"]))
    result["predictions"] = str(out)
    if not settings.get("keep_exports", True):
        # at the paper's size the exports outweigh the feature stores ~15x: drop them once measured
        for path in {store.path for store in exported.values()}:  # splits may share one store
            shutil.rmtree(path)
            Path(str(path) + ".lock").unlink(missing_ok=True)  # the writer's lock file
        result.update({f"exported_{split}": None for split in exported})
        log("removed the stitched exports (evaluate.keep_exports: false); predictions.parquet is kept")
    return result


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    for name in ("src-train", "src-val", "tgt-train", "tgt-val"):
        p.add_argument(f"--{name}", required=True, help="feature record JSON")
    for name in ("src-test", "tgt-test"):
        p.add_argument(f"--{name}", default=None, help="feature record JSON of the test split: every reported "
                       "number is measured on it (without: on val, which also selected)")
    p.add_argument("--cache-root", required=True)
    p.add_argument("--settings", default="{}", help="JSON: {probe: {...}, train: {...} (the train settings the checkpoint must have been "
                   "trained with; checked when given), keep_exports, seed, device}")
    p.add_argument("--out", required=True)
    p.add_argument("--predictions", default=None, help="per-image predictions (default: beside --out)")


def main(args) -> int:
    set_threads()
    res = evaluate(args)
    write_json(args.out, res)
    head = f", head {100 * res['head_acc']:.1f}%" if res["head_acc"] is not None else ""
    log(f"{res['method']} {res['source']}->{res['target']} @{res['layer']} on {res['split']}: probe "
        f"{describe(res)}{head}, d_l {res['d_l']:.3g} ({res['d_l_rel']:.3g} rel), d_L {res['d_L']:.3g} "
        f"({res['d_L_rel']:.3g} rel)")
    return 0
