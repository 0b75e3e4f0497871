"""Streaming linear CKA (stitchcache.analysis.cka / atlas / `analyze cka`, `analyze cka-join`):
checked against a direct numpy computation (dual / Gram-matrix form), against ckatorch where it is
installed, for chunk-order/sub-block independence, one read per chunk, and end to end on stores
extracted from tiny models."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from stitchcache.analysis import cka as ckamod
from stitchcache.analysis.atlas import cka_vs_stitch, load_result, read_cka, spearman, stitch_points
from stitchcache.analysis.cka import linear_cka, store_cka
from stitchcache.cache.store import FeatureStore, StoreWriter, open_record
from stitchcache.cli import main as cli_main


def numpy_cka(x, y):
    """Kornblith et al.'s linear CKA via centred n x n Gram matrices: HSIC(K, L) = tr(K H L H)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def make_store(path, tokens: dict, final, labels, *, prefix, grid, chunk, manifest="m0", name="m", dtype="float32"):
    """A finished store with given token arrays {layer: (N, T, D)}."""
    n, t, d = final.shape
    attrs = {"model_name": name, "key": path.name, "model": {"grid": list(grid), "num_prefix_tokens": prefix},
             "dataset": {"name": "toy", "split": "val", "manifest": manifest, "num_images": n}}
    with StoreWriter(path, num_images=n, layers=sorted(tokens), num_tokens=t, width=d, dtype=dtype,
                     chunk_size=chunk, attrs=attrs) as w:
        for ci in range(w.num_chunks):
            a, b = w.chunk_range(ci)
            w.write_chunk(ci, {l: v[a:b] for l, v in tokens.items()}, final[a:b], labels[a:b])
        w.finalize()
    return FeatureStore(path)


def toy_pair(tmp_path, n=30, grid=(2, 3), prefix_a=1, prefix_b=0, chunk_a=4, chunk_b=6, manifest_b="m0"):
    """Two stores over the same n 'images': A has 3 layers of width 5, B 2 layers of width 4. B's
    layers are noisy linear maps of A's, so CKA values spread over (0, 1); features have large
    offsets (mean >> spread) to exercise the shift."""
    rng = np.random.default_rng(0)
    p = grid[0] * grid[1]
    A = {l: rng.normal(size=(n, prefix_a + p, 5)) * (l + 1) + 50.0 for l in range(3)}
    fa = rng.normal(size=(n, prefix_a + p, 5))
    mix = rng.normal(size=(5, 4))
    B = {0: A[0][:, prefix_a:] @ mix + rng.normal(size=(n, p, 4)) * 0.5,
         1: rng.normal(size=(n, p, 4)) + 100.0}
    B = {l: np.concatenate([rng.normal(size=(n, prefix_b, 4)), v], axis=1) for l, v in B.items()}
    fb = rng.normal(size=(n, prefix_b + p, 4))
    # float32, as stored: the reference computation sees exactly the stored values
    A, B = ({l: v.astype(np.float32) for l, v in d.items()} for d in (A, B))
    fa, fb = fa.astype(np.float32), fb.astype(np.float32)
    labels = np.arange(n) % 3
    a = make_store(tmp_path / "a", A, fa, labels, prefix=prefix_a, grid=grid, chunk=chunk_a, name="ma")
    b = make_store(tmp_path / "b", B, fb, labels, prefix=prefix_b, grid=grid, chunk=chunk_b, name="mb",
                   manifest=manifest_b)
    return a, b, (A, fa, prefix_a), (B, fb, prefix_b)


def expected(side_a, side_b, variant):
    (A, fa, pa), (B, fb, pb) = side_a, side_b
    arrs_a = [A[l] for l in sorted(A)] + [fa]
    arrs_b = [B[l] for l in sorted(B)] + [fb]

    def samples(t, p):
        t = np.asarray(t, np.float64)[:, p:]
        return t.mean(1) if variant == "pooled" else t.reshape(-1, t.shape[-1])
    return np.array([[numpy_cka(samples(x, pa), samples(y, pb)) for y in arrs_b] for x in arrs_a])


def test_linear_cka_matches_gram_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 7))
    y = x @ rng.normal(size=(7, 3)) + rng.normal(size=(40, 3))
    assert linear_cka(x, y) == pytest.approx(numpy_cka(x, y), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))   # invariant to orthogonal maps and isotropic scale
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    assert 0.0 < linear_cka(x, y) < 1.0


@pytest.mark.parametrize("variant", ["pooled", "token"])
def test_store_cka_equals_direct_computation(tmp_path, variant):
    a, b, sa, sb = toy_pair(tmp_path)
    res = store_cka(a, b, variants=[variant], log=lambda m: None)
    assert res["names_a"] == ["layer_00", "layer_01", "layer_02", "final"]
    assert res["names_b"] == ["layer_00", "layer_01", "final"]
    want = expected(sa, sb, variant)
    np.testing.assert_allclose(res["cka"][variant], want, rtol=1e-9, atol=1e-12)
    assert res["n_samples"][variant] == (30 if variant == "pooled" else 30 * 6)
    assert want.min() < 0.3 and want.max() > 0.6   # the case is not degenerate


def test_sub_blocks_and_block_size_do_not_change_the_result(tmp_path, monkeypatch):
    a, b, sa, sb = toy_pair(tmp_path)
    full = store_cka(a, b, log=lambda m: None)["cka"]
    monkeypatch.setattr(ckamod, "SAMPLE_BUDGET", 1)         # token variant: one image per update
    monkeypatch.setattr(ckamod, "_block_size", lambda *arrs: 7)  # blocks not aligned with anything
    small = store_cka(a, b, log=lambda m: None)["cka"]
    for v in full:
        np.testing.assert_allclose(small[v], full[v], rtol=1e-9)


def test_every_chunk_of_every_array_is_read_once(tmp_path, monkeypatch):
    a, b, _, _ = toy_pair(tmp_path)   # chunks of 4 (A) and 6 (B): blocks of lcm = 12 images
    reads = []

    class Counting:
        def __init__(self, arr, tag):
            self.arr, self.tag = arr, tag
            self.shape, self.chunks, self.shards = arr.shape, arr.chunks, getattr(arr, "shards", None)

        def __getitem__(self, key):
            reads.append((self.tag, key.start, key.stop))
            return self.arr[key]

    for store, tag in ((a, "a"), (b, "b")):
        orig = store.array
        monkeypatch.setattr(store, "array", lambda name, orig=orig, tag=tag: Counting(orig(name), f"{tag}:{name}"))
    store_cka(a, b, log=lambda m: None)
    assert len(reads) == len(set(reads))                     # no range read twice
    by_array = {}
    for tag, start, stop in reads:
        by_array.setdefault(tag, []).append((start, stop))
    assert len(by_array) == 4 + 3
    for ranges in by_array.values():
        assert ranges == [(0, 12), (12, 24), (24, 30)]


def test_cheap_checks_name_the_stores(tmp_path):
    a, b, _, _ = toy_pair(tmp_path, manifest_b="other")
    with pytest.raises(ValueError, match="different image lists"):
        store_cka(a, b, variants=["pooled"], log=lambda m: None)
    rng = np.random.default_rng(0)
    c = make_store(tmp_path / "c", {0: rng.normal(size=(30, 5, 4))}, rng.normal(size=(30, 5, 4)),
                   np.zeros(30, int), prefix=1, grid=(2, 2), chunk=8, name="mc")
    with pytest.raises(ValueError, match=r"needs equal grids.*\[2, 3\] and \[2, 2\]"):
        store_cka(a, c, variants=["token"], log=lambda m: None)
    assert store_cka(a, c, variants=["pooled"], log=lambda m: None)["cka"]["pooled"].shape == (4, 2)
    with pytest.raises(ValueError, match="unknown CKA variant"):
        store_cka(a, b, variants=["cls"], log=lambda m: None)


def test_cross_check_against_ckatorch(tmp_path):
    ckatorch = pytest.importorskip("ckatorch", reason="ckatorch (optional test-only cross-check) not installed")
    import torch
    a, b, (A, fa, pa), (B, fb, pb) = toy_pair(tmp_path)
    res = store_cka(a, b, log=lambda m: None)
    arrs_a = [A[l] for l in sorted(A)] + [fa]
    arrs_b = [B[l] for l in sorted(B)] + [fb]
    for i, x in enumerate(arrs_a):
        for j, y in enumerate(arrs_b):
            xp, yp = (torch.from_numpy(np.asarray(t, np.float64)[:, p:].mean(1)) for t, p in ((x, pa), (y, pb)))
            ref = float(ckatorch.cka_base(xp, yp, kernel="linear", unbiased=False))
            assert res["cka"]["pooled"][i, j] == pytest.approx(ref, rel=1e-8)


def test_analyze_cka_end_to_end_on_extracted_stores(tmp_path, image_folder):
    from conftest import extract_records, tiny_vit
    specs = {"p": {"name": "p", **tiny_vit(width=32, img=32, patch=4, depth=2)},
             "q": {"name": "q", **tiny_vit(width=24, img=56, patch=7, depth=3)}}
    recs = extract_records(specs, image_folder, tmp_path, chunk_size=16)
    out = tmp_path / "results" / "analysis" / "cka" / "toy" / "p--q.parquet"
    assert cli_main(["analyze", "cka", "--a", recs["p", "val"], "--b", recs["q", "val"], "--mark-layers", "1",
                     "--device", "cpu", "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads(t.schema.metadata[b"stitchcache.cka"])
    assert [s["model"] for s in meta["stores"]] == ["p", "q"] and meta["split"] == "val" and meta["marks"] == [1]
    rows = t.to_pylist()
    assert len(rows) == 2 * (2 + 2) * (3 + 2)        # variants x (h_0..h_2, final) x (h_0..h_3, final)
    assert {r["variant"] for r in rows} == {"pooled", "token"}
    assert all(0.0 <= r["cka"] <= 1.0 + 1e-9 for r in rows)
    # the stored numbers are those of a direct computation on the stores' tokens
    (_, sp), (_, sq) = open_record(recs["p", "val"]), open_record(recs["q", "val"])
    x = np.asarray(sp.layer(1)[:], np.float64)[:, 1:].mean(1)
    y = np.asarray(sq.final[:], np.float64)[:, 1:].mean(1)
    got = next(r["cka"] for r in rows if r["variant"] == "pooled" and r["array_a"] == "layer_01"
               and r["array_b"] == "final")
    assert got == pytest.approx(numpy_cka(x, y), rel=1e-8)
    # a model against itself: CKA 1 on the diagonal
    same = tmp_path / "pp.parquet"
    cli_main(["analyze", "cka", "--a", recs["p", "val"], "--b", recs["p", "val"], "--variants", "pooled",
              "--device", "cpu", "--out", str(same)])
    diag = [r["cka"] for r in pq.read_table(same).to_pylist() if r["array_a"] == r["array_b"]]
    assert diag == pytest.approx([1.0] * 4)


def _results_table(tmp_path, rows):
    from stitchcache.report import build_table, write_table
    evals = []
    for i, r in enumerate(rows):
        p = tmp_path / "evals" / f"{i}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"dataset": "toy", "stitch": "mlp", "seed": 0, "d_L": 0.1, **r}))
        evals.append(p)
    write_table(build_table(evals, []), None, tmp_path / "results")
    return tmp_path / "results" / "table.parquet"


def _cka_file(path, values):
    """A CKA parquet for (ma, mb) with pooled CKA values {(la, lb): v}."""
    import pyarrow as pa
    from stitchcache.analysis.atlas import CKA_SCHEMA, META
    rows = [{"dataset": "toy", "split": "val", "model_a": "ma", "model_b": "mb", "variant": "pooled",
             "array_a": f"layer_{la:02d}", "layer_a": la, "array_b": f"layer_{lb:02d}", "layer_b": lb, "cka": v,
             "n_samples": 10} for (la, lb), v in values.items()]
    meta = {META: json.dumps({"dataset": "toy", "split": "val"}).encode()}
    pq.write_table(pa.Table.from_pylist(rows, schema=CKA_SCHEMA).replace_schema_metadata(meta), path)
    return path


def test_cka_join_with_results_table(tmp_path):
    ck = _cka_file(tmp_path / "c.parquet", {(1, 1): 0.2, (2, 2): 0.5, (3, 3): 0.9, (1, 2): 0.33})
    base = dict(method="ffm")
    rows = [dict(base, source=s, target=t, layer=l, probe_acc=acc, d_l=dl)
            for s, t in (("ma", "mb"), ("mb", "ma"))
            for l, acc, dl in ((1, 0.5, 3.0), (2, 0.6, 2.0), (3, 0.8, 1.0))]
    rows.append(dict(base, source="ma", target="ma", layer=1, probe_acc=0.9, d_l=0.1))   # self: not joined
    table = _results_table(tmp_path, rows)
    joined, corr = cka_vs_stitch([ck], table)
    j = joined.to_pylist()
    assert len(j) == 6
    got = {(r["source"], r["layer"]): r["cka_pooled"] for r in j}
    assert got == {("ma", 1): 0.2, ("ma", 2): 0.5, ("ma", 3): 0.9, ("mb", 1): 0.2, ("mb", 2): 0.5, ("mb", 3): 0.9}
    assert all(r["cka_token"] is None for r in j)
    c = corr.to_pylist()
    assert len(c) == 2 and all(r["spearman_cka_task_acc"] == pytest.approx(1.0) for r in c)
    assert all(r["spearman_cka_d_l"] == pytest.approx(-1.0) for r in c)
    out = tmp_path / "an"
    assert cli_main(["analyze", "cka-join", "--cka", str(ck), "--table", str(table), "--out-dir", str(out)]) == 0
    md = (out / "cka_vs_stitch.md").read_text()
    assert "| toy | ma→mb | mlp | ffm | 2 | 0 | 0.500 | – | 2.000 | 0.100 | 60.0 |" in md
    assert pq.read_table(out / "cka_vs_stitch.parquet").num_rows == 6
    assert ck.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"      # heatmap beside the CKA file
    assert stitch_points(joined, "toy", "mb", "ma") == [1, 2, 3]
    res, meta = load_result(ck)
    assert res["names_a"] == ["layer_01", "layer_02", "layer_03"] and meta["split"] == "val"
    assert res["cka"]["pooled"][0, 1] == 0.33 and np.isnan(res["cka"]["pooled"][1, 0])
    assert read_cka([ck])["toy", "mb", "ma", "pooled", 2, 1] == 0.33   # both orientations


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


@pytest.mark.gpu
def test_statistics_on_cuda_match_cpu(tmp_path):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    a, b, _, _ = toy_pair(tmp_path)
    cpu = store_cka(a, b, log=lambda m: None)["cka"]
    gpu = store_cka(a, b, device=torch.device("cuda"), log=lambda m: None)["cka"]
    for v in cpu:
        np.testing.assert_allclose(gpu[v], cpu[v], rtol=1e-9)
