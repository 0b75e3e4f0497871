"""The loader reads uncompressed, unsharded chunk files directly (one preadv per chunk, rows landing
at their permuted positions) and everything else through zarr; both give exactly what zarr gives."""
import numpy as np
import pytest
import torch
import zarr

from stitchcache.cache import FeatureStore, StoreWriter, iter_batches
from stitchcache.cache import loader
from stitchcache.cache.loader import _direct_layout, block_reader


def _store(path, x, labels, *, dtype="float16", chunk=4, shard=None, compressor="none"):
    with StoreWriter(path, num_images=len(x), layers=[0], num_tokens=x.shape[1], width=x.shape[2], dtype=dtype,
                     chunk_size=chunk, shard_size=shard, compressor=compressor) as w:
        for u in w.pending_units():
            a, b = w.unit_range(u)
            w.write_unit(u, {0: x[a:b]}, x[a:b], labels[a:b])
        w.finalize()
    return FeatureStore(path)


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((23, 3, 5)).astype(np.float32)


def _no_zarr_getitem(monkeypatch):
    def refuse(self, sel):
        raise AssertionError("read through zarr")
    monkeypatch.setattr(zarr.Array, "__getitem__", refuse)


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_plain_chunks_are_read_without_zarr_and_match_it(tmp_path, x, dtype, monkeypatch):
    s = _store(tmp_path / "s", x, np.arange(23), dtype=dtype)
    raw = s.group["layer_00"]  # int8: the quantised values (their scales are zstd-compressed: through zarr)
    assert _direct_layout(raw) is not None
    ranges, rng = [(0, 4), (4, 12), (1, 23), (20, 23), (3, 3)], np.random.default_rng(1)
    perms = [rng.permutation(b - a) for a, b in ranges]
    for arr in (raw, s.layer(0)):  # s.layer(0): dequantised for int8
        for (a, b), p in zip(ranges, perms):
            want = np.asarray(arr[a:b])
            np.testing.assert_array_equal(block_reader(arr)(a, b), want)
            np.testing.assert_array_equal(block_reader(arr)(a, b, p), want[p])
    want = [np.asarray(raw[a:b]) for a, b in ranges]
    _no_zarr_getitem(monkeypatch)  # from here on, a read through zarr fails
    for (a, b), p, w in zip(ranges, perms, want):
        np.testing.assert_array_equal(block_reader(raw)(a, b, p), w[p])


def test_compressed_sharded_and_mask_arrays(tmp_path, x):
    z = _store(tmp_path / "z", x, np.arange(23), compressor="zstd")
    sh = _store(tmp_path / "sh", x, np.arange(23), chunk=4, shard=8)
    assert _direct_layout(z.layer(0)) is None and _direct_layout(sh.layer(0)) is None
    assert _direct_layout(z.labels) is None  # labels are zstd-compressed by default: through zarr
    masks = zarr.create_array(str(tmp_path / "m"), shape=(23, 4, 6), chunks=(4, 4, 6), dtype="uint8", compressors=None)
    masks[:] = np.random.default_rng(2).integers(0, 256, (23, 4, 6), dtype=np.uint8)
    assert _direct_layout(masks) is not None
    p = np.random.default_rng(3).permutation(18)
    for arr in (z.layer(0), sh.layer(0), masks):
        np.testing.assert_array_equal(block_reader(arr)(5, 23, p), np.asarray(arr[5:23])[p])


def test_chunks_longer_than_iov_max(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_IOV_MAX", 3)  # a chunk read in several preadv calls
    x = np.arange(40, dtype=np.float32).reshape(40, 1, 1) * np.ones((1, 2, 2), np.float32)
    s = _store(tmp_path / "s", x, np.arange(40), dtype="float32", chunk=16)
    p = np.random.default_rng(4).permutation(30)
    np.testing.assert_array_equal(block_reader(s.layer(0))(7, 37, p), x[7:37][p])


def test_missing_chunk_reads_as_fill_value_and_short_chunk_fails(tmp_path, x):
    s = _store(tmp_path / "s", x, np.arange(23), dtype="float32")
    arr = s.group["layer_00"]
    (s.path / "layer_00" / "c" / "2" / "0" / "0").unlink()  # never written
    p = np.random.default_rng(5).permutation(10)
    got = block_reader(arr)(4, 14, p)
    np.testing.assert_array_equal(got, np.asarray(arr[4:14])[p])
    assert (got[np.argsort(p)][4:8] == 0).all()
    chunk = s.path / "layer_00" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(OSError, match="damaged"):
        block_reader(arr)(4, 8)


def test_shuffled_epoch_is_deterministic_and_paired(tmp_path):
    x = np.arange(50, dtype=np.float32).reshape(50, 1, 1) * np.ones((1, 2, 3), np.float32)
    s = _store(tmp_path / "s", x, np.arange(50), dtype="float32", chunk=8)
    def epoch(seed):
        out = []
        for xb, yb in iter_batches([s.layer(0), s.labels], 6, shuffle=True, seed=seed):
            assert torch.equal(xb[:, 0, 0].long(), yb) and (xb == xb[:, :1, :1]).all()
            out += yb.tolist()
        return out
    a = epoch(3)
    assert a == epoch(3) and a != epoch(4) and sorted(a) == list(range(50)) and a != list(range(50))


def _count_getitems(monkeypatch) -> list:
    calls, orig = [], zarr.Array.__getitem__
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda self, sel: calls.append(self.path) or orig(self, sel))
    return calls


def _pass(s):
    return [torch.cat(t) for t in zip(*iter_batches([s.layer(0), s.labels], 3, shuffle=True, seed=5, block=4))]


def test_small_zarr_arrays_are_read_once_per_pass(tmp_path, x, monkeypatch):
    """Labels (zstd-compressed, 8 bytes per image) cost one zarr getitem per block, ≈ 0.7 ms each, which
    is a quarter of a pass over a 0.8 GB store on a fast-memory VM: a small array is read whole, once
    per pass, and gives exactly what per-block reads give."""
    s = _store(tmp_path / "s", x, np.arange(23) % 7)
    with monkeypatch.context() as m:
        m.setattr(loader, "_WHOLE_BYTES", 0)  # the per-block path
        want = _pass(s)
    calls = _count_getitems(monkeypatch)
    got = _pass(s)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert calls.count(s.labels.path) == 1, calls  # 6 blocks, one read
    assert sorted(got[1].tolist()) == sorted((np.arange(23) % 7).tolist())


def test_large_zarr_arrays_are_still_read_per_block(tmp_path, x, monkeypatch):
    s = _store(tmp_path / "z", x, np.arange(23), compressor="zstd")
    monkeypatch.setattr(loader, "_WHOLE_BYTES", 8)  # every array counts as large
    calls = _count_getitems(monkeypatch)
    _pass(s)
    assert calls.count(s.labels.path) == 6 and calls.count(s.layer(0).path) == 6, calls
