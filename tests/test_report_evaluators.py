"""Two evaluators, labelled everywhere: the accuracy plot draws exactly the tables' values (probe and
head), names the reported split, and the distances carry their relative forms."""
import json

import matplotlib.pyplot as plt
import pyarrow as pa
import pytest

from stitchcache.report.outputs import write_table
from stitchcache.report.paper import _Results
from stitchcache.report.plots import accuracy_figure, plot_accuracy
from stitchcache.report.tables import PROBES_KEY, SCHEMA, probe_table, to_markdown


def _rows():
    rows = []
    for seed in (0, 1):
        for src, tgt in (("a", "b"), ("a", "a"), ("b", "b")):
            for layer in (1, 2):
                for i, method in enumerate(("lfm", "ffm", "tlt", "ffm_tlt")):
                    r = dict.fromkeys(SCHEMA.names)
                    base = 0.1 * i + 0.05 * layer + 0.013 * seed + (0.02 if src != tgt else 0)
                    r.update(dataset="ds", source=src, target=tgt, layer=layer, stitch="mlp", init="default",
                             method=method, kind="self" if src == tgt else "cross", seed=seed, metric="accuracy",
                             split="test", probe_acc=0.3 + base,   # the probe and the head differ on purpose
                             head_acc=0.5 + base / 2 if method in ("tlt", "ffm_tlt") else None,
                             d_l=0.1 * layer, d_L=0.5 * layer, d_l_rel=0.2 * layer, d_L_rel=0.9 * layer)
                    rows.append(r)
    return rows


@pytest.fixture
def table():
    probes = [{"dataset": "ds", "model": m, "pool": "mean", "metric": "accuracy", "probe_acc": v, "lr": 0.01,
               "epochs": 3, "split": "test"} for m, v in (("a", 0.61), ("b", 0.72))]
    return pa.Table.from_pylist(_rows(), schema=SCHEMA.with_metadata({PROBES_KEY: json.dumps(probes).encode()}))


def test_plotted_values_equal_the_tables_values(table):
    fig, *_ = accuracy_figure(table)
    R = _Results(table, probe_table(table))
    seen = set()
    for ax in fig.axes:
        for line in ax.get_lines():
            gid = line.get_gid()
            if not gid:
                continue                      # base-probe lines
            field, ds, s, t, st, m = gid.split("|")
            seen.add((field, m))
            for x, y in zip(line.get_xdata(), line.get_ydata()):
                # the paper tables show the head for TLT variants and the probe otherwise ("task")
                kind = "task" if (field == "head_acc") == (m in ("tlt", "ffm_tlt")) else field
                cell = R.cell(ds, s, t, st, m, int(x), kind)
                assert f"{y:.1f}" == cell.split(" ±")[0], (gid, x, y, cell)
            assert (field == "head_acc") <= (m in ("tlt", "ffm_tlt"))
            assert ("trained task head" in ax.get_title()) == (field == "head_acc")
    plt.close(fig)
    # both evaluators are drawn for TLT variants; only the probe for the label-free ones
    assert seen == {("probe_acc", m) for m in ("lfm", "ffm", "tlt", "ffm_tlt")} | {("head_acc", "tlt"), ("head_acc", "ffm_tlt")}
    assert "test split" in fig._suptitle.get_text() and "trained task head" in fig._suptitle.get_text()


def test_tables_name_both_evaluators_the_split_and_relative_distances(table, tmp_path):
    md = to_markdown(table)
    assert "refitted linear probe" in md and "trained task head" in md
    assert "the test split (selection on val)" in md
    assert "| d_l_rel |" in md and "| d_L_rel |" in md
    _, _, md_path, paper_path = write_table(table, None, tmp_path)
    assert "the test split (selection on val)" in paper_path.read_text()
    assert "d_L_rel" in paper_path.read_text()
    assert plot_accuracy(table, tmp_path / "acc.png").stat().st_size > 10_000


def test_results_of_one_dataset_on_different_splits_are_refused(tmp_path):
    from stitchcache.report.tables import build_table
    ev, pr = tmp_path / "eval.json", tmp_path / "probe.json"
    ev.write_text(json.dumps({"dataset": "ds", "source": "a", "target": "b", "layer": 1, "stitch": "mlp",
                              "method": "lfm", "probe_acc": 0.5, "d_l": 0.1, "d_L": 0.2, "split": "test"}))
    pr.write_text(json.dumps({"dataset": "ds", "model": "a", "probe_acc": 0.5, "split": "val"}))
    with pytest.raises(ValueError, match="different splits"):
        build_table([ev], [pr])


def test_a_val_only_table_says_so(table):
    t = table.set_column(table.schema.get_field_index("split"), "split", pa.array(["val"] * table.num_rows))
    probes = [dict(p, split="val") for p in probe_table(table).to_pylist()]
    t = t.replace_schema_metadata({PROBES_KEY: json.dumps(probes).encode()})
    assert "reported on val, also used for selection" in to_markdown(t)
