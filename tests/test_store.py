"""FeatureStore: round trip, chunk-level resume after a real kill, locking, incomplete refusal."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from stitchcache.backends import create_backbone
from stitchcache.cache import FeatureStore, IncompleteStore, StoreBusy, StoreWriter, iter_batches
from stitchcache.extract import extract


def _spec(name="a", **kw):
    return {"name": name, **tiny_vit(**kw)}


@pytest.mark.parametrize("view, order_seed", [("shared", 0), ("native", None)])
def test_round_trip_matches_forward(tmp_path, image_folder, view, order_seed):
    rec = extract(_spec(), image_folder, "train", tmp_path / "cache",
                  {"chunk_size": 16, "batch_size": 7, "num_workers": 0, "dtype": "float32", "view": view,
                   "order_seed": order_seed})
    store = FeatureStore(rec["store"])
    assert store.num_images == 48 and store.layers == [0, 1, 2, 3]
    bb = create_backbone("timm:vit_small_patch16_224", **_spec()["kwargs"])
    from stitchcache.data import open_split

    split = open_split(image_folder, "train")
    order = store.order
    assert sorted(order) == list(range(48))
    assert (list(order) == list(range(48))) == (order_seed is None)
    t = bb.preprocess.for_view(view).transform()
    x = torch.stack([t(split.image(int(order[i]))) for i in range(5)])
    with torch.no_grad():
        hs = bb.forward_layers(x)
        z = bb(x)
    for l in range(4):
        np.testing.assert_allclose(store.layer(l)[:5], hs[l].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.final[:5], z.numpy(), rtol=1e-5, atol=1e-5)
    assert list(store.labels[:]) == [split.label(int(i)) for i in order]
    assert store.image_ids(split) == [split.image_id(int(i)) for i in order]
    assert store.image_ids(split)[0] == f"class{split.label(int(order[0]))}/{int(order[0]) % 24:03d}.png"


def test_same_inputs_same_key_changed_input_new_key(tmp_path, image_folder):
    s = {"chunk_size": 16, "num_workers": 0}
    a = extract(_spec("a"), image_folder, "train", tmp_path / "c", s)
    b = extract(_spec("renamed"), image_folder, "train", tmp_path / "c", s)  # a name is not content
    assert a["store"] == b["store"]
    c = extract(_spec("a", width=48), image_folder, "train", tmp_path / "c", s)
    assert c["store"] != a["store"]
    changed = json.loads(json.dumps(image_folder))
    changed["splits"]["train"]["count"] = 40
    d = extract(_spec("a"), changed, "train", tmp_path / "c", s)
    assert d["store"] != a["store"]
    e = extract(_spec("a"), image_folder, "train", tmp_path / "c", {**s, "view": "native"})
    f = extract(_spec("a"), image_folder, "train", tmp_path / "c", {**s, "order_seed": 1})
    assert len({a["store"], e["store"], f["store"]}) == 3


def test_reader_refuses_incomplete_store(tmp_path):
    w = StoreWriter(tmp_path / "s", num_images=10, layers=[0], num_tokens=3, width=2, chunk_size=4)
    w.write_chunk(0, {0: np.zeros((4, 3, 2))}, np.zeros((4, 3, 2)), np.zeros(4))
    w.close()
    with pytest.raises(IncompleteStore, match="incomplete"):
        FeatureStore(tmp_path / "s")


def test_second_writer_is_refused(tmp_path):
    w = StoreWriter(tmp_path / "s", num_images=10, layers=[0], num_tokens=3, width=2, chunk_size=4)
    with pytest.raises(StoreBusy, match="another process"):
        StoreWriter(tmp_path / "s", num_images=10, layers=[0], num_tokens=3, width=2, chunk_size=4)
    w.close()
    StoreWriter(tmp_path / "s", num_images=10, layers=[0], num_tokens=3, width=2, chunk_size=4).close()


KILL_SCRIPT = r"""
import json, sys, time
import stitchcache.cache.store as store
orig = store.StoreWriter.write_unit
def slow(self, u, *a):
    orig(self, u, *a)
    print("unit", u, flush=True)
    time.sleep(0.4)
store.StoreWriter.write_unit = slow
from stitchcache.extract import extract
spec, ds, root, settings = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
extract(spec, ds, "train", root, settings)
"""


@pytest.mark.parametrize("extra", [{}, {"shard_size": 8, "dtype": "int8"}], ids=["chunks", "int8-shards"])
def test_kill_and_resume_gives_identical_store(tmp_path, image_folder, extra):
    spec = _spec()
    settings = {"chunk_size": 4, "batch_size": 4, "num_workers": 0, **extra}
    args = [sys.executable, "-c", KILL_SCRIPT, json.dumps(spec), json.dumps(image_folder)]
    proc = subprocess.Popen(args + [str(tmp_path / "killed"), json.dumps(settings)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = 0
    while seen < 3:  # kill after three finished units (chunks, or shards of 2 chunks), mid-run
        line = proc.stdout.readline()
        assert line, "extraction ended before it could be killed"
        seen += line.startswith("unit")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (store_dir,) = [p for p in (tmp_path / "killed" / "features").iterdir() if p.is_dir()]
    assert not FeatureStore.is_complete(store_dir)
    done_before = len(list((store_dir / "progress").iterdir()))
    assert 3 <= done_before < 12

    rec = extract(spec, image_folder, "train", tmp_path / "killed", settings)
    ref = extract(spec, image_folder, "train", tmp_path / "clean", settings)
    a, b = FeatureStore(rec["store"]), FeatureStore(ref["store"])
    names = ["final", "labels"] + [f"layer_{l:02d}" for l in a.layers]
    if extra.get("dtype") == "int8":
        names += [n + "_scale" for n in names if n != "labels"]
        assert a.group["final"].shards[0] == 8
    for name in names:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])


def test_iter_batches_covers_every_row_once(tmp_path):
    w = StoreWriter(tmp_path / "s", num_images=50, layers=[0], num_tokens=1, width=1, chunk_size=8)
    vals = np.arange(50, dtype=np.float32).reshape(50, 1, 1)
    for ci in range(w.num_chunks):
        a, b = w.chunk_range(ci)
        w.write_chunk(ci, {0: vals[a:b]}, vals[a:b], np.arange(a, b))
    w.finalize()
    w.close()
    s = FeatureStore(tmp_path / "s")
    seen = []
    for x, y in iter_batches([s.layer(0), s.labels], batch_size=6, shuffle=True, seed=3):
        assert torch.equal(x[:, 0, 0].long(), y)  # rows stay paired across arrays
        seen += y.tolist()
    assert sorted(seen) == list(range(50)) and seen != list(range(50))
