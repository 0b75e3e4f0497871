"""Train settings reach every result the workflow reuses: a train-settings change followed by a
failed (or killed) train job must not leave old-settings results in the table."""
from __future__ import annotations

import copy

from test_workflow import FAKE_MAIN, TINY, job_stats, load_yaml, make_workdir, snakemake, write_config

def test_failed_train_job_after_a_settings_change_is_rerun(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "stitchcache"
    pkg.mkdir(parents=True)
    # the Snakefile imports stitchcache's modules: the stub only shadows `python -m stitchcache`
    (pkg / "__init__.py").write_text("import pkgutil\n__path__ = pkgutil.extend_path(__path__, __name__)\n")
    (pkg / "__main__.py").write_text(FAKE_MAIN)  # fails the calls named by STITCHCACHE_FAKE_FAIL
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    monkeypatch.setenv("STITCHCACHE_FAKE_CALLS", str(calls))
    fake = pkg.parent
    base = load_yaml(TINY)
    base["stitch"].update(pairs=[["sup", "ssl"]], self_stitch=False, layers=[1], methods=["lfm", "ffm"])
    wd = make_workdir(tmp_path, base)
    snakemake(wd, "--cores", "1", "--workflow-profile", "none", pythonpath=fake, timeout=600)
    cfg = copy.deepcopy(base)
    cfg["train"]["max_epochs"] = 3
    write_config(wd, cfg, "changed.yaml")
    # the ffm train job fails under the new settings
    monkeypatch.setenv("STITCHCACHE_FAKE_FAIL", "train --method ffm")
    proc = snakemake(wd, "--cores", "1", "--workflow-profile", "none", config="changed.yaml", pythonpath=fake,
                     check=False, timeout=600)
    assert proc.returncode != 0
    ffm = "results/stitch/fmnist/sup--ssl/layer1/mlp/ffm/seed0/"
    assert not (wd / ffm / "checkpoint.pt").exists()
    monkeypatch.delenv("STITCHCACHE_FAKE_FAIL")
    plan = snakemake(wd, "-n", "--rerun-incomplete", config="changed.yaml", pythonpath=fake)
    stats = job_stats(plan)
    # the failed job runs again, with its evaluation and the table (whether or not the lfm job
    # ran before the failure, which depends on the job order)
    assert ffm + "checkpoint.pt" in plan.stdout and ffm + "eval.json" in plan.stdout, plan.stdout
    assert stats.get("train", 0) >= 1 and stats.get("evaluate", 0) >= 1 and stats.get("table") == 1, stats
    # and running it brings the workflow to "nothing to be done" under the new settings
    snakemake(wd, "--cores", "1", "--workflow-profile", "none", config="changed.yaml", pythonpath=fake, timeout=600)
    assert (wd / ffm / "checkpoint.pt").exists()
    assert "Nothing to be done" in snakemake(wd, "-n", config="changed.yaml", pythonpath=fake).stdout
