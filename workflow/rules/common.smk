"""Config validation, cross-checks and every helper the rules use (paths, specs, targets).

Rules only reference the functions defined here; no logic lives in the rule files.
"""

import json
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from stitchcache import job_params
from stitchcache.config_checks import ConfigErrors, check_config
from stitchcache.grid import STITCH_WILDCARDS, stitch_dir, stitch_pattern, stitch_seeds
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
REPORT_SPLIT = "test"   # optional split of a stitch dataset: when present every reported number uses it


wildcard_constraints:
    dataset=NAME,
    model=NAME,
    src=NAME,
    tgt=NAME,
    split=NAME,
    layer="[0-9]+",
    stitch="mlp|linear_lstsq|linear|lora",
    method="lfm|ffm|tlt|ffm_tlt",
    seed="[0-9]+",


def _check_config(cfg):
    """Cross-checks the schema cannot express (stitchcache/config_checks.py): every error at once,
    each naming its config key. The main process also builds the stitched models on the meta device
    (no weights read) and compares class lists; job processes re-check only the config itself."""
    main = workflow.is_main_process
    try:
        check_config(cfg, models=main, data=main)
    except ConfigErrors as e:
        raise WorkflowError(str(e)) from None


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


def seeds():
    """The seeds of every stitch (train / evaluate) job: `seeds`, else [`seed`] (stitchcache/grid.py)."""
    return stitch_seeds(config)


def stitch_grid():
    """Wildcards (dict) of every evaluated stitch: dataset x pair x layer x stitch layer x method x seed."""
    return [
        dict(dataset=dataset, src=src, tgt=tgt, layer=layer, stitch=stitch, method=method, seed=seed)
        for dataset in stitch_datasets()
        for src, tgt in stitch_pairs()
        for layer in config["stitch"]["layers"]
        for stitch in config["stitch"]["stitch_layers"]
        for method in config["stitch"]["methods"]
        for seed in seeds()
    ]


##### paths #####

def stitch_path(name, **wildcards):
    """A file of one trained stitch (checkpoint.pt, train.json, eval.json): pass every stitch
    wildcard (dataset, src, tgt, layer, stitch, method, seed), e.g. **dict(wildcards.items())."""
    return f"results/stitch/{stitch_dir(**wildcards)}/{name}"


def stitch_output(name):
    """Rule output / input pattern of a stitch file (wildcards in braces)."""
    return f"results/stitch/{stitch_pattern()}/{name}"


def stitch_log(stage):
    """train / evaluate: log file pattern."""
    return f"logs/{stage}/{stitch_pattern()}.log"


def stitch_benchmark(stage):
    """train / evaluate: benchmark TSV pattern."""
    return f"results/benchmarks/{stage}/{stitch_pattern()}.tsv"


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


##### held-out reporting: selection on val, every reported number on test (when the dataset has it) #####


def has_test_split(dataset):
    return REPORT_SPLIT in config["datasets"][dataset]["splits"]


def reported_split(dataset):
    """The split every reported number of `dataset` is measured on: test, else val (also selection)."""
    return REPORT_SPLIT if has_test_split(dataset) else "val"


def stitch_dataset_splits(dataset):
    """The splits of a stitch dataset the workflow extracts: train, val and (if present) test."""
    return list(STITCH_SPLITS) + ([REPORT_SPLIT] if has_test_split(dataset) else [])


def test_features(role):
    """Input function: the test-split feature record of wildcard `role`, or nothing without a test split."""

    def record(wildcards):
        if not has_test_split(wildcards.dataset):
            return []
        return feature_record(wildcards.dataset, wildcards[role], REPORT_SPLIT)

    record.__name__ = f"test_features_{role}"
    return record


def test_arg(flag, name):
    """params: `--<flag> <input.name>` when the job has a test-split input, else nothing."""

    def arg(wildcards, input):
        path = input.get(name)
        return f"--{flag} {shlex.quote(str(path))}" if path else ""

    arg.__name__ = f"test_arg_{name}"
    return arg


def evaluate_test_args(wildcards, input):
    """evaluate: --src-test / --tgt-test when the dataset has a test split."""
    return " ".join(filter(None, (test_arg("src-test", "src_test")(wildcards, input),
                                  test_arg("tgt-test", "tgt_test")(wildcards, input))))


##### input functions #####


def pretrained_checkpoint(wildcards):
    """extract_pretrained: the workflow's own weights (so new weights re-extract)."""
    return model_spec(wildcards.model)["checkpoint"]


def ffm_init_input(wildcards):
    """train: ffm_tlt starts from the ffm checkpoint of the same pair/layer/stitch."""
    if wildcards.method != "ffm_tlt":
        return []
    return [stitch_path("checkpoint.pt", **{**_stitch_wildcards(wildcards), "method": "ffm"})]


def _stitch_wildcards(wildcards):
    return {w: wildcards[w] for w in STITCH_WILDCARDS}


def init_arg(wildcards, input):
    return f"--init {input.init}" if input.init else ""


def all_evals():
    return [stitch_path("eval.json", **w) for w in stitch_grid()]


def all_probes():
    return [f"results/probes/{dataset}/{m}.json" for dataset in stitch_datasets() for m in stitched_models()]


def all_probe_predictions():
    """findings: the base probes' per-image predictions (beside each probe json)."""
    return [p[: -len(".json")] + ".predictions.parquet" for p in all_probes()]


def findings_targets():
    """The findings section (results/findings.md), checked on the results table."""
    return ["results/findings.md"]


def all_targets():
    return findings_targets() + [
        "results/table.parquet",
        "results/table.md",
        "results/table.csv",
        "results/paper_tables.md",
        "results/plots/accuracy.png",
        "results/plots/distances.png",
    ] + analysis_targets() + tree_targets()


##### analyses: Table 10 and the CKA atlas (workflow/rules/analysis.smk) #####


def all_predictions():
    """table10: the per-image predictions the evaluate stage writes beside every eval.json
    (stitched runs and self-stitch controls alike; the analysis pairs them up)."""
    return [os.path.join(os.path.dirname(p), "predictions.parquet") for p in all_evals()]


def cka_pairs():
    """Unordered cross pairs of stitch.pairs in config order (CKA is symmetric: one atlas each)."""
    pairs = {}
    for src, tgt in config["stitch"]["pairs"]:
        if src != tgt and (tgt, src) not in pairs:
            pairs[src, tgt] = None
    return list(pairs)


def cka_split(dataset):
    """The reported split: `test` when the dataset has one, else `val`."""
    return "test" if "test" in config["datasets"][dataset]["splits"] else "val"


def cka_path(dataset, a, b, ext="parquet"):
    return f"results/analysis/cka/{dataset}/{a}--{b}.{ext}"


def all_cka():
    """One CKA atlas per dataset and unordered cross pair; none when analysis.cka_variants is []."""
    if not config["analysis"]["cka_variants"]:
        return []
    return [cka_path(ds, a, b) for ds in stitch_datasets() for a, b in cka_pairs()]


def cka_variants_param(wildcards):
    return " ".join(config["analysis"]["cka_variants"])


def cka_record(role):
    """cka: input function, the feature record of model `role` (a, b) on the reported split."""

    def record(wildcards):
        return feature_record(wildcards.dataset, wildcards[role], cka_split(wildcards.dataset))

    record.__name__ = f"cka_record_{role}"
    return record


def all_cka_heatmaps():
    """cka_join: the heatmap drawn beside each CKA file."""
    return [p[: -len(".parquet")] + ".png" for p in all_cka()]


def analysis_targets():
    out = ["results/analysis/table10.parquet", "results/analysis/table10.md", "results/analysis/table10.png"]
    if all_cka():
        out += all_cka() + all_cka_heatmaps()
        out += ["results/analysis/cka_vs_stitch.parquet", "results/analysis/cka_vs_stitch.md"]
    return out


##### params: JSON handed to the CLI (exactly the config the stage depends on) #####


def model_spec_param(wildcards):
    return json.dumps(model_spec(wildcards.model), sort_keys=True)


def pretrain_model_spec_param(wildcards):
    return job_params.pretrain_model_spec(config, wildcards.model)


def pretrain_dataset_param(wildcards):
    return job_params.pretrain_dataset(config, wildcards.model)


def pretrain_settings_param(wildcards):
    return job_params.pretrain_settings(config, wildcards.model)


def extract_dataset_param(wildcards):
    return job_params.dataset_spec(config, wildcards.dataset, wildcards.split)


def extract_settings_param(wildcards):
    return job_params.extract_settings(config)


def probe_settings_param(wildcards):
    return job_params.probe_settings(config)


def train_settings_param(wildcards):
    return job_params.train_settings(config, wildcards.seed)


def evaluate_settings_param(wildcards):
    return job_params.evaluate_settings(config, wildcards.seed)


def table_settings_param(wildcards):
    return job_params.table_settings(config)


def cache_root():
    return config["cache_root"]


##### resources #####


GPU = 1 if job_params.accelerator_in_use(config) else 0


def gpu_resource(wildcards):
    """pretrain, extract, evaluate: run a backbone."""
    return GPU


def train_gpu(wildcards):
    return job_params.train_gpu(wildcards.method, GPU)


def train_mem_mb(wildcards):
    return job_params.train_mem_mb(wildcards.method)


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
    datasets = {name: (dataset_entry(name), stitch_dataset_splits(name)) for name in stitch_datasets()}
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
    base.setdefault("seed", seeds()[0])  # trees use the stitches of the first seed
    return [stitch_path("checkpoint.pt", **{**base, "tgt": b}) for b in t["branches"]]


def tree_cost_stitches(wildcards):
    """tree_cost: the stitches of every split point, on the tree's first dataset (weights do not
    change the cost)."""
    t = TREES[wildcards.tree]
    return [c for k in t["layers"] for c in tree_stitches(wildcards, dataset=t["datasets"][0], layer=k)]


def tree_trunk_record(split):
    def record(wildcards):
        if split == REPORT_SPLIT and not has_test_split(wildcards.dataset):
            return []
        return feature_record(wildcards.dataset, TREES[wildcards.tree]["trunk"], split)

    record.__name__ = f"tree_trunk_{split}"
    return record


def tree_branch_records(split):
    def records(wildcards):
        if split == REPORT_SPLIT and not has_test_split(wildcards.dataset):
            return []
        return [feature_record(wildcards.dataset, b, split) for b in TREES[wildcards.tree]["branches"]]

    records.__name__ = f"tree_branches_{split}"
    return records


def tree_test_args(wildcards, input):
    """tree_base / tree_vst: --trunk-test / --branch-test when the dataset has a test split (reported)."""
    if not input.get("trunk_test"):
        return ""
    return f"--trunk-test {shlex.quote(str(input.trunk_test))} --branch-test " + " ".join(
        shlex.quote(str(p)) for p in input.branch_test)


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
    """tree: checks (stitchcache/tree/config.py): every error at once, each naming its config key."""
    errors = [f"config error at {key}: {message}" for key, message in check_trees(config)]
    if errors:
        raise WorkflowError("\n".join(errors))


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
