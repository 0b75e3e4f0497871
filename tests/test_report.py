"""Report stage: table building, Markdown, plots and the table/plot CLI functions on fake records."""
import argparse
import json
import math
import statistics

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
    pq_path, csv_path, md_path, paper_path = write_table(t, load_probes(probes), tmp_path / "out")
    assert paper_path.name == "paper_tables.md" and paper_path.is_file()
    back = pq.read_table(pq_path)
    assert back.num_rows == 48 and back.num_columns == len(COLUMNS) == 26
    assert back.column_names == COLUMNS
    assert back.to_pylist() == t.to_pylist()
    meta = back.schema.metadata
    assert b"stitchcache_version" in meta and b"created_at" in meta
    assert b"config" not in b" ".join(meta)
    src = set(zip(back.column("source").to_pylist(), back.column("src_probe_acc").to_pylist()))
    assert src == {("sup", 0.853), ("ssl", 0.781)}
    assert pcsv.read_csv(csv_path).num_rows == 48

    md = md_path.read_text()
    for header in ("## fmnist", "### Base linear probes", "### Stitched model, refitted linear probe: accuracy (%) by layer",
                   "### Feature distances d_l / d_L by layer (LFM vs FFM", "| layer 1 | layer 2 | layer 3 |"):
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


def test_training_section_shows_how_each_run_ended(records, tmp_path):
    evals, probes = records
    md0 = write_table(build_table(evals, probes), None, tmp_path / "old")[2].read_text()
    assert "### Training" not in md0      # records written before runs recorded how they ended
    for p in evals:
        rec = json.loads(p.read_text())
        falling = (rec["source"], rec["target"], rec["layer"], rec["method"]) == ("sup", "ssl", 2, "ffm")
        capped = (rec["source"], rec["target"], rec["layer"], rec["method"]) == ("sup", "ssl", 3, "ffm")
        rec.update(epochs_run=rec["epochs"] + 3, stop="max_epochs" if capped else "patience",
                   tail_fall=0.004 if falling or capped else 0.0)
        p.write_text(json.dumps(rec))
    t = build_table(evals, probes)
    md = write_table(t, None, tmp_path / "out")[2].read_text()
    assert "### Training: best epoch / epochs trained, per seed" in md and "2 of 48 runs." in md
    assert "| sup → ssl | mlp | ffm | 4/7 | 5/8↓ | 6/9 cap↓ |" in md
    assert "| sup → ssl | mlp | lfm | 4/7 | 5/8 | 6/9 |" in md
    r = next(r for r in t.to_pylist() if (r["source"], r["target"], r["layer"], r["method"]) == ("sup", "ssl", 2, "ffm"))
    assert (r["epochs_run"], r["stop"], r["tail_fall"]) == (8, "patience", 0.004)


def test_missing_values_shown_as_dash(records, tmp_path):
    evals, probes = records
    rec = json.loads(evals[0].read_text())
    rec["d_l"] = float("nan")
    evals[0].write_text(json.dumps(rec))
    t = build_table(evals, probes[:1])                                # ssl probe missing
    r = next(r for r in t.to_pylist() if (r["source"], r["target"], r["layer"], r["method"]) == ("sup", "ssl", 1, "lfm"))
    assert r["d_l"] is None
    assert any(r["src_probe_acc"] is None for r in t.to_pylist())
    _, _, md, _ = write_table(t, None, tmp_path / "out")
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


# ----------------------------------------------------------------------------- paper-shaped tables

DATASETS = {"fmnist": 0.0, "cifar": -0.10}           # dataset offset on every accuracy
STITCHES = ["linear", "mlp", "lora"]
SEEDS = [0, 1]


def paper_eval(ds, src, tgt, layer, stitch, method, seed):
    rec = fake_eval(src, tgt, layer, method)
    shift = DATASETS[ds] + 0.02 * STITCHES.index(stitch) + 0.01 * seed + 0.03 * (src == "sup")
    rec.update(dataset=ds, stitch=stitch, seed=seed, probe_acc=rec["probe_acc"] + shift,
               d_l=rec["d_l"] * (1 + seed), d_L=rec["d_L"] + 0.01 * seed)
    if rec["head_acc"] is not None:
        rec["head_acc"] = rec["head_acc"] + shift - 0.03 * (method == "tlt")
    return rec


def paper_rows(datasets=DATASETS, stitches=STITCHES, methods=METHODS, seeds=SEEDS):
    return [paper_eval(ds, s, t, l, st, m, seed) for ds in datasets for s, t in PAIRS for l in LAYERS
            for st in stitches for m in methods for seed in seeds]


def paper_table(rows, datasets=DATASETS):
    from stitchcache.report.tables import SCHEMA
    for r in rows:
        r["src_probe_acc"], r["tgt_probe_acc"] = MODELS[r["source"]], MODELS[r["target"]]
    probes = load_probes([])
    return pa.Table.from_pylist(rows, schema=SCHEMA), probes


def section(md, title):
    """The text of one '## ...' section of paper_tables.md."""
    return md.split(f"## {title}")[1].split("\n## ")[0]


def block(md, heading):
    """The Markdown table lines under one '### heading' line."""
    part = md.split(f"### {heading}\n")[1].split("\n### ")[0].split("\n## ")[0]
    return [line for line in part.splitlines() if line.startswith("|")]


def cell_of(vals):
    m, s = statistics.mean(vals), statistics.stdev(vals)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


@pytest.fixture
def paper_md(tmp_path):
    """paper_tables.md written by the `table` subcommand from 2 datasets x 4 pairs x 3 layers x
    3 stitch families x 4 methods x 2 seeds of fake evaluation JSON."""
    res = tmp_path / "results"
    evals, probes = [], []
    for ds in DATASETS:
        for model, acc in MODELS.items():
            p = res / "probes" / ds / f"{model}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"dataset": ds, "model": model, "pool": "mean", "probe_acc": acc + DATASETS[ds]}))
            probes.append(p)
    for i, rec in enumerate(paper_rows()):
        p = res / "evals" / f"{i}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rec))
        evals.append(p)
    assert run_table(cli(configure_table_parser, ["--evals", *evals, "--probes", *probes, "--out-dir", res])) == 0
    path = res / "paper_tables.md"
    assert path.is_file() and (res / "table.md").is_file()
    return path.read_text()


def head(ds, s, t, l, st, m):
    return [paper_eval(ds, s, t, l, st, m, seed)["head_acc"] for seed in SEEDS]


def probe(ds, s, t, l, st, m):
    return [paper_eval(ds, s, t, l, st, m, seed)["probe_acc"] for seed in SEEDS]


def test_paper_table1_tlt_vs_ffm_tlt(paper_md):
    t1 = section(paper_md, "Table 1")
    assert "task-head accuracy (`head_acc`" in t1 and "skipped" not in t1
    heads = [line for line in t1.splitlines() if line.startswith("### ")]
    assert len(heads) == 2 * 2 * 3                                      # datasets x cross pairs x stitches
    rows = block(t1, "cifar: sup → ssl, MLP stitch")
    assert rows[0] == "| Pre-train | L1 | L2 | L3 |"
    no = "| No | " + " | ".join(cell_of(head("cifar", "sup", "ssl", l, "mlp", "tlt")) for l in LAYERS) + " |"
    ffm = "| FFM | " + " | ".join(cell_of(head("cifar", "sup", "ssl", l, "mlp", "ffm_tlt")) for l in LAYERS) + " |"
    assert rows[2:] == [no, ffm]
    # one value by hand: mean of two seeds 0.01 apart -> std 0.7 points
    v = head("fmnist", "ssl", "sup", 2, "linear", "ffm_tlt")
    assert v[1] - v[0] == pytest.approx(0.01)
    assert f"{100 * (v[0] + 0.005):.1f} ± 0.7" in block(t1, "fmnist: ssl → sup, Linear stitch")[3]


def test_paper_table2_datasets(paper_md):
    t2 = section(paper_md, "Table 2")
    assert "recipe FFM→TLT (the paper's)" in t2 and "MLP stitch" in t2
    rows = block(t2, "ssl and sup")
    assert rows[0] == "| model | cifar L1 | cifar L2 | cifar L3 | fmnist L1 | fmnist L2 | fmnist L3 |"
    labels = [r.split(" | ")[0][2:] for r in rows[2:]]
    assert labels == ["ssl → ssl (S→S)", "sup → sup (T→T)", "ssl → sup (S→T)", "sup → ssl (T→S)"]
    cells = [cell_of(head(ds, "sup", "ssl", l, "mlp", "ffm_tlt")) for ds in ("cifar", "fmnist") for l in LAYERS]
    assert rows[5] == "| sup → ssl (T→S) | " + " | ".join(cells) + " |"


def test_paper_table3_stitch_families(paper_md):
    t3 = section(paper_md, "Table 3")
    assert "recipe FFM→TLT (the paper's)" in t3 and "No lora" not in t3
    rows = block(t3, "fmnist")
    assert rows[0] == "| S → T | stitch | L1 | L2 | L3 |"
    assert [r.split(" | ")[1] for r in rows[2:]] == ["Linear", "MLP", "LoRA"] * 2
    assert rows[2].startswith("| ssl → sup | Linear | ") and rows[3].startswith("|  | MLP | ")
    lora = " | ".join(cell_of(head("fmnist", "sup", "ssl", l, "lora", "ffm_tlt")) for l in LAYERS)
    assert rows[7] == f"|  | LoRA | {lora} |"


def test_paper_table4_and_tables5_9(paper_md):
    t4 = section(paper_md, "Table 4")
    assert "Base linear probes: ssl 68.1, sup 75.3." in block_text(t4, "cifar, LoRA stitch")
    rows = block(t4, "fmnist, Linear stitch")
    assert rows[0] == "| S → T | metric | method | L1 | L2 | L3 |"
    d_l = [[paper_eval("fmnist", "sup", "ssl", l, "linear", "lfm", s)["d_l"] for s in SEEDS] for l in LAYERS]
    want = " | ".join(f"{statistics.mean(v):#.3g} ± {statistics.stdev(v):.2g}" for v in d_l)
    assert f"| sup → ssl | d_l | LFM | {want} |" in rows
    assert [r.split(" | ")[2] for r in rows[2:8]] == ["LFM", "FFM"] * 3
    t59 = section(paper_md, "Tables 5–9")
    rows = block(t59, "fmnist: sup → ssl, MLP stitch")
    assert rows[0] == "| recipe | model | L1 | L2 | L3 |"
    assert len(rows) == 2 + 3 * len(METHODS) + 2
    assert rows[2].startswith("| LFM | sup → sup (S→S control) | ")
    assert rows[3].startswith("|  | ssl → ssl (T→T control) | ")
    ffm_tlt_st = " | ".join(cell_of(head("fmnist", "sup", "ssl", l, "mlp", "ffm_tlt")) for l in LAYERS)
    assert rows[13] == f"|  | sup → ssl (S→T stitched) | {ffm_tlt_st} |"
    ffm_ctrl = " | ".join(cell_of(probe("fmnist", "ssl", "ssl", l, "mlp", "ffm")) for l in LAYERS)
    assert rows[6] == f"|  | ssl → ssl (T→T control) | {ffm_ctrl} |"
    assert rows[-2:] == ["| linear probe | sup (S) | 85.3 | 85.3 | 85.3 |",
                         "| linear probe | ssl (T) | 78.1 | 78.1 | 78.1 |"]
    assert "mean ± sample standard deviation" in paper_md and "skipped" not in paper_md


def test_select_layers():
    from stitchcache.report.paper import select_layers
    assert select_layers([2, 6, 10, 14, 18, 22]) == [6, 14, 22]          # the paper's Table 2 layers
    assert select_layers([3, 1, 2]) == [1, 2, 3] and select_layers([1, 2, 3, 4]) == [1, 2, 3, 4]
    assert select_layers(range(12)) == [1, 6, 11]


def block_text(md, heading):
    return md.split(f"### {heading}\n")[1].split("\n### ")[0]


def test_paper_tables_skip_notes(tmp_path):
    from stitchcache.report import paper_tables
    # one dataset, no lora, no tlt, one seed
    t, probes = paper_table(paper_rows({"fmnist": 0.0}, ["linear", "mlp"], ["lfm", "ffm", "ffm_tlt"], [0]))
    md = paper_tables(t, probes)
    assert "> Table 1 skipped: the results have no `tlt` runs (it compares tlt with ffm_tlt)." in md
    assert "> Table 2 skipped: it compares datasets and the results hold only fmnist" in md
    assert "> No lora results: that row is left out." in md
    assert [r.split(" | ")[1] for r in block(md, "fmnist")[2:]] == ["Linear", "MLP"] * 2
    assert "One seed (0): no spread shown." in md and " ± " not in md
    assert "| FFM→TLT | sup → sup (S→S control) |" in md and "| TLT |" not in md
    # only mlp, no lfm / ffm, ffm_tlt without head accuracy -> Table 3 and 4 skipped, fallback marked
    rows = paper_rows({"fmnist": 0.0}, ["mlp"], ["tlt", "ffm_tlt"], [0])
    for r in rows:
        if r["method"] == "ffm_tlt" and r["layer"] == 1:
            r["head_acc"] = None
    t, probes = paper_table(rows)
    md = paper_tables(t, probes)
    assert "> Table 3 skipped: it compares stitch families and the results hold only mlp" in md
    assert "> Table 4 skipped: the results have no `lfm` / `ffm` runs (it compares lfm with ffm)." in md
    fb = paper_eval("fmnist", "sup", "ssl", 1, "mlp", "ffm_tlt", 0)["probe_acc"]
    assert f"| FFM | {100 * fb:.1f}* |" in md
    assert "* TLT / FFM→TLT result without a task-head accuracy" in md
    # no TLT variants: Table 3 falls back to the next recipe in the preference order and says so
    t, probes = paper_table(paper_rows({"fmnist": 0.0}, ["mlp", "lora"], ["lfm", "ffm"], [0]))
    md = paper_tables(t, probes)
    assert "recipe FFM (no FFM→TLT results; the first present in the preference order" in section(md, "Table 3")
    assert "> Table 1 skipped: the results have no `tlt` / `ffm_tlt` runs" in md
    # self-stitch only (no cross pairs): the cross-pair tables skip
    t, probes = paper_table([r for r in paper_rows({"fmnist": 0.0}, ["mlp"], METHODS, [0]) if r["kind"] == "self"])
    md = paper_tables(t, probes)
    for name in ("Table 1", "Table 4", "Tables 5–9"):
        assert f"> {name} skipped: no cross-model (S ≠ T)" in md
    assert paper_tables(t.slice(0, 0), probes).endswith("> No stitching results: every table skipped.\n")


# ----------------------------------------------------------------------------- inits and several datasets

INIT_SHIFT = {"linear": 0.0, "linear_lstsq": 0.05, "mlp": 0.02}   # distinct accuracy per stitch choice


def choice_eval(ds, src, tgt, layer, choice, method):
    """An eval.json as the evaluate stage writes it: ``stitch`` is the stitch choice (the checkpoint's
    stitch kind, e.g. ``linear_lstsq``), no init field."""
    rec = fake_eval(src, tgt, layer, method)
    shift = INIT_SHIFT[choice] + DATASETS[ds]
    rec.update(dataset=ds, stitch=choice, probe_acc=rec["probe_acc"] + shift)
    if rec["head_acc"] is not None:
        rec["head_acc"] += shift
    return rec


def write_results(root, datasets=DATASETS, choices=("linear", "linear_lstsq", "mlp"), metric=None):
    """results/probes/{dataset}/{model}.json and results/stitch/{dataset}/.../{choice}/{method}/eval.json."""
    evals, probes = [], []
    for ds in datasets:
        for model, acc in MODELS.items():
            p = root / "probes" / ds / f"{model}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            rec = {"dataset": ds, "model": model, "pool": "mean", "probe_acc": acc + DATASETS[ds]}
            if metric and ds in metric:
                rec["metric"] = metric[ds]
            p.write_text(json.dumps(rec))
            probes.append(p)
        for src, tgt in PAIRS:
            for layer in LAYERS:
                for choice in choices:
                    for method in METHODS:
                        p = root / "stitch" / ds / f"{src}--{tgt}" / f"layer{layer}" / choice / method / "eval.json"
                        p.parent.mkdir(parents=True, exist_ok=True)
                        rec = choice_eval(ds, src, tgt, layer, choice, method)
                        if metric and ds in metric:
                            rec["metric"] = metric[ds]
                        p.write_text(json.dumps(rec))
                        evals.append(p)
    return evals, probes


def test_table_splits_the_stitch_choice_into_family_and_init(tmp_path):
    evals, probes = write_results(tmp_path / "results", {"fmnist": 0.0})
    t = build_table(evals, probes)
    rows = t.to_pylist()
    assert t.num_rows == len(PAIRS) * len(LAYERS) * 3 * len(METHODS)          # no duplicate-key error
    assert {(r["stitch"], r["init"]) for r in rows} == {("linear", "default"), ("linear", "lstsq"), ("mlp", "default")}
    assert {r["metric"] for r in rows} == {"accuracy"}
    pick = lambda init: next(r for r in rows if (r["source"], r["target"], r["layer"], r["method"], r["stitch"],
                                                 r["init"]) == ("sup", "ssl", 2, "ffm", "linear", init))
    assert pick("lstsq")["probe_acc"] == pytest.approx(choice_eval("fmnist", "sup", "ssl", 2, "linear_lstsq", "ffm")["probe_acc"])
    assert pick("default")["probe_acc"] == pytest.approx(choice_eval("fmnist", "sup", "ssl", 2, "linear", "ffm")["probe_acc"])
    # within a pair / family / method / layer, the default init sorts before lstsq
    i = [(r["stitch"], r["init"]) for r in rows if (r["source"], r["target"], r["layer"], r["method"]) == ("sup", "ssl", 1, "lfm")]
    assert i == [("linear", "default"), ("linear", "lstsq"), ("mlp", "default")]
    # an explicit init that contradicts the choice name is an error naming the file
    bad = json.loads(evals[0].read_text())
    bad.update(stitch="linear_lstsq", init="default")
    evals[0].write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"eval\.json.*init"):
        build_table(evals, probes)


def test_markdown_and_csv_keep_both_inits(tmp_path):
    evals, probes = write_results(tmp_path / "results", {"fmnist": 0.0})
    _, csv_path, md_path, _ = write_table(build_table(evals, probes), None, tmp_path / "out")
    csv = pcsv.read_csv(csv_path).to_pylist()
    assert {(r["stitch"], r["init"]) for r in csv} == {("linear", "default"), ("linear", "lstsq"), ("mlp", "default")}
    md = md_path.read_text()
    for choice, label in (("linear", "linear (default init)"), ("linear_lstsq", "linear (lstsq init)"), ("mlp", "mlp")):
        cells = " | ".join(f"{100 * choice_eval('fmnist', 'sup', 'ssl', l, choice, 'ffm')['probe_acc']:.1f}" for l in LAYERS)
        assert f"| sup → ssl | {label} | ffm | {cells} |" in md, label


def test_paper_table3_linear_default_and_lstsq_rows(tmp_path):
    from stitchcache.report import paper_tables
    evals, probes = write_results(tmp_path / "results", {"fmnist": 0.0})
    md = paper_tables(build_table(evals, probes))
    rows = block(section(md, "Table 3"), "fmnist")
    assert [r.split(" | ")[1] for r in rows[2:]] == ["Linear (default init)", "Linear (lstsq init)", "MLP"] * 2
    for i, choice in enumerate(("linear", "linear_lstsq", "mlp")):     # ssl → sup first, FFM→TLT head accuracy
        want = " | ".join(f"{100 * choice_eval('fmnist', 'ssl', 'sup', l, choice, 'ffm_tlt')['head_acc']:.1f}"
                          for l in LAYERS)
        assert rows[2 + i].endswith(f" | {want} |"), (choice, rows[2 + i])
    assert "### fmnist: sup → ssl, Linear (lstsq init) stitch" in section(md, "Table 1")
    assert "### fmnist, Linear (default init) stitch" in section(md, "Table 4")
    # the two inits of one family alone are enough for Table 3
    evals, probes = write_results(tmp_path / "only_linear", {"fmnist": 0.0}, ("linear", "linear_lstsq"))
    md = paper_tables(build_table(evals, probes))
    t3 = section(md, "Table 3")
    assert "skipped" not in t3 and "No mlp / lora results" in t3
    assert [r.split(" | ")[1] for r in block(t3, "fmnist")[2:]] == ["Linear (default init)", "Linear (lstsq init)"] * 2


class _Figures:
    """Records what the plot functions draw (titles, y labels, legend labels) before closing a figure."""

    def __init__(self, monkeypatch):
        import stitchcache.report.plots as plots
        self.figs, real = [], plots.plt.close

        def close(fig=None):
            self.figs.append({"titles": [ax.get_title() for ax in fig.axes if ax.get_visible()],
                              "ylabels": [ax.get_ylabel() for ax in fig.axes if ax.get_visible()],
                              "legend": [t.get_text() for leg in fig.legends for t in leg.get_texts()]})
            real(fig)
        monkeypatch.setattr(plots.plt, "close", close)


def test_two_datasets_through_the_cli(tmp_path, capsys, monkeypatch):
    res = tmp_path / "results"
    evals, probes = write_results(res)
    assert run_table(cli(configure_table_parser, ["--evals", *evals, "--probes", *probes, "--out-dir", res])) == 0
    assert "(2 dataset(s))" in capsys.readouterr().out
    t = pq.read_table(res / "table.parquet")
    assert sorted(set(t.column("dataset").to_pylist())) == ["cifar", "fmnist"]
    assert t.num_rows == 2 * len(PAIRS) * len(LAYERS) * 3 * len(METHODS)
    assert {(p["dataset"], p["model"]) for p in probe_table(t).to_pylist()} == {(d, m) for d in DATASETS for m in MODELS}
    # src/tgt probes are joined per dataset
    r = next(r for r in t.to_pylist() if r["dataset"] == "cifar" and r["source"] == "sup")
    assert r["src_probe_acc"] == pytest.approx(MODELS["sup"] + DATASETS["cifar"])
    md = (res / "table.md").read_text()
    assert md.index("## cifar") < md.index("## fmnist")
    cifar = md.split("## cifar")[1].split("## fmnist")[0]
    assert f"| sup | mean | {100 * (MODELS['sup'] + DATASETS['cifar']):.1f} |" in cifar
    assert "| sup → ssl | linear (lstsq init) | lfm |" in cifar
    paper = (res / "paper_tables.md").read_text()
    t3 = section(paper, "Table 3")
    for ds in DATASETS:
        assert [r.split(" | ")[1] for r in block(t3, ds)[2:]] == ["Linear (default init)", "Linear (lstsq init)", "MLP"] * 2
    cifar_lstsq = block(t3, "cifar")[3]
    want = " | ".join(f"{100 * choice_eval('cifar', 'ssl', 'sup', l, 'linear_lstsq', 'ffm_tlt')['head_acc']:.1f}" for l in LAYERS)
    assert cifar_lstsq == f"|  | Linear (lstsq init) | {want} |"
    assert "skipped" not in section(paper, "Table 2")
    # plots: same two file names, one facet per (dataset, cross pair), legend tells the inits apart
    figs = _Figures(monkeypatch)
    assert run_plot(cli(configure_plot_parser, ["--table", res / "table.parquet", "--out-dir", res / "plots"])) == 0
    assert_png(res / "plots" / "accuracy.png")
    assert_png(res / "plots" / "distances.png")
    acc, dist = figs.figs
    assert acc["titles"] == [f"{p} — {e}" for p in ("cifar: ssl → sup", "cifar: sup → ssl", "fmnist: ssl → sup",
                                                     "fmnist: sup → ssl")
                             for e in ("refitted linear probe", "trained task head")]
    assert len(dist["titles"]) == 8 and dist["titles"][0].startswith("cifar: ssl → sup") \
        and dist["titles"][-1].startswith("fmnist: sup → ssl")
    for fig in (acc, dist):
        assert {"linear (default init) stitch", "linear (lstsq init) stitch", "mlp stitch"} <= set(fig["legend"])
    assert set(acc["ylabels"]) == {"probe accuracy (%)", "head accuracy (%)"}


def test_a_dataset_with_another_metric(tmp_path, monkeypatch):
    from stitchcache.report import paper_tables
    """A segmentation dataset's records say metric "miou" (probe_acc / head_acc hold the mIoU)."""
    evals, probes = write_results(tmp_path / "results", metric={"cifar": "miou"})
    t = build_table(evals, probes)
    assert {(r["dataset"], r["metric"]) for r in t.to_pylist()} == {("cifar", "miou"), ("fmnist", "accuracy")}
    assert {(p["dataset"], p["metric"]) for p in probe_table(t).to_pylist()} == {
        ("cifar", "miou"), ("fmnist", "accuracy")}
    _, _, md_path, _ = write_table(t, None, tmp_path / "out")
    md = md_path.read_text()
    cifar, fmnist = md.split("## cifar")[1].split("## fmnist")
    assert "### Stitched model, refitted linear probe: mIoU (%) by layer" in cifar and "probe mIoU (%)" in cifar
    assert "### Stitched model, refitted linear probe: accuracy (%) by layer" in fmnist and "mIoU" not in fmnist
    assert "Metric per dataset" in paper_tables(t) and "cifar: mIoU" in paper_tables(t)
    figs = _Figures(monkeypatch)
    plot_accuracy(t, tmp_path / "acc.png")
    assert figs.figs[0]["ylabels"] == ["probe mIoU (%)", "head mIoU (%)"] * 2 + ["probe accuracy (%)", "head accuracy (%)"] * 2


def test_a_table_without_the_init_and_metric_columns_still_plots(records, tmp_path):
    """A table.parquet written before the init / metric columns existed (stitch = the choice name)."""
    evals, probes = records
    t = build_table(evals, probes).drop_columns(["init", "metric"])
    rows = t.to_pylist()
    for r in rows[:6]:
        r["stitch"] = "linear_lstsq"
    old = pa.Table.from_pylist(rows, schema=t.schema)
    pq.write_table(old, tmp_path / "old.parquet")
    assert run_plot(cli(configure_plot_parser, ["--table", tmp_path / "old.parquet", "--out-dir", tmp_path / "p"])) == 0
    from stitchcache.report.tables import rows_of
    got = {(r["stitch"], r["init"], r["metric"]) for r in rows_of(old)}
    assert got == {("linear", "lstsq", "accuracy"), ("mlp", "default", "accuracy")}
