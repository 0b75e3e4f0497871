"""Shared helpers for the ratio benchmarks: device naming and result files."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """Where result files go: benchmarks/results, or $STITCHCACHE_BENCH_OUT (the GPU suite's run folder)."""
    out = os.environ.get("STITCHCACHE_BENCH_OUT")
    return Path(out) if out else RESULTS


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"cpu ({_cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)")


def _proc_field(path: str, key: str) -> str:
    """The value after ``key:`` on the first line of a /proc file that starts with ``key``; '' if none."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), "")
    except OSError:
        return ""


def _cpu_model() -> str:
    return _proc_field("/proc/cpuinfo", "model name")


def timed(fn, min_seconds: float = 1.0, sync=None) -> tuple[float, int]:
    """Run fn() repeatedly for at least min_seconds; returns (seconds, calls)."""
    fn()  # warm-up
    if sync:
        sync()
    t0, n = time.perf_counter(), 0
    while True:
        fn()
        n += 1
        if sync:
            sync()
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt, n


def save(name: str, result: dict, device: torch.device) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = out / f"{name}-{tag}.json"
    result = {"benchmark": name, "device": device_name(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


# ---- whole processes: wall time, peak memory, a kill ---------------------------------------------
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _pss_kb(pid: int) -> int:
    return int(_proc_field(f"/proc/{pid}/smaps_rollup", "Pss:").split(" ")[0] or 0)


def _hwm_kb(pid: int) -> int:
    """The process's own RSS high-water mark (``VmHWM``). Not ``wait4``'s ``ru_maxrss``: Linux floors
    that at the RSS of the process the child was forked from (exec keeps the old address space's
    high-water mark), so every tool launched by a big benchmark process would report its size."""
    return int(_proc_field(f"/proc/{pid}/status", "VmHWM:").split(" ")[0] or 0)


def run_measured(cmd: list[str], log: Path, env: dict | None, cwd: Path | None = None,
                 kill_when: Callable[[], bool] | None = None,
                 poll_s: float = 0.05, max_pss_mb: float | None = None) -> dict:
    """Run ``cmd`` as a whole process to its end (or SIGKILL its process group once ``kill_when()`` is
    true, or once its tree's PSS passes ``max_pss_mb``): wall seconds, exit code, the peak RSS of its
    largest process (``VmHWM``) and the peak summed PSS of its process tree (both from ``/proc``,
    polled every ``poll_s``, decode workers included; a peak inside the last poll before a process
    exits is missed: ``VmHWM`` only grows, so that is the only blind spot)."""
    with open(log, "ab") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        peak, hwm, killed, over, done = [0], {}, [False], [False], threading.Event()

        def poll():
            while not done.is_set():
                tree = _tree(proc.pid)
                for p in tree:
                    hwm[p] = max(hwm.get(p, 0), _hwm_kb(p))
                peak[0] = max(peak[0], sum(_pss_kb(p) for p in tree))
                if not killed[0]:
                    over[0] = max_pss_mb is not None and peak[0] > max_pss_mb * 1024
                    if over[0] or (kill_when is not None and kill_when()):
                        killed[0] = True
                        try:
                            os.killpg(proc.pid, signal.SIGKILL)  # its own session: workers die too
                        except ProcessLookupError:  # it ended meanwhile
                            pass
                done.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "rc": proc.returncode, "max_rss_mb": max(hwm.values(), default=0) / 1024,
            "tree_pss_mb": peak[0] / 1024, "killed": killed[0], "over_memory": over[0]}
