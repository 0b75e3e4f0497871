"""The GPU suite: every CUDA path and the GPU benchmarks in one short, time-boxed call.

Run through benchmarks/gpu/run.sh (which installs the carried wheels first). Steps, in order, each
a subprocess with its own time limit, all together inside --budget-s (480 s = 8 minutes):
  device    nvidia-smi name, driver, torch / CUDA versions
  pytest    `pytest -m gpu tests/test_gpu.py` (CUDA extraction == CPU, pinned/non_blocking copies,
            bf16 autocast training, export + probe, a gpu=1 Snakemake run)
  extract   extraction ÷ bare forward ÷ write bound at paper size (ViT-L/14 @ 224, batch 256):
            all 25 layers, then the paper's stitch layers (2,6,10,14,18,22) + 23 (+ final)
  ffm       FFM step ÷ target-tail fwd+bwd at layers 2/6/10/14/18/22 (batch 128, bf16)
  lfm       one LFM epoch from a cached store ÷ the raw read bound
  tree      Full vs VST-k vs one VFM latency / peak memory (benchmarks/tree_forward.py, when present)
Writes into --out: results.json (every step: command, rc, seconds, parsed result), summary.md,
log.txt (every step's output), junit.xml, and on CUDA gpu-<device>-<date>.json (= results.json,
to commit as benchmarks/results/). --cpu-smoke runs the same steps at tiny size on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
PAPER_LAYERS = [2, 6, 10, 14, 18, 22]

# (step, script, arguments at paper size, arguments for the CPU smoke run, seconds allowed)
STEPS = [
    ("extract_all", "extract_throughput.py",
     ["--images", "1024", "--width", "1024", "--depth", "24", "--img-size", "224", "--patch", "14", "--batch", "256",
      "--layers", "all", "--tag", "_all"],
     ["--images", "64", "--width", "32", "--depth", "3", "--img-size", "32", "--patch", "8", "--batch", "16",
      "--layers", "all", "--tag", "_all", "--seconds", "0.3"], 90),
    ("extract_stitch_layers", "extract_throughput.py",
     ["--images", "2048", "--width", "1024", "--depth", "24", "--img-size", "224", "--patch", "14", "--batch", "256",
      "--layers", ",".join(map(str, PAPER_LAYERS + [23])), "--tag", "_stitch_layers"],
     ["--images", "64", "--width", "32", "--depth", "3", "--img-size", "32", "--patch", "8", "--batch", "16",
      "--layers", "1,2", "--tag", "_stitch_layers", "--seconds", "0.3"], 80),
    ("ffm", "ffm_step.py",
     ["--width", "1024", "--depth", "24", "--grid", "16", "--batch", "128", "--repeats", "3",
      "--layers", *map(str, PAPER_LAYERS)],
     ["--width", "32", "--depth", "4", "--grid", "4", "--batch", "8", "--repeats", "1", "--layers", "1", "2", "--seconds", "0.2"], 90),
    ("lfm", "lfm_epoch.py",
     ["--images", "4096", "--tokens", "257", "--width", "1024", "--batch", "256", "--chunk", "256"],
     ["--images", "128", "--tokens", "17", "--width", "32", "--batch", "32", "--chunk", "32", "--repeats", "1"], 60),
    ("tree", "tree_forward.py",
     ["--width", "1024", "--depth", "24", "--img", "224", "--patch", "14", "--heads", "16", "--batch", "64",
      "--points", "6", "14", "22", "--rounds", "5"],
     ["--width", "32", "--depth", "4", "--img", "16", "--patch", "4", "--heads", "2", "--batch", "2",
      "--points", "1", "3", "--rounds", "1"], 60),
]
PYTEST_SECONDS = 150


def device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host": platform.node()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            info["nvidia_smi"] = smi
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def run_step(name: str, cmd: list[str], env: dict, timeout: float, log) -> dict:
    t0 = time.perf_counter()
    log.write(f"\n===== {name}: {' '.join(cmd)} (limit {timeout:.0f} s)\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = 124
    seconds = round(time.perf_counter() - t0, 1)
    print(f"[gpu-suite] {name}: rc={rc} in {seconds} s", flush=True)
    return {"command": " ".join(cmd), "rc": rc, "seconds": seconds}


def pytest_counts(junit: Path) -> dict:
    if not junit.exists():
        return {}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json, summary.md, log.txt, junit.xml")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same steps at tiny size on the CPU")
    ap.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of all steps together")
    ap.add_argument("--skip", nargs="*", default=[], help="steps to leave out (pytest, extract_all, ffm, ...)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    bench_out = Path(tempfile.mkdtemp(prefix="sc-gpu-suite-"))
    env = {**os.environ, "STITCHCACHE_BENCH_OUT": str(bench_out), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    device = ["--device", "cpu"] if args.cpu_smoke else ["--device", "cuda"]
    if args.cpu_smoke:
        env["STITCHCACHE_GPU_REHEARSAL"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    results = {"suite": "gpu", "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
               "date": time.strftime("%Y-%m-%d"), **device_info(), "steps": {}}
    if not args.cpu_smoke and not results["cuda_available"]:
        print("[gpu-suite] no CUDA device is visible: run with --cpu-smoke to rehearse on the CPU", file=sys.stderr)
        return 2
    with open(out / "log.txt", "w") as log:
        if "pytest" not in args.skip:
            junit = out / "junit.xml"
            step = run_step("pytest", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q",
                                       "-p", "no:cacheprovider", f"--junitxml={junit}"],
                            env, min(PYTEST_SECONDS, deadline - time.monotonic()), log)
            step["result"] = pytest_counts(junit)
            results["steps"]["pytest"] = step
        for name, script, paper, smoke, limit in STEPS:
            if name in args.skip:
                continue
            if not (BENCH / script).exists():
                results["steps"][name] = {"rc": None, "skipped": f"benchmarks/{script} does not exist yet"}
                continue
            left = deadline - time.monotonic()
            if left < 10:
                results["steps"][name] = {"rc": None, "skipped": "suite time budget spent"}
                continue
            before = set(bench_out.iterdir())
            step = run_step(name, [sys.executable, str(BENCH / script), *(smoke if args.cpu_smoke else paper), *device],
                            env, min(limit, left), log)
            new = sorted(set(bench_out.iterdir()) - before)
            step["result"] = json.loads(new[-1].read_text()) if new else None
            results["steps"][name] = step
    results["ok"] = all(s.get("rc") in (0, None) for s in results["steps"].values()) and \
        not results["steps"].get("pytest", {}).get("result", {}).get("failed_tests")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.cpu_smoke:
        tag = re.sub(r"[^a-z0-9]+", "-", results["device"].lower()).strip("-")
        (out / f"gpu-{tag}-{results['date']}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(summary(results))
    print((out / "summary.md").read_text())
    return 0 if results["ok"] else 1


def summary(r: dict) -> str:
    """A short Markdown summary: one line per step, with its ratio against the same-run baseline."""
    lines = [f"# GPU suite ({r['mode']}), {r['date']}", "",
             f"Device: **{r['device']}** · torch {r['torch']} · CUDA {r['cuda']} · Python {r['python']}", "",
             "| step | rc | s | result |", "|---|---|---|---|"]
    for name, s in r["steps"].items():
        res = s.get("result") or {}
        if "skipped" in s:
            text = f"skipped: {s['skipped']}"
        elif name == "pytest":
            text = f"{res.get('passed', '?')} passed, {res.get('failures', 0) + res.get('errors', 0)} failed, " \
                   f"{res.get('skipped', 0)} skipped" + (f" ({', '.join(res['failed_tests'])})" if res.get("failed_tests") else "")
        elif name.startswith("extract"):
            text = f"extract ÷ forward {res.get('extract_over_forward')} (steady {res.get('steady_extract_over_forward')}), " \
                   f"÷ write bound {res.get('extract_over_write_bound')}; forward {res.get('forward_img_s')} img/s, " \
                   f"write bound {res.get('write_bound_MB_s')} MB/s"
        elif name == "ffm":
            rows = res.get("rows", [])
            text = "FFM step ÷ tail: " + ", ".join(f"l={x['layer']}: {x['ffm_cost_over_tail']}" for x in rows) + \
                   (" · img/s " + " / ".join(str(x["ffm_img_s"]) for x in rows) if rows else "")
        elif name == "lfm":
            text = f"LFM epoch ÷ raw read {res.get('lfm_over_raw_read')} ({res.get('lfm_epoch_img_s')} vs " \
                   f"{res.get('raw_read_img_s')} img/s, {res.get('raw_read_GB_s')} GB/s)"
        else:
            text = ", ".join(f"{k} {v}" for k, v in res.items() if isinstance(v, (int, float)) and ("over" in k or "ratio" in k))
        lines.append(f"| {name} | {s.get('rc')} | {s.get('seconds', '')} | {text} |")
    lines += ["", f"Overall: {'ok' if r['ok'] else 'FAILED'}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
