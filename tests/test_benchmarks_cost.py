"""benchmarks/grid_cost.py on the paper's grid: the cached pipeline costs less than running both VFMs
every step, stage by stage, with every figure computed from the plan's cost model."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from grid_cost import grid_cost  # noqa: E402

from stitchcache.plan import load_config  # noqa: E402


@pytest.fixture(scope="module")
def paper():
    cfg = load_config(REPO / "config" / "paper.yaml")
    return cfg, grid_cost(cfg)


def test_cached_total_below_naive_on_the_paper_grid(paper):
    cfg, res = paper
    rows = {r["stage"]: r for r in res["rows"]}
    total = rows["total"]
    assert 0 < total["cached_gpu_s"] < total["minimal_gpu_s"] <= total["naive_gpu_s"]
    assert res["total_ratio"] == pytest.approx(total["naive_gpu_s"] / total["cached_gpu_s"], abs=0.006)
    # every training method recomputes at least the source head in the naive pipeline
    for m in cfg["stitch"]["methods"]:
        r = rows[f"train {m}"]
        assert r["naive_gpu_s"] >= r["minimal_gpu_s"] > r["cached_gpu_s"] > 0
    # the cached side is the plan itself: its stages add up to the plan's total
    assert total["cached_gpu_s"] == pytest.approx(res["plan_total_gpu_s"], abs=0.5)
    assert rows["extract"]["naive_gpu_s"] == 0
