"""Held-out reporting (selection on val, numbers on test), relative distances, patch-token matching
and the per-image predictions files, on tiny random models over a tiny image folder."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_vit
from stitchcache.cache import open_record
from stitchcache.cli import main as cli
from stitchcache.evaluate.predictions import read_predictions


@pytest.fixture
def recs(tmp_path, image_folder):
    """Records of models a, b on splits train / val / test (test: a different slice than val)."""
    from stitchcache.extract import extract
    ds = dict(image_folder, splits={"train": {"start": 0, "count": 48}, "val": {"start": 0, "count": 40},
                                    "test": {"start": 12, "count": 30}})
    specs = {"a": {"name": "a", **tiny_vit(width=32)}, "b": {"name": "b", **tiny_vit(width=48, img=64, patch=8)}}
    out = {}
    for m, spec in specs.items():
        for split in ds["splits"]:
            p = tmp_path / "rec" / f"{m}-{split}.json"
            p.parent.mkdir(exist_ok=True)
            p.write_text(json.dumps(extract(spec, ds, split, tmp_path / "cache", {"chunk_size": 16, "num_workers": 0})))
            out[m, split] = str(p)
    return out


PROBE = {"max_epochs": 2, "patience": 2, "lr_grid": [0.01], "batch_size": 16}


def _train(recs, tmp_path, method, settings=None, init=None):
    out = tmp_path / f"{method}.pt"
    argv = ["train", "--method", method, "--layer", "1", "--stitch", "mlp",
            "--src-train", recs["a", "train"], "--src-val", recs["a", "val"],
            "--tgt-train", recs["b", "train"], "--tgt-val", recs["b", "val"],
            "--settings", json.dumps({"max_epochs": 1, "lr_grid": [3e-3], "batch_size": 16, "lfm_batch_size": 16,
                                      **(settings or {})}),
            "--out", str(out), "--metrics", str(out) + ".json"]
    assert cli(argv + (["--init", str(init)] if init else [])) == 0
    return out


def _evaluate(recs, tmp_path, ckpt, test=True, keep=True, name="eval"):
    ev = tmp_path / name / "eval.json"
    ev.parent.mkdir()
    argv = ["evaluate", "--checkpoint", str(ckpt), "--src-train", recs["a", "train"], "--src-val", recs["a", "val"],
            "--tgt-train", recs["b", "train"], "--tgt-val", recs["b", "val"], "--cache-root", str(tmp_path / "cache"),
            "--settings", json.dumps({"probe": PROBE, "keep_exports": keep, "device": "cpu"}), "--out", str(ev)]
    if test:
        argv += ["--src-test", recs["a", "test"], "--tgt-test", recs["b", "test"]]
    assert cli(argv) == 0
    return json.loads(ev.read_text()), ev.parent / "predictions.parquet"


def _tokens(rec, layer=None):
    _, store = open_record(rec)
    return np.asarray(store.final[:] if layer is None else store.layer(layer)[:], dtype=np.float64)


def test_store_rows_carry_image_ids(recs, image_folder):
    _, test = open_record(recs["a", "test"])
    ids = test.image_ids()
    assert len(ids) == 30 and sorted(ids)[0] == "class0/012.png" and sorted(ids)[-1] == "class1/017.png"
    assert ids != sorted(ids)  # rows are in the store's seeded order, and the ids follow them ...
    assert [int(i[len("class")]) for i in ids] == test.labels[:].tolist()  # ... as the labels do


def test_tlt_reported_on_test_with_per_image_predictions(recs, tmp_path):
    ckpt = _train(recs, tmp_path, "tlt")
    res, pred_path = _evaluate(recs, tmp_path, ckpt, keep=False)
    assert res["split"] == "test"
    t, meta = read_predictions(pred_path)                      # kept although the exports are dropped
    assert res["exported_test"] is None and pred_path.is_file()
    assert t.column_names == ["image", "label", "pred_probe", "pred_head"]
    assert meta == {"split": "test", "dataset": "toy", "source": "a", "target": "b", "layer": "1",
                    "stitch": "mlp", "method": "tlt", "seed": "0"}
    _, test = open_record(recs["a", "test"])
    assert t.column("image").to_pylist() == test.image_ids()
    label = np.asarray(t.column("label").to_pylist())
    assert (label == test.labels[:]).all()
    # the reported numbers are exactly the per-image predictions' accuracies on test
    assert res["probe_acc"] == pytest.approx(np.mean(np.asarray(t.column("pred_probe").to_pylist()) == label))
    assert res["head_acc"] == pytest.approx(np.mean(np.asarray(t.column("pred_head").to_pylist()) == label))
    assert "probe_val_acc" in res
    # how training ended travels from the trainer into the evaluation record (the table's columns)
    # (max_epochs 1: the cap ended it, one epoch is too short for a trend)
    train_info = json.loads((tmp_path / "tlt.pt.json").read_text())
    assert (res["stop"], res["epochs_run"], res["epochs"], res["tail_fall"]) == ("max_epochs", 1, 1, None)
    assert (train_info["stop"], train_info["epochs_run"], train_info["tail_fall"]) == ("max_epochs", 1, None)


def test_distances_relative_form_and_patch_matching(recs, tmp_path):
    z_t = _tokens(recs["b", "test"])                             # (N, T, D) target final tokens, test split
    h_t = _tokens(recs["b", "test"], layer=1)
    for match in ("all", "patch"):
        ckpt = _train(recs, tmp_path, "lfm", settings={"match_tokens": match})
        res, pred_path = _evaluate(recs, tmp_path, ckpt, name=f"eval-{match}")
        skip = 1 if match == "patch" else 0                      # timm ViT: one CLS token
        assert res["match_tokens"] == match
        for key, ref in (("d_l", h_t), ("d_L", z_t)):
            x = ref[:, skip:].reshape(-1, ref.shape[-1])
            var = x.var(axis=0).mean()                           # per-channel variance over images and tokens
            assert res[f"{key}_target_var"] == pytest.approx(var, rel=1e-4)
            assert res[f"{key}_rel"] == pytest.approx(res[key] / var, rel=1e-4)
        from stitchcache.cache import open_store
        z_s = np.asarray(open_store(res["exported_test"]).final[:], dtype=np.float64)
        assert res["d_L"] == pytest.approx(((z_s - z_t)[:, skip:] ** 2).mean(), rel=1e-3)
        assert pq.read_table(pred_path).column("pred_head").null_count == 30   # lfm has no head


def test_without_a_test_split_numbers_are_on_val(recs, tmp_path):
    ckpt = _train(recs, tmp_path, "lfm")
    res, pred_path = _evaluate(recs, tmp_path, ckpt, test=False)
    assert res["split"] == "val" and res["probe_acc"] == res["probe_val_acc"]
    assert read_predictions(pred_path)[1]["split"] == "val" and pq.read_table(pred_path).num_rows == 40


def test_probe_reports_on_test_and_writes_predictions(recs, tmp_path):
    out = tmp_path / "probes" / "toy" / "a.json"
    assert cli(["probe", "--train", recs["a", "train"], "--val", recs["a", "val"], "--test", recs["a", "test"],
                "--settings", json.dumps(PROBE), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    t, meta = read_predictions(out.with_name("a.predictions.parquet"))
    assert res["split"] == "test" and meta == {"split": "test", "dataset": "toy", "model": "a"}
    label = np.asarray(t.column("label").to_pylist())
    assert res["probe_acc"] == pytest.approx(np.mean(np.asarray(t.column("pred_probe").to_pylist()) == label))
    assert t.column("pred_head").null_count == t.num_rows == 30


def test_matching_losses_skip_the_prefix_tokens():
    import torch
    from stitchcache.stitch.losses import ffm_loss, lfm_loss, match_skip
    h = torch.randn(4, 5, 8)
    t = h.clone()
    t[:, 0] += 3.0                                               # only the CLS token differs
    ident = lambda x: x
    assert lfm_loss(ident, h, t, skip=match_skip("patch", 1)) == 0 < lfm_loss(ident, h, t, skip=match_skip("all", 1))
    assert ffm_loss(ident, h, t, skip=1) == 0
    with pytest.raises(ValueError, match="train.match_tokens"):
        match_skip("cls", 1)


def test_fashion_mnist_image_ids_name_the_source_index():
    from conftest import FMNIST
    from stitchcache.data.fashion_mnist import FashionMNISTSplit
    if not FMNIST.is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    ids = FashionMNISTSplit("test", root=str(FMNIST), source="test", start=1000, count=3).image_ids()
    assert ids == ["test:1000", "test:1001", "test:1002"]   # disjoint from val (test:0..999) by construction
