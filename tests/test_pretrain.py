"""pretrain: a `.partial` checkpoint resumes a killed job only when it was written for the same
model, data and settings (a changed config must not continue someone else's run)."""
from __future__ import annotations

import pytest
import torch

from conftest import FMNIST
from stitchcache import pretrain as pretrain_mod

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")

SPEC = {"name": "m", "backbone": "timm:vit_small_patch16_224", "checkpoint": None,
        "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}}
DATA = {"name": "fmnist", "type": "fashion_mnist", "root": str(FMNIST),
        "splits": {"pretrain": {"source": "train", "start": 0, "count": 64}}}
SETTINGS = {"objective": "supervised", "split": "pretrain", "epochs": 1, "lr": 0.001, "batch_size": 32,
            "num_workers": 0, "seed": 0, "device": "cpu"}


class Killed(Exception):
    pass


def _killed_before_the_final_save(monkeypatch, out, settings):
    """Run pretraining until its last `.partial` is written, then die before writing `out`."""
    real = pretrain_mod._atomic_save

    def save(obj, path):
        if path == out:
            raise Killed
        real(obj, path)

    monkeypatch.setattr(pretrain_mod, "_atomic_save", save)
    with pytest.raises(Killed):
        pretrain_mod.pretrain(SPEC, DATA, settings, out)
    monkeypatch.setattr(pretrain_mod, "_atomic_save", real)
    assert out.with_name(out.name + ".partial").exists() and not out.exists()


def test_partial_of_the_same_settings_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.pt"
    _killed_before_the_final_save(monkeypatch, out, SETTINGS)
    capsys.readouterr()
    pretrain_mod.pretrain(SPEC, DATA, SETTINGS, out)
    err = capsys.readouterr().err
    assert "resuming pretraining of m after epoch 1" in err and "epoch 1/1: loss" not in err
    assert out.exists() and not out.with_name("m.pt.partial").exists()


@pytest.mark.parametrize("change", [{"lr": 0.01}, {"epochs": 2}, {"seed": 1}])
def test_partial_of_other_settings_is_not_resumed(tmp_path, monkeypatch, capsys, change):
    out = tmp_path / "m.pt"
    _killed_before_the_final_save(monkeypatch, out, SETTINGS)
    capsys.readouterr()
    pretrain_mod.pretrain(SPEC, DATA, {**SETTINGS, **change}, out)
    err = capsys.readouterr().err
    assert "resuming" not in err and "it was started with different" in err
    assert f"epoch 1/{change.get('epochs', 1)}: loss" in err  # trained from scratch
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert any(k.startswith("blocks.1.") for k in state)


class _Recorded(Exception):
    pass


@pytest.mark.parametrize("view", ["shared", "native"])
def test_supervised_pretraining_sees_the_view_extraction_will_store(monkeypatch, tmp_path, view):
    """The encoder must be trained on the images it is later probed and stitched on: timm's default
    crop_pct 0.9 (resize 18, crop 16 here) zooms every image by 10 %, while `extract.view: shared`
    stores the full image. Pretraining on the one and extracting the other put every probe of the demo
    4-5 points low (a silent distribution shift). The supervised transform must be extraction's."""
    from stitchcache.backends import create_backbone
    from stitchcache.data import open_split

    seen = {}
    real_open = pretrain_mod.open_split

    def recording_open(spec, split):
        s = real_open(spec, split)

        class Spy:
            num_classes = s.num_classes

            def torch(self, transform):
                seen["t"] = transform
                raise _Recorded

        return Spy()

    monkeypatch.setattr(pretrain_mod, "open_split", recording_open)
    with pytest.raises(_Recorded):
        pretrain_mod.pretrain(SPEC, DATA, {**SETTINGS, "view": view}, tmp_path / "m.pt")
    pre = create_backbone(SPEC["backbone"], checkpoint=None, **SPEC["kwargs"]).preprocess
    assert pre.resize != min(pre.size)  # the model's native transform crops: the two views differ
    img = open_split(DATA, "pretrain").image(0)
    want = pre.for_view(view).transform()(img)
    other = pre.for_view("native" if view == "shared" else "shared").transform()(img)
    got = seen["t"](img)
    assert torch.equal(got, want) and not torch.equal(got, other)
