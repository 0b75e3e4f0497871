"""Table 10 (stitchcache.analysis.predictions, `analyze table10`) on hand-made prediction files
where every count is known."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stitchcache.analysis.predictions import table10, to_markdown
from stitchcache.cli import main as cli_main

# (S->S offset, T->T offset, S->T offset, how many): prediction = (label + offset) % 4, offset 0 = right
PATTERNS = [
    (0, 0, 0, 3),            # all correct (dropped)
    (1, 1, 1, 1),            # all wrong, same class (dropped)
    (1, 2, 3, 1),            # all wrong, controls disagree, follows neither (dropped)
    (1, 2, 1, 1),            # all wrong, controls disagree, follows S->S (dropped)
    (0, 1, 0, 4),            # preserve S only, follows S->S
    (1, 0, 0, 1),            # preserve T only, follows T->T
    (1, 1, 0, 2),            # rescue, controls agree
    (1, 2, 0, 1),            # rescue, controls disagree, neither
    (0, 1, 1, 3),            # interference S only, follows T->T
    (0, 1, 2, 1),            # interference S only, neither
    (1, 0, 1, 5),            # interference T only, follows S->S
    (0, 0, 2, 1),            # interference both
]
EXPECTED = {"n_images": 24, "all_correct": 3, "all_wrong": 3, "n_kept": 18, "preserve_src": 4, "preserve_tgt": 1,
            "rescue": 3, "interfere_src": 4, "interfere_tgt": 5, "interfere_both": 1, "disagree": 17,
            "follow_src": 10, "follow_tgt": 4, "follow_neither": 3}


def _images():
    rows = [(ps, pt, px) for ps, pt, px, k in PATTERNS for _ in range(k)]
    labels = np.arange(len(rows)) % 4
    return [f"class{l}/img{i:03d}.png" for i, l in enumerate(labels)], labels, np.array(rows)


def write_predictions(path, src, tgt, which, *, layer=2, method="ffm", stitch="mlp", seed=0, dataset="toy",
                      head=None, shuffle=0, split="val", images=None, labels=None, segmentation=False):
    """which: 0 = S->S, 1 = T->T, 2 = S->T column of PATTERNS. head: offsets for pred_head (else null)."""
    ims, lab, offs = _images()
    ims, lab = images or ims, lab if labels is None else labels
    pred = (lab + offs[:, which]) % 4
    cols = {"image": ims, "label": lab.astype(np.int64), "pred_probe": pred.astype(np.int64),
            "pred_head": pa.array([None] * len(ims), pa.int64()) if head is None else ((lab + head) % 4).astype(np.int64)}
    if segmentation:
        cols = {"image": ims, "label": np.full(len(ims), -1, np.int64), "pred_probe": pa.array([None] * len(ims), pa.int64()),
                "pred_head": pa.array([None] * len(ims), pa.int64()), "miou": np.linspace(0, 1, len(ims)),
                "pixel_acc": np.linspace(0, 1, len(ims))}
    t = pa.table(cols)
    if shuffle:
        t = t.take(np.random.default_rng(shuffle).permutation(t.num_rows))
    meta = {"split": split, "dataset": dataset, "source": src, "target": tgt, "layer": str(layer), "stitch": stitch,
            "method": method, "seed": str(seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()}), path)
    return path


def trio(root, src="a", tgt="b", **kw):
    """Predictions of S->T and its controls S->S, T->T (image order shuffled differently in each)."""
    d = root / f"{kw.get('layer', 2)}-{kw.get('method', 'ffm')}-{kw.get('dataset', 'toy')}"
    return [write_predictions(d / f"{src}--{src}.parquet", src, src, 0, shuffle=1, **kw),
            write_predictions(d / f"{tgt}--{tgt}.parquet", tgt, tgt, 1, shuffle=2, **kw),
            write_predictions(d / f"{src}--{tgt}.parquet", src, tgt, 2, shuffle=3, **kw)]


def test_every_count_is_known(tmp_path):
    table, notes = table10(trio(tmp_path))
    assert notes == []
    (row,) = table.to_pylist()
    assert {k: row[k] for k in EXPECTED} == EXPECTED
    assert (row["source"], row["target"], row["layer"], row["method"], row["seed"], row["split"]) == ("a", "b", 2, "ffm", 0, "val")
    assert row["prediction"] == "probe"
    # accuracies of the three models: S->S right in patterns with offset 0 in column 0, etc.
    assert row["acc_src_control"] == pytest.approx((3 + 4 + 3 + 1 + 1) / 24)
    assert row["acc_tgt_control"] == pytest.approx((3 + 1 + 5 + 1) / 24)
    assert row["acc_stitched"] == pytest.approx((3 + 4 + 1 + 2 + 1) / 24)


def test_reversed_pair_swaps_the_roles(tmp_path):
    """b->a against b->b (first control) and a->a: the S-only and T-only columns swap."""
    d = tmp_path / "r"
    paths = [write_predictions(d / "aa.parquet", "a", "a", 0), write_predictions(d / "bb.parquet", "b", "b", 1),
             write_predictions(d / "ba.parquet", "b", "a", 2)]
    (row,) = table10(paths)[0].to_pylist()
    assert (row["source"], row["target"]) == ("b", "a")
    assert (row["preserve_src"], row["preserve_tgt"]) == (1, 4)
    assert (row["interfere_src"], row["interfere_tgt"], row["interfere_both"]) == (5, 4, 1)
    assert (row["follow_src"], row["follow_tgt"]) == (4, 10)


def test_head_predictions_are_used_when_all_three_have_them(tmp_path):
    # pred_head: all three right on every image -> everything dropped; pred_probe gives the patterns above
    paths = trio(tmp_path, method="ffm_tlt", head=0)
    (row,) = table10(paths)[0].to_pylist()
    assert row["prediction"] == "head" and row["all_correct"] == 24 and row["n_kept"] == 0
    # one control without pred_head: the probe predictions are used for all three
    write_predictions(paths[0], "a", "a", 0, method="ffm_tlt", head=None)
    (row,) = table10(paths)[0].to_pylist()
    assert row["prediction"] == "probe" and {k: row[k] for k in EXPECTED} == EXPECTED


def test_missing_control_segmentation_and_several_runs(tmp_path):
    paths = trio(tmp_path, layer=1) + trio(tmp_path, layer=3, method="lfm")
    paths.append(write_predictions(tmp_path / "x" / "a--c.parquet", "a", "c", 2))          # no c->c
    seg = [write_predictions(tmp_path / "s" / f"{n}.parquet", s, t, 0, dataset="ade", segmentation=True)
           for n, (s, t) in {"aa": ("a", "a"), "bb": ("b", "b"), "ab": ("a", "b")}.items()]
    table, notes = table10(paths + seg)
    rows = table.to_pylist()
    assert [(r["layer"], r["method"]) for r in rows] == [(3, "lfm"), (1, "ffm")]   # lfm before ffm, then layer
    assert all({k: r[k] for k in EXPECTED} == EXPECTED for r in rows)
    assert any("a→c layer 2 mlp ffm (seed 0) skipped: no a→a and c→c control predictions" in n for n in notes)
    assert any(n.startswith("ade: Table 10 skipped: a segmentation dataset") for n in notes)
    md = to_markdown(table, notes)
    assert "| a→b | mlp | ffm | 1 | 0 | probe | 4 | 1 | 3 | 4 | 5 | 1 | 18 / 24 | 10 | 4 | 3 |" in md
    assert "## toy (split val)" in md and "> ade: Table 10 skipped" in md


def test_errors_name_the_files(tmp_path):
    paths = trio(tmp_path)
    ims, lab, _ = _images()
    write_predictions(paths[1], "b", "b", 1, images=ims[:-1] + ["other.png"])
    with pytest.raises(ValueError, match=r"b--b\.parquet and .*hold different images"):
        table10(paths)
    write_predictions(paths[1], "b", "b", 1, labels=(lab + 1) % 4)
    with pytest.raises(ValueError, match="different labels"):
        table10(paths)
    write_predictions(paths[1], "b", "b", 1, split="test")
    with pytest.raises(ValueError, match="split 'test'"):
        table10(paths)
    with pytest.raises(ValueError, match="same run"):
        table10(paths[:1] + paths)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": ["x"], "label": [0]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet: predictions parquet lacks schema metadata"):
        table10([bad])
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        table10([tmp_path / "nope.parquet"])


def test_cli_writes_parquet_markdown_and_plot(tmp_path):
    paths = trio(tmp_path, layer=1) + trio(tmp_path, layer=2) + trio(tmp_path, src="b", tgt="a", layer=3)
    out = tmp_path / "results" / "analysis"
    assert cli_main(["analyze", "table10", "--predictions", *map(str, paths), "--out-dir", str(out)]) == 0
    t = pq.read_table(out / "table10.parquet")
    assert t.num_rows == 3 and t.schema.metadata[b"stitchcache_version"]
    assert "a--b.parquet" in t.schema.metadata[b"inputs"].decode()
    assert (out / "table10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# Prediction analysis (Table 10)" in (out / "table10.md").read_text()
    # nothing to analyse: still a table, a note and a figure
    empty = tmp_path / "empty"
    cli_main(["analyze", "table10", "--predictions", str(paths[0]), "--out-dir", str(empty)])
    assert pq.read_table(empty / "table10.parquet").num_rows == 0
    assert "No stitched run had both self-stitch controls" in (empty / "table10.md").read_text()
    assert (empty / "table10.png").stat().st_size > 1000
