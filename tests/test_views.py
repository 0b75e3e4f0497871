"""extract.view: under 'shared' token i of every model covers the same image pixels; 'native' is
each library's own transform. The view is part of the store key and the request key."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit
from stitchcache.backends import create_backbone
from stitchcache.cache.keys import feature_key_parts
from stitchcache.data.segmentation import mask_transform
from stitchcache.inputs import request_key

W, H = 90, 60  # a non-square image: shortest-side crops and squashing differ from a shared box


def coordinate_image() -> Image.Image:
    """Red = x / (W-1), green = y / (H-1): the pixels say where they came from."""
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype("uint8"), mode="RGB")


def patch_coords(pre, img, patch: int) -> np.ndarray:
    """(grid_h, grid_w, 2): mean source (x, y) fraction of the pixels each patch token sees."""
    t = pre.transform()(img)  # (3, H', W'), normalised
    rgb = t * torch.tensor(pre.std)[:, None, None] + torch.tensor(pre.mean)[:, None, None]
    xy = rgb[:2]  # (2, H', W') in [0, 1]
    g = torch.nn.functional.avg_pool2d(xy[None], patch)[0]  # (2, gh, gw)
    return g.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def pair():
    """Two models with different native transforms and one 8x8 grid: 32 px / patch 4 at timm's
    crop_pct 0.9 (resize 35, crop 32), and 48 px / patch 6 at crop_pct 1.0 (resize 48, crop 48)."""
    a = create_backbone(tiny_vit()["backbone"], **tiny_vit(img=32, patch=4, depth=1)["kwargs"])
    b = create_backbone(tiny_vit()["backbone"], **tiny_vit(img=48, patch=6, depth=1,
                                                          pretrained_cfg_overlay={"crop_pct": 1.0})["kwargs"])
    assert a.grid == b.grid == (8, 8)
    assert a.preprocess.resize != a.preprocess.size[0] and b.preprocess.resize == b.preprocess.size[0]
    return a, b


def test_shared_view_gives_token_i_the_same_pixels_in_both_models(pair):
    a, b = pair
    img = coordinate_image()
    ca = patch_coords(a.preprocess.for_view("shared"), img, a.patch_size)
    cb = patch_coords(b.preprocess.for_view("shared"), img, b.patch_size)
    assert np.abs(ca - cb).max() < 0.01  # within 1 % of the image per token
    # the shared region is the centred square of the 90x60 image: x from 15/89 to 74/89, all of y
    assert abs(ca[..., 0].min() - (15 + 3.75) / 89) < 0.02 and abs(ca[..., 1].min() - 3.75 / 59) < 0.02


def test_native_views_do_not_line_up(pair):
    a, b = pair
    img = coordinate_image()
    ca = patch_coords(a.preprocess.for_view("native"), img, a.patch_size)
    cb = patch_coords(b.preprocess.for_view("native"), img, b.patch_size)
    assert np.abs(ca - cb).max() > 0.03  # crop_pct 0.9 vs 1.0: outer tokens are ~5 % of the image apart
    sq = a.preprocess.__class__(**{**a.preprocess.__dict__, "resize_mode": "squash"})
    cs = patch_coords(sq, img, a.patch_size)  # squash sees the whole width
    assert np.abs(cs - cb).max() > 0.05


def test_masks_follow_the_shared_view(pair):
    a, _ = pair
    pre = a.preprocess.for_view("shared")
    img = coordinate_image()
    mask = Image.fromarray(np.asarray(img)[..., 0], mode="L")  # class index = x coordinate code
    m = mask_transform(pre)(mask).float() / 255
    x = patch_coords(pre, img, a.patch_size)[..., 0]
    mx = torch.nn.functional.avg_pool2d(m[None, None], a.patch_size)[0, 0].numpy()
    assert np.abs(mx - x).max() < 0.02


def test_view_is_part_of_the_store_key_and_the_request_key():
    facts = {"spec": {"name": "m"}, "preprocess": {}}
    inputs = {"files": {}, "versions": {}}
    keys = {(v, o): str(feature_key_parts(backbone_facts=facts, weights_digest="w", manifest_digest="d",
                                          layers=[1], dtype="float16", model_inputs=inputs,
                                          settings={"view": v, "order_seed": o}))
            for v in ("shared", "native") for o in (0, None)}
    assert len(set(keys.values())) == 4
    defaults = str(feature_key_parts(backbone_facts=facts, weights_digest="w", manifest_digest="d", layers=[1],
                                     dtype="float16", model_inputs=inputs, settings={}))
    assert defaults == keys["shared", 0]  # omitted = the defaults
    spec = {"backbone": "timm:x", "kwargs": {}, "checkpoint": None}
    ds = {"name": "d", "type": "image_folder", "root": "/nonexistent", "splits": {"train": {}}}
    rk = {request_key(spec, ds, "train", e) for e in ({}, {"view": "shared"}, {"view": "native"},
                                                       {"order_seed": None}, {"order_seed": 0})}
    assert len(rk) == 3  # {} = the defaults: shared, order seed 0
