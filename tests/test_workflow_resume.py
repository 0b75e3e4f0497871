"""Interrupting the workflow the way users do, then running the same command again.

`snakemake` runs the tiny experiment (tests/data/tiny.yaml, shrunk to one pair, one layer, `lfm`,
with a train split of 3000 Fashion-MNIST images stored in 16-image chunks) in its own process
group, as a shell runs a foreground command. Whenever an extraction job has written some but not
all chunks of its train feature store, the whole group gets a real signal; then the user's command
runs again. One workflow directory goes through three interruptions in a row:

1. SIGINT: Ctrl-C in the terminal. Run the same command again.
2. SIGTERM (during that second run): `kill -- -PGID`, `scancel` of the SLURM job that runs
   snakemake, a shutdown. Run the same command again.
3. SIGKILL (during the third run): the OOM killer, `kill -9`, a node failure. Snakemake cannot
   clean up: its lock stays, and the next run stops with a LockException until
   `snakemake --unlock`; then the same command again, which completes.

`--rerun-incomplete` is never needed: a killed job's declared outputs are written last (the
features live in the cache root, which is no declared output), so nothing incomplete is left.
After each interruption the next run must do exactly what was left ("planned minus finished" in
Snakemake's printed job list, never `pretrain` again, and every file under results/ left by a
finished job untouched), and the extraction that was interrupted must resume from its finished
chunks: its log says "resuming <store>: k of n chunks already written" with the k counted on disk
after the kill, and those chunks are never written again (their progress markers keep their
mtime). At the end every store is complete and holds the same tokens and labels as a fresh,
uninterrupted extraction, the table has its row, and a dry run has "Nothing to be done".

Nothing here depends on where the extract rule writes its small record or on the rule's name:
stores are found in the cache root (the layout of stitchcache/cache/store.py), jobs in Snakemake's
printed output.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from test_workflow import FMNIST, TINY, env, job_stats, load_yaml, make_workdir

TRAIN_IMAGES = 3000  # ~1.5 s of extraction per model at full speed on 2 cores: 75 polls of 20 ms
CHUNK = 16           # -> 188 chunks per train store
STEP = 4             # signal once the watched store has at least this many new chunks ...
MARGIN = 8           # ... and at least this many still missing
# Three kills have to land inside one 188-chunk store, so every chunk the extraction writes between
# "ready" and the kill comes out of the next run's window. The poller is a nice-0 process polling
# every 20 ms; the workflow runs at nice NICE so that a poller woken on a loaded machine (CI runs
# the suite on every core) preempts the extraction instead of waiting behind it (once, three
# wakeups late, run2 overshot so far that run3 found its store finished).
NICE = 5
POLL = 0.02


def resume_config() -> dict:
    cfg = load_yaml(TINY)
    st = cfg["stitch"]
    dataset = (st.get("datasets") or [st.get("dataset")])[0]
    if "datasets" in st:
        st["datasets"] = [dataset]
    cfg["datasets"][dataset]["splits"]["train"]["count"] = TRAIN_IMAGES
    cfg["extract"].update(chunk_size=CHUNK, batch_size=32, num_workers=0)
    for m in cfg["models"].values():
        if "pretrain" in m:
            m["pretrain"]["num_workers"] = 0  # no DataLoader worker processes to start: seconds less
    src, tgt = list(cfg["models"])[:2]
    st.update(pairs=[[src, tgt]], self_stitch=False, layers=[1], methods=["lfm"])
    return cfg


# ------------------------------------------------------------------------------------- helpers

def command(*extra: str) -> list[str]:
    """What the user types (the default profile supplies cores and the gpu resource)."""
    return [sys.executable, "-m", "snakemake", "--workflow-profile", "workflow/profiles/default",
            "--configfile", "tiny.yaml", "--replace-workflow-config", *extra]


def run(wd: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(*extra), cwd=wd, env=env(), capture_output=True, text=True, timeout=timeout)


def stores(cache: Path) -> dict[str, dict]:
    """Feature stores under the cache root (layout: stitchcache/cache/store.py), read cheaply enough
    to poll: path -> {complete, done (finished chunk markers), total (chunks), model, dataset}."""
    from stitchcache.cache import FeatureStore

    out = {}
    root = cache / "features"
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            attrs = json.loads((path / "zarr.json").read_text())["attributes"]
            total = -(-int(attrs["num_images"]) // int(attrs["chunk_size"]))
            ds = attrs["dataset"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a store, or being created right now
        progress = path / "progress"
        done = sorted(p.name for p in progress.iterdir()) if progress.is_dir() else []
        out[str(path)] = {"complete": FeatureStore.is_complete(path), "done": done, "total": total,
                          "model": attrs.get("model_name"), "dataset": f"{ds['name']}/{ds['split']}"}
    return out


def group_alive(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group, as 'pid state'."""
    alive = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{p.name} {fields[0]}")
    return alive


def finished_jobs(text: str) -> Counter:
    return Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", text))


def finished_outputs(text: str) -> list[str]:
    """The declared outputs of the jobs Snakemake reported finished (from its printed job blocks)."""
    outputs = {}
    for block in re.finditer(r"(?m)^(?:local)?rule \w+:\n((?:    .*\n)+)", text):
        fields = dict(re.findall(r"(?m)^    (\w+): (.*)$", block.group(1)))
        if "jobid" in fields and "output" in fields:
            outputs[fields["jobid"]] = [o.strip() for o in fields["output"].split(",")]
    done = re.findall(r"Finished jobid: (\d+) ", text)
    return [o for j in done for o in outputs.get(j, [])]


def resume_lines(wd: Path) -> dict[str, tuple[int, int]]:
    """store name -> (chunks already written, chunks) from the 'resuming' lines of the stage logs."""
    out = {}
    for log in (wd / "logs").rglob("*.log"):
        for m in re.finditer(r"resuming (\S+): (\d+) of (\d+) chunks already written", log.read_text(errors="replace")):
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def interrupt(wd: Path, sig: signal.Signals, ready, name: str, *extra: str,
              timeout: float = 300) -> tuple[str, int, dict]:
    """Run the user's command in its own process group, send `sig` to the group as soon as
    ready(stores) holds, wait until every process of the group has ended.
    Returns (snakemake's output, its exit status, the stores after the kill)."""
    out_path = wd / f"{name}.out"
    cache = wd / load_yaml(wd / "tiny.yaml")["cache_root"]
    with open(out_path, "w") as out:
        # SIGINT back to its default, as in a terminal: a shell running the tests in the background
        # (`cmd &`) hands SIGINT down as ignored, and Python then keeps ignoring it
        proc = subprocess.Popen(command(*extra), cwd=wd, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.nice(NICE)))
    pgid = proc.pid
    try:
        deadline = time.monotonic() + timeout
        while not ready(stores(cache)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name}: no partly written train store to interrupt (snakemake exit "
                                     f"{proc.poll()}); stores: {stores(cache)}\n{out_path.read_text()[-5000:]}")
            time.sleep(POLL)
        os.killpg(pgid, sig)
        rc = proc.wait(timeout=120)
        deadline = time.monotonic() + 60
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(pgid), f"{name}: processes left after {sig.name}: {group_alive(pgid)}"
    finally:
        if proc.poll() is None or group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    text = out_path.read_text()
    assert rc != 0, f"{name}: snakemake finished despite {sig.name}:\n{text[-3000:]}"
    return text, rc, stores(cache)


def fresh_extraction(cfg: dict, wd: Path, store: dict, root: Path) -> dict:
    """The same features extracted in one uninterrupted pass into another cache root."""
    from stitchcache.extract import extract

    dataset, split = store["dataset"].split("/")
    name = store["model"]
    m = cfg["models"][name]
    ckpt = wd / "results" / "models" / f"{name}.pt" if "pretrain" in m else m.get("checkpoint")
    model_spec = {"name": name, "backbone": m["backbone"], "kwargs": m.get("kwargs", {}),
                  "checkpoint": str(ckpt) if ckpt else None}
    d = cfg["datasets"][dataset]
    dataset_spec = {**{k: v for k, v in d.items() if k != "splits"}, "name": dataset,
                    "splits": {split: d["splits"][split]}}
    return extract(model_spec, dataset_spec, split, root, {**cfg["extract"], "device": "cpu"})


def assert_same_features(resumed: Path, fresh: Path) -> None:
    from stitchcache.cache import open_store

    a, b = open_store(resumed), open_store(fresh)
    assert a.layers == b.layers and a.num_images == b.num_images
    np.testing.assert_array_equal(np.asarray(a.labels[:]), np.asarray(b.labels[:]))
    for name in [*a.layers, "final"]:
        x, y = np.asarray(a.array(name)[:], dtype=np.float32), np.asarray(b.array(name)[:], dtype=np.float32)
        # bit-identical on this machine; a float16 ulp of slack for BLAS kernels that depend on the batch
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3, err_msg=f"{resumed.name} {name}")


# ---------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("written", [{}, {"key": "k", "key_parts": {"model": "m"}, "num_images": 8}],
                         ids=["no-attributes", "some-attributes"])
def test_store_killed_while_being_created_is_created_again(tmp_path, written):
    """A kill while a store is being created (seen with SIGINT, SIGTERM and SIGKILL in the workflow
    test below) leaves a group with arrays but without its attributes, or with some of them (zarr's
    attrs.update wrote zarr.json once per key). The next writer must create it again, not refuse
    it as a store "with different inputs" nor fail on a missing attribute."""
    import zarr

    from stitchcache.cache import StoreWriter, open_store

    path = tmp_path / "features" / "k"
    g = zarr.open_group(str(path), mode="w")  # what StoreWriter had done when it was killed
    g.create_array("layer_00", shape=(8, 2, 3), dtype="float16", chunks=(4, 2, 3))
    g.update_attributes(written)
    attrs = {"key": "k", "key_parts": {"model": "m"}}
    with StoreWriter(path, num_images=8, layers=[0], num_tokens=2, width=3, chunk_size=4, attrs=attrs) as w:
        assert w.pending_units() == [0, 1]
        for u in (0, 1):
            x = np.full((4, 2, 3), u + 1, np.float32)
            w.write_unit(u, {0: x}, x, np.arange(4) + 4 * u)
        w.finalize()
    fs = open_store(path)
    assert fs.attrs["key_parts"] == {"model": "m"}
    np.testing.assert_array_equal(fs.labels[:], np.arange(8))
    assert float(fs.final[7, 0, 0]) == 2.0


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc: Linux")
def test_interrupted_workflow_resumes(tmp_path):
    cfg = resume_config()
    wd = make_workdir(tmp_path, cfg)
    t0 = time.monotonic()
    times = {}
    again = "--rerun-incomplete"  # what README.md tells users to add after an interruption

    def partly_written(s, before: int = 0) -> bool:
        return (not s["complete"] and s["total"] >= 100
                and before + STEP <= len(s["done"]) <= s["total"] - MARGIN)

    # what each kill left finished: chunk markers and the outputs of finished jobs; none may change
    markers: dict[Path, int] = {}
    outputs: dict[str, int] = {}

    def remember(text: str, after_kill: dict) -> None:
        for p, s in after_kill.items():
            for c in s["done"]:
                markers.setdefault(Path(p) / "progress" / c, (Path(p) / "progress" / c).stat().st_mtime_ns)
        for f in finished_outputs(text):
            outputs.setdefault(f, (wd / f).stat().st_mtime_ns)

    def check_plan(text: str, planned: Counter, finished: Counter, name: str) -> Counter:
        """The run did exactly what the interrupted one left; returns its own plan."""
        got = Counter(job_stats(subprocess.CompletedProcess([], 0, text, "")))
        assert got == +(planned - finished), f"{name}: planned {dict(got)}, left {dict(planned - finished)}"
        assert "rule pretrain:" not in text, f"{name} ran pretrain again"
        return got

    # 1. Ctrl-C while the train features are being extracted (both models are pretrained by then)
    text, _, after = interrupt(wd, signal.SIGINT, lambda st: any(partly_written(s) for s in st.values()), "run1")
    times["run1 (SIGINT)"] = time.monotonic() - t0
    planned, finished = Counter(job_stats(subprocess.CompletedProcess([], 0, text, ""))), finished_jobs(text)
    assert finished["pretrain"] == 2, (dict(finished), text[-3000:])
    watched = max((p for p, s in after.items() if not s["complete"] and s["total"] >= 100),
                  key=lambda p: len(after[p]["done"]))
    done = len(after[watched]["done"])
    assert 0 < done < after[watched]["total"], after[watched]
    remember(text, after)

    # 2. the command again; it resumes the store, and is killed with SIGTERM (kill, scancel)
    t = time.monotonic()
    text, _, after = interrupt(wd, signal.SIGTERM, lambda st: watched in st and partly_written(st[watched], done),
                               f"run2 (run1 left {done} chunks)", again)
    times["run2 (SIGTERM)"] = time.monotonic() - t
    planned = check_plan(text, planned, finished, "run2")
    finished = finished_jobs(text)
    assert resume_lines(wd).get(Path(watched).name) == (done, after[watched]["total"]), resume_lines(wd)
    done = len(after[watched]["done"])
    remember(text, after)

    # 3. the command again, killed with SIGKILL (OOM killer, kill -9, node failure)
    t = time.monotonic()
    text, rc, after = interrupt(wd, signal.SIGKILL, lambda st: watched in st and partly_written(st[watched], done),
                                f"run3 (run2 left {done} chunks)", again)
    times["run3 (SIGKILL)"] = time.monotonic() - t
    assert rc == -signal.SIGKILL
    planned = check_plan(text, planned, finished, "run3")
    finished = finished_jobs(text)
    assert resume_lines(wd).get(Path(watched).name) == (done, after[watched]["total"]), resume_lines(wd)
    done = len(after[watched]["done"])
    interrupted = {p: s for p, s in after.items() if not s["complete"]}
    remember(text, after)

    # ... Snakemake could not remove its lock: the command stops and names --unlock
    t = time.monotonic()
    locked = run(wd, again)
    assert locked.returncode != 0
    assert "LockException" in locked.stdout + locked.stderr and "--unlock" in locked.stdout + locked.stderr
    unlock = run(wd, "--unlock")
    assert unlock.returncode == 0, unlock.stdout[-3000:] + unlock.stderr[-3000:]

    # 4. after --unlock, the command completes
    last = run(wd, again)
    text = last.stdout + last.stderr
    assert last.returncode == 0, text[-8000:]
    times["run4 (unlock + complete)"] = time.monotonic() - t
    check_plan(text, planned, finished, "run4")
    resumed = resume_lines(wd)
    assert resumed.get(Path(watched).name) == (done, after[watched]["total"]), resumed
    for p, s in interrupted.items():  # any other store the kill caught resumed from its own chunks
        assert resumed.get(Path(p).name) == ((len(s["done"]), s["total"]) if s["done"] else None), (p, resumed)

    # nothing that had finished before a kill was redone: outputs and chunk markers are untouched
    assert outputs and {f: (wd / f).stat().st_mtime_ns for f in outputs} == outputs, "a finished output was rewritten"
    assert {m: m.stat().st_mtime_ns for m in markers} == markers, "a finished chunk was written again"

    # the resumed stores hold what one uninterrupted extraction writes
    t = time.monotonic()
    final = stores(wd / cfg["cache_root"])
    assert all(s["complete"] for s in final.values()), final
    for p in {watched, *(p for p, s in interrupted.items() if s["done"])}:
        record = fresh_extraction(cfg, wd, final[p], tmp_path / "fresh")
        assert Path(record["store"]).name == Path(p).name  # same content key: same inputs
        assert_same_features(Path(p), Path(record["store"]))
    times["fresh extraction + compare"] = time.monotonic() - t

    import pyarrow.parquet as pq

    rows = pq.read_table(wd / "results" / "table.parquet").to_pylist()
    src, tgt = cfg["stitch"]["pairs"][0]
    assert sorted((r["source"], r["target"], r["layer"], r["method"]) for r in rows) == [(src, tgt, 1, "lfm")]
    assert "Nothing to be done" in run(wd, "-n").stdout
    print({k: round(v) for k, v in times.items()}, "resumed:", resumed)
