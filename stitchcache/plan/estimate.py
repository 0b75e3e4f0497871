"""``plan(cfg)``: bytes, jobs and GPU time of an experiment, from the models' shapes and the split
sizes (the formulas: the package doc)."""
from __future__ import annotations

import gc
from pathlib import Path

import yaml

from ..backends.check import ModelCheckError
from ..cache.keys import token_settings
from ..config_checks import ConfigError, ConfigErrors
from ..grid import method_lr_grid, stitch_seeds
from .cost import ITEMSIZE, LABEL_BYTES, ORDER_BYTES, SCALE_BYTES, SEGMENTATION_TYPES, TRAIN_METHODS, CostModel, _bound
from .shapes import build_random_init, measure, model_shape


# ---- configuration, data ----------------------------------------------------------------------
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def load_config(path: str | Path) -> dict:
    """The config with the schema's defaults filled in (the same validation Snakemake runs).

    Raises ``ConfigErrors`` listing every schema error (not only the first), each with its key."""
    from snakemake.utils import validate

    from ..config_checks import ConfigErrors, schema_errors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    cfg = yaml.safe_load(path.read_text())
    if SCHEMA.exists():
        errors = schema_errors(cfg, SCHEMA)
        if errors:
            raise ConfigErrors(errors, str(path))
        validate(cfg, str(SCHEMA))  # fills in the defaults
    return cfg


def split_info(dataset: dict, split: str) -> dict:
    """``{images, source, note, task, num_classes}``: the size from the data when it opens, else the
    split's ``count:`` (source 'count'), else None (source None, with the reason in ``note``)."""
    from ..data.base import CLASSIFICATION, SEGMENTATION

    s = (dataset.get("splits") or {}).get(split) or {}
    task = SEGMENTATION if dataset.get("type") in SEGMENTATION_TYPES else CLASSIFICATION
    try:
        from ..data import open_split

        data = open_split(dataset, split)
        return {"images": len(data), "source": "data", "note": None, "task": getattr(data, "task", task),
                "num_classes": getattr(data, "num_classes", None)}
    except Exception as e:  # missing files, unknown type, ...: a plan never needs the data
        reason = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    from ..data.holdout import planned_size

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
        from ..stitch.choices import parse_choice

        return parse_choice(choice)
    except ImportError:
        return (choice[: -len("_lstsq")], "lstsq") if choice.endswith("_lstsq") else (choice, "default")


# ---- the plan ----------------------------------------------------------------------------------
def plan(cfg: dict, do_measure: bool = True, device: str = "auto", reference: str = "h100") -> dict:
    from ..extract import resolve_layers
    from ..runtime import pick_device

    cost = CostModel(reference)
    dev = pick_device(device) if do_measure else None
    st = cfg["stitch"]
    ex = cfg.get("extract") or {}
    tr = cfg.get("train") or {}
    ds_names = stitch_datasets(st)
    used = [m for m in cfg["models"] if any(m in p for p in st["pairs"])]
    dtype = token_settings(ex)["dtype"]
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
        try:
            bb = build_random_init(name, m, cfg.get("weights_root"), meta=not do_measure)
        except ModelCheckError as e:  # e.g. an HF model whose config.json is in its (missing) weights folder
            raise ConfigErrors([ConfigError(f"models.{name}.{e.field}", f"model {name!r}: {e.message}")]) from None
        layers = resolve_layers(token_settings(ex)["layers"], bb.depth)
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
    epochs_of = {m: int(tr.get("max_epochs", 100)) * len(method_lr_grid(tr, m)) for m in TRAIN_METHODS}
    epochs = max(epochs_of.values())
    n_seeds = len(stitch_seeds(cfg))  # every stitch trains and evaluates once per seed
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
                        secs = epochs_of[method] * (Ntr * t_tr + Nva * t_va)
                        if init == "lstsq" and method != "ffm_tlt":  # one pass over the training split
                            secs += Ntr * (bl_s + bl_t) / cost.read
                            lstsq_flops += 2.0 * Ntr * T["tokens"] * S["width"] * (S["width"] + T["width"])
                        agg["train_s"][method] += n_seeds * secs
                        agg["train_bound"][method][b_tr] = agg["train_bound"][method].get(b_tr, 0) + 1
                        # evaluation: export (tail forward over train + val), probe, head, distances
                        fwd = cost.step_forward(T, tail, extra)
                        t_exp, _ = _bound(compute=fwd, read=bl_s / cost.read,
                                          write=exp_img / cost.write_rate("none"))
                        e = (Ntr + Nva) * t_exp + (Ntr + Nva) * exp_img / cost.read
                        e += Nva * (bl_s + bl_t + exp_img + fin_t) / cost.read
                        if method in ("tlt", "ffm_tlt"):
                            e += Nva * exp_img / cost.read
                        agg["eval_s"] += n_seeds * e
                        agg["export_bytes"] += n_seeds * (Ntr + Nva) * exp_img
                        agg["largest_export"] = max(agg["largest_export"], (Ntr + Nva) * exp_img)
                        agg["checkpoint_bytes"] += n_seeds * 4 * _stitch_params(family, S, T, mlp_hidden, rank)
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

    n_grid = len(pairs) * len(layers_) * len(stitches) * len(methods) * n_seeds
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

