"""The GPU suite (benchmarks/gpu/run.sh) rehearsed on the CPU, so it cannot rot between GPU loans."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_cpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--cpu-smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:] + (out / "log.txt").read_text()[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "cpu-smoke" and res["ok"]
    steps = res["steps"]
    assert steps["pytest"]["result"]["passed"] == steps["pytest"]["result"]["tests"] > 0  # rehearsed, not skipped
    for name, key in (("extract_all", "extract_over_forward"), ("extract_stitch_layers", "extract_over_forward"),
                      ("lfm", "lfm_over_raw_read")):
        assert steps[name]["rc"] == 0 and steps[name]["result"][key] > 0, steps[name]
    assert [r["layer"] for r in steps["ffm"]["result"]["rows"]] == [1, 2]
    assert steps["extract_stitch_layers"]["result"]["layers"] == "1,2"
    summary = (out / "summary.md").read_text()
    assert "| pytest | 0 |" in summary and "FFM step ÷ tail" in summary and "Overall: ok" in summary
    assert set(p.name for p in out.iterdir()) <= {"results.json", "summary.md", "log.txt", "junit.xml"}
