"""Start-up cost of `python -m stitchcache <stage>` (issue 15): every Snakemake job is a fresh process.

Runs one command per stage, taken from the log of a finished tiny workflow run
(`snakemake -p --configfile tests/data/tiny.yaml`), as a whole process with `-X importtime`, for
each code tree given (e.g. a baseline checkout and this one), in alternated rounds; prints the
median wall time, the median import time (sum of the top-level imports) and which heavy libraries
each stage imported. Outputs are rewritten in place (the same work for every tree).

    python benchmarks/startup.py --workdir WF --tree before=/path/old --tree after=. --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "torch._dynamo", "torchvision", "timm", "open_clip", "transformers", "zarr", "matplotlib",
         "pyarrow")


def stage_commands(workdir: Path) -> dict[str, list[str]]:
    """The first command of each stage in the Snakemake log (an LFM one for train), logs dropped."""
    cmds = {}
    for line in (workdir / "sm.log").read_text().splitlines():
        if not line.startswith("Shell command: python -m stitchcache "):
            continue
        argv = shlex.split(line[len("Shell command: "):].split(" > ")[0])
        stage = argv[3] if argv[3] != "analyze" else "analyze " + argv[4]
        if stage == "train" and "lfm" not in argv:
            continue
        cmds.setdefault(stage, argv[3:])
    cmds["cache ls"] = ["cache", "ls", "--root", "cache"]
    cmds["help"] = ["--help"]
    return cmds


def imports(stderr: str) -> tuple[float, list[str]]:
    total, found = 0, set()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = line[len("import time:"):].split("|")
        if not name.startswith("  "):  # one space after the bar: a top-level import
            total += int(cum)
        if name.strip() in HEAVY:
            found.add(name.strip())
    return total / 1e6, sorted(found)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--tree", action="append", required=True, help="label=path of a checkout (its stitchcache wins)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stages", nargs="*")
    a = p.parse_args()
    trees = dict(t.split("=", 1) for t in a.tree)
    cmds = stage_commands(a.workdir)
    if a.stages:
        cmds = {k: v for k, v in cmds.items() if k in a.stages}
    res = {(s, t): [] for s in cmds for t in trees}
    for r in range(a.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for stage, argv in cmds.items():
            for t in order:
                env = {**os.environ, "PYTHONPATH": str(Path(trees[t]).resolve())}
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stitchcache", *argv],
                                      cwd=a.workdir, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(f"{t} {stage} failed:\n{proc.stderr[-3000:]}")
                res[stage, t].append((wall, *imports(proc.stderr)))
    load = os.getloadavg()[0]
    print(f"rounds={a.rounds} load1={load:.2f}")
    print("| stage | " + " | ".join(f"{t}: wall s / imports s / heavy" for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    out = {}
    for stage in cmds:
        cells = []
        for t in trees:
            v = res[stage, t]
            w, i = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
            cells.append(f"{w:.2f} / {i:.2f} / {', '.join(v[-1][2]) or '-'}")
            out[f"{stage}|{t}"] = {"wall": w, "imports": i, "heavy": v[-1][2]}
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print(json.dumps({"load1": load, **out}))


if __name__ == "__main__":
    main()
