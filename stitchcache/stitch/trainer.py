"""The `train` stage: fit a stitch layer (and TLT head) from cached features.

  lfm      source layer-l tokens -> target layer-l tokens        (no backbone is built at all)
  ffm      source layer-l tokens -> frozen target tail -> target final tokens
  tlt      source layer-l tokens -> tail -> pooled -> linear head -> labels (segmentation: per-patch
           linear head -> grid logits -> bilinear upsampling -> per-pixel CE; tasks.py)
  ffm_tlt  tlt, starting from the FFM checkpoint (--init)

Stitch layers (``--stitch``, a choice of ``choices.py``): linear / mlp (per token), lora (source block
l+1 with LoRA adapters; the source backbone is built once, reduced to that block, even for lfm), and
linear_lstsq: the linear stitch started (lfm / ffm / tlt; ffm_tlt starts from its FFM checkpoint, which
is a linear_lstsq run too) from the closed-form least-squares fit of target layer-l tokens on source
layer-l tokens of the training split. The checkpoint's ``train`` info and the metrics record
``init`` (the choice's init: default | lstsq) and ``start`` (what this run started from: default |
lstsq | checkpoint).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..backends import backbone_from_spec
from ..cache import iter_batches, open_record
from ..grid import method_lr_grid
from ..provenance import code_digest, file_digest, fingerprint
from ..runtime import json_arg, log, pick_device, seed_everything, set_threads, write_json
from ..tasks import check_same_classes, head_config, make_head, task_info, tlt_loss
from ..train import FitConfig, fit, mean_over
from .choices import parse_choice
from .layers import STITCH_LAYERS, PrefixMap, Stitch, make_stitch_config
from .lora import extract_block
from .lstsq import lstsq_linear
from .losses import METHODS, ffm_loss, lfm_loss, match_skip, token_variance
from .model import load_checkpoint, save_checkpoint


def check_aligned(a: dict, b: dict, what: str) -> None:
    da, db = a["dataset_digest"], b["dataset_digest"]
    if da != db or a["num_images"] != b["num_images"] or a.get("row_order") != b.get("row_order"):
        raise SystemExit(f"error: {what}: source and target features were extracted from different images "
                         f"or in different row orders (extract.order_seed) ({a['store']} vs {b['store']})")


def _record(path):
    rec, store = open_record(path)
    rec["dataset_digest"] = store.attrs["key_parts"]["dataset"]
    rec["row_order"] = store.attrs["key_parts"].get("order_seed")  # rows pair up only in one order
    return rec, store


# the code whose changes make a trained stitch stale (its digest is part of every fingerprint)
TRAIN_CODE = ("stitchcache.train", "stitchcache.stitch", "stitchcache.tasks", "stitchcache.cache.loader")


@dataclass
class TrainJob:
    """One `train` job: a stitch layer (and TLT head) at one layer, from four feature records."""
    method: str
    layer: int
    stitch: str
    src_train: str
    src_val: str
    tgt_train: str
    tgt_val: str
    out: str  # checkpoint to write
    metrics: str  # training summary JSON to write
    init: str | None = None  # ffm_tlt: the FFM checkpoint
    settings: dict = field(default_factory=dict)  # the config's train section plus seed/device


def train_fingerprint(job: TrainJob, records: dict) -> dict:
    """What a trained stitch depends on (provenance.py): the train settings as given, the job, the
    four stores' keys, the init checkpoint's digest and the training code."""
    return fingerprint(job.settings, inputs={**{role: rec.get("key") or rec["store"] for role, rec in records.items()},
                                             "method": job.method, "layer": int(job.layer), "stitch": job.stitch},
                       init=file_digest(job.init) if job.init else None, code=code_digest(*TRAIN_CODE))


def train_stitch(job: TrainJob) -> int:
    set_threads()
    settings = dict(job.settings)
    seed = int(settings.get("seed", 0))
    seed_everything(seed)
    device = pick_device(settings.get("device", "auto"))
    method, l = job.method, int(job.layer)
    (st_rec, st), (sv_rec, sv) = _record(job.src_train), _record(job.src_val)
    (tt_rec, tt), (tv_rec, tv) = _record(job.tgt_train), _record(job.tgt_val)
    fp = train_fingerprint(job, {"src_train": st_rec, "src_val": sv_rec, "tgt_train": tt_rec, "tgt_val": tv_rec})
    check_aligned(st_rec, tt_rec, "train split")
    check_aligned(sv_rec, tv_rec, "val split")
    sf, tf = st_rec["facts"], tt_rec["facts"]
    depth = tf["depth"]
    if not 0 <= l < depth:
        raise SystemExit(f"error: stitch layer {l} must lie in 0..{depth - 1} for target {tt_rec['model']}")
    try:
        stitch_cfg = make_stitch_config(job.stitch, sf, tf, hidden=settings.get("mlp_hidden"), layer=l,
                                        rank=settings.get("lora_rank"), alpha=settings.get("lora_alpha"))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if "linear_init" in settings:
        raise SystemExit("error: train.linear_init was removed: the init is part of the stitch layer choice "
                         "(--stitch linear_lstsq; stitch.stitch_layers: [linear, linear_lstsq] trains both)")
    family, stitch_init = parse_choice(job.stitch)
    init = None
    if method == "ffm_tlt":
        if not job.init:
            raise SystemExit("error: ffm_tlt needs --init (the FFM checkpoint)")
        init = load_checkpoint(job.init)
        if init["spec"]["stitch"] != stitch_cfg:
            raise SystemExit(f"error: --init {job.init} has a different stitch layer: {init['spec']['stitch']}")

    target = None
    if method != "lfm":  # LFM never builds a backbone
        target = backbone_from_spec(tf["spec"]).to(device)
    source = None
    if job.stitch == "lora":  # the stitch's frozen block: built once, only block l+1 kept
        source = extract_block(backbone_from_spec(sf["spec"]), l + 1)
    lstsq_init = None
    if stitch_init == "lstsq" and init is None:
        try:
            tgt_l = tt.layer(l)
        except KeyError as e:
            raise SystemExit(f"error: the {job.stitch} stitch needs the target's layer-{l} tokens: {e}")
        t1 = time.time()
        lstsq_init = lstsq_linear(st.layer(l), tgt_l, PrefixMap(sf["num_prefix_tokens"], tf["num_prefix_tokens"]),
                                  batch_size=int(settings.get("lfm_batch_size", 256)))
        log(f"{job.stitch} stitch @{l}: least-squares init from {st_rec['num_images']} training images "
            f"({time.time() - t1:.1f}s)")
    head_cfg = None
    if method in ("tlt", "ffm_tlt"):
        info = task_info({**st.attrs, "num_classes": st_rec.get("num_classes") or _num_classes(st)})
        try:
            check_same_classes(st.attrs, sv.attrs, f"{method} on {st_rec['dataset']}")
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        # classification: linear head on pooled tokens; segmentation: per-patch linear head (tasks.py)
        head_cfg = head_config(info, tf, pool=settings.get("pool", "mean"))

    def build():
        m = nn.ModuleDict({"stitch": Stitch(stitch_cfg, source=source)})
        if init is not None:
            m["stitch"].load_state_dict(init["stitch_state"])
        elif lstsq_init is not None:
            with torch.no_grad():
                m["stitch"].layer.proj.weight.copy_(lstsq_init[0])
                m["stitch"].layer.proj.bias.copy_(lstsq_init[1])
        if head_cfg:
            m["head"] = make_head(head_cfg)
        return m

    def tail(m, h):
        return target.forward_from(m["stitch"](h), l)

    match_tokens = settings.get("match_tokens", "all")
    skip = match_skip(match_tokens, tf["num_prefix_tokens"])  # lfm / ffm: patch tokens only with `patch`
    if method == "lfm":
        train_arrays, val_arrays = [st.layer(l), tt.layer(l)], [sv.layer(l), tv.layer(l)]
        loss_fn = lambda m, b: lfm_loss(m["stitch"], b[0], b[1], skip)
    elif method == "ffm":
        train_arrays, val_arrays = [st.layer(l), tt.final], [sv.layer(l), tv.final]
        loss_fn = lambda m, b: ffm_loss(lambda h: tail(m, h), b[0], b[1], skip)
    else:
        train_arrays, val_arrays = [st.layer(l), st.labels], [sv.layer(l), sv.labels]
        loss_fn = lambda m, b: tlt_loss(lambda h: tail(m, h), m["head"], b[0], b[1])  # CE or per-pixel CE

    bs = int(settings.get("lfm_batch_size", 256) if method == "lfm" else settings.get("batch_size", 128))
    # matching losses: an improvement must also exceed train.min_delta_var x the variance of the target
    # tokens matched (val split), the scale of the relative distances; task losses have no such scale
    target_var = token_variance(iter_batches([val_arrays[1]], bs), skip) if method in ("lfm", "ffm") else None
    min_delta_abs = float(settings.get("min_delta_var", 0.0)) * target_var if target_var is not None else 0.0
    cfg = FitConfig.from_settings({**settings, "seed": seed, "min_delta_abs": min_delta_abs,
                                   "lr_grid": method_lr_grid(settings, method)})

    def batches(epoch_seed):
        return iter_batches(train_arrays, bs, shuffle=True, seed=epoch_seed)

    def val_loss(m):
        return mean_over(iter_batches(val_arrays, bs), lambda b: loss_fn(m, [x.to(device) for x in b]))

    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    desc = f"{method} {st_rec['model']}->{tt_rec['model']} @{l}"
    t0 = time.time()
    res = fit(build, batches, loss_fn, val_loss, cfg, device, partial=partial, desc=desc, fingerprint=fp)
    seconds = time.time() - t0
    best = build()
    best.load_state_dict(res.state)
    spec = {"source": sf["spec"], "target": tf["spec"], "source_facts": sf, "target_facts": tf, "layer": l,
            "stitch": stitch_cfg, "method": method, "head": head_cfg, "dataset": st_rec["dataset"],
            "source_name": st_rec["model"], "target_name": tt_rec["model"]}
    info = {"lr": res.lr, "epochs": res.epochs, "epochs_run": res.epochs_run, "stop": res.stop,
            "tail_fall": res.tail_fall, "val_loss": res.val_loss, "train_seconds": seconds, "seed": seed,
            "init": stitch_init, "match_tokens": match_tokens, "target_var": target_var,
            "min_delta_abs": min_delta_abs,
            "start": "checkpoint" if init is not None else ("lstsq" if lstsq_init is not None else "default"),
            "provenance": fp}
    save_checkpoint(out, spec, best["stitch"], best["head"] if head_cfg else None, info)
    write_json(job.metrics, {**info, "method": method, "layer": l, "stitch": job.stitch, "family": family,
                              "source": st_rec["model"], "target": tt_rec["model"], "history": res.history,
                              "feature_stores": [str(s.path) for s in (st, sv, tt, tv)]})
    partial.unlink(missing_ok=True)
    falling = (f"; still falling when stopped ({res.stop}: -{100 * res.tail_fall:.2f} % over the last "
               f"{cfg.patience} epochs)" if res.still_falling else "")
    log(f"{desc}: lr {res.lr:g}, best epoch {res.epochs} of {res.epochs_run}, val loss {res.val_loss:.4g} "
        f"({seconds:.1f}s){falling}")
    return 0


# ---- the `train` subcommand -------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--layer", required=True, type=int)
    p.add_argument("--stitch", required=True, choices=sorted(STITCH_LAYERS),
                   help="stitch layer choice: family + init (linear_lstsq: linear, least-squares init)")
    for name in ("src-train", "src-val", "tgt-train", "tgt-val"):
        p.add_argument(f"--{name}", required=True, help="feature record JSON")
    p.add_argument("--init", help="checkpoint to start from (ffm_tlt: the FFM checkpoint)")
    p.add_argument("--settings", default="{}", help="JSON: the train section plus seed/device")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--metrics", required=True, help="training summary JSON to write")


def main(args) -> int:
    return train_stitch(TrainJob(
        method=args.method, layer=args.layer, stitch=args.stitch, src_train=args.src_train, src_val=args.src_val,
        tgt_train=args.tgt_train, tgt_val=args.tgt_val, out=args.out, metrics=args.metrics, init=args.init,
        settings=json_arg(args.settings, "--settings")))


def _num_classes(store) -> int:
    return int(store.attrs.get("num_classes") or int(torch.as_tensor(store.labels[:]).max()) + 1)
