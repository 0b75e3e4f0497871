"""Stitching from the cache: every recipe learns, LFM needs no backbone, FFM only trains the stitch,
an identity self-stitch is exact, checkpoints rebuild the stitched model, a killed job resumes."""
import json

import pytest
import torch

from conftest import extract_records, tiny_vit
from stitchcache import load_stitched
from stitchcache.backends import create_backbone
from stitchcache.cli import main as cli
from stitchcache.stitch.layers import Stitch
from stitchcache.stitch.losses import ffm_loss
from stitchcache.stitch.model import StitchedTail


@pytest.fixture
def stores(tmp_path, image_folder):
    """Feature records for two different tiny models (widths 32 / 48, patch 4 @ 32 px vs 8 @ 64 px)."""
    specs = {"a": {"name": "a", **tiny_vit(width=32)}, "b": {"name": "b", **tiny_vit(width=48, img=64, patch=8)}}
    return extract_records(specs, image_folder, tmp_path)


def _train(recs, tmp_path, method, src="a", tgt="b", layer=1, init=None, settings=None):
    out = tmp_path / f"{method}-{src}{tgt}.pt"
    settings = {"max_epochs": 4, "patience": 4, "lr_grid": [3e-3], "batch_size": 16, "lfm_batch_size": 16,
                **(settings or {})}
    argv = ["train", "--method", method, "--layer", str(layer), "--stitch", "mlp",
            "--src-train", recs[src, "train"], "--src-val", recs[src, "val"],
            "--tgt-train", recs[tgt, "train"], "--tgt-val", recs[tgt, "val"],
            "--settings", json.dumps(settings), "--out", str(out), "--metrics", str(out) + ".json"]
    if init:
        argv += ["--init", str(init)]
    assert cli(argv) == 0
    return out, json.loads((tmp_path / (out.name + ".json")).read_text())


@pytest.mark.parametrize("method", ["lfm", "ffm", "tlt"])
def test_each_recipe_reduces_its_loss(stores, tmp_path, method):
    _, metrics = _train(stores, tmp_path, method)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < 0.9 * losses[0], losses


def test_ffm_tlt_starts_from_ffm(stores, tmp_path):
    ffm, _ = _train(stores, tmp_path, "ffm", settings={"max_epochs": 2})
    out, metrics = _train(stores, tmp_path, "ffm_tlt", init=ffm, settings={"max_epochs": 1})
    assert metrics["method"] == "ffm_tlt" and torch.load(out, weights_only=True)["spec"]["head"]["num_classes"] == 2


def test_lfm_builds_no_backbone(stores, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("LFM built a backbone")

    import stitchcache.backends as backends
    import stitchcache.stitch.trainer as trainer

    monkeypatch.setattr(trainer, "backbone_from_spec", forbidden)
    monkeypatch.setattr(backends, "create_backbone", forbidden)
    _train(stores, tmp_path, "lfm", settings={"max_epochs": 1})


def test_ffm_gradients_reach_only_the_stitch():
    tgt = create_backbone("timm:vit_small_patch16_224", **tiny_vit(width=48)["kwargs"])
    stitch = Stitch({"kind": "mlp", "d_in": 32, "d_out": 48, "src_prefix": 1, "tgt_prefix": 1})
    tail = StitchedTail(stitch, tgt, 1)
    h, z = torch.randn(4, 65, 32), torch.randn(4, 65, 48)
    ffm_loss(tail, h, z).backward()
    assert all(p.grad is None for p in tgt.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stitch.parameters())


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_identity_self_stitch_is_exact(layer):
    bb = create_backbone("timm:vit_small_patch16_224", **tiny_vit(width=32)["kwargs"])
    stitch = Stitch({"kind": "linear", "init": "identity", "d_in": 32, "d_out": 32, "src_prefix": 1, "tgt_prefix": 1})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = bb.forward_layers(x, [layer])[layer]
        torch.testing.assert_close(StitchedTail(stitch, bb, layer)(h), bb(x), rtol=0, atol=1e-6)


def test_stitch_choices_are_family_plus_init():
    """linear_lstsq is the linear family with the lstsq init: same module, its own name everywhere
    (CLI --stitch, wildcard, checkpoint kind); names round-trip through (family, init)."""
    from stitchcache.stitch.choices import CHOICES, choice_name, parse_choice
    from stitchcache.stitch.layers import STITCH_LAYERS, LinearStitch

    assert set(STITCH_LAYERS) == set(CHOICES) == {"linear", "linear_lstsq", "mlp", "lora"}
    assert parse_choice("linear_lstsq") == ("linear", "lstsq") and parse_choice("mlp") == ("mlp", "default")
    assert all(choice_name(*parse_choice(c)) == c for c in CHOICES)
    cfg = {"kind": "linear_lstsq", "d_in": 32, "d_out": 48, "src_prefix": 1, "tgt_prefix": 1}
    a, b = Stitch(cfg), Stitch({**cfg, "kind": "linear"})
    assert isinstance(a.layer, LinearStitch) and a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    h = torch.randn(2, 65, 32)
    torch.testing.assert_close(a(h), b(h))


def test_load_stitched_rebuilds_the_model(stores, tmp_path):

    out, _ = _train(stores, tmp_path, "ffm", settings={"max_epochs": 1})
    model = load_stitched(out)
    src = create_backbone("timm:vit_small_patch16_224", **tiny_vit(width=32)["kwargs"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = model(x)
        ref = model.tail(src.forward_layers(x, [1])[1])
    assert z.shape == (2, 65, 48)
    torch.testing.assert_close(z, ref)


def test_killed_training_resumes_to_the_same_result(stores, tmp_path, monkeypatch):
    (tmp_path / "ref").mkdir()
    ref, _ = _train(stores, tmp_path / "ref", "ffm", settings={"max_epochs": 3, "patience": 3})
    import stitchcache.train as train_mod

    real_save = train_mod._save_partial
    calls = {"n": 0}

    def dying_save(path, obj):
        real_save(path, obj)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the job dies after its second epoch was checkpointed

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(train_mod, "_save_partial", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _train(stores, tmp_path / "run", "ffm", settings={"max_epochs": 3, "patience": 3})
    monkeypatch.setattr(train_mod, "_save_partial", real_save)
    out, metrics = _train(stores, tmp_path / "run", "ffm", settings={"max_epochs": 3, "patience": 3})
    a, b = torch.load(ref, weights_only=True), torch.load(out, weights_only=True)
    for k in a["stitch_state"]:
        torch.testing.assert_close(a["stitch_state"][k], b["stitch_state"][k])
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]


@pytest.mark.parametrize("method", ["lfm", "ffm"])
def test_min_delta_var_is_a_fraction_of_the_target_variance(stores, tmp_path, method):
    """train.min_delta_var: a matching run's improvement must exceed that fraction of the variance of the
    target tokens it matches (val split); recorded in the metrics; a floor of 100 % stops after `patience`."""
    from stitchcache.cache import open_record
    from stitchcache.stitch.losses import ChannelVariance  # the variance the relative distances use

    _, metrics = _train(stores, tmp_path, method, settings={"max_epochs": 6, "patience": 2, "min_delta_var": 1.0})
    _, tv = open_record(stores["b", "val"])
    var = ChannelVariance()
    var.update(torch.as_tensor((tv.layer(1) if method == "lfm" else tv.final)[:]).float())
    assert metrics["target_var"] == pytest.approx(var.mean_variance(), rel=1e-4)
    assert metrics["min_delta_abs"] == pytest.approx(var.mean_variance(), rel=1e-4)
    assert len(metrics["history"]) == 3  # epoch 1 sets the best; 2 and 3 cannot improve by a whole variance


def test_min_delta_var_does_not_apply_to_task_losses(stores, tmp_path):
    _, metrics = _train(stores, tmp_path, "tlt", settings={"max_epochs": 4, "patience": 4, "min_delta_var": 1.0})
    assert metrics["min_delta_abs"] == 0.0 and len(metrics["history"]) == 4


@pytest.mark.parametrize("method,want", [("ffm", [0.05, 0.02]), ("lfm", [0.001]), ("tlt", [0.001])])
def test_ffm_has_its_own_lr_grid(stores, tmp_path, method, want):
    """train.ffm_lr_grid: ffm trains over its own grid, every other method over train.lr_grid."""
    _, metrics = _train(stores, tmp_path, method, settings={"max_epochs": 1, "patience": 1, "lr_grid": [0.001],
                                                            "ffm_lr_grid": [0.05, 0.02]})
    assert sorted({h["lr"] for h in metrics["history"]}, reverse=True) == want
    _, metrics = _train(stores, tmp_path / "null", method, settings={"max_epochs": 1, "patience": 1,
                                                                     "lr_grid": [0.001], "ffm_lr_grid": None})
    assert {h["lr"] for h in metrics["history"]} == {0.001}
