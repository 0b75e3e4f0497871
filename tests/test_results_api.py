"""Using results from Python: find_store finds the workflow's own store of (config, dataset, model,
split); load_stitched models carry the source's preprocessing; `cache` reads cache_root from a config."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import extract_records, tiny_vit
from stitchcache.cli import main as cli
from test_workflow import TINY, load_yaml, make_workdir, snakemake

import stitchcache as sc


@pytest.fixture
def config(image_folder, tmp_path):
    cfg = copy.deepcopy(load_yaml(TINY))
    ds = {k: v for k, v in image_folder.items() if k != "name"}
    cfg["datasets"] = {"toy": ds}
    cfg["models"] = {"a": tiny_vit(width=32), "b": tiny_vit(width=48, img=64, patch=8)}
    cfg["stitch"].update(datasets=["toy"], pairs=[["a", "b"]], self_stitch=False, layers=[1], methods=["lfm"])
    cfg["cache_root"] = str(tmp_path / "wf" / "cache")
    return cfg


def test_find_store_names_the_record_the_workflow_plans(config, tmp_path):
    wd = make_workdir(tmp_path, config)
    planned = snakemake(wd, "-n", "--forceall").stdout
    for model in ("a", "b"):
        for split in ("train", "val"):
            path = sc.record_path(config, "toy", model, split, workdir=wd)
            assert str(path.relative_to(wd)) in planned or str(path) in planned, (path, planned[:3000])
    # another extract setting is another store: never the old one
    other = copy.deepcopy(config)
    other["extract"]["dtype"] = "float32"
    assert sc.record_path(other, "toy", "a", "train", workdir=wd) != sc.record_path(config, "toy", "a", "train",
                                                                                      workdir=wd)


def test_find_store_opens_the_store_and_names_what_is_missing(config, tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match=r"model 'a' on toy/train.*does not exist"):
        sc.find_store(config, "toy", "a", "train", workdir=tmp_path / "wf")
    with pytest.raises(KeyError, match=r"datasets.nope"):
        sc.find_store(config, "nope", "a", "train")
    with pytest.raises(KeyError, match=r"datasets.toy.splits.test"):
        sc.find_store(config, "toy", "a", "test")
    # the record the workflow would write, written by the extract stage itself
    rec = extract_records({"a": {"name": "a", **config["models"]["a"]}}, image_folder, tmp_path)["a", "train"]
    path = sc.record_path(config, "toy", "a", "train", workdir=tmp_path / "wf")
    path.parent.mkdir(parents=True)
    path.write_text(open(rec).read())
    store = sc.find_store(config, "toy", "a", "train", workdir=tmp_path / "wf")
    assert str(store.path) == json.loads(open(rec).read())["store"] and store.num_images == 48


def test_load_stitched_carries_the_source_preprocessing(tmp_path, image_folder):
    from PIL import Image

    specs = {"a": {"name": "a", **tiny_vit(width=32)}, "b": {"name": "b", **tiny_vit(width=48, img=64, patch=8)}}
    recs = extract_records(specs, image_folder, tmp_path)
    out = tmp_path / "lfm.pt"
    settings = {"max_epochs": 1, "patience": 1, "lr_grid": [1e-3], "batch_size": 16, "lfm_batch_size": 16}
    assert cli(["train", "--method", "lfm", "--layer", "1", "--stitch", "mlp",
                "--src-train", recs["a", "train"], "--src-val", recs["a", "val"], "--tgt-train", recs["b", "train"],
                "--tgt-val", recs["b", "val"], "--settings", json.dumps(settings), "--out", str(out),
                "--metrics", str(tmp_path / "m.json")]) == 0
    m = sc.load_stitched(out)
    assert m.preprocess == m.source.preprocess and tuple(m.preprocess.size) == (32, 32)
    img = Image.open(next((tmp_path / "images" / "class0").glob("*.png")))
    x = m.transform(img)
    assert x.shape == (3, 32, 32)
    with torch.no_grad():
        assert m(x[None]).shape == (1, 1 + 8 * 8, 48)  # the target's tokens: CLS + 8x8 grid, width 48


def test_cache_commands_read_cache_root_from_configfile(tmp_path, capsys):
    root = tmp_path / "elsewhere"
    root.mkdir()
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"cache_root: {root}\n")
    assert cli(["cache", "ls", "--configfile", str(cfg)]) == 0
    assert f"no stores under {root}" in capsys.readouterr().out
    assert cli(["cache", "ls", "--configfile", str(cfg), "--root", str(tmp_path / "x")]) == 0  # --root wins
    assert f"no stores under {tmp_path / 'x'}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist"):
        cli(["cache", "ls", "--configfile", str(tmp_path / "missing.yaml")])
