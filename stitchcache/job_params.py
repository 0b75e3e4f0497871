"""What each Snakemake job is handed: the JSON settings and specs its params carry, and its resources.

A job's params are exactly the config it depends on — no more (editing an unrelated key re-runs
nothing: Snakemake reruns a job whose params changed) and no less (every result records them as its
provenance and consumers compare them, provenance.py). ``workflow/rules/common.smk`` calls these with
the validated, schema-filled config; they are plain functions of it, unit-tested in
tests/test_job_params.py.
"""
from __future__ import annotations

import json
import os
import shutil

from .data.holdout import related_splits
from .grid import once_seed, stitch_seeds


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def settings(cfg: dict, section: dict, seed=None) -> str:
    """A config section plus seed (default: ``seed``, the seed of the once-per-model stages) and device."""
    seed = once_seed(cfg) if seed is None else int(seed)
    return dumps({**section, "seed": seed, "device": cfg["device"]})


def dataset_spec(cfg: dict, name: str, split: str) -> str:
    """A dataset entry plus its name, with only the split the job reads and the splits deciding its
    images (a holdout and the split it holds out of), so editing another split re-runs nothing."""
    d = cfg["datasets"][name]
    spec = {k: v for k, v in d.items() if k != "splits"}
    spec.update(name=name, splits={s: d["splits"][s] for s in related_splits(d["splits"], split, name)})
    return dumps(spec)


def pretrain_model_spec(cfg: dict, model: str) -> str:
    """The architecture a pretrain job trains: random init (no checkpoint)."""
    m = cfg["models"][model]
    return dumps({"name": model, "backbone": m["backbone"], "kwargs": m["kwargs"], "checkpoint": None})


def pretrain_dataset(cfg: dict, model: str) -> str:
    pre = cfg["models"][model]["pretrain"]
    return dataset_spec(cfg, pre["dataset"], pre["split"])


def pretrain_settings(cfg: dict, model: str) -> str:
    """The model's pretrain section plus extract.view: pretraining reads the view's extraction stores
    (pretrain.py), so a changed view re-pretrains."""
    return settings(cfg, {**cfg["models"][model]["pretrain"], "view": cfg["extract"]["view"]})


def extract_settings(cfg: dict) -> str:
    return settings(cfg, cfg["extract"])


def probe_settings(cfg: dict) -> str:
    return settings(cfg, cfg["probe"])


def train_settings(cfg: dict, seed) -> str:
    """The train section with the job's own seed (the wildcard)."""
    return settings(cfg, cfg["train"], seed=seed)


def evaluate_settings(cfg: dict, seed) -> str:
    """``train``: the settings the checkpoint must have been trained with (evaluate checks them)."""
    return dumps({"probe": cfg["probe"], "keep_exports": cfg["evaluate"]["keep_exports"], "seed": int(seed),
                  "device": cfg["device"], "train": json.loads(train_settings(cfg, seed))})


def table_settings(cfg: dict) -> str:
    """The settings every eval.json / probe JSON must have been produced with (the table checks): the
    train section without its seed, which must be one of ``seeds``."""
    return dumps({"train": {**cfg["train"], "device": cfg["device"]}, "seeds": stitch_seeds(cfg),
                  "probe": cfg["probe"], "probe_job": json.loads(probe_settings(cfg))})


# ---- resources ---------------------------------------------------------------------------------
def accelerator_in_use(cfg: dict, environ=os.environ, which=shutil.which) -> bool:
    """Whether backbone jobs declare gpu=1: ``gpu_jobs: true|false`` decides outright; with
    ``gpu_jobs: auto`` (default), ``device: cuda``, or ``device: auto`` on a machine that shows a GPU
    (nvidia-smi on the PATH and CUDA_VISIBLE_DEVICES not empty / -1). Without one, ``gpu`` resources
    are 0 so CPU-only machines run those jobs side by side. (On a cluster whose submit host has no
    GPU, set ``device: cuda`` or ``gpu_jobs: true``.)"""
    if cfg["gpu_jobs"] != "auto":
        return bool(cfg["gpu_jobs"])
    if cfg["device"] != "auto":
        return cfg["device"] == "cuda"
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return which("nvidia-smi") is not None


def train_gpu(method: str, gpu: int) -> int:
    """lfm trains from the cache alone; the other methods run the target tail on the accelerator."""
    return 0 if method == "lfm" else gpu


def train_mem_mb(method: str) -> int:
    return 2000 if method == "lfm" else 4000
