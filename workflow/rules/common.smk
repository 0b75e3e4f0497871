"""Config validation, cross-checks and every helper the rules use (paths, specs, targets).

Rules only reference the functions defined here; no logic lives in the rule files.
"""

import json
import os
import shutil
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from stitchcache.backends.registry import is_registered, list_models
from stitchcache.inputs import (
    concrete_model_spec,
    drop_if_stale,
    missing_inputs,
    missing_report,
    request_key,
    weights_hint,
)


##### validation #####

# JSON Schema 2020-12; fills in the defaults, rejects unknown keys and bad enum values.
validate(config, schema="../schemas/config.schema.yaml")


NAME = "[A-Za-z0-9_]+"
STITCH_SPLITS = ("train", "val")


wildcard_constraints:
    dataset=NAME,
    model=NAME,
    src=NAME,
    tgt=NAME,
    split=NAME,
    layer="[0-9]+",
    stitch="mlp|linear_lstsq|linear|lora",
    method="lfm|ffm|tlt|ffm_tlt",


def _config_error(key, message):
    raise WorkflowError(f"config error at {key}: {message}")


def _check_config(cfg):
    """Checks the schema cannot express; each error names the offending key."""
    datasets, models, st = cfg["datasets"], cfg["models"], cfg["stitch"]
    for i, name in enumerate(st["datasets"]):
        if name not in datasets:
            _config_error(
                f"stitch.datasets[{i}]",
                f"unknown dataset {name!r} (datasets: {', '.join(datasets)})",
            )
        splits = datasets[name]["splits"]
        for split in STITCH_SPLITS:
            if split not in splits:
                _config_error(
                    f"datasets.{name}.splits",
                    f"the stitch dataset needs a split named {split!r} (has: {', '.join(splits)})",
                )
    for name, m in models.items():
        if ":" not in m["backbone"] and not is_registered(m["backbone"]):
            _config_error(
                f"models.{name}.backbone",
                f"{m['backbone']!r} is neither 'library:architecture' nor a registry model "
                f"(registry: {', '.join(list_models())})",
            )
    for i, pair in enumerate(st["pairs"]):
        for j, name in enumerate(pair):
            if name not in models:
                _config_error(
                    f"stitch.pairs[{i}][{j}]",
                    f"unknown model {name!r} (models: {', '.join(models)})",
                )
    for name, m in models.items():
        pre = m.get("pretrain")
        if pre is None:
            continue
        if m.get("checkpoint") is not None:
            _config_error(
                f"models.{name}.checkpoint",
                "a model with `pretrain:` gets its checkpoint from the pretrain stage; set checkpoint: null",
            )
        if pre["dataset"] not in datasets:
            _config_error(
                f"models.{name}.pretrain.dataset",
                f"unknown dataset {pre['dataset']!r} (datasets: {', '.join(datasets)})",
            )
        if pre["split"] not in datasets[pre["dataset"]]["splits"]:
            _config_error(
                f"models.{name}.pretrain.split",
                f"dataset {pre['dataset']!r} has no split {pre['split']!r} "
                f"(has: {', '.join(datasets[pre['dataset']]['splits'])})",
            )
    for name in stitched_models(cfg):
        depth = models[name]["kwargs"].get("depth")
        if isinstance(depth, int):
            for i, layer in enumerate(st["layers"]):
                if not 1 <= layer <= depth - 1:
                    _config_error(
                        f"stitch.layers[{i}]",
                        f"layer {layer} is outside 1..{depth - 1} for model {name!r} (kwargs.depth: {depth})",
                    )
    wanted = cfg["extract"]["layers"]
    if wanted != "all":
        missing = sorted(set(st["layers"]) - set(wanted))
        if missing:
            _config_error(
                "extract.layers",
                f"stitch layers {missing} are not extracted (extract.layers: {wanted})",
            )


##### the experiment grid #####


def stitched_models(cfg=config):
    """Models that appear in a pair, in config order."""
    used = {name for pair in cfg["stitch"]["pairs"] for name in pair}
    return [name for name in cfg["models"] if name in used]


def pretrained_models():
    return [name for name, m in config["models"].items() if "pretrain" in m]


def stitch_pairs():
    """Ordered (source, target) pairs: the configured ones, then S->S / T->T controls."""
    pairs = [tuple(p) for p in config["stitch"]["pairs"]]
    if config["stitch"]["self_stitch"]:
        pairs += [(m, m) for m in stitched_models()]
    return list(dict.fromkeys(pairs))  # de-duplicate, keep order


def stitch_datasets():
    return config["stitch"]["datasets"]


##### paths #####

def stitch_path(name, dataset, src, tgt, layer, stitch, method):
    """A file of one trained stitch: checkpoint.pt, train.json or eval.json."""
    return f"results/stitch/{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}/{name}"


def output_dir(wildcards, output):
    """table / plot: the folder their outputs go to (--out-dir)."""
    return os.path.dirname(output[0])


##### models and feature records #####


def model_spec(name):
    """A model's concrete spec {name, backbone, kwargs, checkpoint}: registry names resolved to
    their weights under weights_root, the pretrain output as checkpoint for pretrained models."""
    if name not in _MODEL_SPECS:
        m = config["models"][name]
        ckpt = f"results/models/{name}.pt" if "pretrain" in m else None
        _MODEL_SPECS[name] = concrete_model_spec(name, m, weights_root=config["weights_root"], checkpoint=ckpt)
    return _MODEL_SPECS[name]


_MODEL_SPECS = {}


def dataset_entry(name):
    return {**config["datasets"][name], "name": name}


def records_root():
    return f"{cache_root()}/records"


def record_pattern():
    """extract: where records of fixed-weight models go (in the cache root, by request key)."""
    return os.path.join(records_root(), "{dataset}", "{model}", "{split}-{request}.json")


def cache_root_of_record(wildcards, output):
    """extract: the cache root holding output.record (<root>/records/<dataset>/<model>/<file>)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(output.record))))


def feature_record(dataset, model, split):
    """The record (small JSON) of one feature store.

    Models with fixed weights (a file, registry weights, random init): in the shared cache root
    under a request key over weights digest, data manifest, layers, dtype and library versions,
    so another experiment pointing at the same cache root finds it and schedules no extraction.
    Models this workflow pretrains: in results/features (their weights do not exist before the
    run); their store is still content-keyed and shared, the job just finds it."""
    if "pretrain" in config["models"][model]:
        return f"results/features/{dataset}/{model}/{split}.json"
    if (dataset, model, split) not in _RECORDS:
        key = request_key(model_spec(model), dataset_entry(dataset), split, config["extract"])
        record = f"{records_root()}/{dataset}/{model}/{split}-{key}.json"
        if drop_if_stale(record):
            print(f"stitchcache: {record} named a missing or incomplete store; removed it, so "
                  "the extraction runs again", file=sys.stderr)
        _RECORDS[dataset, model, split] = record
    return _RECORDS[dataset, model, split]


_RECORDS = {}


def features(role, split):
    """Input function: the feature record of the model in wildcard `role` (model, src, tgt)."""

    def record(wildcards):
        return feature_record(wildcards.dataset, wildcards[role], split)

    record.__name__ = f"features_{role}_{split}"
    return record


##### input functions #####


def pretrained_checkpoint(wildcards):
    """extract_pretrained: the workflow's own weights (so new weights re-extract)."""
    return model_spec(wildcards.model)["checkpoint"]


def ffm_init_input(wildcards):
    """train: ffm_tlt starts from the ffm checkpoint of the same pair/layer/stitch."""
    if wildcards.method != "ffm_tlt":
        return []
    return [stitch_path("checkpoint.pt", **{**dict(wildcards.items()), "method": "ffm"})]


def init_arg(wildcards, input):
    return f"--init {input.init}" if input.init else ""


def all_evals():
    return [
        stitch_path("eval.json", dataset=dataset, src=src, tgt=tgt, layer=layer, stitch=stitch, method=method)
        for dataset in stitch_datasets()
        for src, tgt in stitch_pairs()
        for layer in config["stitch"]["layers"]
        for stitch in config["stitch"]["stitch_layers"]
        for method in config["stitch"]["methods"]
    ]


def all_probes():
    return [f"results/probes/{dataset}/{m}.json" for dataset in stitch_datasets() for m in stitched_models()]


def all_targets():
    return [
        "results/table.parquet",
        "results/table.md",
        "results/table.csv",
        "results/paper_tables.md",
        "results/plots/accuracy.png",
        "results/plots/distances.png",
    ] + tree_targets()


##### params: JSON handed to the CLI (exactly the config the stage depends on) #####


def _settings(section):
    return json.dumps({**section, "seed": config["seed"], "device": config["device"]}, sort_keys=True)


def _dataset_spec(name, split):
    """A dataset entry plus its name, with only the split the job reads (so editing another split
    re-runs nothing)."""
    d = config["datasets"][name]
    spec = {k: v for k, v in d.items() if k != "splits"}
    spec.update(name=name, splits={split: d["splits"][split]})
    return json.dumps(spec, sort_keys=True)


def model_spec_param(wildcards):
    return json.dumps(model_spec(wildcards.model), sort_keys=True)


def pretrain_model_spec_param(wildcards):
    m = config["models"][wildcards.model]
    spec = {"name": wildcards.model, "backbone": m["backbone"], "kwargs": m["kwargs"], "checkpoint": None}
    return json.dumps(spec, sort_keys=True)


def pretrain_dataset_param(wildcards):
    pre = config["models"][wildcards.model]["pretrain"]
    return _dataset_spec(pre["dataset"], pre["split"])


def pretrain_settings_param(wildcards):
    return _settings(config["models"][wildcards.model]["pretrain"])


def extract_dataset_param(wildcards):
    return _dataset_spec(wildcards.dataset, wildcards.split)


def extract_settings_param(wildcards):
    return _settings(config["extract"])


def probe_settings_param(wildcards):
    return _settings(config["probe"])


def train_settings_param(wildcards):
    return _settings(config["train"])


def evaluate_settings_param(wildcards):
    return json.dumps({"probe": config["probe"], "keep_exports": config["evaluate"]["keep_exports"],
                       "seed": config["seed"], "device": config["device"]}, sort_keys=True)


def cache_root():
    return config["cache_root"]


##### resources #####


def accelerator_in_use():
    """Whether backbone jobs declare gpu=1: `gpu_jobs: true|false` decides outright; with
    `gpu_jobs: auto` (default), `device: cuda`, or `device: auto` on a machine that shows a GPU.
    Without one, `gpu` resources are 0 so CPU-only machines run those jobs side by side.
    (On a cluster whose submit host has no GPU, set `device: cuda` or `gpu_jobs: true`.)"""
    if config["gpu_jobs"] != "auto":
        return bool(config["gpu_jobs"])
    device = config["device"]
    if device != "auto":
        return device == "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return shutil.which("nvidia-smi") is not None


GPU = 1 if accelerator_in_use() else 0


def gpu_resource(wildcards):
    """pretrain, extract, evaluate: run a backbone."""
    return GPU


def train_gpu(wildcards):
    """lfm trains from the cache alone; the other methods run the target tail on the accelerator."""
    return 0 if wildcards.method == "lfm" else GPU


def train_mem_mb(wildcards):
    return 2000 if wildcards.method == "lfm" else 4000


##### job groups (cluster only; local runs ignore groups) #####

# Many CPU jobs of seconds to minutes (lfm training, probes). The SLURM profile bundles them with
# `group-components: small=<n>`, so a cluster gets one submission per n of them. (table and plot
# stay out: grouped with the probes they would make Snakemake's readiness check scan their
# thousands of inputs for every finished job.)
SMALL_GROUP = "small"


def train_group(wildcards):
    return SMALL_GROUP if wildcards.method == "lfm" else None


##### wildcard constraints #####


def _alternatives(names):
    return "|".join(names) if names else "(?!x)x"  # (?!x)x never matches


def pretrain_model_regex():
    return _alternatives(pretrained_models())


def fixed_model_regex():
    """Models whose weights exist before the run (their records live in the cache root)."""
    return _alternatives([m for m in config["models"] if m not in pretrained_models()])


##### missing weights and data #####


def _missing_inputs():
    """Weights of the stitched models and the datasets they read, where absent."""
    models = {}
    for name in stitched_models():
        spec = model_spec(name)
        if "pretrain" not in config["models"][name] and spec["checkpoint"] is not None:
            models[name] = {**spec, "hint": weights_hint(config["models"][name], spec["checkpoint"])}
    datasets = {name: (dataset_entry(name), list(STITCH_SPLITS)) for name in stitch_datasets()}
    for name in pretrained_models():
        pre = config["models"][name]["pretrain"]
        entry = datasets.setdefault(pre["dataset"], (dataset_entry(pre["dataset"]), []))
        entry[1].append(pre["split"])
    return missing_inputs(models, datasets)




##### VFM Stitch Trees (workflow/rules/tree.smk; logic in stitchcache/tree/config.py) #####

from stitchcache.tree.config import check_trees, resolve_trees

TREES = resolve_trees(config)


def tree_stitches(wildcards, dataset=None, layer=None):
    """The tree's stitch checkpoints trunk -> branch (branch order), through stitch_path with every
    wildcard passed on (only `tree` is the tree's own)."""
    t = TREES[wildcards.tree]
    base = {k: v for k, v in dict(wildcards.items()).items() if k != "tree"}
    base.update(dataset=dataset or base.get("dataset"), layer=layer if layer is not None else base.get("layer"),
                src=t["trunk"], stitch=t["stitch"], method=t["method"])
    return [stitch_path("checkpoint.pt", **{**base, "tgt": b}) for b in t["branches"]]


def tree_cost_stitches(wildcards):
    """tree_cost: the stitches of every split point, on the tree's first dataset (weights do not
    change the cost)."""
    t = TREES[wildcards.tree]
    return [c for k in t["layers"] for c in tree_stitches(wildcards, dataset=t["datasets"][0], layer=k)]


def tree_trunk_record(split):
    def record(wildcards):
        return feature_record(wildcards.dataset, TREES[wildcards.tree]["trunk"], split)

    record.__name__ = f"tree_trunk_{split}"
    return record


def tree_branch_records(split):
    def records(wildcards):
        return [feature_record(wildcards.dataset, b, split) for b in TREES[wildcards.tree]["branches"]]

    records.__name__ = f"tree_branches_{split}"
    return records


def tree_evals(tree):
    t = TREES[tree]
    return [f"results/tree/{tree}/{d}/{name}.json" for d in t["datasets"]
            for name in ["base"] + [f"vst{k}" for k in t["layers"]]]


def tree_evals_of(wildcards):
    return tree_evals(wildcards.tree)


def all_tree_evals():
    return [e for tree in TREES for e in tree_evals(tree)]


def tree_branches_arg(wildcards):
    return " ".join(TREES[wildcards.tree]["branches"])


def tree_options_arg(wildcards):
    t = TREES[wildcards.tree]
    return (f"--fusion {t['fusion']} --select-layer {t['select_layer']} "
            f"--select-feature {t['select_feature']} --final-norm {t['final_norm']}")


def tree_settings_param(wildcards):
    t = TREES[wildcards.tree]
    return json.dumps({**config["probe"], "select_layer": t["select_layer"], "seed": config["seed"],
                       "device": config["device"]}, sort_keys=True)


def tree_targets():
    if not TREES:
        return []
    out = ["results/tree/plan.md"]
    for tree, t in TREES.items():
        out += [f"results/tree/{tree}/tree_table.md", f"results/tree/{tree}/tree_knob.png"]
        if config["tree"]["cost"]:
            out.append(f"results/tree/{tree}/cost.md")
        if config["tree"]["export"]:
            out += [f"results/tree/{tree}/{d}/vst{k}.pt" for d in t["datasets"] for k in t["layers"]]
    return out


def _check_trees():
    for key, message in check_trees(config):
        _config_error(key, message)


_check_config(config)
_check_trees()

# Missing weights / data: reported while planning (dry runs too), fatal before a real run starts.
MISSING = _missing_inputs() if workflow.is_main_process else []
if MISSING:
    print(missing_report(MISSING), file=sys.stderr)


onstart:
    if MISSING:
        raise WorkflowError(
            f"stopped before any job: {len(MISSING)} input(s) missing (listed above with how to "
            "provide them; `snakemake -n` lists them without running anything)"
        )
