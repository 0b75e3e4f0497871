"""The analysis rules (workflow/rules/analysis.smk): planned jobs, their commands and inputs.

The per-image predictions come from the evaluate stage (its output beside each eval.json)."""
from test_workflow import TINY, job_stats, load_yaml, make_workdir, snakemake


def test_analysis_rules_are_planned(tmp_path):
    cfg = load_yaml(TINY)
    wd = make_workdir(tmp_path, cfg)
    proc = snakemake(wd, "-n", "-p", timeout=300)
    stats = job_stats(proc)
    # one CKA atlas for the unordered pair {sup, ssl}, one Table 10, one join with the results table
    assert (stats.get("cka"), stats.get("table10"), stats.get("cka_join")) == (1, 1, 1)
    text = proc.stdout
    assert "python -m stitchcache analyze cka --a results/features/fmnist/sup/test.json" in text  # tiny has a test split
    assert "--b results/features/fmnist/ssl/test.json --variants pooled token --no-plot" in text
    assert "--out results/analysis/cka/fmnist/sup--ssl.parquet" in text
    table10 = next(line for line in text.splitlines() if "analyze table10" in line)
    assert table10.count("predictions.parquet") == 4 * 2 * 4     # every stitched run and control
    assert "results/stitch/fmnist/sup--sup/layer2/mlp/ffm_tlt/seed0/predictions.parquet" in table10
    assert "analyze cka-join --cka results/analysis/cka/fmnist/sup--ssl.parquet --table results/table.parquet" in text


def test_cka_reads_val_when_there_is_no_test_split(tmp_path):
    cfg = load_yaml(TINY)
    cfg["datasets"]["fmnist"]["splits"].pop("test", None)
    cfg["analysis"] = {"cka_variants": ["pooled"]}
    wd = make_workdir(tmp_path, cfg)
    text = snakemake(wd, "-n", "-p", timeout=300).stdout
    assert ("analyze cka --a results/features/fmnist/sup/val.json --b results/features/fmnist/ssl/val.json"
            " --variants pooled --no-plot") in text


def test_no_cka_variants_no_atlas(tmp_path):
    cfg = load_yaml(TINY)
    cfg["analysis"] = {"cka_variants": []}
    wd = make_workdir(tmp_path, cfg)
    stats = job_stats(snakemake(wd, "-n", timeout=300))
    assert stats.get("table10") == 1 and "cka" not in stats and "cka_join" not in stats
