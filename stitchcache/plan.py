"""``stitchcache plan``: what an experiment will store and how long it will take, printed before any
work. Needs no weights and no data: models are built random-init (on the ``meta`` device when nothing
is measured, so even ViT-L costs no memory) just to read their shapes, and split sizes come from the
data when it can be opened, else from the split's ``count:``.

Storage is exact arithmetic on the shapes (tested against real stores). GPU time is an estimate on a
*reference accelerator* (``--reference``; ``REFERENCES`` holds the measured numbers and names their
source), scaled from the reference model to each model by FLOPs per image, and bounded by bytes
where bytes are the bound:

* FLOPs of a ViT forward, counted for matrix products only (the part that costs; norms, softmax,
  GELU, biases are < 1 %):  ``F_block = (8 + 4 r) T D^2 + 4 T^2 D``  (qkv 6TD^2, attention
  scores and weighted sum 4T^2D, output projection 2TD^2, MLP 4rTD^2), ``F_embed = 2 G C p^2 D``,
  ``F = F_embed + L F_block``. ``T`` tokens, ``D`` width, ``L`` depth, ``G`` grid cells, ``p`` patch,
  ``C`` channels, ``r`` the MLP ratio read from the model (``(W - 4 D^2) / 2 D^2`` for ``W`` matrix
  weights per block: the ratio a plain GELU MLP with the same weights would have).
* extraction (one store = dataset x model x split): ``N x max(F / (capture img/s x F_ref),
  bytes/img / host copy B/s, bytes/img / write B/s)`` - the pipeline overlaps compute, device->host
  copies and disk writes, so the slowest of the three sets the pace (and is printed as the bound).
* stitch training (one job; an UPPER bound: every learning rate runs ``max_epochs``, early stopping
  ends sooner): ``max_epochs x |lr_grid| x (N_train x t_step + N_val x t_val)``. The FFM step
  (stitch + frozen tail fwd+bwd) is fitted to the reference points as ``t(n) = a + b n`` seconds per
  image for a tail of ``n`` blocks (see ``ffm_fit``; the fit error is printed), scaled per model:
  ``t = a (T D / T_ref D_ref) + b (n F_block + F_extra) / F_block_ref``, with ``F_extra`` the source
  block a LoRA stitch runs. TLT and FFM->TLT cost what FFM costs (their head is tiny); LFM runs no
  backbone: only the stitch (the ``a`` term), so it is bound by reading the cache. Each step is
  ``max(compute, cached bytes read / read B/s)``. The validation pass of every epoch is a forward
  only: per block ``F_block / (forward img/s x F_ref)`` (0.40 of the fitted fwd+bwd per block).
* evaluation (one job): the stitched forward (tail forward) over train + val, exporting final tokens
  (bounded by reading the source tokens and writing the export), then reading the export back for
  the probe (a linear layer on pooled features: negligible compute) and the val arrays for d_l / d_L.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
import yaml

from .cache.manage import human

ITEMSIZE = {"float16": 2, "float32": 4, "int8": 1}
SCALE_BYTES = {"int8": 4}  # int8 stores add one float32 scale per token
LABEL_BYTES = 8  # classification labels: int64 per image; segmentation: uint8 mask at the input size
ORDER_BYTES = 8  # the store's row order: int64 per image (docs/stages/extract.md, "Row order")
SEGMENTATION_TYPES = ("ade20k",)  # dataset types whose labels are masks (when the data cannot be opened)
TRAIN_METHODS = ("lfm", "ffm", "tlt", "ffm_tlt")

# Reference accelerators: measured numbers only, each with where it came from. Add a machine by
# adding an entry with the same keys (and measure the same things on it).
REFERENCES: dict[str, dict] = {
    "h100": {
        "device": "NVIDIA H100, bf16 autocast",
        "source": "stitchcache reference measurements on an H100 (design notes, 'Measured reference "
                  "points'): random-weight ViT-L/14, 224 px, bf16, batch 256",
        # the model the numbers were measured on
        "model": {"tokens": 257, "width": 1024, "depth": 24, "mlp_ratio": 4.0, "patch_size": 14,
                  "channels": 3, "grid_cells": 256},
        "forward_img_s": 2026.0,       # plain forward
        "capture_img_s": 2015.0,       # forward capturing all 24 layers on the GPU
        "host_copy_bytes_s": 17.5e9,   # 24 layers copied to pinned host memory: 1385 img/s = 17.5 GB/s
        "write_bytes_s": {"none": 1.3e9,   # NVMe direct write
                          "zstd": 1.2e9,   # zstd-1 Zarr write
                          "blosc": 1.2e9},  # not measured: the zstd number stands in for it
        # FFM step (MLP stitch + frozen target tail fwd+bwd), batch 128, img/s at stitch point l
        "ffm_step_img_s": {2: 878.0, 6: 1070.0, 10: 1360.0, 14: 1890.0, 18: 3115.0, 22: 8247.0},
        "ffm_batch_size": 128,
        # reading cached tokens. NOT an H100 measurement: the in-process reader's warm rate on the
        # development machine (docs/stages/extract.md, 5-6 GB/s; lower end); a cold NVMe can be slower
        "read_bytes_s": 5.0e9,
    },
}


# ---- configuration, data ----------------------------------------------------------------------
def load_config(path: str | Path) -> dict:
    """The config with the schema's defaults filled in (the same validation Snakemake runs)."""
    from snakemake.utils import validate

    cfg = yaml.safe_load(Path(path).read_text())
    schema = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
    if schema.exists():
        validate(cfg, str(schema))
    return cfg


def split_info(dataset: dict, split: str) -> dict:
    """``{images, source, note, task, num_classes}``: the size from the data when it opens, else the
    split's ``count:`` (source 'count'), else None (source None, with the reason in ``note``)."""
    from .data.base import CLASSIFICATION, SEGMENTATION

    s = (dataset.get("splits") or {}).get(split) or {}
    task = SEGMENTATION if dataset.get("type") in SEGMENTATION_TYPES else CLASSIFICATION
    try:
        from .data import open_split

        data = open_split(dataset, split)
        return {"images": len(data), "source": "data", "note": None, "task": getattr(data, "task", task),
                "num_classes": getattr(data, "num_classes", None)}
    except Exception as e:  # missing files, unknown type, ...: a plan never needs the data
        reason = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    from .data.holdout import planned_size

    try:
        count = planned_size(dataset.get("splits") or {}, split, dataset.get("name", "?")) if s else None
    except ValueError as e:
        count, reason = None, str(e)
    return {"images": count, "source": "count" if count is not None else None, "note": reason, "task": task,
            "num_classes": None}


def split_size(dataset: dict, split: str) -> int | None:
    return split_info(dataset, split)["images"]


def stitch_datasets(st: dict) -> list[str]:
    """``stitch.datasets`` (a list), or the older single ``stitch.dataset``."""
    if st.get("datasets"):
        return list(st["datasets"])
    return [st["dataset"]]


def stitch_family(choice: str) -> tuple[str, str]:
    """(family, init) of a ``stitch.stitch_layers`` entry: linear_lstsq -> (linear, lstsq)."""
    try:
        from .stitch.choices import parse_choice

        return parse_choice(choice)
    except ImportError:
        return (choice[: -len("_lstsq")], "lstsq") if choice.endswith("_lstsq") else (choice, "default")


# ---- shapes and FLOPs -------------------------------------------------------------------------
def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """Matrix-product FLOPs of one ViT block for one image: ``(8 + 4 r) T D^2 + 4 T^2 D``."""
    T, D = tokens, width
    return (8 + 4 * mlp_ratio) * T * D * D + 4 * T * T * D


def forward_flops(shape: dict) -> float:
    """FLOPs of a whole forward for one image: patch embedding + L blocks."""
    embed = 2 * shape["grid_cells"] * shape["channels"] * shape["patch_size"] ** 2 * shape["width"]
    return embed + shape["depth"] * block_flops(shape["tokens"], shape["width"], shape["mlp_ratio"])


def model_shape(bb) -> dict:
    """What the estimates need from a built backbone (its parameters may live on the meta device)."""
    D = bb.width
    ratio, how = 4.0, "assumed (no block list)"
    try:
        from .stitch.lora import block_list

        blk = block_list(bb)[0]
        weights = sum(p.numel() for p in blk.parameters() if p.dim() == 2)
        ratio, how = (weights / (D * D) - 4) / 2, "read"
    except (NotImplementedError, ImportError, IndexError):
        pass
    gh, gw = bb.grid
    shape = {"tokens": bb.num_tokens, "width": D, "depth": bb.depth, "mlp_ratio": ratio, "mlp_ratio_from": how,
             "patch_size": bb.patch_size, "channels": bb.preprocess.channels, "grid_cells": gh * gw,
             "image_size": tuple(bb.image_size), "num_prefix_tokens": bb.num_prefix_tokens}
    shape["block_flops"] = block_flops(shape["tokens"], D, ratio)
    shape["forward_flops"] = forward_flops(shape)
    return shape


def build_random_init(name: str, model: dict, weights_root=None, meta: bool = True):
    """The config's model as a random-init backbone: registry names resolve to their library
    architecture (their weights need not exist). ``meta``: parameters on the meta device (no memory,
    no init time); a backend that cannot build there falls back to a real CPU random init."""
    from .backends import create_backbone
    from .inputs import concrete_model_spec

    spec = concrete_model_spec(name, model, weights_root=weights_root)
    if meta:
        try:
            with torch.device("meta"):
                return create_backbone(spec["backbone"], checkpoint=None, **spec["kwargs"])
        except Exception:  # e.g. open_clip moves tensors while building
            pass
    return create_backbone(spec["backbone"], checkpoint=None, **spec["kwargs"])


def measure(bb, layers: list[int], device: torch.device, batch: int) -> float:
    """Images per second of a capture forward on this machine (random pixels, no disk)."""
    bb = bb.to(device)
    x = torch.randn(batch, bb.preprocess.channels, *bb.image_size, device=device)
    capture = sorted(set(layers) | {bb.depth})
    with torch.inference_mode():
        bb.forward_layers(x, capture)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            hs = bb.forward_layers(x, capture)
            bb.final_norm(hs[bb.depth]).float().cpu()
            n += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


# ---- the cost model ----------------------------------------------------------------------------
def ffm_fit(ref: dict) -> dict:
    """Fit ``t(n) = a + b n`` (seconds per image, tail of n blocks) to the reference FFM steps by least
    squares on relative error; returns a, b and each point's measured / fitted img/s and error."""
    import numpy as np

    depth = ref["model"]["depth"]
    pts = sorted(ref["ffm_step_img_s"].items())
    n = np.array([depth - l for l, _ in pts], float)
    rate = np.array([r for _, r in pts], float)
    t = 1.0 / rate
    A = np.stack([np.ones_like(n), n], 1) / t[:, None]  # rows weighted by 1/t: relative error
    (a, b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    fitted = 1.0 / (a + b * n)
    points = [{"layer": l, "tail_blocks": int(k), "img_s": float(r), "fit_img_s": float(f),
               "error": float(f / r - 1)} for (l, r), k, f in zip(pts, n, fitted)]
    return {"a": float(a), "b": float(b), "points": points,
            "max_abs_error": max(abs(p["error"]) for p in points)}


class CostModel:
    """Seconds per image of each kind of work, on the reference accelerator (see the module doc)."""

    def __init__(self, reference: str = "h100"):
        if reference not in REFERENCES:
            raise ValueError(f"unknown reference {reference!r} (known: {', '.join(REFERENCES)})")
        self.name, self.ref = reference, REFERENCES[reference]
        m = dict(self.ref["model"])
        self.ref_shape = m
        self.ref_block = block_flops(m["tokens"], m["width"], m["mlp_ratio"])
        self.ref_forward = forward_flops(m)
        self.ref_volume = m["tokens"] * m["width"]
        self.fit = ffm_fit(self.ref)
        self.a, self.b = self.fit["a"], self.fit["b"]
        self.fwd_per_flop = 1.0 / (self.ref["forward_img_s"] * self.ref_forward)
        self.capture_per_flop = 1.0 / (self.ref["capture_img_s"] * self.ref_forward)
        self.fb_per_flop = self.b / self.ref_block  # frozen block fwd+bwd, seconds per forward FLOP
        self.fwd_ratio = self.fwd_per_flop / self.fb_per_flop  # forward / (fwd+bwd) of a block, ~0.40
        self.read = self.ref["read_bytes_s"]
        self.copy = self.ref["host_copy_bytes_s"]

    def write_rate(self, compressor: str) -> float:
        return self.ref["write_bytes_s"].get(compressor or "none", self.ref["write_bytes_s"]["none"])

    def capture(self, shape: dict) -> float:
        return shape["forward_flops"] * self.capture_per_flop

    def forward(self, shape: dict) -> float:
        return shape["forward_flops"] * self.fwd_per_flop

    def step(self, tgt: dict, tail_blocks: int, extra_flops: float = 0.0) -> float:
        """Stitch + ``tail_blocks`` frozen target blocks, forward and backward (one image)."""
        over = self.a * tgt["tokens"] * tgt["width"] / self.ref_volume
        return over + (tail_blocks * tgt["block_flops"] + extra_flops) * self.fb_per_flop

    def step_forward(self, tgt: dict, tail_blocks: int, extra_flops: float = 0.0) -> float:
        """The same, forward only (validation passes, export)."""
        over = self.a * self.fwd_ratio * tgt["tokens"] * tgt["width"] / self.ref_volume
        return over + (tail_blocks * tgt["block_flops"] + extra_flops) * self.fwd_per_flop


def _bound(**seconds) -> tuple[float, str]:
    name = max(seconds, key=seconds.get)
    return seconds[name], name


# ---- the plan ----------------------------------------------------------------------------------
def plan(cfg: dict, do_measure: bool = True, device: str = "auto", reference: str = "h100") -> dict:
    from .extract import resolve_layers
    from .runtime import pick_device

    cost = CostModel(reference)
    dev = pick_device(device) if do_measure else None
    st = cfg["stitch"]
    ex = cfg.get("extract") or {}
    tr = cfg.get("train") or {}
    ds_names = stitch_datasets(st)
    used = [m for m in cfg["models"] if any(m in p for p in st["pairs"])]
    dtype = ex.get("dtype", "float16")
    compressor = ex.get("compressor", "none") or "none"
    itemsize, scale_bytes = ITEMSIZE[dtype], SCALE_BYTES.get(dtype, 0)
    notes: list[str] = []

    # splits: sizes and tasks (train, val of every stitch dataset; pretrain splits of used models)
    info = {}
    for d in ds_names:
        entry = dict(cfg["datasets"][d], name=d)
        for split in ("train", "val"):
            info[d, split] = split_info(entry, split)
            i = info[d, split]
            if i["source"] is None:
                notes.append(f"{d}/{split}: size unknown ('?', counted as 0): the data cannot be opened "
                             f"({i['note']}) and datasets.{d}.splits.{split} has no count:")

    counted = [f"{d}/{s}" for (d, s), i in info.items() if i["source"] == "count"]
    if counted:
        notes.append(f"sizes from count: (the data could not be opened here): {', '.join(counted)}")

    # models: built one at a time, freed at once; only their shapes are kept
    shapes, local = {}, {}
    for name in used:
        m = cfg["models"][name]
        bb = build_random_init(name, m, cfg.get("weights_root"), meta=not do_measure)
        layers = resolve_layers(ex.get("layers", "all"), bb.depth)
        shape = model_shape(bb)
        shape["layers"] = len(layers)
        shape["bytes_per_layer_image"] = bb.num_tokens * (bb.width * itemsize + scale_bytes)
        shape["tokens_per_image"] = shape["bytes_per_layer_image"] * (len(layers) + 1)  # + final
        shape["export_bytes_per_image"] = bb.num_tokens * bb.width * 2  # stitched exports: float16
        if shape["mlp_ratio_from"] != "read":
            notes.append(f"{name}: MLP ratio {shape['mlp_ratio_from']}: {shape['mlp_ratio']:g}")
        shapes[name] = shape
        if do_measure:
            local[name] = measure(bb, layers, dev, 64 if dev.type == "cuda" else
                                  max(1, min(8, int(2e10 // shape["forward_flops"]))))
        del bb
        gc.collect()

    def label_bytes(d, model):
        seg = info[d, "train"]["task"] == "segmentation"
        h, w = shapes[model]["image_size"]
        return h * w if seg else LABEL_BYTES

    def n(d, split):
        return info[d, split]["images"] or 0

    # feature stores + extraction
    rows = []
    for d in ds_names:
        for name in used:
            s = shapes[name]
            per_image = s["tokens_per_image"] + label_bytes(d, name) + ORDER_BYTES
            compute = cost.capture(s)
            copy = s["tokens_per_image"] / cost.copy
            write = per_image / cost.write_rate(compressor)
            t_img, bound = _bound(compute=compute, copy=copy, write=write)
            for split in ("train", "val"):
                N = info[d, split]["images"]
                ips = local.get(name)
                rows.append({"dataset": d, "model": name, "split": split, "images": N, "layers": s["layers"] + 1,
                             "bytes_per_layer_image": s["bytes_per_layer_image"], "bytes_per_image": per_image,
                             "bytes": per_image * (N or 0), "gpu_seconds": t_img * (N or 0),
                             "bound": bound, "bounds_s_per_image": {"compute": compute, "copy": copy, "write": write},
                             "images_per_s": ips, "seconds": (N or 0) / ips if ips else None})

    # stitch grid
    pairs = [tuple(p) for p in st["pairs"]] + ([(m, m) for m in used] if st.get("self_stitch", True) else [])
    pairs = list(dict.fromkeys(pairs))
    layers_ = list(st.get("layers", [1]))
    stitches = list(st.get("stitch_layers", ["mlp"]))
    methods = list(st.get("methods", list(TRAIN_METHODS)))
    epochs = int(tr.get("max_epochs", 100)) * len(tr.get("lr_grid", [1e-3]))
    mlp_hidden = tr.get("mlp_hidden")
    rank = int(tr.get("lora_rank", 8))
    per_ds = {}
    lstsq_flops = 0.0
    for d in ds_names:
        Ntr, Nva = n(d, "train"), n(d, "val")
        agg = {"train_s": {m: 0.0 for m in methods}, "train_bound": {m: {} for m in methods},
               "eval_s": 0.0, "probe_s": 0.0, "export_bytes": 0, "checkpoint_bytes": 0, "largest_export": 0}
        for src, tgt in pairs:
            S, T = shapes[src], shapes[tgt]
            bl_s, bl_t, fin_t = S["bytes_per_layer_image"], T["bytes_per_layer_image"], T["bytes_per_layer_image"]
            lab = label_bytes(d, tgt)
            exp_img = T["export_bytes_per_image"] + lab
            for l in layers_:
                tail = T["depth"] - l
                for choice in stitches:
                    family, init = stitch_family(choice)
                    extra = S["block_flops"] if family == "lora" else 0.0  # the LoRA stitch runs source block l+1
                    for method in methods:
                        if method == "lfm":
                            c_tr, c_va = cost.step(T, 0, extra), cost.step_forward(T, 0, extra)
                            r_img = bl_s + bl_t
                        else:
                            c_tr, c_va = cost.step(T, tail, extra), cost.step_forward(T, tail, extra)
                            r_img = bl_s + (fin_t if method == "ffm" else lab)
                        t_tr, b_tr = _bound(compute=c_tr, read=r_img / cost.read)
                        t_va, _ = _bound(compute=c_va, read=r_img / cost.read)
                        secs = epochs * (Ntr * t_tr + Nva * t_va)
                        if init == "lstsq" and method != "ffm_tlt":  # one pass over the training split
                            secs += Ntr * (bl_s + bl_t) / cost.read
                            lstsq_flops += 2.0 * Ntr * T["tokens"] * S["width"] * (S["width"] + T["width"])
                        agg["train_s"][method] += secs
                        agg["train_bound"][method][b_tr] = agg["train_bound"][method].get(b_tr, 0) + 1
                        # evaluation: export (tail forward over train + val), probe, head, distances
                        fwd = cost.step_forward(T, tail, extra)
                        t_exp, _ = _bound(compute=fwd, read=bl_s / cost.read,
                                          write=exp_img / cost.write_rate("none"))
                        e = (Ntr + Nva) * t_exp + (Ntr + Nva) * exp_img / cost.read
                        e += Nva * (bl_s + bl_t + exp_img + fin_t) / cost.read
                        if method in ("tlt", "ffm_tlt"):
                            e += Nva * exp_img / cost.read
                        agg["eval_s"] += e
                        agg["export_bytes"] += (Ntr + Nva) * exp_img
                        agg["largest_export"] = max(agg["largest_export"], (Ntr + Nva) * exp_img)
                        agg["checkpoint_bytes"] += 4 * _stitch_params(family, S, T, mlp_hidden, rank)
        for name in used:  # base-model probes: read the final tokens of train + val
            agg["probe_s"] += (Ntr + Nva) * shapes[name]["bytes_per_layer_image"] / cost.read
        ds_rows = [r for r in rows if r["dataset"] == d]
        agg["feature_bytes"] = sum(r["bytes"] for r in ds_rows)
        agg["extract_s"] = sum(r["gpu_seconds"] for r in ds_rows)
        agg["images"] = {"train": info[d, "train"]["images"], "val": info[d, "val"]["images"]}
        agg["total_s"] = agg["extract_s"] + sum(agg["train_s"].values()) + agg["eval_s"] + agg["probe_s"]
        per_ds[d] = agg
    if lstsq_flops:
        notes.append(f"linear_lstsq: the least-squares sums (X^T X, X^T Y) take {lstsq_flops / 1e12:.0f} TFLOP "
                     "in float64 in total; stitch/lstsq.py accumulates them on the host CPU, not in these GPU-h")

    # pretraining (models the workflow trains itself): ~3 forwards per image (fwd + bwd with weight grads)
    pretrain_s = 0.0
    for name in used:
        p = cfg["models"][name].get("pretrain")
        if p:
            pds = dict(cfg["datasets"][p["dataset"]], name=p["dataset"])
            Np = split_size(pds, p.get("split", "pretrain")) or 0
            views = 2 if p.get("objective") == "simclr" else 1
            pretrain_s += int(p.get("epochs", 4)) * Np * views * 3 * cost.forward(shapes[name])

    n_grid = len(pairs) * len(layers_) * len(stitches) * len(methods)
    jobs = {"pretrain": sum(1 for m in used if cfg["models"][m].get("pretrain")),
            "extract": len(ds_names) * len(used) * 2, "probe": len(ds_names) * len(used),
            "train": len(ds_names) * n_grid, "evaluate": len(ds_names) * n_grid, "table": 1, "plot": 1}
    gpu = {"extract": sum(a["extract_s"] for a in per_ds.values()) / 3600,
           "train": {m: sum(a["train_s"][m] for a in per_ds.values()) / 3600 for m in methods},
           "evaluate": sum(a["eval_s"] + a["probe_s"] for a in per_ds.values()) / 3600,
           "pretrain": pretrain_s / 3600}
    gpu["total"] = gpu["extract"] + sum(gpu["train"].values()) + gpu["evaluate"] + gpu["pretrain"]
    return {"rows": rows, "datasets": per_ds, "shapes": shapes, "jobs": jobs, "gpu_hours": gpu,
            "feature_bytes": sum(r["bytes"] for r in rows),
            "export_bytes": sum(a["export_bytes"] for a in per_ds.values()),
            "keep_exports": bool((cfg.get("evaluate") or {}).get("keep_exports", True)),
            "largest_export": max((a["largest_export"] for a in per_ds.values()), default=0),
            "checkpoint_bytes": sum(a["checkpoint_bytes"] for a in per_ds.values()),
            "extract_seconds": sum(r["seconds"] for r in rows) if do_measure else None,
            "stitch_jobs": len(ds_names) * n_grid, "device": str(dev) if dev is not None else None,
            "reference": {"name": cost.name, "device": cost.ref["device"], "source": cost.ref["source"],
                          "ffm_fit": cost.fit, "forward_over_fwd_bwd": cost.fwd_ratio},
            "compressor": compressor, "dtype": dtype, "epochs_x_lrs": epochs, "notes": notes,
            "unknown_sizes": [f"{d}/{s}" for (d, s), i in info.items() if i["images"] is None]}


def _stitch_params(family: str, S: dict, T: dict, hidden, rank: int) -> int:
    """Trainable parameters of a stitch layer (the checkpoint holds these in float32)."""
    ds, dt = S["width"], T["width"]
    if family == "linear":
        return ds * dt + dt
    if family == "mlp":
        h = int(hidden or dt)
        return ds * h + h + h * dt + dt
    if family == "lora":  # A (r x in) and B (out x r) on qkv, proj, fc1, fc2; + width projection
        hid = int(round(S["mlp_ratio"] * ds))
        lora = rank * ((ds + 3 * ds) + (ds + ds) + (ds + hid) + (hid + ds))
        return lora + (ds * dt + dt if ds != dt else 0)
    return ds * dt + dt


# ---- printing ----------------------------------------------------------------------------------
def _h(seconds_or_hours: float, hours: bool = False) -> str:
    h = seconds_or_hours if hours else seconds_or_hours / 3600
    return f"{h:.2f}" if h < 10 else f"{h:.1f}" if h < 100 else f"{h:.0f}"


def print_plan(p: dict) -> None:
    ref = p["reference"]
    unk = set(p["unknown_sizes"])
    mark = " (+?)" if unk else ""
    print(f"GPU time: estimated for the reference '{ref['name']}' ({ref['device']}); source: {ref['source']}")
    local = p["extract_seconds"] is not None
    print(f"\nfeature stores ({p['dtype']}, compressor {p['compressor']}): one per dataset x model x split")
    head = (f"{'dataset':10} {'model':12} {'split':5} {'images':>7} {'arrays':>6} {'per image':>10} {'store':>10} "
            f"{'GPU-h':>6} {'bound':>7}")
    print(head + (f" {'local img/s':>11}" if local else ""))
    for r in p["rows"]:
        imgs = r["images"] if r["images"] is not None else "?"
        line = (f"{r['dataset']:10} {r['model']:12} {r['split']:5} {imgs:>7} {r['layers']:>6} "
                f"{human(r['bytes_per_image']):>10} {human(r['bytes']):>10} {_h(r['gpu_seconds']):>6} {r['bound']:>7}")
        if local:
            line += f" {r['images_per_s']:>11.1f}"
        print(line)
    print(f"{'total':48} {human(p['feature_bytes']):>10}{mark} {_h(p['gpu_hours']['extract'], True):>6}")
    if local:
        print(f"this machine ({p['device']}): extraction forward alone about {p['extract_seconds'] / 3600:.2f} h "
              "(measured img/s above; no disk)")

    methods = list(p["gpu_hours"]["train"])
    print(f"\nGPU-h per dataset (training: UPPER BOUND, every lr of the grid runs max_epochs = "
          f"{p['epochs_x_lrs']} epochs in all; early stopping ends sooner)")
    print(f"{'dataset':10} {'train/val':>13} {'features':>10} {'exports':>10} {'ckpts':>9} {'extract':>7} "
          + " ".join(f"{m:>7}" for m in methods) + f" {'eval':>7} {'total':>7}")
    for d, a in p["datasets"].items():
        tv = "/".join(str(a["images"][s]) if a["images"][s] is not None else "?" for s in ("train", "val"))
        print(f"{d:10} {tv:>13} {human(a['feature_bytes']):>10} {human(a['export_bytes']):>10} "
              f"{human(a['checkpoint_bytes']):>9} {_h(a['extract_s']):>7} "
              + " ".join(f"{_h(a['train_s'][m]):>7}" for m in methods)
              + f" {_h(a['eval_s'] + a['probe_s']):>7} {_h(a['total_s']):>7}")
    g = p["gpu_hours"]
    print(f"{'total':10} {'':>13} {human(p['feature_bytes']):>10} {human(p['export_bytes']):>10} "
          f"{human(p['checkpoint_bytes']):>9} {_h(g['extract'], True):>7} "
          + " ".join(f"{_h(g['train'][m], True):>7}" for m in methods)
          + f" {_h(g['evaluate'], True):>7} {_h(g['total'] - g['pretrain'], True):>7}")
    bounds = []
    for m in methods:
        c = {}
        for a in p["datasets"].values():
            for k, v in a["train_bound"][m].items():
                c[k] = c.get(k, 0) + v
        bounds.append(f"{m} " + ("/".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"))
    print("training step bound (jobs): " + "; ".join(bounds)
          + ("; lfm jobs declare no GPU in the workflow (cache reads): their hours can overlap the others"
             if "lfm" in methods else ""))
    if g["pretrain"]:
        print(f"pretraining (rough: 3 forwards per image and view): {_h(g['pretrain'], True)} GPU-h")
    if p.get("keep_exports", True):
        storage = p["feature_bytes"] + p["export_bytes"] + p["checkpoint_bytes"]
        print(f"\nstorage: {human(storage)}{mark} = feature stores {human(p['feature_bytes'])} + stitched exports "
              f"{human(p['export_bytes'])} + stitch checkpoints {human(p['checkpoint_bytes'])}")
    else:
        storage = p["feature_bytes"] + p["checkpoint_bytes"]
        print(f"\nstorage: {human(storage)}{mark} = feature stores {human(p['feature_bytes'])} + stitch checkpoints "
              f"{human(p['checkpoint_bytes'])}; stitched exports ({human(p['export_bytes'])} in all) are removed "
              f"by each evaluate job (evaluate.keep_exports: false): at most {human(p['largest_export'])} per "
              "running job")
    print(f"GPU time: {_h(g['total'], True)} GPU-h{mark} in all, an upper bound (training at max_epochs)")
    jobs = p["jobs"]
    print("jobs per rule: " + ", ".join(f"{k} {v}" for k, v in jobs.items() if v)
          + f" (total {sum(jobs.values())}; extract includes extract_pretrained)")
    fit = ref["ffm_fit"]
    print(f"\nmodel: FFM step t(n) = {fit['a'] * 1e6:.1f} us + {fit['b'] * 1e6:.1f} us x n tail blocks per image "
          f"(fit to {len(fit['points'])} reference points, max error {100 * fit['max_abs_error']:.1f} %); "
          f"forward / fwd+bwd per block {ref['forward_over_fwd_bwd']:.2f}; other models scaled by FLOPs "
          "(docs/stages/extract.md, 'Planning')")
    for note in p["notes"]:
        print(f"note: {note}")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", default="config.yaml")
    p.add_argument("--no-measure", action="store_true", help="skip measuring this machine's throughput")
    p.add_argument("--device", default="auto", help="where to measure (auto | cpu | cuda)")
    p.add_argument("--reference", default="h100", choices=sorted(REFERENCES),
                   help="reference accelerator of the GPU-time estimates")


def main(args) -> int:
    print(f"stitchcache plan: {args.configfile}")
    print_plan(plan(load_config(args.configfile), do_measure=not args.no_measure, device=args.device,
                    reference=args.reference))
    return 0
