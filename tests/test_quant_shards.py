"""int8 per-token quantisation, sharded stores (layout, per-shard resume), dask and torch readers."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from stitchcache.cache import (ChunkDataset, FeatureStore, QuantizedArray, StoreWriter, chunk_loader,
                               dequantize, iter_batches, quantize)
from stitchcache.cache.manage import verify_store
from stitchcache.cache.quant import quantize_torch
from stitchcache.extract import extract


def _spec(name="a", **kw):
    return {"name": name, **tiny_vit(**kw)}


def _within_half_scale(x, deq, scale, slack=1e-6):
    bound = scale[..., None] / 2 * (1 + slack) + 1e-12 + slack * np.abs(x)
    assert np.all(np.abs(x.astype(np.float64) - deq) <= bound)


# ---- quantisation ----------------------------------------------------------------------------
def test_quantize_round_trip_error_bound():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5, 33)).astype(np.float32)
    x *= np.exp(rng.uniform(-8, 8, size=(7, 5, 1))).astype(np.float32)  # scales spanning 7 decades
    x[0, 0] = 0.0  # an all-zero token: scale 0, exact
    x[1, 1, 3] = -1e4  # one outlier only coarsens its own token
    qv = quantize(x)
    assert qv.q.dtype == np.int8 and qv.scale.dtype == np.float32 and qv.scale.shape == (7, 5)
    assert np.abs(qv.q).max() == 127 and qv.q.min() >= -127
    deq = dequantize(qv.q, qv.scale)
    _within_half_scale(x, deq, qv.scale)
    assert np.all(deq[0, 0] == 0)
    np.testing.assert_allclose(qv.scale, np.abs(x).max(-1) / 127, rtol=1e-6)
    # the torch version (used on the device during extraction) gives the same bytes
    q_t, s_t = quantize_torch(torch.from_numpy(x))
    np.testing.assert_array_equal(q_t.numpy(), qv.q)
    np.testing.assert_allclose(s_t.numpy(), qv.scale, rtol=1e-7)


def _write(path, x, labels, *, dtype="int8", chunk=4, shard=None):
    with StoreWriter(path, num_images=len(x), layers=[0], num_tokens=x.shape[1], width=x.shape[2],
                     dtype=dtype, chunk_size=chunk, shard_size=shard) as w:
        for u in w.pending_units():
            a, b = w.unit_range(u)
            w.write_unit(u, {0: x[a:b]}, x[a:b] * 2, labels[a:b])
        w.finalize()
    return FeatureStore(path)


def test_quantized_array_reads_as_float(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((22, 3, 8)).astype(np.float32)
    s = _write(tmp_path / "s", x, np.arange(22), chunk=4, shard=8)
    arr = s.layer(0)
    assert isinstance(arr, QuantizedArray) and isinstance(s.final, QuantizedArray)
    assert arr.shape == (22, 3, 8) and arr.chunks == (4, 3, 8) and arr.ndim == 3 and len(arr) == 22
    assert s.group["layer_00"].dtype == np.int8 and s.group["layer_00_scale"].shape == (22, 3)
    scale = s.group["layer_00_scale"][:]
    full = arr[:]
    assert full.dtype == np.float32
    _within_half_scale(x, full, scale)
    np.testing.assert_array_equal(arr[5:13], full[5:13])
    np.testing.assert_array_equal(arr[7], full[7])
    np.testing.assert_array_equal(arr[2:9, 1], full[2:9, 1])
    np.testing.assert_array_equal(arr[2:9, :, 3], full[2:9, :, 3])
    np.testing.assert_array_equal(np.asarray(arr), full)
    _within_half_scale(2 * x, s.final[:], s.group["final_scale"][:])
    assert s.labels[:].tolist() == list(range(22))
    # dask: dequantised lazily, one dask chunk per shard
    d = s.dask(0)
    assert d.dtype == np.float32 and d.chunks[0] == (8, 8, 6)
    np.testing.assert_allclose(d.compute(), full, rtol=1e-7)
    np.testing.assert_array_equal(s.dask("labels").compute(), np.arange(22))
    assert verify_store(s.path, deep=True) == []


def test_int8_store_holds_quarter_of_float32_bytes(tmp_path):
    x = np.random.default_rng(2).standard_normal((16, 17, 64)).astype(np.float32)
    a = _write(tmp_path / "q", x, np.zeros(16), dtype="int8")
    b = _write(tmp_path / "f", x, np.zeros(16), dtype="float16")
    nbytes = lambda s, n: sum(f.stat().st_size for f in (s.path / n).rglob("*") if f.is_file() and f.name != "zarr.json")
    assert nbytes(a, "layer_00") + nbytes(a, "layer_00_scale") < 0.6 * nbytes(b, "layer_00")
    np.testing.assert_allclose(a.dask("final").compute(), b.dask("final").compute().astype(np.float32),
                               atol=float(np.abs(2 * x).max() / 127))


# ---- shards ---------------------------------------------------------------------------------
def test_shard_geometry_is_checked(tmp_path):
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        StoreWriter(tmp_path / "s", num_images=10, layers=[0], num_tokens=3, width=2, chunk_size=4, shard_size=6)
    # the lock was released: the same store can be created with a valid geometry
    with StoreWriter(tmp_path / "s", num_images=10, layers=[0], num_tokens=3, width=2, chunk_size=4,
                     shard_size=8) as w:
        assert w.num_units == 2 and w.unit_range(1) == (8, 10) and list(w.unit_chunks(1)) == [2]
        with pytest.raises(ValueError, match="written whole"):
            w.write_chunk(0, {0: np.zeros((4, 3, 2))}, np.zeros((4, 3, 2)), np.zeros(4))


def test_sharded_float_store_round_trip(tmp_path):
    x = np.random.default_rng(3).standard_normal((21, 3, 4)).astype(np.float32)
    s = _write(tmp_path / "s", x, np.arange(21), dtype="float32", chunk=2, shard=8)
    assert s.layer(0).shards == (8, 3, 4) and s.layer(0).chunks == (2, 3, 4) and s.shard_size == 8
    np.testing.assert_array_equal(s.layer(0)[:], x)
    np.testing.assert_array_equal(s.dask("final").compute(), 2 * x)
    assert verify_store(s.path, deep=True) == []


SETTINGS = {"chunk_size": 4, "shard_size": 16, "batch_size": 5, "num_workers": 0}


def test_sharded_extract_resumes_per_shard(tmp_path, image_folder, monkeypatch):
    import stitchcache.cache.store as store_mod

    spec = _spec()
    orig = store_mod.StoreWriter.write_unit
    calls = []

    def failing(self, u, *a):
        if len(calls) == 1:
            raise RuntimeError("simulated crash while writing the second shard")
        orig(self, u, *a)
        calls.append(u)

    monkeypatch.setattr(store_mod.StoreWriter, "write_unit", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(spec, image_folder, "train", tmp_path / "crashed", SETTINGS)
    (store_dir,) = [p for p in (tmp_path / "crashed" / "features").iterdir() if p.is_dir()]
    assert not FeatureStore.is_complete(store_dir)
    assert sorted(p.name for p in (store_dir / "progress").iterdir()) == [f"chunk_{i:06d}" for i in range(4)]
    # a shard whose markers are only partly there (killed while recording) is rewritten whole
    (store_dir / "progress" / "chunk_000002").unlink()

    monkeypatch.setattr(store_mod.StoreWriter, "write_unit", lambda self, u, *a: (calls.append(u), orig(self, u, *a)))
    calls.clear()
    rec = extract(spec, image_folder, "train", tmp_path / "crashed", SETTINGS)
    assert calls == [0, 1, 2]  # 48 images / 16 per shard; shard 0 was incomplete again
    calls.clear()
    monkeypatch.setattr(store_mod.StoreWriter, "write_unit", orig)
    ref = extract(spec, image_folder, "train", tmp_path / "clean", SETTINGS)
    a, b = FeatureStore(rec["store"]), FeatureStore(ref["store"])
    assert a.layer(0).shards[0] == 16 and a.layer(0).chunks[0] == 4
    for name in ["final", "labels"] + [f"layer_{l:02d}" for l in a.layers]:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])
    assert verify_store(a.path) == []


# ---- int8 end to end ------------------------------------------------------------------------
def test_int8_extract_matches_float32_within_bound_and_trains(tmp_path, image_folder):
    from stitchcache.cli import main as cli

    recs = {}
    for m, spec in {"a": _spec("a"), "b": _spec("b", width=48, img=64, patch=8)}.items():
        for split in ("train", "val"):
            rec = extract(spec, image_folder, split, tmp_path / "cache",
                          {"chunk_size": 8, "shard_size": 16, "batch_size": 6, "num_workers": 0, "dtype": "int8"})
            path = tmp_path / f"{m}-{split}.json"
            path.write_text(json.dumps(rec))
            recs[m, split] = str(path)
    ref = extract(_spec("a"), image_folder, "train", tmp_path / "cache",
                  {"chunk_size": 16, "num_workers": 0, "dtype": "float32"})
    q = FeatureStore(json.loads(open(recs["a", "train"]).read())["store"])
    f = FeatureStore(ref["store"])
    assert q.path != f.path and q.attrs["key_parts"]["settings"]["dtype"] == "int8"  # dtype is part of the key
    for l in q.layers:
        # slack: the two runs' forwards use different batch sizes (float32 results differ in the last bits)
        _within_half_scale(f.layer(l)[:], q.layer(l)[:], q.group[f"layer_{l:02d}_scale"][:], slack=1e-4)
    _within_half_scale(f.final[:], q.final[:], q.group["final_scale"][:], slack=1e-4)
    assert q.labels[:].tolist() == f.labels[:].tolist()
    # a train step reads the int8 stores through the unchanged loaders (ffm: source layer + target final)
    out = tmp_path / "ffm.pt"
    argv = ["train", "--method", "ffm", "--layer", "1", "--stitch", "mlp",
            "--src-train", recs["a", "train"], "--src-val", recs["a", "val"],
            "--tgt-train", recs["b", "train"], "--tgt-val", recs["b", "val"],
            "--settings", json.dumps({"max_epochs": 1, "patience": 1, "lr_grid": [1e-3], "batch_size": 16}),
            "--out", str(out), "--metrics", str(out) + ".json"]
    assert cli(argv) == 0
    metrics = json.loads((tmp_path / "ffm.pt.json").read_text())
    assert np.isfinite(metrics["val_loss"])


# ---- torch reader ---------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_chunk_dataset_splits_blocks_across_workers(tmp_path, workers):
    x = np.arange(50, dtype=np.float32).reshape(50, 1, 1) * np.ones((1, 2, 3), np.float32)
    s = _write(tmp_path / "s", x, np.arange(50), dtype="float32", chunk=4)
    loader = chunk_loader(s, [0, "labels"], batch_size=6, num_workers=workers, shuffle=True, seed=1)
    seen = []
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and len(yb) <= 6
        assert torch.equal(xb[:, 0, 0].long(), yb)  # rows stay paired across arrays
        seen += yb.tolist()
    assert sorted(seen) == list(range(50)) and seen != list(range(50))
    ds = loader.dataset
    ds.set_epoch(1)
    again = [y for _, yb in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers) for y in yb.tolist()]
    assert sorted(again) == list(range(50)) and again != seen
    # blocks are dealt to workers without overlap
    arrays = [s.layer(0)]
    parts = [ds.worker_ranges(arrays, w, 3) for w in range(3)]
    flat = sorted(r for p in parts for r in p)
    assert flat == [(a, min(a + 8, 50)) for a in range(0, 50, 8)]  # blocks of whole chunks >= batch


def test_chunk_dataset_reads_int8_as_float(tmp_path):
    x = np.random.default_rng(4).standard_normal((20, 3, 8)).astype(np.float32)
    s = _write(tmp_path / "s", x, np.arange(20), chunk=4)
    ds = ChunkDataset(s.path, ["final", "labels"], batch_size=7, shuffle=False)
    out = torch.cat([xb for xb, _ in ds])
    np.testing.assert_array_equal(out.numpy(), s.final[:])


def test_iter_batches_prefetch_and_unshuffled_order(tmp_path):
    x = np.arange(30, dtype=np.float32).reshape(30, 1, 1)
    s = _write(tmp_path / "s", x, np.arange(30), dtype="float32", chunk=4)
    for prefetch in (0, 2):
        got = [y.tolist() for _, y in iter_batches([s.layer(0), s.labels], 7, prefetch=prefetch)]
        assert sum(got, []) == list(range(30)) and [len(g) for g in got] == [7, 7, 7, 7, 2]
    # stopping early does not hang (the prefetch thread is told to stop)
    it = iter_batches([s.layer(0)], 2, shuffle=True, prefetch=1)
    next(it)
    it.close()


def test_plan_counts_int8_bytes():
    from pathlib import Path

    from stitchcache.plan import load_config, plan

    cfg = load_config(Path(__file__).parent / "data" / "tiny.yaml")
    cfg["extract"]["dtype"] = "int8"
    p = plan(cfg, do_measure=False)
    sup = cfg["models"]["sup"]["kwargs"]
    tokens = (sup["img_size"] // sup["patch_size"]) ** 2 + 1
    row = next(r for r in p["rows"] if r["model"] == "sup")
    assert row["bytes_per_layer_image"] == tokens * (sup["embed_dim"] + 4)  # int8 + a float32 scale per token


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_block_reads_match_zarr(tmp_path, dtype):
    """The loader's block reads (rows in the shuffled order, dequantised for int8) return exactly what
    zarr returns, including edge chunks, blocks spanning several chunks, and sharded arrays."""
    from stitchcache.cache.loader import block_reader

    x = np.random.default_rng(5).standard_normal((23, 3, 5)).astype(np.float32)
    s = _write(tmp_path / "s", x, np.arange(23), dtype=dtype, chunk=4)
    sh = _write(tmp_path / "sh", x, np.arange(23), dtype=dtype, chunk=4, shard=8)
    arrays = [s.layer(0), s.labels]
    rng = np.random.default_rng(0)
    for a, b in [(0, 4), (4, 12), (1, 23), (20, 23), (5, 5)]:
        perm = rng.permutation(b - a)
        for arr in arrays + [sh.layer(0)]:
            want = np.asarray(arr[a:b])
            np.testing.assert_array_equal(block_reader(arr)(a, b), want)
            np.testing.assert_array_equal(block_reader(arr)(a, b, perm), want[perm])
    # a chunk never written reads as the fill value, like zarr
    (s.path / "layer_00" / "c" / "2" / "0" / "0").unlink()
    raw = s.group["layer_00"]
    np.testing.assert_array_equal(block_reader(raw)(6, 14), np.asarray(raw[6:14]))
