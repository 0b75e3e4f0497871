"""The findings checks on hand-made results tables where every verdict is known."""
import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stitchcache.report.findings import (FAILS, HOLDS, NO_DATA, UNRESOLVED, WITHIN, check_findings, findings_markdown,
                                       shallow_deep)
from stitchcache.report.tables import PROBES_KEY, SCHEMA

LAYERS = (1, 2, 3)   # shallow [1], deep [3]


def row(src, tgt, layer, method, seed=0, probe=None, head=None, d_l=None, d_L=None):
    r = dict.fromkeys(SCHEMA.names)
    r.update(dataset="ds", source=src, target=tgt, layer=layer, stitch="mlp", init="default", method=method,
             kind="self" if src == tgt else "cross", seed=seed, metric="accuracy", probe_acc=probe, head_acc=head,
             d_l=d_l, d_L=d_L)
    return r


def paper_like(seed=0, jitter=0.0):
    """Results shaped so every finding holds: LFM low d_l / high d_L, FFM→TLT best, deep stitch wins."""
    rows = []
    for l in LAYERS:
        j = jitter
        for src, tgt in (("a", "b"), ("a", "a"), ("b", "b")):
            boost = 0.05 if src != tgt else 0.0
            rows += [row(src, tgt, l, "lfm", seed, probe=0.40 + 0.1 * l + j, d_l=0.01, d_L=1.0),
                     row(src, tgt, l, "ffm", seed, probe=0.50 + 0.1 * l + j, d_l=0.02, d_L=0.3),
                     row(src, tgt, l, "tlt", seed, probe=0.3, head=0.20 + 0.2 * l + j),
                     row(src, tgt, l, "ffm_tlt", seed, probe=0.6, head=0.55 + 0.1 * l + boost + j)]
    return rows


def table(rows, probes=({"a": 0.70, "b": 0.80})):
    meta = {PROBES_KEY: json.dumps([{"dataset": "ds", "model": m, "pool": "mean", "metric": "accuracy",
                                     "probe_acc": v, "lr": 0.01, "epochs": 3} for m, v in probes.items()]).encode()}
    return pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(meta))


def verdicts(t):
    return [f.verdict for f in check_findings(t)]


def test_shallow_and_deep_points():
    assert shallow_deep([3, 1, 2]) == ([1], [3])
    assert shallow_deep([2, 6, 10, 14, 18, 22]) == ([2, 6], [18, 22])
    assert shallow_deep([5]) == ([], [])


def test_all_findings_hold_with_two_seeds_and_spread_is_printed():
    t = table(paper_like(0) + paper_like(1, jitter=0.01))
    assert verdicts(t) == [HOLDS, HOLDS, HOLDS]
    md = findings_markdown(t)
    assert "## Finding 1: holds" in md and "## Finding 3: holds" in md
    # layer 3 FFM→TLT a→b: seed means (0.90 + 0.91) / 2; spread = sample std of the two seeds
    assert "S → T FFM→TLT 90.5 ± 0.7 (n=2)" in md


def test_finding1_fails_when_ffm_has_the_larger_final_distance():
    rows = paper_like()
    for r in rows:
        if r["source"] == "a" and r["target"] == "b" and r["method"] == "ffm" and r["layer"] == 2:
            r["d_L"] = 2.0    # above LFM's 1.0 at one point
    f1 = check_findings(table(rows))[0]
    assert f1.verdict == FAILS
    bad = [c for c in f1.checks if c.verdict == FAILS]
    assert len(bad) == 1 and "d_L(FFM) <= d_L(LFM)" in bad[0].claim
    assert any("layer 2: FFM 2.00 (n=1) > LFM 1.00 (n=1)" in e for e in bad[0].evidence)


def test_finding2_fails_when_the_gain_is_largest_at_deep_points():
    rows = paper_like()
    for r in rows:
        if r["method"] == "tlt":
            r["head_acc"] = {1: 0.60, 2: 0.60, 3: 0.40}[r["layer"]]   # gains: 0.05 at 1, 0.45 (+boost) at 3
    f2 = check_findings(table(rows))[1]
    assert f2.verdict == FAILS
    assert [c.verdict for c in f2.checks] == [HOLDS, FAILS]


def test_finding3_fails_when_the_stronger_base_probe_wins():
    assert verdicts(table(paper_like(), probes={"a": 0.70, "b": 0.99}))[2] == FAILS


def test_not_enough_data_without_tlt_and_controls():
    rows = [r for r in paper_like() if r["method"] in ("lfm", "ffm") and r["kind"] == "cross"]
    v = verdicts(table(rows))
    assert v == [NO_DATA, NO_DATA, NO_DATA]   # finding 1's (a), (b) hold, (c) lacks TLT
    f1 = check_findings(table(rows))[0]
    assert [c.verdict for c in f1.checks] == [HOLDS, HOLDS, NO_DATA]


def test_a_single_layer_has_no_shallow_deep_contrast():
    rows = [r for r in paper_like() if r["layer"] == 2]
    f = check_findings(table(rows))
    assert f[0].checks[2].verdict == NO_DATA and f[2].verdict == NO_DATA


def test_no_cross_results_at_all():
    md = findings_markdown(table([r for r in paper_like() if r["kind"] == "self"]))
    assert md.count("not enough data") >= 3


def test_reported_split_is_named(tmp_path):
    rows = paper_like()
    schema = SCHEMA.append(pa.field("split", pa.string())) if "split" not in SCHEMA.names else SCHEMA
    for r in rows:
        r["split"] = "val"
    t = pa.Table.from_pylist(rows, schema=schema.with_metadata(table(rows).schema.metadata))
    assert "reported on val, also used for selection" in findings_markdown(t)


def test_cli_writes_findings(tmp_path, capsys):
    from stitchcache.report.cli import configure_findings_parser, run_findings
    pq.write_table(table(paper_like()), tmp_path / "table.parquet")
    args = configure_findings_parser(argparse.ArgumentParser()).parse_args(
        ["--table", str(tmp_path / "table.parquet"), "--out", str(tmp_path / "f" / "findings.md")])
    assert run_findings(args) == 0
    assert (tmp_path / "f" / "findings.md").read_text().startswith("# Findings")
    assert "finding 1: holds" in capsys.readouterr().out


def test_no_import_cycle_between_tables_and_paper():
    import ast
    import inspect

    import stitchcache.report.tables as tables
    tree = ast.parse(inspect.getsource(tables))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"paper", "findings", "outputs", "plots"} & imported


def test_a_difference_inside_the_seed_spread_is_marked():
    # seeds 0 / 1 differ by 0.3 (jitter): TLT and FFM→TLT at layer 1 differ by 0.15 between them
    wide = table(paper_like(0) + paper_like(1, jitter=0.3))
    md = findings_markdown(wide)
    line = next(l for l in md.splitlines() if l.strip().startswith("- layer 3: S → S (a → a)"))
    assert f"({WITHIN}; noise 21.2: seed std 21.2)" in line, line
    # with a small spread the same comparison is resolved and not marked
    tight = findings_markdown(table(paper_like(0) + paper_like(1, jitter=0.01)))
    line = next(l for l in tight.splitlines() if l.strip().startswith("- layer 3: S → S (a → a)"))
    assert WITHIN not in line
    assert WITHIN in md.split("## Finding 1")[0]  # the header explains the mark


def _two_seeds_with(change, jitter=0.3):
    """paper_like results for seeds 0 and 1 (seed 1 shifted by ``jitter``: seed std 0.21 in every
    cell), then ``change(row)`` applied to every row."""
    rows = paper_like(0) + paper_like(1, jitter=jitter)
    for r in rows:
        change(r)
    return table(rows)


def _tlt_just_above_ffm_tlt(delta, jitter=0.3):
    def change(r):   # a → b TLT at layer 3: ``delta`` above FFM→TLT there (0.55 + 0.3 + 0.05 + jitter)
        if r["kind"] == "cross" and r["method"] == "tlt" and r["layer"] == 3:
            r["head_acc"] = 0.90 + delta + (jitter if r["seed"] == 1 else 0.0)
    return change


def test_a_reversal_inside_the_seed_spread_is_not_resolved_not_a_failure():
    # FFM→TLT is 1 point below TLT at layer 3, the seeds spread by 21 points: the direction of the
    # comparison is noise, so finding 2's claim (a) can neither hold nor fail on these seeds
    f2 = check_findings(_two_seeds_with(_tlt_just_above_ffm_tlt(0.01)))[1]
    assert f2.checks[0].verdict == UNRESOLVED, f2.checks[0]
    assert f2.verdict == UNRESOLVED
    assert any("layer 3:" in e and WITHIN in e for e in f2.checks[0].evidence)
    md = findings_markdown(_two_seeds_with(_tlt_just_above_ffm_tlt(0.01)))
    assert f"## Finding 2: {UNRESOLVED}" in md
    assert f"**{UNRESOLVED}** — ds, a → b, mlp: FFM→TLT >= TLT" in md


def test_a_reversal_outside_the_seed_spread_still_fails():
    # the same reversal with seeds that agree (std 0.7 points) is resolved: claim (a) fails
    f2 = check_findings(_two_seeds_with(_tlt_just_above_ffm_tlt(0.05, jitter=0.01), jitter=0.01))[1]
    assert f2.checks[0].verdict == FAILS and f2.verdict == FAILS


def test_a_resolved_failure_outweighs_an_unresolved_comparison():
    # the control comparisons at layer 3 unresolved (5-point gap, 21-point spread) and the target
    # probe comparison a resolved failure (probe 200 % far above every stitched value): the finding
    # does not hold
    found = check_findings(table(paper_like(0) + paper_like(1, jitter=0.3), probes={"a": 0.70, "b": 2.0}))
    assert sum(WITHIN in e for e in found[2].checks[0].evidence) == 2
    assert found[2].verdict == FAILS


def test_the_shallow_deep_gain_comparison_inside_the_spread_is_not_resolved():
    def change(r):   # a → b gains: shallow 0.70 − 0.60, deep 0.90 − 0.85: differ by 5 points < the 21-point spread
        if r["method"] == "tlt":
            r["head_acc"] = {1: 0.60, 2: 0.60, 3: 0.85}[r["layer"]] + (0.3 if r["seed"] == 1 else 0.0)
    f2 = check_findings(_two_seeds_with(change))[1]
    assert f2.checks[1].verdict == UNRESOLVED, f2.checks[1]
    assert WITHIN in f2.checks[1].evidence[0]


def test_one_seed_says_every_comparison_counts_its_sign():
    md = findings_markdown(table(paper_like()))
    assert "With one seed there is no seed spread: every comparison counts its sign" in md
    assert UNRESOLVED not in md.split("See docs")[1]
    assert "With one seed" not in findings_markdown(table(paper_like(0) + paper_like(1, jitter=0.01)))


def _falling(rows, method, layer, src="a", tgt="b", fall=0.004):
    for r in rows:
        if (r["source"], r["target"], r["method"], r["layer"]) == (src, tgt, method, layer):
            r.update(epochs=40, epochs_run=43, stop="patience", tail_fall=fall)
    return rows


def test_a_distance_still_falling_when_stopped_is_marked_as_an_upper_bound():
    # bug: FFM's d_L of a run early stopping ended while it still fell was compared with LFM's as if
    # converged. FFM is the lower side of d_L(FFM) <= d_L(LFM): longer training only widens the gap
    md = findings_markdown(table(_falling(paper_like(), "ffm", 2)))
    line = next(l for l in md.splitlines() if l.strip().startswith("- layer 2: FFM 0.300"))
    assert "FFM still falling when stopped in 1/1 seeds: an upper bound, longer training would only widen" in line
    assert "1 of 36 stitch trainings were still lowering their validation loss" in md
    # LFM still falling at layer 2: its d_L is not its own loss (no mark); its d_l is the upper side
    # of nothing but the lower side of d_l(LFM) <= d_l(FFM): widening again
    md = findings_markdown(table(_falling(paper_like(), "lfm", 2)))
    line = next(l for l in md.splitlines() if l.strip().startswith("- layer 2: LFM 0.0100"))
    assert "LFM still falling" in line and "only widen" in line
    assert not any("LFM still falling" in l for l in md.splitlines() if l.strip().startswith("- layer 2: FFM 0.300"))


def test_a_failing_comparison_whose_larger_side_still_falls_could_change():
    # d_l(LFM) 0.03 > d_l(FFM) 0.02 at layer 1 while LFM (its own loss: d_l) still falls: the failure
    # is on the side longer training moves, so it could turn
    rows = _falling(paper_like(), "lfm", 1)
    for r in rows:
        if (r["source"], r["target"], r["method"], r["layer"]) == ("a", "b", "lfm", 1):
            r["d_l"] = 0.03
    f1 = check_findings(table(rows))[0]
    assert f1.checks[0].verdict == FAILS
    assert any("LFM still falling when stopped in 1/1 seeds: an upper bound, *could change with longer training*" in e
               for e in f1.checks[0].evidence)


def test_a_gain_that_rounds_to_zero_prints_plus_zero():
    from stitchcache.report.findings import points
    assert points(-0.0004) == "+0.0" and points(0.012) == "+1.2" and points(-0.012) == "-1.2"
