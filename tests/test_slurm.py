"""The workflow on a real (single-node) SLURM cluster, through workflow/profiles/slurm.

Opt-in: runs only with STITCHCACHE_TEST_SLURM=1, as root, on Linux (it installs Debian's
slurm-wlm + munge when missing and starts munged, slurmctld and slurmd; see tests/slurm_cluster.py):

    STITCHCACHE_TEST_SLURM=1 python -m pytest tests/test_slurm.py

.ci/run sets the variable. Without it the cluster tests skip; with it, a cluster test that cannot
run here (not root, no apt-get, no executor plugin, no Fashion-MNIST) fails, so CI cannot pass
without running them.

The node has two fake GPUs (GRES on mknod devices). The experiment is tests/data/tiny.yaml shrunk
to one pair, one layer, methods lfm + ffm and no pretraining (12 SLURM jobs), with `gpu_jobs: true`
(backbone rules declare gpu=1, so they are submitted with --gpus=1) and `device: cpu` (the jobs
themselves compute on the CPU). Every Snakemake call runs under a subprocess timeout (SIGKILL),
and the cluster is stopped (jobs cancelled, daemons ended by pidfile) whatever happens.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, available

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# SLURM jobs of the shrunk experiment, by rule; the backbone rules and ffm training ask for a GPU
JOBS = {"extract": 4, "probe": 2, "train": 2, "evaluate": 2, "table": 1, "plot": 1}
GPU_JOBS = {"rule_extract_wildcards_fmnist_sup_train", "rule_extract_wildcards_fmnist_sup_val",
            "rule_extract_wildcards_fmnist_ssl_train", "rule_extract_wildcards_fmnist_ssl_val",
            "rule_train_wildcards_fmnist_sup_ssl_1_mlp_ffm",
            "rule_evaluate_wildcards_fmnist_sup_ssl_1_mlp_lfm", "rule_evaluate_wildcards_fmnist_sup_ssl_1_mlp_ffm"}

HAS_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
needs_plugin = pytest.mark.skipif(not HAS_PLUGIN, reason="needs snakemake-executor-plugin-slurm (pip install -e '.[slurm]')")
OPTED_IN = os.environ.get("STITCHCACHE_TEST_SLURM") == "1"
needs_cluster = [
    pytest.mark.slurm,
    pytest.mark.skipif(not OPTED_IN, reason="opt-in: set STITCHCACHE_TEST_SLURM=1 (starts a real SLURM cluster as root)"),
]


def cannot_run() -> str | None:
    """Why the cluster tests cannot run here (None: they can)."""
    if available() is not None:
        return f"cannot start SLURM here: {available()}"
    if not HAS_PLUGIN:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[test,slurm]')"
    if not FMNIST.is_dir():
        return "needs Debian's dataset-fashion-mnist"
    return None


def cluster_test(f):
    for mark in reversed(needs_cluster):
        f = mark(f)
    return f


def slurm_config() -> dict:
    cfg = yaml.safe_load(TINY.read_text())
    for m in cfg["models"].values():
        m.pop("pretrain", None)  # random-init backbones: one stage (and ~35 s) less
    cfg["stitch"].update(pairs=[["sup", "ssl"]], self_stitch=False, layers=[1], methods=["lfm", "ffm"])
    cfg["gpu_jobs"] = True   # request (fake) GPUs from SLURM ...
    cfg["device"] = "cpu"    # ... while computing on the CPU
    return cfg


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not OPTED_IN:  # never start daemons unasked
        pytest.skip("opt-in: set STITCHCACHE_TEST_SLURM=1")
    why = cannot_run()
    if why:  # asked for explicitly (CI): not running it is a failure, not a skip
        pytest.fail(f"STITCHCACHE_TEST_SLURM=1, but {why}", pytrace=False)
    partition = yaml.safe_load(PROFILE.read_text())["default-resources"]["slurm_partition"]
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), partition=partition, gpus=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def workdir(tmp_path) -> Path:
    wd = tmp_path / "wf"
    wd.mkdir()
    shutil.copy(REPO / "Snakefile", wd / "Snakefile")
    shutil.copytree(REPO / "workflow", wd / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    # the experiment IS config.yaml here: Snakemake 9.27 does not pass --replace-workflow-config on
    # to the jobs it submits, so with `--configfile X --replace-workflow-config` each SLURM job
    # would merge X into the default config.yaml and run another experiment than the one planned
    (wd / "config.yaml").write_text(yaml.safe_dump(slurm_config(), sort_keys=False))
    return wd


def snakemake(wd: Path, *args: str, timeout: float, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """snakemake with the SLURM profile in `wd` (the experiment is wd/config.yaml)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # jobs run this venv's python
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "snakemake", "--workflow-profile", "workflow/profiles/slurm",
           "--slurm-init-seconds-before-status-checks", "2", *args]
    # subprocess.run kills (SIGKILL) on timeout: Snakemake ignores SIGTERM while the plugin waits
    return subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------- the profile (no cluster needed)

def test_slurm_profile_keys():
    prof = yaml.safe_load(PROFILE.read_text())
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"  # sacct hangs without accounting
    assert {"slurm_partition", "runtime", "mem_mb"} <= set(prof["default-resources"])
    assert "resources" not in prof  # a global gpu=1 would allow one GPU job cluster-wide
    assert prof["jobs"] >= 1 and prof["latency-wait"] >= 5
    # every key is commented
    for line in PROFILE.read_text().splitlines():
        if re.match(r"^\s*[\w-]+:", line) and not line.lstrip().startswith("#"):
            assert "#" in line, line


@needs_plugin
def test_slurm_profile_dry_run_requests_gpus(workdir):
    """No cluster needed for -n: with gpu_jobs true the backbone rules declare gpu=1 (-> --gpus=1)."""
    proc = snakemake(workdir, "-n", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gpu = {}
    for block in re.split(r"(?m)^(?:local)?rule ", proc.stdout)[1:]:
        rule = block.split(":", 1)[0]
        res = re.search(r"resources: (.*)", block).group(1)
        if rule != "all":
            assert "slurm_partition=" in res, (rule, res)
        gpu.setdefault(rule, set()).add("gpu=1" in res)
    assert gpu == {"extract": {True}, "train": {True, False}, "evaluate": {True}, "probe": {False},
                   "table": {False}, "plot": {False}, "all": {False}}
    lint = snakemake(workdir, "--lint", timeout=120)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]


# ------------------------------------------------------------------ a real cluster (opt-in)

@cluster_test
def test_fake_gpu_sets_cuda_visible_devices(cluster):
    proc = subprocess.run(["srun", "--gpus=1", "printenv", "CUDA_VISIBLE_DEVICES"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() in ("0", "1"), proc.stdout + proc.stderr


@cluster_test
def test_tiny_workflow_on_slurm(cluster, workdir):
    import pyarrow.parquet as pq

    t0 = time.monotonic()
    proc = snakemake(workdir, timeout=420)
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    print(f"SLURM run: {elapsed:.0f} s")

    rows = pq.read_table(workdir / "results" / "table.parquet").to_pylist()
    assert sorted((r["source"], r["target"], r["layer"], r["method"]) for r in rows) == [
        ("sup", "ssl", 1, "ffm"), ("sup", "ssl", 1, "lfm")]
    for p in ("results/table.md", "results/paper_tables.md", "results/plots/accuracy.png"):
        assert (workdir / p).stat().st_size > 0, p

    # every job went through sbatch, and exactly the GPU rules were given a (fake) GPU
    jobs = [j for j in cluster.jobs() if j.get("Comment", "").startswith("rule_")
            and os.path.realpath(j.get("WorkDir", "")) == os.path.realpath(workdir)]
    by_rule = {}
    for j in jobs:
        assert j["JobState"] == "COMPLETED", j
        rule = j["Comment"].split("_wildcards_")[0].removeprefix("rule_")
        by_rule[rule] = by_rule.get(rule, 0) + 1
    assert by_rule == JOBS, by_rule
    with_gpu = {j["Comment"] for j in jobs if j.get("JOB_GRES", "(null)").startswith("gpu:fake:1")}
    assert with_gpu == GPU_JOBS
    assert all(j.get("TresPerJob") == "gres:gpu:1" for j in jobs if j["Comment"] in GPU_JOBS)

    assert "Nothing to be done" in snakemake(workdir, "-n", timeout=120).stdout


FAILING_CLI = "import sys\nprint('stitchcache stub: failing on purpose', file=sys.stderr)\nsys.exit(3)\n"


@cluster_test
def test_failing_job_is_reported(cluster, workdir, tmp_path):
    """A job that fails on the cluster ends the run with an error (no endless status polling)."""
    fake = tmp_path / "fake" / "stitchcache"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(FAILING_CLI)
    t0 = time.monotonic()
    proc = snakemake(workdir, "results/features/fmnist/sup/train.json", timeout=180, pythonpath=fake.parent)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-5000:]
    assert "Error in rule extract" in log, log[-5000:]
    assert "failing on purpose" in log  # show-failed-logs printed the job's log
    assert time.monotonic() - t0 < 170
