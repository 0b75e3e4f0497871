"""Report stage: table building, Markdown, plots and the table/plot CLI functions on fake records."""
import argparse
import json
import math

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from stitchcache.report import build_table, load_probes, probe_table, write_table
from stitchcache.report.cli import configure_plot_parser, configure_table_parser, run_plot, run_table
from stitchcache.report.plots import plot_accuracy, plot_distances
from stitchcache.report.tables import COLUMNS

MODELS = {"sup": 0.853, "ssl": 0.781}           # base linear-probe accuracies
PAIRS = [("sup", "ssl"), ("ssl", "sup"), ("sup", "sup"), ("ssl", "ssl")]
LAYERS = [1, 2, 3]
METHODS = ["lfm", "ffm", "tlt", "ffm_tlt"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_eval(src, tgt, layer, method):
    cross = src != tgt
    base = 0.80 - 0.05 * (4 - layer) if cross else MODELS[tgt] - 0.004 * (4 - layer)
    acc = base + 0.01 * METHODS.index(method)
    d_l = (0.02 if method == "lfm" else 0.05) * layer * (3 if cross else 1)
    d_L = (0.30 if method == "lfm" else 0.08) / layer * (3 if cross else 1)
    return {"dataset": "fmnist", "source": src, "target": tgt, "layer": layer, "stitch": "mlp",
            "method": method, "kind": "cross" if cross else "self", "seed": 0, "probe_acc": acc,
            "head_acc": acc + 0.004 if "tlt" in method else None, "d_l": d_l, "d_L": d_L,
            "lr": 0.001, "epochs": 3 + layer, "train_seconds": 1.5 * layer}


@pytest.fixture
def records(tmp_path):
    res = tmp_path / "results"
    evals, probes = [], []
    for model, acc in MODELS.items():
        p = res / "probes" / "fmnist" / f"{model}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"dataset": "fmnist", "model": model, "pool": "mean", "probe_acc": acc,
                                 "lr": 0.01, "epochs": 12}))
        probes.append(p)
    for src, tgt in PAIRS:
        for layer in LAYERS:
            for method in METHODS:
                p = res / "stitch" / "fmnist" / f"{src}--{tgt}" / f"layer{layer}" / "mlp" / method / "eval.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(fake_eval(src, tgt, layer, method)))
                evals.append(p)
    return evals, probes


def cli(configure, argv):
    return configure(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def assert_png(path, min_bytes=10_000):
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes


def test_build_table_rows_and_join(records):
    evals, probes = records
    t = build_table(evals, probes)
    assert t.num_rows == len(PAIRS) * len(LAYERS) * len(METHODS) == 48
    assert t.column_names == COLUMNS
    rows = t.to_pylist()
    assert rows[0]["kind"] == "cross" and rows[-1]["kind"] == "self"    # cross rows sorted first
    r = next(r for r in rows if (r["source"], r["target"], r["layer"], r["method"]) == ("ssl", "sup", 2, "ffm"))
    assert r["src_probe_acc"] == MODELS["ssl"] and r["tgt_probe_acc"] == MODELS["sup"]
    assert r["probe_acc"] == pytest.approx(fake_eval("ssl", "sup", 2, "ffm")["probe_acc"])
    assert all((r["head_acc"] is not None) == ("tlt" in r["method"]) for r in rows)
    assert probe_table(t).to_pylist() == load_probes(probes).to_pylist()


def test_write_table_roundtrip_and_markdown(records, tmp_path):
    evals, probes = records
    t = build_table(evals, probes)
    pq_path, csv_path, md_path = write_table(t, load_probes(probes), tmp_path / "out")
    back = pq.read_table(pq_path)
    assert back.num_rows == 48 and back.num_columns == len(COLUMNS) == 17
    assert back.column_names == COLUMNS
    assert back.to_pylist() == t.to_pylist()
    meta = back.schema.metadata
    assert b"stitchcache_version" in meta and b"created_at" in meta
    assert b"config" not in b" ".join(meta)
    src = set(zip(back.column("source").to_pylist(), back.column("src_probe_acc").to_pylist()))
    assert src == {("sup", 0.853), ("ssl", 0.781)}
    assert pcsv.read_csv(csv_path).num_rows == 48

    md = md_path.read_text()
    for header in ("## fmnist", "### Base linear probes", "### Stitched probe accuracy (%) by layer",
                   "### Feature distances d_l / d_L by layer (LFM vs FFM)", "| layer 1 | layer 2 | layer 3 |"):
        assert header in md
    assert "| sup | mean | 85.3 | 0.01 | 12 |" in md
    acc = fake_eval("sup", "ssl", 1, "ffm")["probe_acc"]           # 0.71 -> "71.0"
    row = f"| sup → ssl | mlp | ffm | {100 * acc:.1f} |"
    assert row in md
    assert "| sup → sup (self) | mlp | lfm |" in md
    d = fake_eval("sup", "ssl", 3, "lfm")["d_L"]                    # 0.3 * 3 / 3 -> "0.3"
    assert f"{d:#.3g}" in md.split("| sup → ssl | mlp | lfm | d_L |")[1].splitlines()[0]
    assert "| sup → ssl | mlp | tlt | d_l |" not in md                # distances table is LFM vs FFM
    write_table(t, None, tmp_path / "again")                          # probes taken from the metadata
    assert (tmp_path / "again" / "table.md").read_text() == md        # deterministic


def test_missing_values_shown_as_dash(records, tmp_path):
    evals, probes = records
    rec = json.loads(evals[0].read_text())
    rec["d_l"] = float("nan")
    evals[0].write_text(json.dumps(rec))
    t = build_table(evals, probes[:1])                                # ssl probe missing
    r = next(r for r in t.to_pylist() if (r["source"], r["target"], r["layer"], r["method"]) == ("sup", "ssl", 1, "lfm"))
    assert r["d_l"] is None
    assert any(r["src_probe_acc"] is None for r in t.to_pylist())
    _, _, md = write_table(t, None, tmp_path / "out")
    assert "| ssl | mean | 85.3 |" not in md.read_text()
    assert "| sup → ssl | mlp | lfm | d_l | – |" in md.read_text()


def test_plots_are_real_pngs(records, tmp_path):
    evals, probes = records
    t = build_table(evals, probes)
    assert_png(plot_accuracy(t, tmp_path / "acc.png"))
    assert_png(plot_distances(t, tmp_path / "dist.png"))


def test_plots_single_layer_single_method_with_nans(records, tmp_path):
    evals, probes = records
    t = build_table(evals, probes)
    rows = [r for r in t.to_pylist() if r["layer"] == 2 and r["method"] == "ffm"]
    rows[0]["probe_acc"] = math.nan
    rows[0]["d_L"] = None
    one = pa.Table.from_pylist(rows, schema=t.schema)
    assert_png(plot_accuracy(one, tmp_path / "acc.png"), 5_000)
    assert_png(plot_distances(one, tmp_path / "dist.png"), 5_000)


def test_cli_table_then_plot(records, tmp_path, capsys):
    evals, probes = records
    out = tmp_path / "results"
    args = cli(configure_table_parser, ["--evals", *evals, "--probes", *probes, "--out-dir", out])
    assert run_table(args) == 0
    assert "48 stitch results" in capsys.readouterr().out
    assert pq.read_table(out / "table.parquet").num_rows == 48
    args = cli(configure_plot_parser, ["--table", out / "table.parquet", "--out-dir", out / "plots"])
    assert run_plot(args) == 0
    assert "accuracy.png" in capsys.readouterr().out
    assert_png(out / "plots" / "accuracy.png")
    assert_png(out / "plots" / "distances.png")


def test_errors_name_the_file(records, tmp_path):
    evals, probes = records
    rec = json.loads(evals[5].read_text())
    del rec["d_L"]
    evals[5].write_text(json.dumps(rec))
    args = cli(configure_table_parser, ["--evals", *evals, "--probes", *probes, "--out-dir", tmp_path / "o"])
    with pytest.raises(ValueError, match=r"eval\.json.*lacks field\(s\) d_L") as e:
        run_table(args)
    assert str(evals[5]) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_table(evals[:1], [tmp_path / "nope.json"])
    bad = tmp_path / "bad_probe.json"
    bad.write_text(json.dumps({"dataset": "fmnist", "model": "sup", "probe_acc": "high"}))
    with pytest.raises(ValueError, match="bad_probe.json.*probe_acc"):
        load_probes([bad])
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        run_plot(cli(configure_plot_parser, ["--table", tmp_path / "missing.parquet", "--out-dir", tmp_path]))
