"""The Snakemake workflow: config schema, planned jobs, params-only re-runs, lint, end to end.

Every Snakemake run happens in a copy of the workflow under tmp_path, as a subprocess with a
timeout. The fast tests replace the stitchcache CLI by a stub that only writes the declared
outputs (so the job graph, rerun triggers and resources are tested without training anything);
the `slow` test runs the tiny experiment (tests/data/tiny.yaml) for real.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
TINY = REPO / "tests" / "data" / "tiny.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# jobs of one tiny run: 2 models (both pretrained), splits train+val, pairs sup->ssl, ssl->sup plus
# 2 self-stitches = 4 pairs, layers [1, 2], one stitch layer, 4 methods
TINY_JOBS = {"pretrain": 2, "extract_pretrained": 6, "probe": 2, "train": 32, "evaluate": 32, "table": 1, "plot": 1,
             "findings": 1, "all": 1}   # extract: train / val / test of 2 models
# the default: the pair sup -> ssl plus 2 self-stitches = 3 pairs, layers [1, 5], 4 methods, run for
# seeds [0, 1] (probes and pretraining once)
DEFAULT_JOBS = {"pretrain": 2, "extract_pretrained": 6, "probe": 2, "train": 48, "evaluate": 48, "table": 1, "plot": 1,
                "findings": 1, "all": 1}
ANALYSIS_JOBS = {"table10": 1, "cka": 1, "cka_join": 1}   # workflow/rules/analysis.smk: one model pair
TINY_JOBS.update(ANALYSIS_JOBS)
DEFAULT_JOBS.update(ANALYSIS_JOBS)
# the sup_ssl tree (tree: in config.yaml) at every stitch point of the default
DEFAULT_JOBS.update({"tree_base": 1, "tree_vst": 2, "tree_report": 1, "tree_cost": 1, "tree_export": 2, "tree_plan": 1})


# ------------------------------------------------------------------------------------- helpers

def load_yaml(path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def schema() -> dict:
    return load_yaml(SCHEMA)


def schema_errors(cfg: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema())
    return [e.message for e in validator.iter_errors(cfg)]


def make_workdir(tmp_path: Path, cfg: dict | None = None) -> Path:
    """A copy of the workflow (Snakefile, workflow/, config.yaml) plus tiny.yaml (or `cfg`)."""
    wd = tmp_path / "wf"
    wd.mkdir()
    shutil.copy(REPO / "Snakefile", wd / "Snakefile")
    shutil.copy(REPO / "config.yaml", wd / "config.yaml")
    shutil.copytree(REPO / "workflow", wd / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    write_config(wd, cfg if cfg is not None else load_yaml(TINY))
    return wd


def write_config(wd: Path, cfg: dict, name: str = "tiny.yaml") -> Path:
    p = wd / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def env(extra_pythonpath: Path | None = None) -> dict:
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")  # `python` = this venv
    if extra_pythonpath is not None:
        e["PYTHONPATH"] = str(extra_pythonpath) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def snakemake(wd: Path, *args: str, config: str = "tiny.yaml", timeout: float = 180, check: bool = True,
              pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *args]
    if config:
        cmd += ["--configfile", config, "--replace-workflow-config"]
    proc = subprocess.run(cmd, cwd=wd, env=env(pythonpath), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_stats(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule -> number of jobs ({} when nothing to do)."""
    text = proc.stdout + proc.stderr
    if "Job stats:" not in text:
        return {}
    stats = {}
    for line in text.split("Job stats:", 1)[1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m:
            if m.group(1) == "total":
                break
            stats[m.group(1)] = int(m.group(2))
    return stats


FAKE_MAIN = r'''
"""Stub of `python -m stitchcache`: writes each declared output and logs the call."""
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
with open(os.environ["STITCHCACHE_FAKE_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\n")
fail = os.environ.get("STITCHCACHE_FAKE_FAIL")  # a call containing this text fails (exit 1), writing nothing
if fail and fail in " ".join(argv):
    sys.exit(1)
cmd = " ".join(argv[:2]) if argv[0] in ("tree", "analyze") else argv[0]   # e.g. "tree plan", "analyze cka-join"
opts = {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--") and i + 1 < len(argv)}
outs = [opts[k] for k in ("--out", "--metrics", "--markdown", "--predictions") if k in opts]
if cmd == "tree plan":
    outs.append(str(Path(opts["--out"]).with_suffix(".json")))
if cmd == "analyze cka-join":
    outs += [str(Path(c).with_suffix(".png")) for c in argv[argv.index("--cka") + 1:argv.index("--table")]]
names = {"table": ["table.parquet", "table.csv", "table.md", "paper_tables.md"], "plot": ["accuracy.png", "distances.png"],
         "analyze table10": ["table10.parquet", "table10.md", "table10.png"],
         "analyze cka-join": ["cka_vs_stitch.parquet", "cka_vs_stitch_spearman.parquet", "cka_vs_stitch.md"],
         "tree report": ["tree_table.md", "tree_table.csv", "tree_table.parquet", "tree_gains.json", "tree_knob.png"]}
outs += [str(Path(opts["--out-dir"]) / n) for n in names.get(cmd, [])]
for o in outs:
    p = Path(o); p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"stub": cmd}) if p.suffix == ".json" else "stub")
'''


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """A PYTHONPATH folder whose `stitchcache` package shadows the real one in rule shells."""
    pkg = tmp_path / "fake" / "stitchcache"
    pkg.mkdir(parents=True)
    # the stub's subpackages are the real ones (common.smk imports stitchcache.config_checks, ...);
    # only `python -m stitchcache` (__main__) is replaced
    (pkg / "__init__.py").write_text(f"__path__.append({str(REPO / 'stitchcache')!r})\n")
    (pkg / "__main__.py").write_text(FAKE_MAIN)
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    monkeypatch.setenv("STITCHCACHE_FAKE_CALLS", str(calls))
    return pkg.parent, calls


def read_calls(calls: Path) -> list[list[str]]:
    return [json.loads(l) for l in calls.read_text().splitlines() if l.strip()]


# ------------------------------------------------------------------------------ (a) the schema

def test_schema_declares_2020_12_and_closes_every_object():
    s = schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)

    def objects(node, path="#"):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                yield path, node
            for k, v in node.items():
                yield from objects(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from objects(v, f"{path}/{i}")

    for path, node in objects(s):
        assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"


@pytest.mark.parametrize("path", [REPO / "config.yaml", TINY])
def test_shipped_configs_validate(path):
    assert schema_errors(load_yaml(path)) == []


def test_default_config_is_the_documented_experiment():
    cfg = load_yaml(REPO / "config.yaml")
    assert cfg["datasets"]["fmnist"]["root"] == str(FMNIST)
    sup, ssl = cfg["models"]["sup"], cfg["models"]["ssl"]
    assert sup["pretrain"]["objective"] == "supervised" and ssl["pretrain"]["objective"] == "simclr"
    for m, (size, patch, width) in ((sup, (28, 7, 64)), (ssl, (56, 14, 48))):
        k = m["kwargs"]
        assert (k["img_size"], k["patch_size"], k["embed_dim"], k["depth"]) == (size, patch, width, 6)
        assert k["img_size"] // k["patch_size"] == 4
    assert cfg["stitch"]["layers"] == [1, 5]  # a shallow and a deep stitch point
    assert cfg["train"]["max_epochs"] >= 10 * cfg["train"]["patience"]  # early stopping, not the cap, ends runs
    assert cfg["stitch"]["methods"] == ["lfm", "ffm", "tlt", "ffm_tlt"]
    assert cfg["stitch"]["stitch_layers"] == ["mlp"]


def test_snakemake_validate_fills_defaults():
    from snakemake.utils import validate

    cfg = {
        "datasets": {"d": {"type": "fashion_mnist", "splits": {"train": {"source": "train"}, "val": {"source": "test"}}}},
        "models": {"m": {"backbone": "timm:vit_small_patch16_224"}},
        "stitch": {"datasets": ["d"], "pairs": [["m", "m"]]},
    }
    validate(cfg, str(SCHEMA))
    assert cfg["device"] == "auto" and cfg["seed"] == 0 and cfg["cache_root"] == "cache"
    assert cfg["stitch"]["methods"] == ["lfm", "ffm", "tlt", "ffm_tlt"]
    assert cfg["stitch"]["self_stitch"] is True
    assert cfg["train"]["max_epochs"] >= 1 and cfg["probe"]["pool"] == "mean"
    assert cfg["extract"]["layers"] == "all" and cfg["extract"]["dtype"] == "float16"
    assert cfg["models"]["m"]["checkpoint"] is None and cfg["models"]["m"]["kwargs"] == {}
    assert cfg["datasets"]["d"]["splits"]["train"]["start"] == 0


@pytest.mark.parametrize("section, key", [
    ("train", "patienc"), ("extract", "batchsize"), ("probe", "lr"), ("stitch", "layer"), (None, "cache_dir"),
])
def test_misspelt_key_is_rejected_by_name(section, key):
    cfg = load_yaml(REPO / "config.yaml")
    (cfg[section] if section else cfg)[key] = 1
    errors = schema_errors(cfg)
    assert errors and any(repr(key) in e for e in errors), errors


def test_misspelt_nested_key_is_rejected_by_name():
    cfg = load_yaml(REPO / "config.yaml")
    cfg["models"]["sup"]["pretrain"]["epoch"] = cfg["models"]["sup"]["pretrain"].pop("epochs")
    cfg["datasets"]["fmnist"]["splits"]["train"]["cont"] = 5
    errors = " ".join(schema_errors(cfg))
    assert "'epoch'" in errors and "'cont'" in errors


@pytest.mark.parametrize("mutate, bad", [
    (lambda c: c["stitch"].__setitem__("methods", ["lfm", "fmm"]), "fmm"),
    (lambda c: c["stitch"].__setitem__("stitch_layers", ["conv"]), "conv"),
    (lambda c: c["models"]["ssl"]["pretrain"].__setitem__("objective", "byol"), "byol"),
    (lambda c: c["extract"].__setitem__("dtype", "bfloat16"), "bfloat16"),
    (lambda c: c.__setitem__("device", "gpu"), "gpu"),
])
def test_bad_enum_value_is_rejected_by_name(mutate, bad):
    cfg = load_yaml(REPO / "config.yaml")
    mutate(cfg)
    errors = schema_errors(cfg)
    assert errors and any(repr(bad) in e for e in errors), errors


def test_snakemake_stops_on_misspelt_key(tmp_path):
    cfg = load_yaml(TINY)
    cfg["train"]["max_epoch"] = cfg["train"].pop("max_epochs")
    wd = make_workdir(tmp_path, cfg)
    proc = snakemake(wd, "-n", check=False)
    assert proc.returncode != 0
    assert "'max_epoch' was unexpected" in proc.stdout + proc.stderr


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["stitch"].__setitem__("pairs", [["sup", "dino"]]), "stitch.pairs[0][1]: unknown model 'dino'"),
    (lambda c: c["stitch"].__setitem__("layers", [1, 3]), "stitch.layers[1]: layer 3 is outside 1..2"),
    (lambda c: c["datasets"]["fmnist"]["splits"].pop("val"), "needs a split named 'val'"),
    (lambda c: c["stitch"].__setitem__("datasets", ["fmnist", "cifar"]), "stitch.datasets[1]: unknown dataset 'cifar'"),
    (lambda c: c["models"]["ssl"].__setitem__("backbone", "dinov9-l14"), "models.ssl.backbone: 'dinov9-l14' is neither"),
    (lambda c: c["models"]["sup"]["pretrain"].__setitem__("split", "nope"), "models.sup.pretrain.split"),
    (lambda c: c["models"]["sup"].__setitem__("checkpoint", "w.pt"), "models.sup.checkpoint"),
    (lambda c: c["extract"].__setitem__("layers", [0, 1, 3]), "extract.layers: stitch layers [2]"),
])
def test_cross_checks_name_the_key(tmp_path, mutate, message):
    cfg = load_yaml(TINY)
    mutate(cfg)
    assert schema_errors(cfg) == []  # only common.smk can see these
    wd = make_workdir(tmp_path, cfg)
    proc = snakemake(wd, "-n", check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------- (b) dry runs

def test_dry_run_plans_the_tiny_grid(tmp_path):
    wd = make_workdir(tmp_path)
    proc = snakemake(wd, "-n", "-p")
    assert job_stats(proc) == TINY_JOBS
    out = proc.stdout
    # ffm_tlt starts from the ffm checkpoint of the same pair / layer / stitch
    assert ("--method ffm_tlt --layer 2 --stitch mlp --src-train results/features/fmnist/ssl/train.json"
            in out)
    assert "--init results/stitch/fmnist/ssl--sup/layer2/mlp/ffm/seed0/checkpoint.pt" in out
    assert "--method ffm --layer 1" in out and out.count("--init ") == 8  # 4 pairs x 2 layers
    # extract reads the pretrained checkpoint
    assert '"checkpoint": "results/models/ssl.pt"' in out


def test_dry_run_plans_the_default_grid(tmp_path):
    wd = make_workdir(tmp_path)
    proc = snakemake(wd, "-n", config="")  # config.yaml only
    assert job_stats(proc) == DEFAULT_JOBS


def test_models_without_pretrain_and_without_self_stitch(tmp_path):
    cfg = load_yaml(TINY)
    del cfg["models"]["ssl"]["pretrain"]
    cfg["stitch"].update(self_stitch=False, pairs=[["sup", "ssl"]], methods=["lfm", "ffm_tlt"])
    wd = make_workdir(tmp_path, cfg)
    stats = job_stats(snakemake(wd, "-n"))
    # ffm_tlt pulls in its ffm init (trained but not evaluated)
    assert stats == {"pretrain": 1, "extract_pretrained": 3, "extract": 3, "probe": 2, "train": 6, "evaluate": 4,
                     "table": 1, "plot": 1, "findings": 1, "all": 1, **ANALYSIS_JOBS}


@pytest.mark.parametrize("device, gpu", [("cuda", "1"), ("cpu", "0")])
def test_resources_and_gpu_declarations(tmp_path, device, gpu):
    """Backbone rules ask for a GPU when one is used; on CPU they declare none and run side by side."""
    cfg = load_yaml(TINY)
    cfg["device"] = device
    wd = make_workdir(tmp_path, cfg)
    proc = snakemake(wd, "-n")
    text = proc.stdout
    seen = {}
    for block in re.split(r"(?m)^\s*(?:local)?rule ", text)[1:]:
        rule = block.split(":", 1)[0]
        r = re.search(r"resources: (.*)", block)
        if rule == "all":
            continue
        res = dict(kv.split("=", 1) for kv in r.group(1).split(", "))
        assert {"mem_mb", "runtime"} <= set(res), (rule, res)
        if rule == "train":
            method = re.search(r"wildcards: .*method=(\w+)", block).group(1)
            rule = "train_lfm" if method == "lfm" else "train_tail"
        seen.setdefault(rule, set()).add(res.get("gpu", "0"))
    assert seen == {"pretrain": {gpu}, "extract_pretrained": {gpu}, "train_tail": {gpu}, "evaluate": {gpu},
                    "train_lfm": {"0"}, "probe": {"0"}, "table": {"0"}, "plot": {"0"},
                    "findings": {"0"}, "table10": {"0"}, "cka": {gpu}, "cka_join": {"0"}}


def test_small_cpu_jobs_are_grouped_for_clusters(tmp_path):
    """lfm training and probes carry group `small` (bundled on a cluster with --group-components);
    jobs that run a backbone are never grouped."""
    wd = make_workdir(tmp_path)
    text = snakemake(wd, "-n").stdout
    grouped, alone = set(), set()
    group = None
    for line in text.splitlines():
        if re.search(r"Group job (\w+)", line):
            group = re.search(r"Group job (\w+)", line).group(1)
            continue
        m = re.match(r"^(\s*)(?:local)?rule (\w+):", line)
        if m:
            indented, rule = bool(m.group(1)), m.group(2)
            current = (group if indented else None), rule
            if not indented:
                group = None
        m = re.match(r"^\s*wildcards: .*method=(\w+)", line)
        if m and current[1] == "train":
            current = current[0], f"train_{m.group(1)}"
        if line.strip().startswith("resources:"):
            (grouped if current[0] == "small" else alone).add(current[1])
    assert grouped == {"train_lfm", "probe"}
    assert alone == {"pretrain", "extract_pretrained", "train_ffm", "train_tlt", "train_ffm_tlt", "evaluate",
                     "table", "plot", "findings", "all", "table10", "cka", "cka_join"}
    prof = load_yaml(REPO / "workflow" / "profiles" / "slurm" / "config.yaml")
    assert prof["group-components"] == ["small=16"]


# --------------------------------------------------------------- (c) rerun after a config change

def test_params_only_reruns(tmp_path, fake_cli):
    fake, calls = fake_cli
    wd = make_workdir(tmp_path)
    # a real (stubbed) run without the profile and without --resources: gpu jobs still run
    proc = snakemake(wd, "--cores", "2", "--workflow-profile", "none", pythonpath=fake, timeout=600)
    ran = read_calls(calls)
    assert sorted({c[0] for c in ran}) == ["analyze", "evaluate", "extract", "findings", "plot", "pretrain", "probe",
                                           "table", "train"]
    assert len(ran) == sum(TINY_JOBS.values()) - 1
    for p in ("results/table.parquet", "results/plots/distances.png", "logs/table.log",
              "results/benchmarks/train/fmnist/sup--ssl/layer1/mlp/ffm/seed0.tsv",
              "results/benchmarks/extract/fmnist/sup/val.tsv", "results/benchmarks/pretrain/ssl.tsv"):
        assert (wd / p).exists(), p
    assert "Nothing to be done" in snakemake(wd, "-n", pythonpath=fake).stdout

    base = load_yaml(TINY)

    def plan(mutate):
        cfg = copy.deepcopy(base)
        mutate(cfg)
        write_config(wd, cfg, "changed.yaml")
        return job_stats(snakemake(wd, "-n", config="changed.yaml", pythonpath=fake))

    # train settings: only train and what depends on it
    # (the CKA atlas reads only the feature stores: it is not recomputed; Table 10 and the join are)
    assert plan(lambda c: c["train"].update(max_epochs=3)) == {
        "train": 32, "evaluate": 32, "table": 1, "plot": 1, "findings": 1, "all": 1, "table10": 1, "cka_join": 1}
    assert plan(lambda c: c["train"].update(lr_grid=[0.01, 0.001])) == {
        "train": 32, "evaluate": 32, "table": 1, "plot": 1, "findings": 1, "all": 1, "table10": 1, "cka_join": 1}
    # probe settings: base probes and the stitched-model probes inside evaluate, no training
    assert plan(lambda c: c["probe"].update(max_epochs=5)) == {
        "probe": 2, "evaluate": 32, "table": 1, "plot": 1, "findings": 1, "all": 1, "table10": 1, "cka_join": 1}
    # extract settings: extraction and everything downstream, but no pretraining
    assert plan(lambda c: c["extract"].update(batch_size=64)) == {
        k: v for k, v in TINY_JOBS.items() if k != "pretrain"}
    # ... except the view: the encoders are pretrained on the view extraction stores
    assert plan(lambda c: c["extract"].update(view="native")) == TINY_JOBS
    # one model's pretrain settings: that model and everything that touches it
    stats = plan(lambda c: c["models"]["ssl"]["pretrain"].update(epochs=2))
    assert stats["pretrain"] == 1 and stats["extract_pretrained"] == 3 and stats["train"] == 24  # all but sup->sup; ssl train/val/test
    # the unused pretrain split is not part of the val/train extract jobs' params
    stats = plan(lambda c: c["datasets"]["fmnist"]["splits"]["pretrain"].update(count=128))
    assert stats["pretrain"] == 2
    stats = plan(lambda c: c["datasets"]["fmnist"]["splits"]["val"].update(count=64))
    assert stats["extract_pretrained"] == 2 and "pretrain" not in stats

    # a smaller grid: the existing stitches stay valid, only the table and plots are redone
    assert plan(lambda c: c["stitch"].update(layers=[1], methods=["lfm", "ffm"])) == {
        "table": 1, "plot": 1, "findings": 1, "all": 1, "table10": 1, "cka_join": 1}

    # actually re-running after a train-only change calls no extract / pretrain
    n_before = len(read_calls(calls))
    cfg = copy.deepcopy(base)
    cfg["train"]["max_epochs"] = 3
    write_config(wd, cfg, "changed.yaml")
    # ... this time with the default profile (it supplies cores and the gpu resource)
    proc = snakemake(wd, "--workflow-profile", "workflow/profiles/default", config="changed.yaml", pythonpath=fake,
                     timeout=600)
    assert 'gpu=Resource("gpu", 1)' in proc.stdout + proc.stderr
    rerun = {c[0] for c in read_calls(calls)[n_before:]}
    assert rerun == {"train", "evaluate", "table", "plot", "findings", "analyze"}
    assert "Nothing to be done" in snakemake(wd, "-n", config="changed.yaml", pythonpath=fake).stdout


# ---------------------------------------------------------------------------------- (d) lint

def test_lint_passes(tmp_path):
    wd = make_workdir(tmp_path)
    proc = snakemake(wd, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_profile(tmp_path):
    prof = load_yaml(REPO / "workflow" / "profiles" / "default" / "config.yaml")
    assert prof["cores"] == "all" and "gpu=1" in prof["resources"]
    assert prof["rerun-incomplete"] is False and prof["keep-going"] is False


# ------------------------------------------------------------------------ (e) the real thing

@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_tiny_workflow_end_to_end(tmp_path):
    import pyarrow.parquet as pq

    cfg = load_yaml(TINY)
    cfg["stitch"]["layers"] = [2]  # one stitch point: every recipe and pair still runs (~half the jobs)
    wd = make_workdir(tmp_path, cfg)
    proc = snakemake(wd, "--cores", "2", check=False, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    for p in ("results/table.parquet", "results/table.csv", "results/table.md", "results/paper_tables.md",
              "results/plots/accuracy.png", "results/plots/distances.png"):
        assert (wd / p).stat().st_size > 0, p

    rows = pq.read_table(wd / "results" / "table.parquet").to_pylist()
    key = lambda r: (r["source"], r["target"], r["layer"], r["method"])
    got = {key(r) for r in rows}
    pairs = [("sup", "ssl"), ("ssl", "sup"), ("sup", "sup"), ("ssl", "ssl")]
    want = {(s, t, 2, m) for s, t in pairs for m in ("lfm", "ffm", "tlt", "ffm_tlt")}
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert r["kind"] == ("self" if r["source"] == r["target"] else "cross")
        assert math.isfinite(r["probe_acc"]) and 0.0 <= r["probe_acc"] <= 1.0, r
        assert math.isfinite(r["d_l"]) and math.isfinite(r["d_L"]), r
        if r["method"] in ("tlt", "ffm_tlt"):
            assert r["head_acc"] is not None and 0.0 <= r["head_acc"] <= 1.0, r
    assert any(r["kind"] == "self" for r in rows)
    # held-out reporting: tiny.yaml has a test split, so every reported number is on it
    assert {r["split"] for r in rows} == {"test"} and all(math.isfinite(r["d_L_rel"]) for r in rows)
    pred = pq.read_table(wd / "results/stitch/fmnist/sup--ssl/layer2/mlp/tlt/seed0/predictions.parquet")
    assert pred.num_rows == 128 and pred.schema.metadata[b"split"] == b"test"
    assert set(pred.column("image").to_pylist()) == {f"test:{i}" for i in range(128, 256)}  # rows in store order
    assert pred.column("pred_head").null_count == 0
    assert pq.read_table(wd / "results/probes/fmnist/sup.predictions.parquet").num_rows == 128
    findings = (wd / "results" / "findings.md").read_text()
    assert findings.startswith("# Findings") and findings.count("## Finding") == 3
    # the verdicts count the test split's noise from every run's and probe's predictions (keys match)
    n_probes = len(list((wd / "results/probes/fmnist").glob("*.predictions.parquet")))
    assert f"per-image predictions of {len(rows) + n_probes} runs and probes" in findings, findings[:1500]
    assert "test s.e." in findings and "**Warning" not in findings

    # analyses (docs/stages/analysis.md): Table 10 for every cross run (2 pairs x 1 layer x 4 methods),
    # the CKA atlas of the pair {sup, ssl} and its join with the results table
    t10 = pq.read_table(wd / "results" / "analysis" / "table10.parquet").to_pylist()
    assert len(t10) == 8 and all(r["n_images"] == 128 for r in t10)
    assert {r["prediction"] for r in t10 if r["method"] in ("tlt", "ffm_tlt")} == {"head"}
    cka = pq.read_table(wd / "results" / "analysis" / "cka" / "fmnist" / "sup--ssl.parquet").to_pylist()
    assert len(cka) == 2 * 5 * 5 and all(0.0 <= r["cka"] <= 1.0 + 1e-9 for r in cka)
    joined = pq.read_table(wd / "results" / "analysis" / "cka_vs_stitch.parquet").to_pylist()
    assert len(joined) == 8 and all(r["cka_pooled"] is not None for r in joined)
    for p in ("results/analysis/table10.md", "results/analysis/table10.png",
              "results/analysis/cka/fmnist/sup--ssl.png", "results/analysis/cka_vs_stitch.md"):
        assert (wd / p).stat().st_size > 0, p

    again = snakemake(wd, "-n", timeout=300)
    assert "Nothing to be done" in again.stdout + again.stderr

    # the HTML report renders the tables and both plots with their captions
    snakemake(wd, "--report", "report.html", timeout=300)
    html = (wd / "report.html").read_text()
    assert html.count("data:image/png") >= 2
    for caption in ("Stitched model accuracy by stitch layer with two evaluators", "Layer feature distance d_l",
                    "The paper's three findings checked on these results",
                    "arranged like the paper's tables", "One row per stitched model",
                    "Prediction analysis (the paper's Table 10)", "Linear CKA between every layer"):
        assert caption in html, caption
