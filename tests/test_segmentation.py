"""Segmentation through the pipeline: masks follow the image's resize / crop (nearest) and land on
the right patches, masks are stored as (N, H, W) uint8, the per-patch head / loss / mIoU are right,
and a tiny ADE-like run goes extract -> probe -> TLT -> evaluate."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import extract_records, tiny_vit
from stitchcache.backends.base import Preprocess
from stitchcache.cache import open_record
from stitchcache.cli import main as cli
from stitchcache.data import open_split
from stitchcache.data.segmentation import mask_transform
from stitchcache.tasks import Confusion, SegHead, seg_loss


# ------------------------------------------------------------------------------ geometry / alignment
@pytest.mark.parametrize("mode, resize, size, image_hw", [
    ("shortest", 24, (24, 24), (37, 53)),      # downscale, centre crop of the long side
    ("shortest", 40, (32, 24), (30, 45)),      # upscale, non-square crop
    ("shortest_hf", 27, (24, 24), (41, 30)),   # floored crop offsets
    ("squash", 24, (24, 32), (37, 53)),        # no aspect ratio kept
    ("shortest", 20, (24, 24), (30, 20)),      # crop larger than the image: padded
])
def test_mask_follows_the_image_geometry(mode, resize, size, image_hw):
    """With nearest interpolation for the image too, the preprocessed image and the preprocessed
    mask must agree pixel for pixel, whatever the resize mode: same resize, same crop."""
    rng = np.random.default_rng(0)
    h, w = image_hw
    labels = rng.integers(0, 5, (h // 3 + 1, w // 3 + 1)).repeat(3, 0).repeat(3, 1)[:h, :w].astype(np.uint8)
    labels[:, :2] = 4
    image = Image.fromarray(np.repeat(labels[..., None] * 50, 3, axis=2))
    pp = Preprocess(size=size, resize=resize, mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="nearest",
                    resize_mode=mode)
    img = pp.transform()(image)                                   # (3, H, W) in [0, 1]
    mask = mask_transform(pp)(Image.fromarray(labels, mode="L"))  # (H, W) uint8
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == size
    from_image = torch.round(img[0] * 255 / 50).to(torch.uint8)
    inside = mask != 255
    assert torch.equal(from_image[inside], mask[inside])
    if image_hw[1] < size[1]:  # padding: black in the image, ignored (255) in the mask, never class 0
        assert (~inside).any() and (img[:, ~inside] == 0).all()
    else:
        assert inside.all()


def _block_dataset(tmp_path):
    """One 64x96 (h x w) ADE-like image whose raw mask is 32-px blocks: a class-5 column on each
    side (cut away by the centre crop) and, inside the crop, quadrants of raw 1, 2 / 3, 0."""
    root = tmp_path / "blocks"
    for sub in ("training", "validation"):
        (root / "images" / sub).mkdir(parents=True)
        (root / "annotations" / sub).mkdir(parents=True)
        raw = np.full((64, 96), 5, np.uint8)
        raw[:32, 16:48], raw[:32, 48:80], raw[32:, 16:48], raw[32:, 48:80] = 1, 2, 3, 0
        Image.fromarray(np.repeat(raw[..., None] * 40, 3, 2)).save(root / "images" / sub / "ADE_x_0.jpg")
        Image.fromarray(raw, mode="L").save(root / "annotations" / sub / "ADE_x_0.png")
    return {"name": "blocks", "type": "ade20k", "root": str(root),
            "splits": {"train": {"source": "train"}, "val": {"source": "val"}}}


def test_block_mask_lands_on_the_right_patches(tmp_path):
    """Extracted through the real pipeline (32 px, patch 8, shorter side 64 -> 32, centre crop):
    every patch of the stored mask holds one class, the expected one for its grid cell."""
    ds = _block_dataset(tmp_path)
    spec = {"name": "m", **tiny_vit(width=16, img=32, patch=8, depth=1, pretrained_cfg_overlay={"crop_pct": 1.0})}
    rec, store = open_record(extract_records({"m": spec}, ds, tmp_path, chunk_size=4)["m", "train"])
    assert store.labels.shape == (1, 32, 32) and store.labels.dtype == np.uint8
    assert store.attrs["task"] == "segmentation" and store.attrs["ignore_index"] == 255
    assert store.attrs["num_classes"] == 150 and rec["task"] == "segmentation"
    mask = store.labels[0]
    patches = mask.reshape(4, 8, 4, 8).transpose(0, 2, 1, 3).reshape(4, 4, 64)
    assert (patches == patches[..., :1]).all()  # one class per patch
    expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])
    assert np.array_equal(patches[..., 0], expected)
    assert 4 not in mask  # raw class 5 lay outside the crop


# ------------------------------------------------------------------------------ head, loss, metric
def test_seg_head_maps_each_patch_token_to_its_grid_cell():
    head = SegHead(width=4, num_classes=3, num_prefix=1, grid=(2, 3))
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(3, 4))
        head.fc.bias.zero_()
    z = torch.zeros(1, 7, 4)
    z[0, 1 + 1 * 3 + 2, 1] = 5.0  # patch token of row 1, column 2 (row-major after the prefix)
    z[0, 0, :] = 9.0              # the prefix token is dropped
    logits = head(z)
    assert logits.shape == (1, 3, 2, 3) and logits[0, 1, 1, 2] == 5.0 and logits.abs().sum() == 5.0


def test_seg_loss_ignores_unlabelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 2, 2)
    y = torch.randint(0, 4, (2, 8, 8))
    y[:, :3] = 255
    base = seg_loss(logits, y)
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    ref = torch.nn.functional.cross_entropy(up.permute(0, 2, 3, 1)[y != 255], y[y != 255])
    assert torch.allclose(base, ref, atol=1e-6)
    assert seg_loss(logits, torch.full((2, 8, 8), 255)).item() == 0.0  # nothing labelled: 0, not NaN


def test_miou_accumulates_over_batches():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2;
    # class 3: never in gt, predicted only on an ignored pixel -> absent; class 4: absent
    whole = Confusion(5)
    whole.update(pred, gt)
    parts = Confusion(5)
    parts.update(pred[:1], gt[:1])
    parts.update(pred[1:], gt[1:])
    for c in (whole, parts):
        r = c.result()
        assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
        assert r["pixel_acc"] == pytest.approx(4 / 6) and r["classes_present"] == 3


# ------------------------------------------------------------------------------ end to end
def test_tiny_segmentation_run(tmp_path, ade20k):
    """Two different tiny ViTs (CLS vs no prefix token, 32 px / patch 8 vs 28 px / patch 7: both a
    4x4 grid) on the ADE-like fixture: extract, probe both, TLT b->a, evaluate."""
    specs = {"a": {"name": "a", **tiny_vit(width=32, img=32, patch=8, depth=2)},
             "b": {"name": "b", **tiny_vit(width=24, img=28, patch=7, depth=2, class_token=False, global_pool="avg")}}
    recs = extract_records(specs, ade20k, tmp_path, chunk_size=8)
    _, sb = open_record(recs["b", "train"])
    assert sb.labels.shape == (16, 28, 28) and sb.labels.chunks == (8, 28, 28) and sb.labels.dtype == np.uint8
    assert open_split(ade20k, "train").digest() == sb.attrs["key_parts"]["dataset"]

    probe = {"max_epochs": 3, "patience": 3, "batch_size": 8, "lr_grid": [0.01]}
    for m in ("a", "b"):
        out = tmp_path / f"probe-{m}.json"
        assert cli(["probe", "--train", recs[m, "train"], "--val", recs[m, "val"], "--settings", json.dumps(probe),
                    "--out", str(out)]) == 0
        p = json.loads(out.read_text())
        assert p["task"] == "segmentation" and p["metric"] == "miou" and p["num_classes"] == 150
        assert 0.0 <= p["probe_acc"] == p["probe_miou"] <= 1.0 and 0.0 <= p["probe_pixel_acc"] <= 1.0

    ckpt = tmp_path / "tlt.pt"
    settings = {"max_epochs": 4, "patience": 4, "lr_grid": [3e-3], "batch_size": 8}
    assert cli(["train", "--method", "tlt", "--layer", "1", "--stitch", "mlp",
                "--src-train", recs["b", "train"], "--src-val", recs["b", "val"],
                "--tgt-train", recs["a", "train"], "--tgt-val", recs["a", "val"],
                "--settings", json.dumps(settings), "--out", str(ckpt), "--metrics", str(tmp_path / "tlt.json")]) == 0
    losses = [h["train_loss"] for h in json.loads((tmp_path / "tlt.json").read_text())["history"]]
    assert losses[-1] < 0.9 * losses[0], losses
    head = torch.load(ckpt, weights_only=True)["spec"]["head"]
    assert head["task"] == "segmentation" and head["grid"] == [4, 4] and head["num_prefix"] == 1

    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--src-train", recs["b", "train"], "--src-val", recs["b", "val"],
                "--tgt-train", recs["a", "train"], "--tgt-val", recs["a", "val"], "--cache-root", str(tmp_path / "cache"),
                "--settings", json.dumps({"probe": probe, "device": "cpu"}), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["task"] == "segmentation" and r["metric"] == "miou" and r["pool"] is None
    for k in ("probe_acc", "probe_miou", "probe_pixel_acc", "head_acc", "head_miou", "head_pixel_acc"):
        assert 0.0 <= r[k] <= 1.0, (k, r[k])
    assert r["head_acc"] == r["head_miou"] and r["probe_acc"] == r["probe_miou"]
    _, exported = open_record(recs["b", "val"])
    from stitchcache.cache import open_store
    ev = open_store(r["exported_val"])
    assert ev.labels.shape == (8, 28, 28) and np.array_equal(ev.labels[:], exported.labels[:])
    # per-image predictions: segmentation rows carry the probe's per-image mIoU / pixel accuracy
    import pyarrow.parquet as pq
    pred = pq.read_table(tmp_path / "predictions.parquet")
    assert pred.column_names == ["image", "label", "pred_probe", "pred_head", "miou", "pixel_acc"]
    assert pred.column("image").to_pylist() == exported.image_ids()
    assert sorted(pred.column("image").to_pylist())[0] == "images/validation/ADE_val_00000000.jpg"
    assert set(pred.column("label").to_pylist()) == {-1} and pred.column("pred_probe").null_count == 8
    px = np.asarray(pred.column("pixel_acc").to_pylist())
    assert np.all((0 <= px) & (px <= 1)) and pred.schema.metadata[b"split"] == b"val"
