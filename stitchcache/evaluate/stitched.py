"""The `evaluate` stage for one trained stitch.

1. export: cached source layer-l tokens -> stitch -> frozen target tail -> final tokens, written to a
   feature store (``<cache_root>/stitched/<key>``, keyed by checkpoint digest + source store), so
   probes and analyses treat a stitched model like any base model;
2. linear probe on the exported final tokens (same probe as the base models);
3. the TLT head's task metric (tlt, ffm_tlt): accuracy, or mIoU for segmentation (tasks.py);
4. d_l = mean_x mean_elem (s(S_l(x)) - T_l(x))^2 and d_L = mean_x mean_elem (stitched(x) - T_final(x))^2
   on the validation split (mean squared error per element).
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
from ..stitch.model import StitchedTail, build_parts, load_checkpoint
from ..tasks import SEGMENTATION, head_metrics, task_info
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
                     label_shape=labels.shape[1:], label_dtype=labels.dtype, order=src_store.order) as w:
        for ci in w.pending_chunks():
            a, b = w.chunk_range(ci)
            outs = []
            for (h,) in iter_batches([src[a:b]], batch_size):
                with torch.no_grad(), autocast(device):
                    outs.append(tail(h.to(device)).float().cpu().numpy().astype(np.float16))
            w.write_chunk(ci, {}, np.concatenate(outs), src_store.labels[a:b])
        w.finalize()
    return FeatureStore(out_path)


def distances(stitch, layer: int, src_val, tgt_val, exported_val, device, batch_size: int = 256) -> dict:
    sums = {"d_l": 0.0, "d_L": 0.0}
    n = 0
    arrays = [src_val.layer(layer), tgt_val.layer(layer), exported_val.final, tgt_val.final]
    for h_s, h_t, z_s, z_t in iter_batches(arrays, batch_size):
        with torch.no_grad():
            sums["d_l"] += F.mse_loss(stitch(h_s.to(device)).float(), h_t.to(device)).item() * len(h_s)
        sums["d_L"] += F.mse_loss(z_s, z_t).item() * len(h_s)
        n += len(h_s)
    return {k: v / max(n, 1) for k, v in sums.items()}


def head_accuracy(head, exported_val, device, batch_size: int = 512) -> float:
    """Classification accuracy of a TLT head (segmentation: ``head_metrics`` in tasks.py)."""
    correct, n = 0, 0
    for z, y in iter_batches([exported_val.final, exported_val.labels], batch_size):
        with torch.no_grad():
            correct += (head(z.to(device)).argmax(1).cpu() == y).sum().item()
        n += len(y)
    return correct / max(n, 1)


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
    settings = json_arg(args.settings, "--settings")
    seed = int(settings.get("seed", 0))
    seed_everything(seed)
    device = pick_device(settings.get("device", "auto"))
    ckpt = load_checkpoint(args.checkpoint)
    spec = ckpt["spec"]
    l = spec["layer"]
    st_rec, st = open_record(args.src_train)
    sv_rec, sv = open_record(args.src_val)
    tv_rec, tv = open_record(args.tgt_val)
    trained = check_trained_as_asked(ckpt, settings.get("train"), args.checkpoint, {
        "src_train": st_rec, "src_val": sv_rec, "tgt_train": read_json(args.tgt_train, "feature record"),
        "tgt_val": tv_rec})
    stitch, head = build_parts(ckpt)
    target = backbone_from_spec(spec["target"])
    tail = StitchedTail(stitch, target, l).to(device).eval()
    if head is not None:
        head = head.to(device).eval()
    ck_digest = weights_digest(args.checkpoint)
    root = Path(args.cache_root).resolve() / "stitched"
    exported = {}
    t0 = time.time()
    for split, rec, store in (("train", st_rec, st), ("val", sv_rec, sv)):
        key = content_key({"checkpoint": ck_digest, "source_store": rec["key"], "format": 1})
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
                         probe_settings, device, grid=target.grid)
    info = task_info({**st.attrs, "num_classes": num_classes})
    hm = None
    if head is not None:
        if info["task"] == SEGMENTATION:
            hm = head_metrics(head, iter_batches([exported["val"].final, exported["val"].labels], 64), device, info)
        else:
            acc = head_accuracy(head, exported["val"], device)
            hm = {"metric": "accuracy", "score": acc}
    dist = distances(stitch.to(device), l, sv, tv, exported["val"], device)
    result = {
        "dataset": spec["dataset"], "source": spec["source_name"], "target": spec["target_name"], "layer": l,
        "stitch": spec["stitch"]["kind"], "method": spec["method"],
        "kind": "self" if spec["source_name"] == spec["target_name"] else "cross", "seed": ckpt["train"]["seed"],
        "probe_acc": probe["probe_acc"], "probe_lr": probe["lr"], "pool": probe["pool"],
        "head_acc": hm["score"] if hm else None,  # the task metric: accuracy, or mIoU (see "metric")
        "task": info["task"], "metric": info["metric"], "num_classes": num_classes,
        "d_l": dist["d_l"], "d_L": dist["d_L"], "lr": ckpt["train"]["lr"], "epochs": ckpt["train"]["epochs"],
        "train_seconds": ckpt["train"]["train_seconds"], "eval_seconds": time.time() - t0,
        "exported_train": str(exported["train"].path), "exported_val": str(exported["val"].path),
        "train_provenance": trained, "probe_settings": settings.get("probe", {}),
    }
    if info["task"] == SEGMENTATION:
        result.update(probe_miou=probe["probe_miou"], probe_pixel_acc=probe["probe_pixel_acc"],
                      head_miou=hm["miou"] if hm else None, head_pixel_acc=hm["pixel_acc"] if hm else None)
    if not settings.get("keep_exports", True):
        # at the paper's size the exports outweigh the feature stores ~15x: drop them once measured
        for path in {store.path for store in exported.values()}:  # train and val may share one store
            shutil.rmtree(path)
            Path(str(path) + ".lock").unlink(missing_ok=True)  # the writer's lock file
        result.update(exported_train=None, exported_val=None)
        log("removed the stitched exports (evaluate.keep_exports: false)")
    return result


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    for name in ("src-train", "src-val", "tgt-train", "tgt-val"):
        p.add_argument(f"--{name}", required=True, help="feature record JSON")
    p.add_argument("--cache-root", required=True)
    p.add_argument("--settings", default="{}", help="JSON: {probe: {...}, train: {...} (the train settings the checkpoint must have been "
                   "trained with; checked when given), keep_exports, seed, device}")
    p.add_argument("--out", required=True)


def main(args) -> int:
    set_threads()
    res = evaluate(args)
    write_json(args.out, res)
    head = f", head {100 * res['head_acc']:.1f}%" if res["head_acc"] is not None else ""
    log(f"{res['method']} {res['source']}->{res['target']} @{res['layer']}: probe {describe(res)}{head}, "
        f"d_l {res['d_l']:.3g}, d_L {res['d_L']:.3g}")
    return 0
