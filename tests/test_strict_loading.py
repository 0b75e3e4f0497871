"""Weights load strictly in every backend: missing or unexpected tensors stop with an error naming the
model, the file and the first keys; `strict_load: false` is the documented opt-out (logged)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stitchcache.backends import WeightsMismatch, backbone_from_spec, create_backbone
from test_backends import FAMILIES, TINY_TIMM, _make, _save, oc_paths  # noqa: F401  (oc_paths: a fixture)

STRICT = [f for f in FAMILIES if f != "open_clip-vit-seqfirst"]


def _tamper(ckpt: str) -> str:
    """Remove one block tensor and add an unknown one, in the file's own format. -> the dropped key."""
    p = Path(ckpt)
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        sd = load_file(str(p))
    else:
        sd = torch.load(p, weights_only=True)
    dropped = sorted(k for k in sd if ".1." in k and k.endswith("bias"))[-1]  # a bias of block 1 (2nd block)
    del sd[dropped]
    sd[dropped.rsplit(".", 3)[0] + ".bogus.weight"] = torch.zeros(2)
    if p.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    else:
        torch.save(sd, p)
    return dropped


@pytest.mark.parametrize("fid", STRICT)
def test_weights_that_do_not_fit_stop_the_build(fid, oc_paths, tmp_path, capsys):
    bb = _make(fid, oc_paths)
    name, ckpt, kwargs = _save(bb, fid, tmp_path)
    name = name.format(**oc_paths)
    dropped = _tamper(ckpt)
    with pytest.raises(WeightsMismatch) as e:
        create_backbone(name, checkpoint=ckpt, **kwargs)
    msg = str(e.value)
    short = dropped.split(".", 1)[1] if dropped.startswith(("visual.", "vision_model.")) else dropped
    assert name.split(":", 1)[1][:20] in msg and str(Path(ckpt).name) in msg, msg
    assert "missing 1" in msg and short.rsplit(".", 3)[-3] in msg and "unexpected 1" in msg and "bogus" in msg, msg
    assert "strict_load: false" in msg
    # the opt-out: loads, says what did not fit, and the spec rebuilds the same way
    bb2 = create_backbone(name, checkpoint=ckpt, strict_load=False, **kwargs)
    err = capsys.readouterr().err
    assert "warning" in err and "bogus" in err and "strict_load is false" in err
    assert bb2.spec["strict_load"] is False
    backbone_from_spec(bb2.spec)


def test_timm_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(WeightsMismatch, match=r"(?s)timm model 'vit_small_patch16_224'.*resnet.pt.*missing \d+ "
                                              r"\(blocks.*unexpected 2 \(conv1.weight, fc.weight\)"):
        create_backbone("timm:vit_small_patch16_224", checkpoint=str(path), **TINY_TIMM)


def test_timm_four_blocks_into_depth_three_is_refused(tmp_path):
    four = create_backbone("timm:vit_small_patch16_224", **{**TINY_TIMM, "depth": 4})
    path = tmp_path / "four.pt"
    torch.save(four.model.state_dict(), path)
    with pytest.raises(WeightsMismatch, match=r"missing 0 \(\), unexpected \d+ \(blocks.3"):
        create_backbone("timm:vit_small_patch16_224", checkpoint=str(path), **{**TINY_TIMM, "depth": 3})
    # the shape of a tensor that does not fit is an error too, naming the file
    with pytest.raises(WeightsMismatch, match="four.pt.*shape mismatch"):
        create_backbone("timm:vit_small_patch16_224", checkpoint=str(path), **{**TINY_TIMM, "depth": 4,
                                                                                "embed_dim": 48})


def test_timm_classifier_in_the_file_is_not_an_error(tmp_path):
    """A released checkpoint carries its classifier; the tokens never use it (num_classes=0)."""
    full = create_backbone("timm:vit_small_patch16_224", **{**TINY_TIMM, "num_classes": 10})
    path = tmp_path / "with_head.pt"
    torch.save(full.model.state_dict(), path)
    bb = create_backbone("timm:vit_small_patch16_224", checkpoint=str(path), **TINY_TIMM)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), full.model.forward_features(x), rtol=0, atol=0)


def test_open_clip_says_nothing_about_random_init_when_weights_load(oc_paths, tmp_path, caplog):
    import logging

    bb = _make("open_clip-vit", oc_paths)
    name, ckpt, kwargs = _save(bb, "open_clip-vit", tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_backbone(name.format(**oc_paths), checkpoint=ckpt, **kwargs)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # random init: then the library's line is true, and kept
        create_backbone(name.format(**oc_paths), **kwargs)
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_config_strict_load_reaches_the_job_time_loader(tmp_path):
    """models.<name>.strict_load: false (schema default true) -> the spec extract builds from."""
    from stitchcache.extract import model_from_spec
    from stitchcache.inputs import concrete_model_spec

    four = create_backbone("timm:vit_small_patch16_224", **{**TINY_TIMM, "depth": 4})
    path = tmp_path / "four.pt"
    torch.save(four.model.state_dict(), path)
    entry = {"backbone": "timm:vit_small_patch16_224", "kwargs": {**TINY_TIMM, "depth": 3}, "checkpoint": str(path)}
    spec = concrete_model_spec("m", {**entry, "strict_load": True})
    assert "strict_load" not in spec  # the default leaves specs (and every key made from them) as they were
    with pytest.raises(WeightsMismatch, match="blocks.3"):
        model_from_spec(spec)
    spec = concrete_model_spec("m", {**entry, "strict_load": False})
    assert spec["strict_load"] is False
    assert model_from_spec(spec).depth == 3
