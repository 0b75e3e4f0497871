"""CUDA paths, run by the GPU suite (benchmarks/gpu/run.sh) where a GPU is visible.

Marked `gpu`: on a machine without CUDA every test skips, unless STITCHCACHE_GPU_REHEARSAL=1 (set by
`run.sh --cpu-smoke`), which runs the same code on the CPU so the suite is rehearsed on every
submission; each assertion then checks what the CPU path must do (e.g. no pinned buffers).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from stitchcache.cli import main as cli

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("STITCHCACHE_GPU_REHEARSAL") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (STITCHCACHE_GPU_REHEARSAL=1 rehearses these tests on the CPU)")


SPECS = {"a": {"name": "a", **tiny_vit(width=32)}, "b": {"name": "b", **tiny_vit(width=48, img=64, patch=8)}}


def _folder(root: Path) -> dict:
    """2 classes x 24 images, like conftest's image_folder (module-scoped here)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(24):
            arr = (rng.random((28, 28)) * 60 + 120 * c).astype("uint8")
            Image.fromarray(arr, mode="L").save(root / "images" / f"class{c}" / f"{i:03d}.png")
    return {"name": "toy", "type": "image_folder", "root": str(root / "images"),
            "splits": {"train": {"start": 0, "count": 48}, "val": {"start": 0, "count": 48}}}


def _extract(spec, dataset, split, root, device, **extra):
    from stitchcache.extract import extract

    return extract(spec, dataset, split, root, {"chunk_size": 16, "batch_size": 16, "num_workers": 0,
                                                "device": device.type, **extra})


@pytest.fixture(scope="module")
def records(tmp_path_factory, device):
    """Feature records of two tiny models, extracted once on the device under test."""
    tmp_path = tmp_path_factory.mktemp("gpu-records")
    dataset = _folder(tmp_path)
    recs = {}
    for m, spec in SPECS.items():
        for split in ("train", "val"):
            path = tmp_path / "rec" / f"{m}-{split}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(_extract(spec, dataset, split, tmp_path / "cache", device)))
            recs[m, split] = str(path)
    return recs


def test_device_extraction_equals_cpu_extraction(tmp_path, image_folder, device):
    from stitchcache import open_store

    on_dev = _extract(SPECS["a"], image_folder, "train", tmp_path / "dev", device)
    on_cpu = _extract(SPECS["a"], image_folder, "train", tmp_path / "cpu", torch.device("cpu"))
    a, b = open_store(on_dev["store"]), open_store(on_cpu["store"])
    for l in range(4):
        x, y = np.asarray(a.layer(l)[:], np.float32), np.asarray(b.layer(l)[:], np.float32)
        # fp16 storage: one rounding step of the stored values, plus TF32/accumulation-order noise
        np.testing.assert_allclose(x, y, rtol=2e-2, atol=2e-2 * np.abs(y).max())
    np.testing.assert_allclose(np.asarray(a.final[:], np.float32), np.asarray(b.final[:], np.float32),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(np.asarray(a.labels[:]), np.asarray(b.labels[:]))


def test_pinned_non_blocking_path_on_cuda_only(tmp_path, image_folder, device, monkeypatch):
    """Extraction copies device->host into pinned buffers with non_blocking=True on CUDA, and into
    plain memory synchronously on the CPU."""
    import stitchcache.extract as ex

    seen = {"pin": set(), "non_blocking": set(), "pinned_tensors": set()}
    init, add = ex._UnitBuffer.__init__, ex._UnitBuffer.add

    def spy_init(self, *a, **k):
        init(self, *a, **k)
        seen["pin"].add(bool(k.get("pin", a[4] if len(a) > 4 else None)))
        seen["pinned_tensors"].update(t.is_pinned() for t in self.tokens.values())

    def spy_add(self, *a, **k):
        seen["non_blocking"].add(bool(k.get("non_blocking", a[-1] if a else None)))
        return add(self, *a, **k)

    monkeypatch.setattr(ex._UnitBuffer, "__init__", spy_init)
    monkeypatch.setattr(ex._UnitBuffer, "add", spy_add)
    _extract(SPECS["a"], image_folder, "train", tmp_path / "c", device)
    cuda = device.type == "cuda"
    assert seen["pin"] == {cuda} and seen["non_blocking"] == {cuda} and seen["pinned_tensors"] == {cuda}, seen


def _train(recs, tmp_path, method, device, init=None, epochs=3):
    out = tmp_path / f"{method}.pt"
    settings = {"max_epochs": epochs, "patience": epochs, "lr_grid": [3e-3], "batch_size": 16,
                "lfm_batch_size": 16, "device": device.type}
    argv = ["train", "--method", method, "--layer", "1", "--stitch", "mlp",
            "--src-train", recs["a", "train"], "--src-val", recs["a", "val"],
            "--tgt-train", recs["b", "train"], "--tgt-val", recs["b", "val"],
            "--settings", json.dumps(settings), "--out", str(out), "--metrics", str(out) + ".json"]
    if init:
        argv += ["--init", str(init)]
    assert cli(argv) == 0
    return out, json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.parametrize("method", ["lfm", "ffm", "tlt"])
def test_training_under_autocast_reduces_the_loss(records, tmp_path, device, method, monkeypatch):
    """bf16 autocast on CUDA (fp32 on CPU): each recipe's training loss falls."""
    import importlib

    import stitchcache.runtime as runtime

    for name in ("stitchcache.train", "stitchcache.stitch.trainer"):  # the training stage's modules
        importlib.import_module(name)
    modes = []
    real = runtime.autocast

    def spy(dev):
        ctx = real(dev)
        modes.append((dev.type, getattr(ctx, "fast_dtype", None), getattr(ctx, "_enabled", None)))
        return ctx

    monkeypatch.setattr(runtime, "autocast", spy)
    for mod in list(sys.modules.values()):  # modules that imported autocast by name
        if getattr(mod, "__name__", "").startswith("stitchcache") and getattr(mod, "autocast", None) is real:
            monkeypatch.setattr(mod, "autocast", spy)
    _, metrics = _train(records, tmp_path, method, device)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    assert modes and all(m[0] == device.type for m in modes)  # every step runs under the stage's autocast
    if device.type == "cuda":
        assert all(m[1] == torch.bfloat16 and m[2] for m in modes), modes


def test_export_and_probe(records, tmp_path, device):
    ckpt, _ = _train(records, tmp_path, "ffm", device, epochs=2)
    out = tmp_path / "eval.json"
    settings = {"probe": {"max_epochs": 5, "patience": 2, "batch_size": 16, "lr_grid": [1e-2], "weight_decay": 0.0,
                          "pool": "mean"}, "keep_exports": True, "seed": 0, "device": device.type}
    argv = ["evaluate", "--checkpoint", str(ckpt), "--src-train", records["a", "train"],
            "--src-val", records["a", "val"], "--tgt-train", records["b", "train"], "--tgt-val", records["b", "val"],
            "--cache-root", str(tmp_path / "cache"), "--settings", json.dumps(settings), "--out", str(out)]
    assert cli(argv) == 0
    res = json.loads(out.read_text())
    accs = [v for k, v in res.items() if k.endswith("acc") and isinstance(v, float)]
    assert accs and all(0.0 <= v <= 1.0 for v in accs), res
    assert np.isfinite(res["d_l"]) and np.isfinite(res["d_L"])


def test_snakemake_gpu_job(tmp_path, image_folder, device):
    """The tiny workflow with gpu_jobs: true: backbone jobs declare gpu=1 and run on the device
    (a real run on CUDA; on the CPU rehearsal a dry run, the real run being tests/test_workflow.py's)."""
    pytest.importorskip("snakemake")
    import yaml

    wd = tmp_path / "wf"
    wd.mkdir()
    shutil.copy(REPO / "Snakefile", wd)
    shutil.copy(REPO / "config.yaml", wd)
    shutil.copytree(REPO / "workflow", wd / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = {"cache_root": str(tmp_path / "cache"), "device": device.type, "gpu_jobs": True,
           "datasets": {"toy": {k: v for k, v in image_folder.items() if k != "name"}},
           "models": {"a": {"backbone": SPECS["a"]["backbone"], "kwargs": SPECS["a"]["kwargs"]},
                      "b": {"backbone": SPECS["b"]["backbone"], "kwargs": SPECS["b"]["kwargs"]}},
           "extract": {"num_workers": 0, "chunk_size": 16, "batch_size": 16},
           "stitch": {"datasets": ["toy"], "pairs": [["a", "b"]], "self_stitch": False, "layers": [1],
                      "stitch_layers": ["mlp"], "methods": ["ffm"]},
           "train": {"max_epochs": 2, "patience": 2, "batch_size": 16, "lr_grid": [3e-3]},
           "probe": {"max_epochs": 3, "patience": 2, "batch_size": 16, "lr_grid": [1e-2]}}
    (wd / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--resources", "gpu=1", "--configfile", "gpu.yaml",
           "--replace-workflow-config", "--printshellcmds"]
    if device.type != "cuda":
        cmd.append("-n")
    proc = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "gpu=1" in text, text[-3000:]
    if device.type == "cuda":
        ev = json.loads(next((wd / "results" / "stitch").rglob("eval.json")).read_text())
        assert np.isfinite(ev["d_L"])
