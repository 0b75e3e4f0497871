"""Partials and results carry what produced them; anything stale is discarded or refused, loudly."""
from __future__ import annotations

import torch
from torch import nn

import pytest

from stitchcache import provenance
from stitchcache.train import FitConfig, fit


class Interrupt(Exception):
    pass


def _problem(stop_at_epoch: int | None = None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g)

    def build():
        return nn.Linear(4, 2)

    def batches(epoch_seed):
        if stop_at_epoch is not None and epoch_seed == stop_at_epoch:
            raise Interrupt  # the job is killed before this epoch
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(epoch_seed))
        return [(x[perm[i:i + 16]], y[perm[i:i + 16]]) for i in range(0, 64, 16)]

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    def val_loss(m):
        return float(loss_fn(m, (x, y)))

    return build, batches, loss_fn, val_loss


def _fit(grid, partial, stop_at_epoch=None, fingerprint=None, epochs=3):
    build, batches, loss_fn, val_loss = _problem(stop_at_epoch)
    cfg = FitConfig(lr_grid=grid, max_epochs=epochs, patience=10)
    return fit(build, batches, loss_fn, val_loss, cfg, torch.device("cpu"), partial=partial, desc="t",
               fingerprint=fingerprint)


def _same(a, b):
    return a.lr == b.lr and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_partial_resumes_when_nothing_changed(tmp_path, capsys):
    partial = tmp_path / "c.partial"
    with pytest.raises(Interrupt):
        _fit([1e-2], partial, stop_at_epoch=1)
    assert partial.exists()
    resumed = _fit([1e-2], partial)
    assert "resuming lr=0.01 after epoch 1" in capsys.readouterr().err
    assert _same(resumed, _fit([1e-2], None))


def test_partial_of_another_lr_grid_is_discarded(tmp_path, capsys):
    partial = tmp_path / "c.partial"
    with pytest.raises(Interrupt):
        _fit([1e-2], partial, stop_at_epoch=1)
    res = _fit([1e-1], partial)  # same grid index 0, another learning rate
    err = capsys.readouterr().err
    assert "discarding t partial checkpoint" in err and "fit config" in err and "resuming" not in err
    assert _same(res, _fit([1e-1], None))  # trained at 0.1 from scratch, not 0.01's optimizer


def test_finished_grid_point_of_another_grid_is_not_reused(tmp_path, capsys):
    partial = tmp_path / "c.partial"
    _fit([1e-2], partial)  # finished: the partial holds the result of lr=0.01 at index 0
    res = _fit([1e-1, 1e-2], partial)
    assert "discarding" in capsys.readouterr().err
    fresh = _fit([1e-1, 1e-2], None)
    assert _same(res, fresh) and [h["lr"] for h in res.history] == [h["lr"] for h in fresh.history]


def test_partial_of_other_settings_or_inputs_is_discarded(tmp_path, capsys):
    partial = tmp_path / "c.partial"
    old = provenance.fingerprint({"pool": "mean"}, inputs={"src_train": "key-a"})
    with pytest.raises(Interrupt):
        _fit([1e-2], partial, stop_at_epoch=1, fingerprint=old)
    new = provenance.fingerprint({"pool": "mean"}, inputs={"src_train": "key-b"})
    _fit([1e-2], partial, fingerprint=new)
    err = capsys.readouterr().err
    assert "discarding" in err and "inputs.src_train" in err and "resuming" not in err


def test_partial_without_a_fingerprint_is_discarded(tmp_path, capsys):
    partial = tmp_path / "c.partial"
    torch.save({"results": [], "current": {"lr_index": 0}}, partial)  # written before fingerprints existed
    _fit([1e-2], partial)
    assert "discarding" in capsys.readouterr().err


def test_check_names_what_differs():
    a = provenance.fingerprint({"max_epochs": 2, "lr_grid": [0.001]})
    b = provenance.fingerprint({"max_epochs": 3, "lr_grid": [0.001]})
    provenance.check(a, a, "x")
    with pytest.raises(SystemExit, match=r"results/x.*settings.max_epochs: 2 there, 3 asked"):
        provenance.check(a, b, "results/x")
    with pytest.raises(SystemExit, match="settings"):
        provenance.check(None, b, "results/x")


# ---- the train stage records its fingerprint; evaluate and table refuse other settings -------
import json  # noqa: E402

from conftest import extract_records, tiny_vit  # noqa: E402
from stitchcache.cli import main as cli  # noqa: E402

SETTINGS = {"max_epochs": 1, "patience": 1, "lr_grid": [3e-3], "batch_size": 16, "lfm_batch_size": 16,
            "seed": 0, "device": "cpu"}


@pytest.fixture
def trained(tmp_path, image_folder):
    specs = {"a": {"name": "a", **tiny_vit(width=32)}, "b": {"name": "b", **tiny_vit(width=48, img=64, patch=8)}}
    recs = extract_records(specs, image_folder, tmp_path)
    out = tmp_path / "ffm.pt"
    roles = ["--src-train", recs["a", "train"], "--src-val", recs["a", "val"],
             "--tgt-train", recs["b", "train"], "--tgt-val", recs["b", "val"]]
    assert cli(["train", "--method", "ffm", "--layer", "1", "--stitch", "linear", *roles,
                "--settings", json.dumps(SETTINGS), "--out", str(out), "--metrics", str(tmp_path / "train.json")]) == 0
    return out, roles, tmp_path


def _evaluate(ckpt, roles, tmp_path, train_settings, out="eval.json"):
    settings = {"probe": {"max_epochs": 1, "patience": 1, "lr_grid": [0.01], "batch_size": 16}, "seed": 0,
                "device": "cpu", "train": train_settings}
    return cli(["evaluate", "--checkpoint", str(ckpt), *roles, "--cache-root", str(tmp_path / "cache"),
                "--settings", json.dumps(settings), "--out", str(tmp_path / out)])


def test_results_carry_their_settings_and_consumers_refuse_others(trained):
    ckpt, roles, tmp_path = trained
    metrics = json.loads((tmp_path / "train.json").read_text())
    fp = metrics["provenance"]
    assert fp["settings"] == SETTINGS and fp["inputs"]["method"] == "ffm" and fp["code"]
    assert set(fp["inputs"]) >= {"src_train", "src_val", "tgt_train", "tgt_val"}
    assert torch.load(ckpt, weights_only=True)["train"]["provenance"] == fp
    assert not ckpt.with_name(ckpt.name + ".partial").exists()

    # evaluate: the checkpoint of max_epochs 1 is refused when max_epochs 2 is asked
    with pytest.raises(SystemExit, match=r"ffm.pt.*other settings.*settings.max_epochs: 1 there, 2 asked"):
        _evaluate(ckpt, roles, tmp_path, {**SETTINGS, "max_epochs": 2})
    assert _evaluate(ckpt, roles, tmp_path, SETTINGS) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["train_provenance"] == fp

    # table: results of other train settings are refused, naming the file
    probe_settings = {"max_epochs": 1, "patience": 1, "lr_grid": [0.01], "batch_size": 16}
    table = ["table", "--evals", str(tmp_path / "eval.json"), "--out-dir", str(tmp_path / "t")]
    asked = {"train": SETTINGS, "probe": probe_settings}
    assert cli([*table, "--settings", json.dumps(asked)]) == 0
    with pytest.raises(SystemExit, match=r"(?s)1 result\(s\).*eval.json: settings.lr_grid"):
        cli([*table, "--settings", json.dumps({**asked, "train": {**SETTINGS, "lr_grid": [1e-2]}})])
    # an eval.json written before results carried their settings is refused too
    old = {k: v for k, v in ev.items() if k != "train_provenance"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="old.json: missing"):
        cli(["table", "--evals", str(tmp_path / "old.json"), "--out-dir", str(tmp_path / "t"),
             "--settings", json.dumps(asked)])


def test_evaluate_refuses_a_checkpoint_trained_on_other_stores(trained):
    ckpt, roles, tmp_path = trained
    swapped = list(roles)
    swapped[1], swapped[5] = roles[5], roles[1]  # src-train <-> tgt-train
    with pytest.raises(SystemExit, match="inputs.src_train"):
        _evaluate(ckpt, swapped, tmp_path, SETTINGS)


# ---- pretraining partials -------------------------------------------------------------------
def test_pretrain_partial_resumes_only_under_the_same_settings(tmp_path, image_folder, monkeypatch, capsys):
    import stitchcache.pretrain as pre

    spec = {"name": "m", **tiny_vit(width=32)}
    ds = {**image_folder, "splits": {"pretrain": {"start": 0, "count": 32}}}
    settings = {"objective": "supervised", "split": "pretrain", "epochs": 2, "batch_size": 16, "lr": 1e-3,
                "num_workers": 0, "device": "cpu", "seed": 0}
    out = tmp_path / "m.pt"
    real_save = pre._atomic_save

    def killed_after_first_epoch(obj, path):
        real_save(obj, path)
        raise Interrupt

    monkeypatch.setattr(pre, "_atomic_save", killed_after_first_epoch)
    with pytest.raises(Interrupt):
        pre.pretrain(spec, ds, settings, out)
    monkeypatch.setattr(pre, "_atomic_save", real_save)
    partial = out.with_name(out.name + ".partial")
    assert partial.exists()
    saved = partial.read_bytes()

    pre.pretrain(spec, ds, {**settings, "lr": 1e-2}, out)  # another lr: start afresh
    err = capsys.readouterr().err
    assert "discarding pretraining partial" in err and "settings.lr" in err and "resuming" not in err
    assert "epoch 1/2" in err and out.exists()

    partial.write_bytes(saved)
    pre.pretrain(spec, ds, settings, out)  # the same settings: resumed after epoch 1
    err = capsys.readouterr().err
    assert "resuming pretraining of m after epoch 1" in err and "discarding" not in err
