"""The Backbone contract's derived methods and the prefix-token policy of stitch layers."""
import pytest
import torch

from conftest import tiny_vit
from stitchcache.backends import create_backbone
from stitchcache.stitch.layers import PrefixMap, Stitch, make_stitch_config


def _bb(**kw):
    return create_backbone("timm:vit_small_patch16_224", **tiny_vit(**kw)["kwargs"])


def test_selected_capture_stops_after_the_deepest_layer(monkeypatch):
    bb = _bb(depth=4)
    calls = []
    real = bb.block
    monkeypatch.setattr(bb, "block", lambda i, h: calls.append(i) or real(i, h))
    out = bb.forward_layers(torch.randn(2, 3, 32, 32), [0, 2])
    assert sorted(out) == [0, 2] and calls == [1, 2]  # blocks 3 and 4 never run


def test_capture_keeps_only_requested_layers():
    bb = _bb(depth=4)
    out = bb.forward_layers(torch.randn(2, 3, 32, 32), [3])
    assert list(out) == [3] and out[3].shape == (2, 65, 32)


def test_out_of_range_layer_names_the_model():
    bb = _bb(depth=3)
    with pytest.raises(ValueError, match=r"layer 7 is out of range .*0\.\.3"):
        bb.forward_layers(torch.randn(1, 3, 32, 32), [7])


# ---- prefix-token policy (docs/stages/train.md) -------------------------------------------------
def _tokens(prefix, grid=4, d=3):
    """Prefix token k holds value 100+k everywhere; patch token j holds j."""
    pre = torch.stack([torch.full((d,), 100.0 + k) for k in range(prefix)]) if prefix else torch.empty(0, d)
    patches = torch.arange(grid, dtype=torch.float32)[:, None].expand(grid, d)
    return torch.cat([pre, patches])[None]  # (1, prefix + grid, d)


def test_same_prefix_is_identity():
    h = _tokens(5)
    assert torch.equal(PrefixMap(5, 5)(h), h)


def test_cls_to_cls_plus_registers_repeats_the_cls():
    out = PrefixMap(1, 5)(_tokens(1))  # CLIP -> DINOv2-reg / DINOv3
    assert out.shape == (1, 9, 3)
    assert torch.equal(out[0, :5, 0], torch.full((5,), 100.0))  # every target prefix slot <- source CLS
    assert torch.equal(out[0, 5:, 0], torch.arange(4.0))  # patches unchanged, in order


def test_registers_map_slot_by_slot_and_extra_slots_take_cls():
    out = PrefixMap(3, 5)(_tokens(3))
    assert out[0, :5, 0].tolist() == [100.0, 101.0, 102.0, 100.0, 100.0]


def test_prefix_to_no_prefix_drops_it():
    out = PrefixMap(5, 0)(_tokens(5))  # DINOv3 -> SigLIP
    assert out.shape == (1, 4, 3) and torch.equal(out[0, :, 0], torch.arange(4.0))


def test_no_prefix_to_cls_uses_the_mean_patch_token():
    out = PrefixMap(0, 1)(_tokens(0))  # SigLIP -> CLIP
    assert out.shape == (1, 5, 3) and out[0, 0, 0] == pytest.approx(1.5)


def test_stitch_config_refuses_different_grids():
    a, b = _bb(), _bb(img=48, patch=4)  # 8x8 vs 12x12
    with pytest.raises(ValueError, match="token grids differ"):
        make_stitch_config("mlp", a.describe(), b.describe())


def test_stitch_maps_source_to_target_token_layout():
    a = _bb(width=32)
    b = create_backbone("timm:vit_small_patch14_reg4_dinov2", img_size=56, patch_size=7, embed_dim=48, depth=2,
                        num_heads=2)  # 8x8 grid, CLS + 4 registers
    s = Stitch(make_stitch_config("mlp", a.describe(), b.describe()))
    h = a.forward_layers(torch.randn(2, 3, 32, 32), [1])[1]
    assert s(h).shape == (2, b.num_tokens, 48)
