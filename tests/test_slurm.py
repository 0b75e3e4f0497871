"""The workflow on a real (single-node) SLURM cluster, through workflow/profiles/slurm.

Opt-in: runs only with STITCHCACHE_TEST_SLURM=1, as root, on Linux (it installs Debian's
slurm-wlm + munge when missing and starts munged, slurmctld and slurmd; see tests/slurm_cluster.py):

    STITCHCACHE_TEST_SLURM=1 python -m pytest tests/test_slurm.py

.ci/run sets the variable. Without it the cluster tests skip; with it, a cluster test that cannot
run here (not root, no apt-get, no executor plugin, no Fashion-MNIST) fails, so CI cannot pass
without running them.

The node has two fake GPUs (GRES on mknod devices). The experiment is tests/data/tiny.yaml shrunk
to one pair, one layer, methods lfm + ffm and no pretraining (12 jobs; the CPU-only ones may be
bundled into group submissions by the profile), with `gpu_jobs: true` (backbone rules declare
gpu=1, so they are submitted with --gpus=1) and `device: cpu` (the jobs themselves compute on the
CPU). Every Snakemake call runs under a subprocess timeout (SIGKILL); a job pending for a reason
that never clears (e.g. PartitionConfig: more CPUs than the node has) fails the test at once; and
the cluster is stopped (jobs cancelled, daemons ended by pidfile) whatever happens.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, available

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# jobs of the shrunk experiment, by rule; the backbone rules (extract, evaluate) and ffm training
# ask for a GPU, and each of those 9 is its own sbatch job; the CPU jobs may be bundled in groups
JOBS = {"extract": 6, "probe": 2, "train": 2, "evaluate": 2, "table": 1, "plot": 1, "findings": 1,  # extract: 3 splits x 2
        "table10": 1, "cka": 1, "cka_join": 1}
GPU_JOBS = 10  # extract 6, train ffm 1, evaluate 2, cka 1
# a pending job with one of these reasons can never start on this cluster (e.g. asks for more CPUs
# than the node has): fail at once instead of waiting for the timeout
NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "ReqNodeNotAvail")


def needs_gpu(comment: str) -> bool:
    """From the plugin's job comment `rule_<rule>_wildcards_<values>`: backbone rules, the CKA atlas and
    non-lfm training (train's wildcards end in `..._<method>_<seed>`)."""
    rule, _, values = comment.partition("_wildcards_")
    rule = rule.removeprefix("rule_")
    return rule in ("extract", "extract_pretrained", "evaluate", "cka") or (rule == "train" and "_lfm_" not in values + "_")

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


def snakemake(wd: Path, *args: str, timeout: float, watch: bool = False) -> subprocess.CompletedProcess:
    """snakemake with the SLURM profile in `wd` (the experiment is wd/config.yaml). With `watch`, the
    run is stopped (and the test fails) as soon as one of its jobs pends for a reason that never
    clears (NEVER_STARTS), instead of waiting for `timeout`."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # jobs run this venv's python
    cmd = [sys.executable, "-m", "snakemake", "--workflow-profile", "workflow/profiles/slurm",
           "--slurm-init-seconds-before-status-checks", "2", *args]
    if not watch:
        # subprocess.run kills (SIGKILL) on timeout: Snakemake ignores SIGTERM while the plugin waits
        return subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=timeout)
    out, err = wd / ".snakemake-test.out", wd / ".snakemake-test.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=fo, stderr=fe)
    stuck = None
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
            stuck = never_starting_job(wd)
            if stuck:
                break
            time.sleep(2)
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL: Snakemake ignores SIGTERM while the plugin waits
        proc.wait()
    if stuck:
        raise AssertionError(f"a SLURM job of this run can never start: {stuck}\n{out.read_text()[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())


def never_starting_job(wd: Path) -> str | None:
    """`scontrol show job` of a pending job submitted from `wd` whose reason never clears, if any."""
    proc = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i|%r|%Z"], capture_output=True, text=True, timeout=20)
    for line in proc.stdout.splitlines():
        job, reason, workdir = (line.split("|") + ["", ""])[:3]
        if reason in NEVER_STARTS and os.path.realpath(workdir) == os.path.realpath(wd):
            show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=20)
            return f"job {job} pending ({reason}):\n{show.stdout}"
    return None


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
    for block in re.split(r"(?m)^\s*(?:local)?rule ", proc.stdout)[1:]:
        rule = block.split(":", 1)[0]
        res = re.search(r"resources: (.*)", block).group(1)
        if rule != "all":
            assert "slurm_partition=" in res, (rule, res)
        gpu.setdefault(rule, set()).add("gpu=1" in res)
    assert gpu == {"extract": {True}, "train": {True, False}, "evaluate": {True}, "probe": {False},
                   "table": {False}, "plot": {False}, "findings": {False}, "all": {False},
                   "table10": {False}, "cka": {True}, "cka_join": {False}}
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
    proc = snakemake(workdir, timeout=900, watch=True)  # 17 jobs, each an sbatch with status polling
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    print(f"SLURM run: {elapsed:.0f} s")

    rows = pq.read_table(workdir / "results" / "table.parquet").to_pylist()
    assert sorted((r["source"], r["target"], r["layer"], r["method"]) for r in rows) == [
        ("sup", "ssl", 1, "ffm"), ("sup", "ssl", 1, "lfm")]
    for p in ("results/table.md", "results/paper_tables.md", "results/plots/accuracy.png"):
        assert (workdir / p).stat().st_size > 0, p

    # every planned job ran, each in an sbatch job (alone, or bundled in a group of CPU jobs) ...
    finished = Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", log))
    assert finished == {**JOBS, "all": 1}, finished
    jobs = [j for j in cluster.jobs() if os.path.realpath(j.get("WorkDir", "")) == os.path.realpath(workdir)]
    assert all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    assert GPU_JOBS <= len(jobs) <= sum(JOBS.values()), [j.get("Comment") for j in jobs]
    # ... and exactly the GPU jobs were given a (fake) GPU, one each
    grouped = [j for j in jobs if "/group_" in j.get("StdOut", "")]
    alone = [j for j in jobs if j not in grouped]
    with_gpu = [j for j in jobs if j.get("JOB_GRES", "(null)").startswith("gpu:fake:1")]
    assert sorted(j["Comment"] for j in with_gpu) == sorted(j["Comment"] for j in alone if needs_gpu(j["Comment"]))
    assert len(with_gpu) == GPU_JOBS and all(j.get("TresPerJob") == "gres:gpu:1" for j in with_gpu)
    print(f"SLURM jobs: {len(alone)} alone, {len(grouped)} groups")

    assert "Nothing to be done" in snakemake(workdir, "-n", timeout=120).stdout


@cluster_test
def test_failing_job_is_reported(cluster, workdir, tmp_path):
    """A job that fails on the cluster ends the run with an error (no endless status polling):
    one model's weights file is corrupt, so its extraction fails when it loads them."""
    garbage = tmp_path / "corrupt.pt"
    garbage.write_text("not a checkpoint\n")
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["models"]["sup"]["checkpoint"] = str(garbage)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    plan = snakemake(workdir, "-n", timeout=120)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    outputs = [re.search(r"output: (\S+)", block).group(1)
               for block in re.split(r"(?m)^\s*(?:local)?rule ", plan.stdout)[1:] if block.startswith("extract")]
    target = next(o for o in outputs if "/sup/train" in o)  # sup's train features, wherever the record lives
    t0 = time.monotonic()
    proc = snakemake(workdir, target, timeout=180, watch=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-5000:]
    assert "Error in rule extract" in log, log[-5000:]
    assert "stitchcache/extract.py" in log, log[-5000:]  # show-failed-logs printed the job's traceback
    assert time.monotonic() - t0 < 170
