"""Dataset types on tiny fixtures written here: image_list (+ the balanced-subset helper),
fgvc_aircraft (official layout, banner crop) and ade20k (masks, label mapping). Loading, label
order, manifests whose digest follows the content, clear errors naming the file or key."""
import csv
import json

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT
from stitchcache.cli import main as cli
from stitchcache.data import DATASET_TYPES, open_split
from stitchcache.data.base import IGNORE_INDEX
from stitchcache.data.subset import balanced_subset


def _png(path, value, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


# ---------------------------------------------------------------------------------------- image_list
@pytest.fixture
def listed(tmp_path):
    """root/imgs/<class>/<i>.png for classes 'b cat', 'a,dog', 'c' (3 images each) and two lists."""
    root = tmp_path / "ds"
    rows = []
    for k, c in enumerate(["b cat", "a,dog", "c"]):
        for i in range(3):
            rel = f"imgs/{c.replace(',', '_')}/{i}.png"
            _png(root / rel, 40 * k + i)
            rows.append((rel, c))
    (root / "lists").mkdir()
    with open(root / "lists" / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows[::-1])
    with open(root / "lists" / "val.csv", "w", newline="") as f:  # no header, one class only
        csv.writer(f).writerows([r for r in rows if r[1] == "c"])
    return {"name": "lst", "type": "image_list", "root": str(root),
            "splits": {"train": {"list": "lists/train.csv"}, "val": {"list": str(root / "lists" / "val.csv")}}}


def test_image_list_loads_with_sorted_class_order(listed):
    s = open_split(listed, "train")
    assert s.classes == ["a,dog", "b cat", "c"] and s.num_classes == 3 and s.task == "classification"
    assert len(s) == 9
    assert s.items[0] == ("imgs/c/2.png", 2) and s.label(0) == 2  # rows keep the list's order
    assert np.asarray(s.image(0))[0, 0, 0] == 82
    x, y, i = s.torch(lambda im: torch.from_numpy(np.asarray(im).copy()))[6]
    assert y == 1 and i == 6 and x.shape == (10, 12, 3)  # rows 3..5: 'a,dog' (0), 6..8: 'b cat' (1)
    sub = open_split({**listed, "splits": {"train": {"list": "lists/train.csv", "start": 2, "count": 4}}}, "train")
    assert [it[0] for it in sub.items] == [it[0] for it in s.items[2:6]]


def test_image_list_classes_file_fixes_the_order(listed, tmp_path):
    (tmp_path / "ds" / "classes.txt").write_text("c\nb cat\n\na,dog\n")
    spec = {**listed, "classes": "classes.txt"}
    tr, va = open_split(spec, "train"), open_split(spec, "val")
    assert tr.classes == va.classes == ["c", "b cat", "a,dog"]
    assert va.num_classes == 3 and {va.label(i) for i in range(len(va))} == {0}
    # without the file the one-class val list would number its class 0 as well, but name only 'c'
    assert open_split(listed, "val").classes == ["c"]


def test_image_list_digest_follows_content(listed, tmp_path):
    d0 = open_split(listed, "train").digest()
    assert open_split(listed, "train").digest() == d0  # deterministic
    _png(tmp_path / "ds" / "imgs" / "c" / "1.png", 0, size=(13, 10))  # one image replaced (new size)
    d1 = open_split(listed, "train").digest()
    assert d1 != d0
    lst = tmp_path / "ds" / "lists" / "train.csv"
    lst.write_text(lst.read_text().replace("imgs/c/0.png,c", "imgs/c/0.png,b cat"))  # a relabelled image
    assert open_split(listed, "train").digest() != d1


def test_image_list_errors_name_the_file(listed, tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        open_split({**listed, "splits": {"train": {"list": "nope.csv"}}}, "train")
    with pytest.raises(ValueError, match=r"needs `list:`"):
        open_split({**listed, "splits": {"train": {}}}, "train")
    (root / "bad.csv").write_text("path,label\nimgs/c/0.png,c\nimgs/c/1.png\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*line 3"):
        open_split({**listed, "splits": {"train": {"list": "bad.csv"}}}, "train")
    (root / "classes.txt").write_text("c\n")
    with pytest.raises(ValueError, match=r"classes\.txt.*'a,dog'"):
        open_split({**listed, "classes": "classes.txt"}, "train")
    (root / "classes.txt").write_text("c\nc\n")
    with pytest.raises(ValueError, match="twice"):
        open_split({**listed, "classes": "classes.txt"}, "train")
    (root / "imgs" / "c" / "2.png").unlink()
    s = open_split(listed, "train")  # opening stays cheap; the manifest stats every image
    with pytest.raises(FileNotFoundError, match=r"imgs/c/2\.png"):
        s.digest()
    with pytest.raises(FileNotFoundError, match=r"imgs/c/2\.png"):
        s.image(0)
    with pytest.raises(ValueError, match=r"splits\.train has keys \['source'\]"):
        open_split({**listed, "splits": {"train": {"list": "lists/train.csv", "source": "train"}}}, "train")
    with pytest.raises(ValueError, match="unknown type 'imagelist'.*image_list"):
        open_split({**listed, "type": "imagelist"}, "train")


# ------------------------------------------------------------------------------------- data subset
@pytest.fixture
def folder(tmp_path):
    """tmp/pool/{train,val}/<class>/<scene>/<i>.jpg: 3 classes, 8 / 3 / 5 train images, 2 val each."""
    root = tmp_path / "pool"
    for c, n in (("airport", 8), ("farm", 3), ("port", 5)):
        for i in range(n):
            _png(root / "train" / c / f"scene{i % 2}" / f"{i}.png", i)
        for i in range(2):
            _png(root / "val" / c / f"{i}.png", i)
    return root


def _read(p):
    return list(csv.reader(open(p)))[1:]


def test_subset_is_balanced_disjoint_and_seeded(folder, tmp_path):
    res = balanced_subset(folder / "train", tmp_path / "l0", train=2, val=1, seed=0)
    tr, va = _read(tmp_path / "l0" / "train.csv"), _read(tmp_path / "l0" / "val.csv")
    assert res["classes"] == 3 and len(tr) == 6 and len(va) == 3
    for c in ("airport", "farm", "port"):
        assert sum(r[1] == c for r in tr) == 2 and sum(r[1] == c for r in va) == 1
    assert not {r[0] for r in tr} & {r[0] for r in va}
    assert all(r[0].startswith(f"{r[1]}/") for r in tr)  # relative to the common parent: --root itself
    again = balanced_subset(folder / "train", tmp_path / "l1", train=2, val=1, seed=0)
    assert again["train"] == 6 and _read(tmp_path / "l1" / "train.csv") == tr
    other = [_read(tmp_path / f"s{s}" / "train.csv") for s in range(1, 4)
             if balanced_subset(folder / "train", tmp_path / f"s{s}", train=2, val=1, seed=s)]
    assert any(o != tr for o in other)
    # the lists load as an image_list dataset with the written classes file
    spec = {"name": "sub", "type": "image_list", "root": res["base"], "classes": str(tmp_path / "l0" / "classes.txt"),
            "splits": {"train": {"list": str(tmp_path / "l0" / "train.csv")}}}
    s = open_split(spec, "train")
    assert s.classes == ["airport", "farm", "port"] and len(s) == 6 and s.image(0).size == (12, 10)


def test_subset_cli_val_root_and_short_classes(folder, tmp_path, capsys):
    out = tmp_path / "lists"
    assert cli(["data", "subset", "--root", str(folder / "train"), "--val-root", str(folder / "val"),
                "--train", "3", "--val", "2", "--seed", "1", "--out", str(out)]) == 0
    tr, va = _read(out / "train.csv"), _read(out / "val.csv")
    assert len(tr) == 9 and len(va) == 6
    assert all(r[0].startswith("train/") for r in tr) and all(r[0].startswith("val/") for r in va)
    assert f"root: {folder}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="class 'farm' has too few images"):
        cli(["data", "subset", "--root", str(folder / "train"), "--train", "3", "--val", "1", "--out", str(out)])
    assert cli(["data", "subset", "--root", str(folder / "train"), "--train", "3", "--val", "1", "--out", str(out),
                "--skip-short"]) == 0
    assert (out / "classes.txt").read_text().split("\n")[:2] == ["airport", "port"]
    with pytest.raises(SystemExit, match="does not exist"):
        cli(["data", "subset", "--root", str(tmp_path / "missing"), "--train", "1", "--val", "1", "--out", str(out)])


# ----------------------------------------------------------------------------------- fgvc_aircraft
@pytest.fixture
def aircraft(tmp_path):
    root = tmp_path / "fgvc-aircraft-2013b"
    data = root / "data"
    (data / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172", "F/A-18"]
    (data / "variants.txt").write_text("".join(v + "\n" for v in variants))
    splits = {"train": ["0034309", "0034958", "1025794"], "val": ["0056978", "0062765"],
              "test": ["1102335", "1110428"]}
    for k, (src, ids) in enumerate(splits.items()):
        lines = []
        for j, image_id in enumerate(ids):
            arr = np.full((50, 30, 3), 10 * j, np.uint8)
            arr[-20:] = 255  # the copyright banner
            Image.fromarray(arr).save(data / "images" / f"{image_id}.jpg", quality=95)
            lines.append(f"{image_id} {variants[(k + j) % 4]}\n")
        (data / f"images_variant_{src}.txt").write_text("".join(lines))
    (data / "images_variant_trainval.txt").write_text(
        (data / "images_variant_train.txt").read_text() + (data / "images_variant_val.txt").read_text())
    return {"name": "air", "type": "fgvc_aircraft", "root": str(root),
            "splits": {"train": {"source": "trainval"}, "val": {"source": "test"}}}


def test_fgvc_aircraft_reads_the_official_layout(aircraft):
    tr, va = open_split(aircraft, "train"), open_split(aircraft, "val")
    assert len(tr) == 5 and len(va) == 2 and tr.num_classes == va.num_classes == 4
    assert tr.classes[2] == "Cessna 172"  # names with spaces / slashes survive
    assert [tr.label(i) for i in range(5)] == [0, 1, 2, 1, 2] and [va.label(i) for i in range(2)] == [2, 3]
    im = tr.image(0)
    assert im.size == (30, 30) and np.asarray(im).max() < 60  # 20-px banner cropped by default
    keep = open_split({**aircraft, "crop_banner": False}, "train")
    assert keep.image(0).size == (30, 50)
    assert keep.digest() != tr.digest()
    # data/ itself as the root works too
    assert len(open_split({**aircraft, "root": aircraft["root"] + "/data"}, "train")) == 5


def test_fgvc_aircraft_digest_and_errors(aircraft, tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    d0 = open_split(aircraft, "val").digest()
    Image.fromarray(np.zeros((60, 30, 3), np.uint8)).save(data / "images" / "1110428.jpg")
    assert open_split(aircraft, "val").digest() != d0
    with pytest.raises(ValueError, match="source must be one of train, val, test, trainval"):
        open_split({**aircraft, "splits": {"train": {"source": "training"}}}, "train")
    (data / "images_variant_test.txt").write_text("1102335 Boeing 999\n")
    with pytest.raises(ValueError, match=r"images_variant_test\.txt.*line 1.*'Boeing 999'"):
        open_split(aircraft, "val")
    (data / "images_variant_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"images_variant_val\.txt"):
        open_split({**aircraft, "splits": {"val": {"source": "val"}}}, "val")
    (data / "images" / "0034309.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"0034309\.jpg"):
        open_split(aircraft, "train").digest()
    with pytest.raises(FileNotFoundError, match="variants.txt"):
        open_split({**aircraft, "root": str(tmp_path)}, "train")


# ------------------------------------------------------------------------------------------ ade20k
def test_ade20k_masks_are_mapped_and_checked(ade20k, tmp_path):
    tr, va = open_split(ade20k, "train"), open_split(ade20k, "val")
    assert (len(tr), len(va)) == (16, 8)
    assert tr.task == "segmentation" and tr.num_classes == 150 and tr.ignore_index == IGNORE_INDEX == 255
    root = tmp_path / "ADEChallengeData2016"
    raw = np.asarray(Image.open(root / "annotations" / "training" / f"{tr.items[0]}.png"))
    m = tr.label(0)
    assert m.mode == "L" and m.size == tr.image(0).size == (40, 32)
    mask = np.asarray(m)
    assert np.array_equal(mask == 255, raw == 0) and np.array_equal(mask[raw > 0], raw[raw > 0] - 1)
    with pytest.raises(ValueError, match="label_transform"):
        tr.torch(lambda im: im)  # a segmentation split never goes through without its mask transform


def test_ade20k_digest_and_errors(ade20k, tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    d0 = open_split(ade20k, "val").digest()
    mpath = root / "annotations" / "validation" / "ADE_val_00000003.png"
    Image.fromarray(np.full((32, 40), 7, np.uint8), mode="L").save(mpath)  # a relabelled mask
    assert open_split(ade20k, "val").digest() != d0
    assert open_split(ade20k, "train").digest() == open_split(ade20k, "train").digest()
    Image.fromarray(np.full((32, 40), 151, np.uint8), mode="L").save(mpath)
    with pytest.raises(ValueError, match=r"ADE_val_00000003\.png.*151"):
        open_split(ade20k, "val").label(3)
    Image.fromarray(np.zeros((30, 40), np.uint8), mode="L").save(mpath)
    with pytest.raises(ValueError, match=r"ADE_val_00000003\.png' is 40x30 but its image is 40x32"):
        open_split(ade20k, "val").label(3)
    mpath.unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_val_00000003\.png"):
        open_split(ade20k, "val")
    with pytest.raises(FileNotFoundError, match=r"images/training"):
        open_split({**ade20k, "root": str(tmp_path)}, "train")
    with pytest.raises(ValueError, match="source must be one of train, val"):
        open_split({**ade20k, "splits": {"train": {"source": "test"}}}, "train")
    with pytest.raises(ValueError, match=r"keys \['crop_banner'\]"):
        open_split({**ade20k, "crop_banner": True}, "train")


# ------------------------------------------------------------------------------------------ schema
def test_schema_accepts_each_dataset_type_and_rejects_typos(listed, aircraft, ade20k):
    s = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    v = jsonschema.Draft202012Validator({"$defs": s["$defs"], "$ref": "#/$defs/dataset"})
    assert set(s["$defs"]["dataset"]["properties"]["type"]["enum"]) == set(DATASET_TYPES)
    fmnist = {"type": "fashion_mnist", "splits": {"train": {"source": "train", "count": 10}}}
    for spec in (listed, {**listed, "classes": "c.txt"}, aircraft, {**aircraft, "crop_banner": False}, ade20k, fmnist):
        entry = {k: val for k, val in spec.items() if k != "name"}
        assert list(v.iter_errors(entry)) == [], entry
    assert list(v.iter_errors({**fmnist, "crop_banners": True}))
    assert list(v.iter_errors({"type": "ade20k", "splits": {"val": {"source": "validation"}}}))
    assert list(v.iter_errors({"type": "image_list", "splits": {"val": {"lists": "v.csv"}}}))
    json.dumps(s)  # still plain data


def test_subset_test_list_is_disjoint_and_leaves_train_val_unchanged(folder, tmp_path):
    balanced_subset(folder / "train", tmp_path / "a", train=1, val=1, seed=0)
    res = balanced_subset(folder / "train", tmp_path / "b", train=1, val=1, seed=0, test=1)
    assert res["test"] == 3 and not (tmp_path / "a" / "test.csv").exists()
    for name in ("train.csv", "val.csv"):
        assert _read(tmp_path / "a" / name) == _read(tmp_path / "b" / name)
    lists = [{r[0] for r in _read(tmp_path / "b" / f"{s}.csv")} for s in ("train", "val", "test")]
    assert sum(map(len, lists)) == len(set().union(*lists)) == 9
    # from a folder of its own (fMoW: the official test images), next to a val folder
    res = balanced_subset(folder / "train", tmp_path / "c", train=1, val=1, seed=0, val_root=folder / "val",
                          test=1, test_root=folder / "val")
    va, te = _read(tmp_path / "c" / "val.csv"), _read(tmp_path / "c" / "test.csv")
    assert all(r[0].startswith("val/") for r in va + te) and not {r[0] for r in va} & {r[0] for r in te}
