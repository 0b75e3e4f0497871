"""The tree rules in the workflow: planned with the rest, config errors by key, reruns only what changed."""
import copy

import pytest

from stitchcache.tree.config import check_trees, resolve_trees
from test_workflow import TINY, fake_cli, job_stats, load_yaml, make_workdir, read_calls, snakemake, write_config  # noqa: F401 (fixture)

TREE = {"trunk": "sup", "branches": ["ssl"], "layers": [1, 2], "fusion": "concat"}
TREE_JOBS = {"tree_base": 1, "tree_vst": 2, "tree_report": 1, "tree_cost": 1, "tree_export": 2, "tree_plan": 1}



def tiny_with_tree(**changes):
    cfg = load_yaml(TINY)
    cfg["tree"] = {"trees": {"st": {**TREE, **changes}}}
    return cfg


def test_resolve_defaults_and_checks():
    cfg = tiny_with_tree()
    t = resolve_trees(cfg)["st"]
    assert t["method"] == "ffm" and t["stitch"] == "mlp" and t["datasets"] == ["fmnist"] and t["select_layer"] == -1
    assert check_trees(cfg) == []
    bad = tiny_with_tree(branches=["sup"], layers=[5], method="lfm2", stitch="lora")
    keys = [k for k, _ in check_trees(bad)]
    assert keys == ["tree.trees.st.branches[0]", "tree.trees.st.layers[0]", "tree.trees.st.stitch",
                    "tree.trees.st.method"]
    cfg = tiny_with_tree()
    cfg["stitch"]["pairs"] = [["ssl", "sup"]]
    (err,) = check_trees(cfg)
    assert err[0] == "tree.trees.st.branches[0]" and "add [sup, ssl] to stitch.pairs" in err[1]


def test_dry_run_plans_the_tree_with_the_rest(tmp_path):
    wd = make_workdir(tmp_path, tiny_with_tree())
    proc = snakemake(wd, "-n", "-p")
    stats = job_stats(proc)
    assert {k: stats[k] for k in TREE_JOBS} == TREE_JOBS and stats["train"] == 32
    out = proc.stdout
    assert "--checkpoints results/stitch/fmnist/sup--ssl/layer2/mlp/ffm/seed0/checkpoint.pt" in out
    assert "--fusion concat --select-layer -1" in out


def test_config_error_names_the_tree_key(tmp_path):
    wd = make_workdir(tmp_path, tiny_with_tree(layers=[7]))
    proc = snakemake(wd, "-n", check=False)
    assert proc.returncode != 0 and "tree.trees.st.layers[0]" in proc.stdout + proc.stderr


def test_tree_reruns_only_what_changed(tmp_path, fake_cli):
    fake, calls = fake_cli
    base = tiny_with_tree()
    wd = make_workdir(tmp_path, base)
    snakemake(wd, "--cores", "2", "--workflow-profile", "none", pythonpath=fake, timeout=600)
    ran = [c for c in read_calls(calls) if c[0] == "tree"]
    assert sorted(c[1] for c in ran) == sorted(["evaluate"] * 3 + ["report", "cost", "export", "export", "plan"])
    assert "Nothing to be done" in snakemake(wd, "-n", pythonpath=fake).stdout

    def plan(mutate):
        cfg = copy.deepcopy(base)
        mutate(cfg)
        write_config(wd, cfg, "changed.yaml")
        return job_stats(snakemake(wd, "-n", config="changed.yaml", pythonpath=fake))

    # the fusion only shapes the exported tower and what the cost stage measures
    assert plan(lambda c: c["tree"]["trees"]["st"].update(fusion="tuple")) == {"tree_export": 2, "tree_cost": 1, "all": 1}
    # the budget only re-plans
    assert plan(lambda c: c["tree"].update(budget="10%")) == {"tree_plan": 1, "all": 1}
    # probe settings: every probe, including the tree's
    stats = plan(lambda c: c["probe"].update(max_epochs=5))
    assert stats["tree_base"] == 1 and stats["tree_vst"] == 2 and "tree_export" not in stats
    # one split point fewer: the kept VST-1 results stay valid; only the tree's summaries are redone
    stats = plan(lambda c: c["tree"]["trees"]["st"].update(layers=[1]))
    assert stats == {"tree_report": 1, "tree_cost": 1, "tree_plan": 1, "all": 1}
