"""Reuse across experiments: two workflow directories with different configs that share a model,
a dataset and a cache root extract once; the second schedules no extraction job. A changed input
(new weights) gets a new key and is extracted again, nothing stale is reused."""
from __future__ import annotations

import json

import pytest
import torch

from test_workflow import FMNIST, job_stats, load_yaml, make_workdir, snakemake, TINY, write_config

pytestmark = [pytest.mark.slow,  # two real Snakemake runs
              pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")]

KWARGS_A = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}
KWARGS_B = {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 3, "num_heads": 2}


def write_checkpoint(path, seed: int):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **KWARGS_A)
    torch.save(model.state_dict(), path)


def experiment(cache_root, checkpoint, layers, methods) -> dict:
    cfg = load_yaml(TINY)
    cfg["cache_root"] = str(cache_root)
    cfg["datasets"]["fmnist"]["splits"] = {"train": {"source": "train", "start": 0, "count": 128},
                                           "val": {"source": "test", "start": 0, "count": 64}}
    cfg["models"] = {
        "a": {"backbone": "timm:vit_small_patch16_224", "kwargs": KWARGS_A, "checkpoint": str(checkpoint)},
        "b": {"backbone": "timm:vit_small_patch16_224", "kwargs": KWARGS_B, "checkpoint": None},  # random init
    }
    cfg["stitch"].update(pairs=[["a", "b"]], self_stitch=False, layers=layers, stitch_layers=["linear"],
                         methods=methods)
    return cfg


def test_second_experiment_schedules_no_extraction(tmp_path):
    shared = tmp_path / "shared-cache"
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    ckpt = tmp_path / "a.pt"
    write_checkpoint(ckpt, seed=1)

    first = make_workdir(tmp_path / "one", experiment(shared, ckpt, layers=[1], methods=["lfm"]))
    assert job_stats(snakemake(first, "-n"))["extract"] == 4  # 2 models x {train, val}
    run = snakemake(first, "--cores", "2", check=False, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    records = sorted((shared / "records").rglob("*.json"))
    assert len(records) == 4
    stores = {json.loads(r.read_text())["store"] for r in records}
    assert len(stores) == 4 and all(str(shared / "features") in s for s in stores)

    # another directory, another config (more layers), the same models, data and cache root
    second = make_workdir(tmp_path / "two", experiment(shared, ckpt, layers=[1, 2], methods=["lfm"]))
    stats = job_stats(snakemake(second, "-n"))
    assert "extract" not in stats and stats["train"] == 2 and stats["probe"] == 2, stats
    run = snakemake(second, "--cores", "2", check=False, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert not (second / "logs" / "extract").exists()  # no extraction ran here
    assert (second / "results" / "table.parquet").stat().st_size > 0
    assert sorted((shared / "records").rglob("*.json")) == records
    # the second experiment's evaluations read the first one's stores
    ev = json.loads(next((second / "results" / "stitch").rglob("eval.json")).read_text())
    assert ev["layer"] in (1, 2)

    # gc keeps what either experiment uses (train.json names the four stores a stitch read)
    from stitchcache.cli import main as cli
    assert cli(["cache", "gc", "--root", str(shared), "--keep-referenced-by", str(first), str(second), "--yes"]) == 0
    assert sorted((shared / "records").rglob("*.json")) == records
    assert all(json.loads(r.read_text())["store"] for r in records)

    # a store removed behind the workflow's back: its record is dropped, and a job that needs it
    # (here: ffm, newly asked for) gets the extraction planned again
    import shutil
    victim = next(r for r in records if "/b/val-" in str(r))
    shutil.rmtree(json.loads(victim.read_text())["store"])
    write_config(second, experiment(shared, ckpt, layers=[1, 2], methods=["lfm", "ffm"]))
    proc = snakemake(second, "-n")
    assert job_stats(proc)["extract"] == 1 and not victim.exists()
    assert "named a missing or incomplete store" in proc.stderr

    # new weights under the same path: a new key for model a only, re-extracted; b is still reused
    write_checkpoint(ckpt, seed=2)
    proc = snakemake(second, "-n", "-p")
    assert job_stats(proc)["extract"] == 3  # a: train + val; b: the removed val store
    outputs = [l for l in proc.stdout.splitlines() if l.strip().startswith("output:") and "/records/" in l]
    assert sum("/records/fmnist/a/" in l for l in outputs) == 2 and len(outputs) == 3, outputs
