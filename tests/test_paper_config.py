"""config/paper.yaml: the paper's grid plans without weights or data, lists what is missing with
how to provide it, and a real run stops before any job."""
from __future__ import annotations

import jsonschema
import pytest

from test_workflow import REPO, job_stats, load_yaml, make_workdir, schema, snakemake, write_config

PAPER = REPO / "config" / "paper.yaml"
MODELS = {"dinov2": "dinov2-l14", "clip": "clip-l14", "siglip2": "siglip2-l16", "dinov3": "dinov3-l16"}
DATASETS = ("fmow", "inat", "aircraft", "ade20k")


def paper() -> dict:
    return load_yaml(PAPER)


def test_paper_config_is_the_papers_grid():
    cfg = paper()
    jsonschema.Draft202012Validator(schema()).validate(cfg)
    assert {n: m["backbone"] for n, m in cfg["models"].items()} == MODELS
    st = cfg["stitch"]
    assert st["layers"] == [2, 6, 10, 14, 18, 22]
    assert set(st["stitch_layers"]) >= {"mlp", "linear", "lora"}
    assert st["methods"] == ["lfm", "ffm", "tlt", "ffm_tlt"] and st["self_stitch"] is True
    assert sorted(map(tuple, st["pairs"])) == sorted((s, t) for s in MODELS for t in MODELS if s != t)
    assert tuple(st["datasets"]) == DATASETS
    assert cfg["datasets"]["ade20k"]["type"] == "ade20k"
    assert cfg["train"]["max_epochs"] == 100 and cfg["train"]["patience"] == 5


@pytest.fixture
def paper_wd(tmp_path, monkeypatch):
    """A workflow copy without weights (empty weights root) and without data."""
    weights = tmp_path / "no-weights"
    weights.mkdir()
    monkeypatch.setenv("STITCHCACHE_WEIGHTS", str(weights))
    return make_workdir(tmp_path, paper()), weights


@pytest.mark.slow  # a dry run of the whole paper grid
def test_dry_run_plans_the_whole_grid_and_lists_missing_inputs(paper_wd):
    wd, weights = paper_wd
    proc = snakemake(wd, "-n", timeout=900)
    n_pairs = 12 + 4  # ordered cross pairs + self-stitches
    n_stitch = len(DATASETS) * n_pairs * 6 * len(paper()["stitch"]["stitch_layers"]) * 4
    # the trees (tree: in paper.yaml) on the 3 classification datasets: clip_dinov2 at k = 14, 22,
    # cambrian4 at k = 6, 14, 22; a cost and a report per tree, one plan (export: false)
    trees = {"tree_base": 2 * 3, "tree_vst": (2 + 3) * 3, "tree_cost": 2, "tree_report": 2, "tree_plan": 1}
    # extraction: 4 models x train / val / test; CKA: 6 unordered model pairs per dataset
    analysis = {"table10": 1, "cka": len(DATASETS) * 6, "cka_join": 1}
    assert job_stats(proc) == {"extract": len(DATASETS) * 4 * 3, "probe": len(DATASETS) * 4,
                               "train": n_stitch, "evaluate": n_stitch, "table": 1, "plot": 1, "findings": 1, "all": 1,
                               **trees, **analysis}
    err = proc.stderr
    assert "input(s) missing" in err
    for name, registry in MODELS.items():
        line = next(l for l in err.splitlines() if l.strip().startswith(f"weights {name}:"))
        assert str(weights) in line, line  # the exact path under the weights root
    assert err.count("how: get https://huggingface.co/") == 4
    for ds in DATASETS:
        for split in ("train", "val"):
            assert f"data    {ds}/{split}:" in err
    # extraction records are addressed in the cache root, by request key
    assert "cache/records/ade20k/dinov3/train-" in proc.stdout


def test_real_run_stops_before_any_job(paper_wd):
    wd, _ = paper_wd
    cfg = paper()
    cfg["stitch"].update(datasets=["aircraft"], pairs=[["dinov2", "clip"]], layers=[2])
    cfg.pop("tree", None)  # the paper's trees need the full grid (their checks would stop the plan)
    write_config(wd, cfg)
    proc = snakemake(wd, "--cores", "1", check=False, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "stopped before any job" in text and "weights dinov2:" in text and "data    aircraft/val:" in text
    assert not (wd / "logs").exists() and not (wd / "cache" / "records").exists()


@pytest.mark.slow  # a dry run of the whole paper grid
def test_provided_data_disappears_from_the_report(paper_wd):
    """Once a dataset is where the config says, it is no longer listed (and its key changes)."""
    from conftest import write_ade20k

    wd, _ = paper_wd
    cfg = paper()
    cfg["stitch"].update(datasets=["ade20k"], pairs=[["dinov2", "clip"]], layers=[2])
    cfg.pop("tree", None)  # the paper's trees need the full grid (their checks would stop the plan)
    write_config(wd, cfg)
    before = snakemake(wd, "-n", timeout=300)
    write_ade20k(wd / "data" / "ADEChallengeData2016")  # 16 + 8 images, fewer than the config's count:
    after = snakemake(wd, "-n", timeout=300)
    assert "data    ade20k/train: ade20k split 'train': start=0, count=20210 lies outside its 16 images" in after.stderr
    for split in ("train", "val"):
        cfg["datasets"]["ade20k"]["splits"][split]["count"] = None
    write_config(wd, cfg)
    after = snakemake(wd, "-n", timeout=300)
    assert "data    ade20k/train:" in before.stderr and "data    ade20k/train:" not in after.stderr
    assert "weights dinov2:" in after.stderr  # still no weights
    records = lambda p: sorted(l for l in p.stdout.splitlines() if "output: cache/records/ade20k/" in l)
    assert records(before) and records(after) and records(before) != records(after)
