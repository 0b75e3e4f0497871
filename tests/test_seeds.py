"""Seeds: the `seeds:` list makes the seed a wildcard of every stitch (train / evaluate) job.

Unit tests of stitchcache/grid.py (the one place stitch paths and seeds are defined), schema checks,
and dry runs of the tiny workflow with two seeds (no training: `snakemake -n -p`).
"""
from __future__ import annotations

import json
import re

import pytest

from stitchcache.grid import STITCH_WILDCARDS, once_seed, stitch_dir, stitch_pattern, stitch_seeds
from test_workflow import REPO, TINY, job_stats, load_yaml, make_workdir, schema_errors, snakemake

WC = dict(dataset="fmnist", src="sup", tgt="ssl", layer=3, stitch="mlp", method="ffm", seed=1)


def test_stitch_dir_holds_every_wildcard_and_the_seed():
    assert stitch_dir(**WC) == "fmnist/sup--ssl/layer3/mlp/ffm/seed1"
    assert stitch_dir(**{**WC, "seed": 0}) != stitch_dir(**WC)
    assert stitch_pattern() == "{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}/seed{seed}"
    assert set(re.findall(r"{(\w+)}", stitch_pattern())) == set(STITCH_WILDCARDS)


@pytest.mark.parametrize("drop, add", [("seed", None), ("method", None), (None, "split")])
def test_stitch_dir_refuses_a_missing_or_unknown_wildcard_by_name(drop, add):
    wc = {k: v for k, v in WC.items() if k != drop}
    if add:
        wc[add] = "val"
    with pytest.raises(TypeError, match=repr(drop or add)):
        stitch_dir(**wc)


def test_seeds_default_to_the_single_seed():
    assert stitch_seeds({"seed": 3}) == [3] and once_seed({"seed": 3}) == 3
    assert stitch_seeds({"seed": 0, "seeds": [4, 2]}) == [4, 2]
    assert once_seed({"seed": 0, "seeds": [4, 2]}) == 0  # pretrain / extract / probes: `seed`
    assert stitch_seeds({}) == [0]


@pytest.mark.parametrize("seeds, message", [
    ([], "should be non-empty"), ([0, 0], "non-unique"), ([-1], "less than the minimum"), (["1"], "not of type"),
    (1, "not of type"),
])
def test_schema_rejects_bad_seeds(seeds, message):
    cfg = load_yaml(REPO / "config.yaml")
    cfg["seeds"] = seeds
    errors = schema_errors(cfg)
    assert any(message in e for e in errors), errors


def test_default_config_runs_two_seeds():
    cfg = load_yaml(REPO / "config.yaml")
    assert len(cfg["seeds"]) >= 2 and schema_errors(cfg) == []


def _train_calls(out: str) -> list[dict]:
    """(settings, paths) of every planned `stitchcache train` call of `snakemake -n -p`."""
    calls = []
    for line in out.splitlines():
        if "python -m stitchcache train " not in line:
            continue
        settings = json.loads(re.search(r"--settings '([^']*)'", line).group(1))
        out_path = re.search(r"--out (\S+)", line).group(1)
        init = re.search(r"--init (\S+)", line)
        calls.append({"settings": settings, "out": out_path, "init": init.group(1) if init else None,
                      "method": re.search(r"--method (\w+)", line).group(1)})
    return calls


def test_two_seeds_double_the_stitch_jobs_only(tmp_path):
    cfg = load_yaml(TINY)
    cfg["seeds"] = [0, 7]
    wd = make_workdir(tmp_path, cfg)
    proc = snakemake(wd, "-n", "-p")
    stats = job_stats(proc)
    # 4 pairs x 2 layers x 4 methods x 2 seeds; pretraining, extraction and probes once
    assert stats == {"pretrain": 2, "extract_pretrained": 6, "probe": 2, "train": 64, "evaluate": 64,
                     "table": 1, "plot": 1, "findings": 1, "all": 1, "table10": 1, "cka": 1, "cka_join": 1}
    calls = _train_calls(proc.stdout)
    assert len(calls) == 64
    for c in calls:
        seed = c["settings"]["seed"]
        assert seed in (0, 7) and c["out"].endswith(f"/seed{seed}/checkpoint.pt"), c
        if c["method"] == "ffm_tlt":  # starts from the ffm stitch of the same seed
            assert c["init"] == c["out"].replace("/ffm_tlt/", "/ffm/"), c
    assert sorted(c["settings"]["seed"] for c in calls).count(7) == 32
    # evaluate gets the job's seed; pretrain and probe the once-only `seed`
    assert re.search(r"stitchcache evaluate .*/seed7/checkpoint.pt.*\"seed\": 7", proc.stdout)
    for stage in ("pretrain", "probe"):
        lines = [l for l in proc.stdout.splitlines() if f"python -m stitchcache {stage} " in l]
        assert lines and all('"seed": 0' in l for l in lines), stage



def test_plan_counts_every_seed():
    """`stitchcache plan`: each seed trains and evaluates the grid again; extraction and probes once."""
    from stitchcache.plan import load_config, plan

    one = plan(load_config(TINY), do_measure=False)
    cfg = load_config(TINY)
    cfg["seeds"] = [0, 1, 2]
    three = plan(cfg, do_measure=False)
    assert three["stitch_jobs"] == 3 * one["stitch_jobs"]
    assert three["jobs"]["train"] == three["jobs"]["evaluate"] == 3 * one["jobs"]["train"]
    assert three["jobs"]["extract"] == one["jobs"]["extract"] and three["jobs"]["probe"] == one["jobs"]["probe"]
    g1, g3 = one["gpu_hours"], three["gpu_hours"]
    assert g3["extract"] == pytest.approx(g1["extract"]) and g3["pretrain"] == pytest.approx(g1["pretrain"])
    for m, v in g1["train"].items():
        assert g3["train"][m] == pytest.approx(3 * v), m
    assert g3["evaluate"] > 2 * g1["evaluate"]  # base probes (not per seed) are part of it
    assert three["checkpoint_bytes"] == 3 * one["checkpoint_bytes"]
