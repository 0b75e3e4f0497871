"""Evaluating trees from the cache: single trunk VFM vs VST-k vs Full, and the Normalized Gain.

No backbone runs its prefix: every number comes from feature stores.
* single: the trunk's own final tokens (its store's ``final``).
* Full:   the trunk's final tokens + every branch VFM's own final tokens (their stores), fused.
* VST-k:  the trunk's final tokens + each branch's stitched final tokens, computed here from the
          trunk's cached layer-k tokens through that branch's stitch and frozen tail
          (``StitchTree.branch_tokens``), in chunk-sized blocks. Only pooled features are kept.
Fusion for the probe: each branch's tokens are pooled (``probe.pool``: mean of patch tokens or CLS,
per branch with its own prefix count) and the pooled vectors concatenated on channels: what a
linear probe sees of the ``concat`` fusion (for ``interleave``, mean pooling gives the mean of the
branches' means, a linear function of the same features). The branches' outputs are the final
tokens z (select_layer -1, final norm): those are the features the cache stores.
Added cost is counted to the deployed output layer (``select_layer``: with -2 a 24-block ViT-L
counts 23 blocks, the paper's cost model), while the probed features are the final tokens.
The probe is the project's linear probe (standardised features, AdamW, LR grid, early stopping on
the validation split; the score is validation accuracy).

Normalized Gain (paper, Table 12) per metric m: (VST_m - single_m) / (Full_m - single_m); averaged
over the metrics where Full differs from single. The Full row carries ``gain_se``, the paired
standard error of Full − single over the reported images (both probes score the same images in
this job): the report flags a normalized gain whose denominator is within it.
"""
from __future__ import annotations

import math

import torch

from ..cache import iter_batches, open_record, pool_tokens, pooled_features
from ..evaluate.probe import linear_probe
from ..tasks import SEGMENTATION, task_info
from .vst import TreeOptions, resolve_layer, tree_from_checkpoints


def _check_same_images(recs: dict, split: str) -> None:
    digests = {n: (r["store_attrs"]["key_parts"]["dataset"], r["num_images"]) for n, r in recs.items()}
    if len(set(digests.values())) != 1:
        stores = ", ".join(f"{r['model']}: {r['store']}" for r in recs.values())
        raise SystemExit(f"error: tree evaluation, {split} split: the feature stores hold different images ({stores})")


def _open(paths: dict) -> dict:
    out = {}
    for n, p in paths.items():
        rec, store = open_record(p)
        rec["store_attrs"] = dict(store.attrs)
        out[n] = (rec, store)
    return out


def stitched_pooled(tree, store, pool: str, device, batch_size: int = 256) -> list[torch.Tensor]:
    """Pooled features of every non-trunk branch from the trunk's cached layer-k tokens."""
    out = {n: [] for n in tree.names[1:]}
    for (h,) in iter_batches([store.layer(tree.k)], batch_size):
        with torch.no_grad():
            toks = tree.branch_tokens(h.to(device).float())
        for n, t in zip(tree.names[1:], toks[1:]):
            out[n].append(pool_tokens(t, 0 if tree.options.select_feature == "patch" else tree.model(n).num_prefix_tokens,
                                      pool).float().cpu())
    return [torch.cat(v) for v in out.values()]


def evaluate_tree(trunk: dict, branches: dict[str, dict], checkpoints: list[str] | None, settings: dict,
                  device=None) -> list[dict]:
    """trunk / branches[name]: {"train": record path, "val": record path[, "test": record path]}.
    Without checkpoints: the single and Full rows; with the checkpoints of one tree (one per branch,
    same k): the VST-k row. The probes select on val; scores are on test when given, else on val."""
    device = device or torch.device("cpu")
    pool = settings.get("pool", "mean")
    trunk_name = None
    feats, labels, meta = {}, {}, {}
    splits = ("train", "val", "test") if "test" in trunk else ("train", "val")
    report = splits[-1]
    for split in splits:
        paths = {"__trunk__": trunk[split], **{n: b[split] for n, b in branches.items()}}
        opened = _open(paths)
        _check_same_images({n: r for n, (r, _) in opened.items()}, split)
        rec, store = opened["__trunk__"]
        trunk_name = rec["model"]
        info = task_info({**store.attrs, "num_classes": rec.get("num_classes")})
        if info["task"] == SEGMENTATION:
            raise SystemExit(f"error: tree evaluation of {rec['dataset']}: segmentation is not supported "
                             "(the tree probe is a classification probe on pooled features)")
        meta = {"dataset": rec["dataset"], "num_classes": int(rec["num_classes"]), "depths": {}}
        parts = {"trunk": pooled_features(store.final, rec["facts"]["num_prefix_tokens"], pool)}
        for n, (r, s) in opened.items():
            meta["depths"][r["model"]] = r["facts"]["depth"]
            if n != "__trunk__" and not checkpoints:
                parts[n] = pooled_features(s.final, r["facts"]["num_prefix_tokens"], pool)
        if checkpoints:
            tree = tree_from_checkpoints(checkpoints, _layer_of(checkpoints),
                                         TreeOptions(select_feature="cls_patch")).to(device)
            if tree.trunk_name != trunk_name:
                raise SystemExit(f"error: the stitches start at {tree.trunk_name!r}, the trunk features are "
                                 f"{trunk_name!r}")
            for n, f in zip(tree.names[1:], stitched_pooled(tree, store, pool, device)):
                parts[n] = f
            meta["k"], meta["names"] = tree.k, tree.names
        feats[split], labels[split] = parts, torch.from_numpy(store.labels[:])
    probe = {k: v for k, v in settings.items() if k != "select_layer"}

    def score(names):
        x = {s: torch.cat([feats[s][n] for n in names], dim=1) for s in splits}
        test = {"x_te": x["test"], "y_te": labels["test"]} if report == "test" else {}
        return linear_probe(x["train"], labels["train"], x["val"], labels["val"], meta["num_classes"], probe, device,
                            **test)

    others = [n for n in feats["train"] if n != "trunk"]
    # cost at the deployed output layer (select_layer; -2 of 24 blocks = 23, the paper's depth)
    sl = int(settings.get("select_layer", -1))
    depth = resolve_layer(sl, meta["depths"][trunk_name], trunk_name)
    branch_depths = [resolve_layer(sl, meta["depths"][n], n) for n in branches]
    base = {"dataset": meta["dataset"], "trunk": trunk_name, "branches": list(branches), "vfms": 1 + len(branches),
            "pool": pool, "metric": "accuracy", "split": report, "select_layer": sl,
            "features": "final tokens (layer L, final norm) from the cache"}
    if not checkpoints:
        single, full = score(["trunk"]), score(["trunk", *others])
        return [{**base, "config": "single", "k": None, "score": single["probe_acc"], "probe_lr": single["lr"],
                 "added_cost": 0.0},
                {**base, "config": "full", "k": None, "score": full["probe_acc"], "probe_lr": full["lr"],
                 "added_cost": sum(branch_depths) / depth, "gain_se": paired_se(single, full)}]
    k = meta["k"]
    vst = score(["trunk", *others])
    return [{**base, "config": f"vst{k}", "k": k, "score": vst["probe_acc"], "probe_lr": vst["lr"],
             "added_cost": sum(d - k for d in branch_depths) / depth,
             "checkpoints": [str(c) for c in checkpoints]}]


def paired_se(a: dict, b: dict) -> float | None:
    """Standard error over the reported images of the accuracy difference b − a of two probes scored on
    the same images: std_i(c_b,i − c_a,i) / sqrt(n), c = 1 where the image is classified right (the
    test split's noise of Full − single; None below two images)."""
    pa, pb = a["predictions"], b["predictions"]
    d = (pb["pred_probe"] == pb["label"]).astype(float) - (pa["pred_probe"] == pa["label"]).astype(float)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None


def _layer_of(checkpoints) -> int:
    from ..stitch.model import load_checkpoint

    layers = {int(load_checkpoint(c)["spec"]["layer"]) for c in checkpoints}
    if len(layers) != 1:
        raise SystemExit(f"error: one tree's stitches share one stitch point; got layers {sorted(layers)}")
    return layers.pop()


def normalized_gain(single: list[float], full: list[float], vst: list[float]) -> dict:
    """Per metric (VST - single) / (Full - single) (None where Full == single) and their mean."""
    per = [None if math.isclose(f, s) else (v - s) / (f - s) for s, f, v in zip(single, full, vst)]
    ok = [g for g in per if g is not None]
    return {"per_metric": per, "mean": sum(ok) / len(ok) if ok else None}
