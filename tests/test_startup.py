"""Start-up of `python -m stitchcache <stage>` (issue 15): every Snakemake job is a fresh process, so
a stage imports only what it needs, and an extract cache hit is answered before any model is built
(or its library imported). Checked in a subprocess through `sys.modules`, not by timing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision", "open_clip", "transformers", "torch._dynamo")
WRAPPER = f"""
import json, sys
from stitchcache.cli import main
rc = main(sys.argv[1:])
print("MODULES=" + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
raise SystemExit(rc)
"""


def run_stage(*argv, cwd=None) -> tuple[subprocess.CompletedProcess, set]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("MODULES=")][-1]
    return proc, set(json.loads(line[len("MODULES="):]))


def write_evals(root: Path) -> tuple[list[Path], list[Path]]:
    evals, probes = [], []
    for model, acc in (("a", 0.8), ("b", 0.7)):
        p = root / "probes" / f"{model}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"dataset": "toy", "model": model, "pool": "mean", "probe_acc": acc, "lr": 0.01,
                                 "epochs": 3}))
        probes.append(p)
    for src, tgt in (("a", "b"), ("b", "a"), ("a", "a")):
        for layer in (1, 2):
            for i, method in enumerate(("lfm", "ffm", "tlt", "ffm_tlt")):
                p = root / "stitch" / f"{src}--{tgt}" / f"layer{layer}" / method / "eval.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps({
                    "dataset": "toy", "source": src, "target": tgt, "layer": layer, "stitch": "mlp",
                    "method": method, "kind": "cross" if src != tgt else "self", "seed": 0,
                    "probe_acc": 0.6 + 0.01 * i + 0.02 * layer, "head_acc": 0.7 if "tlt" in method else None,
                    "d_l": 0.1 * layer, "d_L": 0.2 / layer, "lr": 0.001, "epochs": 2, "train_seconds": 1.0}))
                evals.append(p)
    return evals, probes


def test_report_stages_import_no_torch(tmp_path):
    """table / findings / plot read JSON and Parquet only: no torch, no model library."""
    evals, probes = write_evals(tmp_path / "results")
    out = tmp_path / "out"
    _, mods = run_stage("table", "--evals", *evals, "--probes", *probes, "--out-dir", out)
    assert mods == set(), f"table imported {mods}"
    assert (out / "table.parquet").is_file()
    _, mods = run_stage("findings", "--table", out / "table.parquet", "--out", out / "findings.md")
    assert mods == set(), f"findings imported {mods}"
    _, mods = run_stage("plot", "--table", out / "table.parquet", "--out-dir", out / "plots")
    assert mods == set(), f"plot imported {mods}"
    assert (out / "plots" / "accuracy.png").is_file()


def test_help_and_cache_inspection_import_no_torch(tmp_path):
    for argv in (["--help"], ["table", "--help"], ["cache", "ls", "--root", tmp_path]):
        proc = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, argv)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        line = [l for l in proc.stdout.splitlines() if l.startswith("MODULES=")]
        if line:  # --help exits inside argparse before the wrapper prints; then nothing was imported anyway
            assert set(json.loads(line[-1][len("MODULES="):])) == set(), (argv, line)


def extract_args(spec, dataset, cache, out, settings=None):
    return ["extract", "--model-spec", json.dumps({**spec, "name": "m"}), "--dataset-spec", json.dumps(dataset),
            "--split", "train", "--cache-root", cache, "--settings",
            json.dumps({"chunk_size": 16, "num_workers": 0, "device": "cpu", **(settings or {})}), "--out", out]


def test_extract_cache_hit_builds_no_model(tmp_path, image_folder):
    """The second extraction of the same (model, weights, data, settings) is answered from the request
    key: same record, and neither timm nor a model is touched."""
    spec = tiny_vit(width=16, img=16, patch=4, depth=2)
    cache = tmp_path / "cache"
    proc, mods = run_stage(*extract_args(spec, image_folder, cache, tmp_path / "r1.json"))
    assert "timm" in mods  # the first run builds the model
    first = json.loads((tmp_path / "r1.json").read_text())
    proc, mods = run_stage(*extract_args(spec, image_folder, cache, tmp_path / "r2.json"))
    assert "cache hit" in proc.stderr + proc.stdout
    assert "timm" not in mods and "torchvision" not in mods, mods
    assert "torch" not in mods, f"a cache hit imported torch (~1.3 s per job): {mods}"
    assert json.loads((tmp_path / "r2.json").read_text()) == first


def test_extract_memo_is_not_trusted_blindly(tmp_path, image_folder):
    """A store removed (or replaced by another) after the memo was written is extracted again; a changed
    token setting is a different request key (a miss, a new store)."""
    from stitchcache.extract import extract

    spec = tiny_vit(width=16, img=16, patch=4, depth=2)
    settings = {"chunk_size": 16, "num_workers": 0, "device": "cpu"}
    rec = extract({**spec, "name": "m"}, image_folder, "train", tmp_path / "cache", settings)
    shutil.rmtree(rec["store"])
    again = extract({**spec, "name": "m"}, image_folder, "train", tmp_path / "cache", settings)
    assert again["key"] == rec["key"] and Path(again["store"], "COMPLETE").exists()
    # a memo that names a complete store with another key is ignored
    other = extract({**spec, "name": "m"}, image_folder, "train", tmp_path / "cache", {**settings, "dtype": "float32"})
    assert other["key"] != rec["key"]
    memos = sorted((tmp_path / "cache" / "requests").glob("*.json"))
    assert len(memos) == 2
    for m in memos:
        r = json.loads(m.read_text())
        if r["key"] == rec["key"]:
            m.write_text(json.dumps({**r, "store": other["store"]}))
    fixed = extract({**spec, "name": "m"}, image_folder, "train", tmp_path / "cache", settings)
    assert fixed["store"] == rec["store"] and fixed["key"] == rec["key"]


def test_extract_hit_takes_names_from_the_call(tmp_path, image_folder):
    from stitchcache.extract import extract

    spec = tiny_vit(width=16, img=16, patch=4, depth=2)
    settings = {"chunk_size": 16, "num_workers": 0, "device": "cpu"}
    a = extract({**spec, "name": "first"}, image_folder, "train", tmp_path / "cache", settings)
    b = extract({**spec, "name": "second"}, {**image_folder, "name": "toy2"}, "train", tmp_path / "cache", settings)
    assert b["store"] == a["store"] and b["model"] == "second" and b["dataset"] == "toy2"
    c = extract({**spec, "name": "first"}, image_folder, "val", tmp_path / "cache", settings)  # val == train here
    assert c["store"] == a["store"] and c["split"] == "val"


def test_the_workflow_dag_build_imports_no_torch():
    """Every `snakemake` call (a dry run, each job's re-parse of the Snakefile) imports what
    workflow/rules/*.smk import from stitchcache; none of it may pull in torch (~1.3 s each time)."""
    import re

    mods = set()
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")) + [ROOT / "Snakefile"]:
        mods |= set(re.findall(r"^\s*(?:from|import) (stitchcache[\w.]*)", smk.read_text(), re.M))
    assert "stitchcache.inputs" in mods  # the parse found common.smk's imports
    code = "import sys\n" + "".join(f"import {m}\n" for m in sorted(mods)) + \
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"the DAG build imports {proc.stdout.strip()} via {sorted(mods)}"
