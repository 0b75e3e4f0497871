"""Bad images are found before any forward pass and named all at once; on_bad_image: skip leaves
them out with a stable key; high-bit-depth images are scaled to 8 bits, not clipped."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_vit
from stitchcache.data import open_split
from stitchcache.data.scan import BadImages, checked_split, scan_split


def _folder(tmp_path, n=6):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def _spec(root, **extra):
    return {"name": "toy", "type": "image_folder", "root": str(root), "splits": {"train": {}}, **extra}


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _break_files(root):
    """A truncated PNG, a truncated JPEG and a garbage file; returns their paths."""
    png = root / "a" / "1.png"
    _truncate(png)
    jpg = root / "b" / "9.jpg"
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    jpg.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    junk = root / "b" / "junk.jpg"
    junk.write_bytes(b"this is not an image" * 10)
    return [png, jpg, junk]


def test_extraction_error_names_the_truncated_file(tmp_path):
    """Before: 'image file is truncated' from a DataLoader worker, without the file's name."""
    root = _folder(tmp_path)
    bad = root / "a" / "2.png"
    _truncate(bad)
    split = open_split(_spec(root), "train")
    ds = split.torch(lambda im: np.asarray(im.convert("RGB")))
    i = next(i for i in range(len(split)) if split.image_path(i) == bad)
    with pytest.raises(OSError, match=str(bad)):
        ds[i]


def test_every_bad_file_is_reported_at_once_with_its_path(tmp_path):
    root = _folder(tmp_path)
    broken = _break_files(root)
    split = open_split(_spec(root), "train")
    with pytest.raises(BadImages) as e:
        checked_split(split, "error", cache_dir=tmp_path / "scans", dataset="toy")
    msg = str(e.value)
    assert "3 of 14 images of toy/train" in msg and "on_bad_image: skip" in msg
    for p in broken:
        assert str(p) in msg
    assert len(e.value.bad) == 3


def test_scan_is_cached_by_manifest(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    _break_files(root)
    split = open_split(_spec(root), "train")
    first = scan_split(split, tmp_path / "scans")
    from stitchcache.data import scan

    monkeypatch.setattr(scan, "_check", lambda *a: pytest.fail("rescanned an unchanged manifest"))
    assert scan_split(open_split(_spec(root), "train"), tmp_path / "scans") == first
    monkeypatch.undo()
    (root / "b" / "junk.jpg").unlink()  # the manifest changes: scanned again
    assert len(scan_split(open_split(_spec(root), "train"), tmp_path / "scans")) == 2


def test_skip_leaves_bad_images_out_and_records_them(tmp_path):
    root = _folder(tmp_path)
    broken = _break_files(root)
    base = open_split(_spec(root, on_bad_image="skip"), "train")
    split = checked_split(base, "skip", cache_dir=tmp_path / "scans", dataset="toy")
    assert len(split) == len(base) - 3
    assert split.manifest()["skipped"] == sorted(str(p.relative_to(root)) for p in broken)
    for i in range(len(split)):
        split.image(i)  # every remaining image decodes
    again = checked_split(open_split(_spec(root, on_bad_image="skip"), "train"), "skip",
                          cache_dir=tmp_path / "scans2", dataset="toy")
    assert again.digest() == split.digest() != base.digest()  # stable key across runs


def test_skip_records_the_list_in_the_store(tmp_path):
    from stitchcache.cache import FeatureStore
    from stitchcache.extract import extract

    root = _folder(tmp_path)
    broken = _break_files(root)
    spec = {"name": "t", **tiny_vit(depth=1), "checkpoint": None}
    ds = _spec(root, on_bad_image="skip")
    rec = extract(spec, ds, "train", tmp_path / "cache", {"chunk_size": 8, "num_workers": 0})
    fs = FeatureStore(rec["store"])
    want = sorted(str(p.relative_to(root)) for p in broken)
    assert fs.num_images == 11 and fs.attrs["skipped_images"] == want and rec["skipped_images"] == want
    with pytest.raises(SystemExit, match="3 of 14 images"):  # error mode: before any store exists
        from stitchcache.extract import main
        import argparse

        main(argparse.Namespace(model_spec=json.dumps(spec), dataset_spec=json.dumps(_spec(root)), split="train",
                                cache_root=str(tmp_path / "cache2"), settings='{"num_workers": 0}',
                                out=str(tmp_path / "r.json")))
    assert not (tmp_path / "cache2" / "features").exists()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """Before: PIL's convert('RGB') clipped I;16 to 255: a mid-grey 16-bit image became white."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(root / "a" / "x.png")
    with Image.open(root / "a" / "x.png") as im:
        assert im.mode.startswith("I;16")  # really a 16-bit file
    rgb = np.asarray(open_split(_spec(root), "train").image(0).convert("RGB"))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 64, 128, 255])


def test_float_tiff_is_scaled_not_clipped(tmp_path):
    """Before: a float image in 0..1 became all black (values truncated to 0 or 1)."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32).repeat(4, 0)
    Image.fromarray(values, mode="F").save(root / "a" / "x.tif")
    rgb = np.asarray(open_split(_spec(root), "train").image(0).convert("RGB"))
    np.testing.assert_array_equal(rgb[0, :, 1], [0, 64, 128, 255])


def test_float_image_without_known_scale_is_a_bad_image(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.array([[-3.0, 900.0]], dtype=np.float32), mode="F").save(root / "a" / "x.tif")
    with pytest.raises(BadImages, match=r"x\.tif.*no known scale"):
        checked_split(open_split(_spec(root), "train"), "error", dataset="toy")


def test_image_folder_count_says_it_takes_whole_classes(tmp_path, capsys):
    root = _folder(tmp_path)
    open_split({**_spec(root), "splits": {"train": {"count": 4}}}, "train")
    assert "1 of 2 classes" in capsys.readouterr().err
