"""Held-out selection splits (data/holdout.py): train and val disjoint, seeded, recorded."""
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from stitchcache.data import open_split
from stitchcache.data.holdout import related_splits

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((8, 8)) * 255).astype("uint8"), mode="L").save(root / f"c{c:02d}" / f"{i:03d}.png")
    return root


@pytest.fixture
def folder_spec(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=5, per_class=20)
    return {"name": "toy", "type": "image_folder", "root": str(root),
            "splits": {"train": {}, "val": {"holdout": {"of": "train", "fraction": 0.1, "seed": 0}}}}


def ids(split):
    return [split.image_id(i) for i in range(len(split))]


def test_train_and_val_are_disjoint_cover_the_base_and_are_per_class(folder_spec):
    train, val = open_split(folder_spec, "train"), open_split(folder_spec, "val")
    assert len(train) == 90 and len(val) == 10
    assert not set(ids(train)) & set(ids(val))
    assert sorted(ids(train) + ids(val)) == sorted(ids(open_split({**folder_spec, "splits": {"train": {}}}, "train")))
    assert np.bincount(val.labels(), minlength=5).tolist() == [2] * 5  # 10 % of every class
    # labels / images follow the subset
    for i in (0, 5, 9):
        assert val.label(i) == int(val.image_id(i)[1:3])
        assert val.image(i).size == (8, 8)


def test_holdout_is_stable_and_seeded_and_recorded_in_the_manifest(folder_spec):
    a, b = open_split(folder_spec, "val"), open_split(folder_spec, "val")
    assert ids(a) == ids(b) and a.digest() == b.digest()
    assert open_split(folder_spec, "train").digest() == open_split(folder_spec, "train").digest()
    other = json.loads(json.dumps(folder_spec))
    other["splits"]["val"]["holdout"]["seed"] = 1
    c = open_split(other, "val")
    assert ids(c) != ids(a) and c.digest() != a.digest()
    assert open_split(other, "train").digest() != open_split(folder_spec, "train").digest()
    m = a.manifest()
    assert m["rule"] == {"keep": "held_out", "of": "train", "fraction": 0.1, "seed": 0}
    assert len(m["indices"]) == 10 and m["base"]["type"] == "image_folder"
    # schema defaults (start 0, count null) filled in by validation are accepted
    filled = json.loads(json.dumps(folder_spec))
    filled["splits"]["val"].update(start=0, count=None)
    assert ids(open_split(filled, "val")) == ids(a)


def test_jobs_get_the_splits_that_decide_their_images(folder_spec):
    splits = {**folder_spec["splits"], "test": {"root": "x"}}
    assert related_splits(splits, "train") == ["train", "val"]
    assert related_splits(splits, "val") == ["train", "val"]
    assert related_splits(splits, "test") == ["test"]


@pytest.mark.parametrize("bad, msg", [
    ({"holdout": {"of": "train", "fraction": 0.1}, "root": "x"}, r"no keys \['root'\]"),
    ({"holdout": {"of": "nope", "fraction": 0.1}}, r"holdout.of: 'nope' is not another split"),
    ({"holdout": {"of": "train", "fraction": 1.5}}, r"holdout.fraction"),
    ({"holdout": {"of": "train"}}, r"needs `of` and `fraction`"),
])
def test_bad_holdout_names_the_key(folder_spec, bad, msg):
    spec = {**folder_spec, "splits": {"train": {}, "val": bad}}
    with pytest.raises(ValueError, match=msg):
        open_split(spec, "val")


def test_fashion_mnist_style_ids_and_schema(tmp_path):
    s = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    v = jsonschema.Draft202012Validator({"$defs": s["$defs"], "$ref": "#/$defs/dataset"})
    entry = {"type": "fashion_mnist", "splits": {"train": {"source": "train"},
                                                 "val": {"holdout": {"of": "train", "fraction": 0.1, "seed": 3}},
                                                 "test": {"source": "test"}}}
    assert list(v.iter_errors(entry)) == []
    assert list(v.iter_errors({**entry, "splits": {"val": {"holdout": {"of": "train", "fraction": 0.1, "sed": 3}}}}))
    assert list(v.iter_errors({**entry, "splits": {"val": {"holdout": {"of": "train"}}}}))


def test_plan_sizes_follow_the_holdout_while_the_data_is_absent():
    from stitchcache.plan import split_info

    d = {"name": "air", "type": "fgvc_aircraft", "root": "/nonexistent",
         "splits": {"train": {"source": "trainval", "count": 6667},
                    "val": {"holdout": {"of": "train", "fraction": 0.1, "seed": 0}}, "test": {"source": "test"}}}
    assert split_info(d, "val")["images"] == 667 and split_info(d, "train")["images"] == 6000
    assert split_info(d, "test")["images"] is None


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_train_test_gets_a_held_out_val():
    spec = {"name": "fm", "type": "fashion_mnist", "splits": {
        "train": {"source": "train", "count": 1000},
        "val": {"holdout": {"of": "train", "fraction": 0.1, "seed": 0}}, "test": {"source": "test", "count": 200}}}
    train, val, test = (open_split(spec, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 1000 and 95 <= len(val) <= 105
    assert not set(ids(train)) & set(ids(val)) and all(i.startswith("train:") for i in ids(val))
    assert ids(test)[0] == "test:0"
    assert np.array_equal(val.labels(), [val.label(i) for i in range(len(val))])
