"""The stitch grid's seeds and the path of one stitch: the one place a stitch wildcard is named.

The workflow (workflow/rules/common.smk) builds every ``results/stitch/...``, log and benchmark
path of a train / evaluate job through ``stitch_dir``, and every seed list through
``stitch_seeds``, so adding a wildcard to the stitch jobs is a change here and nowhere else.

Seeds (config keys):
  seeds  list of distinct ints >= 0; every stitch training and its evaluation run once per seed
         (the seed is a wildcard of train / evaluate and part of their paths: ``.../seed{seed}/``)
  seed   int >= 0 (default 0): the seed of the stages that run once per model / dataset (pretrain,
         extract, base probes), and the only stitch seed when ``seeds`` is not given
"""
from __future__ import annotations

# train / evaluate wildcards, in path order
STITCH_WILDCARDS = ("dataset", "src", "tgt", "layer", "stitch", "method", "seed")
STITCH_DIR = "{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}/seed{seed}"


def stitch_dir(**wildcards) -> str:
    """``{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}/seed{seed}`` of one stitch job.

    Takes exactly the stitch wildcards (pass a job's wildcards through with ``**``); a missing or an
    unknown one is an error naming it, so no caller silently builds a path without the seed."""
    missing = [w for w in STITCH_WILDCARDS if w not in wildcards]
    extra = sorted(set(wildcards) - set(STITCH_WILDCARDS))
    if missing or extra:
        raise TypeError(f"stitch_dir: missing wildcard(s) {missing}, unknown {extra}; "
                        f"a stitch is named by {', '.join(STITCH_WILDCARDS)}")
    return STITCH_DIR.format(**wildcards)


def stitch_pattern() -> str:
    """The same with Snakemake wildcards in braces (rule outputs, logs, benchmarks)."""
    return stitch_dir(**{w: "{" + w + "}" for w in STITCH_WILDCARDS})


def stitch_seeds(cfg: dict) -> list[int]:
    """The seeds every stitch job runs with: ``seeds`` when given, else ``[seed]``."""
    seeds = cfg.get("seeds")  # the schema checks: a non-empty list of distinct ints >= 0
    if seeds is None:
        return [int(cfg.get("seed", 0))]
    return list(seeds)


def once_seed(cfg: dict) -> int:
    """The seed of the stages that run once (pretrain, extract, base probes): ``seed``."""
    return int(cfg.get("seed", 0))


def method_lr_grid(settings: dict, method: str) -> list:
    """The LR grid of a method: ``train.ffm_lr_grid`` for ffm when set, else ``train.lr_grid``."""
    if method == "ffm" and settings.get("ffm_lr_grid"):
        return list(settings["ffm_lr_grid"])
    return list(settings.get("lr_grid", [1e-3]))
