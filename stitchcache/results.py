"""Using results from Python: find the feature store of (config, dataset, model, split).

``find_store(config, dataset, model, split)`` computes where the workflow keeps that store's record
(exactly as ``workflow/rules/common.smk``'s ``feature_record`` does) instead of globbing the records
folder, so a store of other settings (another dataset manifest, weights, layers, dtype or library
versions) is never picked up by mistake:

  models with fixed weights   <cache_root>/records/<dataset>/<model>/<split>-<request key>.json
  models the workflow trains  <workdir>/results/features/<dataset>/<model>/<split>.json

``config``: an experiment config file or dict, complete as the workflow sees it (it is validated
against the workflow's schema, which fills in the defaults). Relative paths (``cache_root``, the
``results/`` folder) are taken from ``workdir``, the workflow directory (default: the current one).
"""
from __future__ import annotations

import os
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_config(config: str | os.PathLike | dict) -> dict:
    """A config file or dict, validated and with the schema's defaults filled in (a copy)."""
    import copy

    import yaml
    from snakemake.utils import validate

    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
    else:
        p = Path(config)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        cfg = yaml.safe_load(p.read_text()) or {}
    validate(cfg, schema=str(SCHEMA))  # raises naming the offending key; fills in defaults
    return cfg


def record_path(config: str | os.PathLike | dict, dataset: str, model: str, split: str,
                workdir: str | os.PathLike | None = None) -> Path:
    """Where the workflow writes the feature record of (dataset, model, split)."""
    from .inputs import concrete_model_spec, request_key

    cfg = load_config(config)
    wd = Path(workdir or ".")
    if dataset not in cfg["datasets"]:
        raise KeyError(f"datasets.{dataset}: no such dataset in the config (datasets: {', '.join(cfg['datasets'])})")
    if model not in cfg["models"]:
        raise KeyError(f"models.{model}: no such model in the config (models: {', '.join(cfg['models'])})")
    splits = cfg["datasets"][dataset]["splits"]
    if split not in splits:
        raise KeyError(f"datasets.{dataset}.splits.{split}: no such split (splits: {', '.join(splits)})")
    m = cfg["models"][model]
    if "pretrain" in m:
        return wd / "results" / "features" / dataset / model / f"{split}.json"
    spec = concrete_model_spec(model, m, weights_root=cfg["weights_root"], checkpoint=None)
    key = request_key(spec, {**cfg["datasets"][dataset], "name": dataset}, split, cfg["extract"])
    return wd / cfg["cache_root"] / "records" / dataset / model / f"{split}-{key}.json"


def find_store(config: str | os.PathLike | dict, dataset: str, model: str, split: str,
               workdir: str | os.PathLike | None = None):
    """The finished, read-only ``FeatureStore`` of (dataset, model, split) under ``config``."""
    from .cache import open_record

    path = record_path(config, dataset, model, split, workdir)
    if not path.is_file():
        raise FileNotFoundError(f"no feature store of model {model!r} on {dataset}/{split} for this config yet: "
                                f"its record {str(path)!r} does not exist (run the workflow with this config; "
                                "a changed setting that defines the features means a new store)")
    return open_record(path)[1]
