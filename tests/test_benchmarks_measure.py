"""benchmarks/common.run_measured: the peak memory it reports is the measured command's own, not the
benchmark process's. Linux floors a child's wait4/getrusage max RSS at the RSS of the process it was
forked from (exec records the old address space's high-water mark), so a 1.3 GB benchmark process once
reported 1346 MB for every tool it launched."""
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import run_measured  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")

CHILD = "import time, numpy as np; a = np.ones({mb} * 2**20, np.uint8); time.sleep(0.6); print(a.size)"


@pytest.fixture(scope="module")
def big_parent():
    ballast = np.ones(900 * 2**20, np.uint8)  # touched: 900 MB resident in this process
    yield ballast
    del ballast


def _run(tmp_path, mb):
    return run_measured([sys.executable, "-c", CHILD.format(mb=mb)], tmp_path / "log", env=None)


def test_small_child_of_a_big_parent_reports_its_own_peak(tmp_path, big_parent):
    r = _run(tmp_path, 0)
    assert r["rc"] == 0
    assert r["max_rss_mb"] < 400, r  # python + numpy, not the 900 MB parent


def test_a_child_that_allocates_is_measured(tmp_path, big_parent):
    r = _run(tmp_path, 500)
    assert r["rc"] == 0
    assert 500 <= r["max_rss_mb"] < 900, r
    assert r["tree_pss_mb"] >= 450, r
