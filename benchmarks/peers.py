"""stitchcache extract side by side with other ways to capture every block's tokens (issue 15).

Setup, written once: a random-init timm ViT (width 192, depth 6, 112 px, patch 14) saved as a
checkpoint that every tool loads; 2N Fashion-MNIST images as PNGs at the model's input size (so every
tool's preprocessing is to-tensor + normalise: the same pixels everywhere); lists of the first N and
of all 2N. Every tool runs as a whole process (start-up, model build, decoding, forward, writes), one
torch thread each, capturing every block output and the final norm:

  stitchcache    python -m stitchcache extract (its store: h_0..h_L + final, float16)
  naive          timm forward_intermediates + np.save per block and batch (peer_tools.py)
  thingsvision   get_extractor_from_model + its ImageDataset / DataLoader, features to disk
  torchlens      extract_dataset to safetensors shards
  bare           the baseline, in this process: timm forward_features over the same decoded images
                 in batches of the same size (no capture, no decoding, no writes)

R rounds; in each, every (tool, N) and (tool, 2N) run and the bare forward go in a shuffled order;
medians. Per tool: img/s at 2N end to end and the steady rate N / (t_2N - t_N), both ÷ bare; peak
memory (the largest process's peak RSS, VmHWM, and the summed PSS of the process tree, both polled);
bytes on disk per image and captured array; resume after SIGKILL (stitchcache: killed once a chunk is
recorded, re-run, compared file by file with an uninterrupted store; torchlens: its resume=True, the
same test on its shards; others: no); the largest |difference| of any captured token to
stitchcache's store after a float16 cast.

Usage: python benchmarks/peers.py [--images 1536] [--rounds 6] [--torchlens-python PY]
       [--thingsvision-python PY]   (a peer is skipped, with a note, when its Python lacks it)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import run_measured, save
from peer_outputs import arrays_written, du, modules, same_store, store_of, token_diff

ROOT = Path(__file__).resolve().parents[1]
TOOL_SCRIPT = Path(__file__).resolve().parent / "peer_tools.py"
ARCH = "vit_small_patch16_224"
RESUMABLE = ("stitchcache", "torchlens")  # tools that claim to resume: the kill test runs on them


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _run(cmd: list[str], log: Path, args: argparse.Namespace, **kw) -> dict:
    """One whole-process run; a tool whose processes pass --max-memory-mb is killed (and reported)."""
    return run_measured(cmd, log, _env(), cwd=ROOT, max_pss_mb=args.max_memory_mb, **kw)


def _mem_total_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 1024


def _tail(log: Path, n: int = 600) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


# ---- the setup -----------------------------------------------------------------------------------
def make_setup(tmp: Path, n2: int, width: int, depth: int, img: int, patch: int) -> dict:
    """Checkpoint, the 2N PNGs, the N / 2N lists, the model's normalisation."""
    import timm
    from PIL import Image

    from stitchcache.backends import create_backbone
    from stitchcache.data.fashion_mnist import FashionMNISTSplit

    kwargs = {"img_size": img, "patch_size": patch, "embed_dim": width, "depth": depth,
              "num_heads": max(1, width // 64), "num_classes": 0}
    torch.manual_seed(0)
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt = tmp / "vit.pth"
    torch.save(timm.create_model(ARCH, pretrained=False, **kwargs).state_dict(), ckpt)
    pre = create_backbone(f"timm:{ARCH}", checkpoint=str(ckpt), **kwargs).preprocess
    src = FashionMNISTSplit("peers", source="train", count=n2)
    folder = tmp / "images"
    folder.mkdir()
    rows = []
    for i in range(n2):  # 28 px grey -> the model's size, RGB: decoding costs what a real PNG would
        name = f"{i:06d}.png"
        src.image(i).resize((img, img), Image.BICUBIC).convert("RGB").save(folder / name)
        rows.append((name, str(src.label(i))))
    lists = {}
    for n in (n2 // 2, n2):
        lists[n] = tmp / f"list_{n}.csv"
        lists[n].write_text("".join(f"{p},{c}\n" for p, c in rows[:n]))
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in range(10)))
    return {"kwargs": kwargs, "checkpoint": str(ckpt), "folder": folder, "names": [r[0] for r in rows],
            "lists": lists, "mean": list(pre.mean), "std": list(pre.std), "tmp": tmp}


def kill_batch(args: argparse.Namespace, n: int) -> int:
    """Batch (and stitchcache chunk) of the kill tests and their references: a few units even at smoke sizes."""
    return max(8, min(args.batch, n // 4))


def tool_cmd(tool: str, setup: dict, n: int, out: Path, args: argparse.Namespace, python: str,
             resume: bool = False, batch: int | None = None) -> list[str]:
    batch = batch or args.batch
    if tool == "stitchcache":
        model = {"name": "peer_vit", "backbone": f"timm:{ARCH}", "checkpoint": setup["checkpoint"],
                 "kwargs": setup["kwargs"]}
        ds = {"name": "peers", "type": "image_list", "root": str(setup["folder"]),
              "classes": str(setup["tmp"] / "classes.txt"), "splits": {"train": {"list": str(setup["lists"][n])}}}
        settings = {"batch_size": batch, "chunk_size": min(batch, n), "num_workers": args.workers, "device": "cpu",
                    "layers": "all"}
        return [python, "-m", "stitchcache", "extract", "--model-spec", json.dumps(model), "--dataset-spec",
                json.dumps(ds), "--split", "train", "--cache-root", str(out), "--settings", json.dumps(settings),
                "--out", str(out / "record.json")]
    job = {"arch": ARCH, "kwargs": setup["kwargs"], "checkpoint": setup["checkpoint"], "batch": batch,
           "images": [str(setup["folder"] / p) for p in setup["names"][:n]], "mean": setup["mean"],
           "std": setup["std"], "threads": 1, "out": str(out), "modules": modules(args.depth), "resume": resume}
    out.mkdir(parents=True, exist_ok=True)
    jf = out.parent / f"{out.name}.job.json"
    jf.write_text(json.dumps(job))
    return [python, str(TOOL_SCRIPT), tool, "--job", str(jf)]


def python_for(tool: str, given: str | None) -> tuple[str | None, str]:
    """The Python a tool runs in, or None and why it is skipped."""
    py = given or sys.executable
    mod = "timm" if tool == "naive" else tool
    r = subprocess.run([py, "-c", f"import {mod}, timm, PIL, numpy"], cwd=ROOT, env=_env(), capture_output=True)
    if r.returncode:
        return None, f"{tool}: not importable in {py} ({r.stderr.decode(errors='replace').strip().splitlines()[-1:]})"
    ver = subprocess.run([py, "-c", f"import importlib.metadata as m; print(m.version({mod!r}))"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True).stdout.strip()
    return py, f"{tool} {ver} in {py}"


def kill_resume(tool: str, setup: dict, n: int, args: argparse.Namespace, python: str, ref: Path,
                work: Path) -> str:
    """SIGKILL a run once its first unit is on disk, re-run it, compare with the uninterrupted ``ref``."""
    out, log = work / f"kill-{tool}", work / f"kill-{tool}.log"
    if tool == "stitchcache":
        units = lambda: list(out.glob("features/*/progress/chunk_*"))  # noqa: E731
    else:
        units = lambda: list(out.glob("batch_*.safetensors"))  # noqa: E731
    kb = kill_batch(args, n)
    total = -(-n // kb)  # chunks of the store, shards of torchlens
    first = _run(tool_cmd(tool, setup, n, out, args, python, batch=kb), log, args,
                 kill_when=lambda: len(units()) >= 1, poll_s=0.02)
    if first["over_memory"]:
        return "not tested (over --max-memory-mb before the kill)"
    if not first["killed"]:
        return "not tested (the run ended before the kill)"
    before = len(units())
    if before >= total:
        shutil.rmtree(out, ignore_errors=True)
        return f"not tested mid-run (all {total} units were on disk when the kill landed)"
    again = _run(tool_cmd(tool, setup, n, out, args, python, resume=True, batch=kb), log, args)
    if again["rc"]:
        return f"no: the re-run failed (rc {again['rc']}: {_tail(log, 200)!r})"
    stray: list[str] = []
    if tool == "stitchcache":
        bad, stray = same_store(store_of(out), store_of(ref))
    else:
        mine, theirs = sorted(out.glob("batch_*.safetensors")), sorted(ref.glob("batch_*.safetensors"))
        bad = [f.name for f, g in zip(mine, theirs) if f.read_bytes() != g.read_bytes()]
        bad += ["shard count"] if len(mine) != len(theirs) else []
    shutil.rmtree(out, ignore_errors=True)
    what = f"killed with {before} of {total} {'chunks' if tool == 'stitchcache' else 'shards'} on disk"
    if stray:
        what += f"; {len(stray)} stray *.partial temp file(s) of the killed write left in the store"
    return f"yes, byte-identical ({what})" if not bad else f"resumed, but {len(bad)} files differ ({bad[:3]}; {what})"


# ---- the run ---------------------------------------------------------------------------------------
def make_bare(setup: dict, n: int, batch: int) -> Callable[[], float]:
    """The baseline: timm forward_features over the N decoded images in this process; returns img/s."""
    import timm
    from PIL import Image
    from torchvision import transforms as T

    model = timm.create_model(ARCH, pretrained=False, **setup["kwargs"])
    model.load_state_dict(torch.load(setup["checkpoint"], map_location="cpu", weights_only=True))
    model.eval()
    tf = T.Compose([T.ToTensor(), T.Normalize(setup["mean"], setup["std"])])
    x = torch.stack([tf(Image.open(setup["folder"] / p).convert("RGB")) for p in setup["names"][:n]])

    def run() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, n, batch):
                model.forward_features(x[b:b + batch])
        return n / (time.perf_counter() - t0)

    return run


def summarize(runs: dict, n: int, n2: int, bare: float) -> dict:
    t1 = [r["wall_s"] for r in runs[n]]
    t2 = [r["wall_s"] for r in runs[n2]]
    steady = [(n2 - n) / (b - a) for a, b in zip(t1, t2) if b > a]  # paired by round
    med = statistics.median
    out = {"wall_s_n": [round(t, 2) for t in t1], "wall_s_2n": [round(t, 2) for t in t2],
           "img_s_2n": round(n2 / med(t2), 1), "steady_img_s": round(med(steady), 1) if steady else None,
           "max_rss_mb": [round(med([r["max_rss_mb"] for r in runs[k]])) for k in (n, n2)],
           "tree_pss_mb": [round(med([r["tree_pss_mb"] for r in runs[k]])) for k in (n, n2)]}
    out["img_s_2n_over_bare"] = round(out["img_s_2n"] / bare, 3)
    out["steady_over_bare"] = round(out["steady_img_s"] / bare, 3) if steady else None
    return out


def table(res: dict) -> list[str]:
    lines = ["| tool | img/s at 2N whole process (÷ bare) | steady img/s N→2N (÷ bare) | peak RSS N / 2N (MB) "
             "| bytes / image-layer | resumes after SIGKILL | max token diff to stitchcache |",
             "|---|---:|---:|---:|---:|---|---:|",
             f"| bare forward (in-process, no capture) | {res['bare_img_s']} (1.00) | — | — | — | — | — |"]
    for tool, t in res["tools"].items():
        if "error" in t:
            lines.append(f"| {tool} | failed: {t['error'][:120]!r} | | | | | |")
            continue
        steady = f"{t['steady_img_s']} ({t['steady_over_bare']:.2f})" if t["steady_img_s"] else "—"
        diff = t.get("max_token_diff")
        lines.append(f"| {tool} | {t['img_s_2n']} ({t['img_s_2n_over_bare']:.2f}) | {steady} | "
                     f"{t['max_rss_mb'][0]} / {t['max_rss_mb'][1]} | {t.get('bytes_per_image_layer', 0):,.0f} | "
                     f"{t['resume']} | {'—' if diff is None else f'{diff:.3g}'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1536, help="N (the larger runs take 2N)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128, help="batch of every tool and of the bare forward")
    ap.add_argument("--workers", type=int, default=1, help="stitchcache's decode workers (extract.num_workers)")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--tools", default="stitchcache,naive,thingsvision,torchlens")
    ap.add_argument("--thingsvision-python", default=None, help="a Python with thingsvision (default: this one)")
    ap.add_argument("--torchlens-python", default=None, help="a Python with torchlens (default: this one)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled order of each round")
    ap.add_argument("--workdir", default=None, help="where images, checkpoint and outputs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--max-memory-mb", type=float, default=None,
                    help="kill (and report) a tool whose process tree passes this PSS (default: 60%% of RAM)")
    args = ap.parse_args()
    args.max_memory_mb = args.max_memory_mb or 0.6 * _mem_total_mb()
    torch.set_num_threads(1)
    n, n2 = args.images, 2 * args.images
    wanted = [t for t in args.tools.split(",") if t]
    notes, pythons = [], {}
    for tool in wanted:
        py, note = python_for(tool, {"thingsvision": args.thingsvision_python,
                                     "torchlens": args.torchlens_python}.get(tool))
        notes.append(note if py else f"skipped: {note}")
        if py:
            pythons[tool] = py
    print("\n".join(notes), flush=True)
    if "stitchcache" not in pythons:
        raise SystemExit("stitchcache itself is not importable: run from the repository with its venv")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sc-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]
    try:
        setup = make_setup(work / "setup", n2, args.width, args.depth, args.img_size, args.patch)
        names = setup["names"][:n]
        # uninterrupted runs of N images: the token reference (stitchcache) and the kill tests' references
        refs, resume = {}, {}
        for tool in [t for t in pythons if t in RESUMABLE]:
            out, log = work / f"ref-{tool}", work / f"{tool}.log"
            r = _run(tool_cmd(tool, setup, n, out, args, pythons[tool], batch=kill_batch(args, n)), log, args)
            if r["rc"] == 0 and not r["killed"]:
                refs[tool] = out
            elif tool == "stitchcache":
                raise SystemExit(f"stitchcache reference run failed (rc {r['rc']}): {_tail(log)}")
            else:
                resume[tool] = (f"not tested (its uninterrupted run failed: rc {r['rc']}, "
                                f"over memory: {r['over_memory']})")
        ref = store_of(refs["stitchcache"])
        for t in pythons:
            if t not in resume:
                resume[t] = (kill_resume(t, setup, n, args, pythons[t], refs[t], work) if t in refs
                             else "no (the tool has no resume)")
        print("resume after SIGKILL: " + "; ".join(f"{t}: {v}" for t, v in resume.items()), flush=True)
        bare = make_bare(setup, n, args.batch)
        runs = {t: {n: [], n2: []} for t in pythons}
        extra = {t: {"resume": resume[t]} for t in pythons}
        bare_ips = []
        for rnd in range(args.rounds):
            jobs = [(t, k) for t in pythons for k in (n, n2)] + [("bare", n)]
            random.Random(args.seed + rnd).shuffle(jobs)
            for tool, k in jobs:
                if tool == "bare":
                    bare_ips.append(bare())
                    continue
                if "error" in extra[tool]:
                    continue
                out, log = work / f"r{rnd}-{tool}-{k}", work / f"{tool}.log"
                m = _run(tool_cmd(tool, setup, k, out, args, pythons[tool]), log, args)
                if m["over_memory"]:
                    extra[tool]["error"] = (f"killed at {k} images: its processes passed {args.max_memory_mb:.0f} MB "
                                            "(--max-memory-mb)")
                elif m["rc"]:
                    extra[tool]["error"] = f"rc {m['rc']}: {_tail(log)}"
                else:
                    runs[tool][k].append(m)
                    if rnd == 0 and k == n:
                        data = store_of(out) if tool == "stitchcache" else out
                        extra[tool]["bytes_per_image_layer"] = du(data) / (k * arrays_written(tool, args.depth))
                        extra[tool]["max_token_diff"] = token_diff(tool, out, ref, args.depth, names)
                shutil.rmtree(out, ignore_errors=True)
            load.append(os.getloadavg()[0])
            print(f"round {rnd + 1}/{args.rounds} done (load {load[-1]:.1f})", flush=True)
        bare_med = round(statistics.median(bare_ips), 1)
        tools = {t: ({**extra[t], **summarize(runs[t], n, n2, bare_med)} if "error" not in extra[t] else extra[t])
                 for t in pythons}
        res = {"images_n": n, "images_2n": n2, "rounds": args.rounds, "batch": args.batch,
               "stitchcache_workers": args.workers, "torch_threads_per_tool": 1,
               "model": {"arch": ARCH, **setup["kwargs"]}, "captured": modules(args.depth),
               "bare_img_s": bare_med, "bare_img_s_rounds": [round(v, 1) for v in bare_ips], "tools": tools,
               "notes": notes, "load_avg_1min": [round(v, 2) for v in load]}
        res["table"] = table(res)
        print("\n" + "\n".join(res["table"]))
        print("process-tree PSS N / 2N (MB): " + "; ".join(f"{t}: {v['tree_pss_mb'][0]} / {v['tree_pss_mb'][1]}"
                                                            for t, v in tools.items() if "tree_pss_mb" in v))
        save("peers", res, torch.device("cpu"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
