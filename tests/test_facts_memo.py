"""The on-disk memo of the planner's model checks (backends/check.py, issue 15): an unchanged config's
next dry run builds no model and imports neither torch nor timm, and the memo is never trusted when
anything its answer depends on changed (spec, library versions, the backends' code, the weights file)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_vit
from stitchcache.backends import check

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from stitchcache.backends.check import checkpoint_problems, model_facts
spec = json.loads(sys.argv[1])
f = model_facts(spec)
problems = checkpoint_problems(spec)
print("OUT=" + json.dumps({"depth": f.depth, "grid": list(f.grid), "problems": problems,
                           "modules": sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)}))
"""


@pytest.fixture
def facts_dir(tmp_path, monkeypatch):
    d = tmp_path / "facts"
    monkeypatch.setenv(check.FACTS_DIR_ENV, str(d))
    return d


def probe(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("OUT="))[4:])


def test_second_check_in_a_new_process_builds_nothing(facts_dir):
    spec = {**tiny_vit(width=16, img=16, patch=4, depth=3), "checkpoint": None}
    first = probe(spec)
    assert "timm" in first["modules"] and first["depth"] == 3 and first["grid"] == [4, 4]
    assert len(list(facts_dir.glob("facts-*.json"))) == 1
    second = probe(spec)
    assert second["modules"] == [], f"a memo hit imported {second['modules']}"
    assert (second["depth"], second["grid"]) == (3, [4, 4])


def test_a_changed_spec_or_library_version_misses(facts_dir, monkeypatch):
    spec = {**tiny_vit(width=16, img=16, patch=4, depth=3), "checkpoint": None}
    assert check.model_facts(spec).depth == 3
    deeper = {**spec, "kwargs": {**spec["kwargs"], "depth": 4}}
    assert check.model_facts(deeper).depth == 4                       # not the memo of depth 3
    assert len(list(facts_dir.glob("facts-*.json"))) == 2
    key = check._memo_file("facts", check._spec_json(spec))[1]
    real = check.importlib.metadata.version
    with monkeypatch.context() as m:   # another timm installed: another key
        m.setattr(check.importlib.metadata, "version", lambda d: "0.0.1" if d == "timm" else real(d))
        assert check._memo_file("facts", check._spec_json(spec))[1] != key
    with monkeypatch.context() as m:   # the backends' source changed: another key
        import stitchcache.provenance as prov
        m.setattr(prov, "code_digest", lambda *mods: "edited")
        assert check._memo_file("facts", check._spec_json(spec))[1] != key
    assert check._memo_file("facts", check._spec_json(spec))[1] == key


def test_a_wrong_memo_is_not_trusted(facts_dir):
    spec = {**tiny_vit(width=16, img=16, patch=4, depth=3), "checkpoint": None}
    check.model_facts(spec)
    memo, key = check._memo_file("facts", check._spec_json(spec))
    data = json.loads(memo.read_text())
    memo.write_text(json.dumps({**data, "key": "another"}))       # e.g. written under other versions
    check._facts.cache_clear()
    assert check.model_facts(spec).depth == 3 and json.loads(memo.read_text())["key"] == key
    memo.write_text("{not json")
    assert check.model_facts(spec).depth == 3


def test_a_rewritten_checkpoint_is_checked_again(facts_dir, tmp_path):
    import timm
    import torch

    spec = {**tiny_vit(width=16, img=16, patch=4, depth=2), "checkpoint": str(tmp_path / "w.pt")}
    kw = spec["kwargs"]
    good = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                             **{k: v for k, v in kw.items() if k != "pretrained_cfg_overlay"})
    torch.save(good.state_dict(), spec["checkpoint"])
    assert check.checkpoint_problems(spec) == []
    assert len(list(facts_dir.glob("checkpoint-*.json"))) == 1
    wide = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **{**kw, "embed_dim": 32})
    torch.save(wide.state_dict(), spec["checkpoint"])                 # same path, other weights
    problems = check.checkpoint_problems(spec)
    assert problems and "other shapes" in problems[0]


def test_specs_read_from_local_files_are_not_memoised_on_disk(facts_dir, tmp_path, monkeypatch):
    assert check._memo_file("facts", json.dumps({"backbone": "hf:/models/siglip", "kwargs": {}})) is None
    assert check._memo_file("facts", json.dumps({"backbone": "open_clip:/cfg/model.json", "kwargs": {}})) is None
    # timm's hub prefix reads a config from the hub cache; a bare name that is a folder here is a local model
    assert check._memo_file("facts", json.dumps({"backbone": "timm:hf-hub:timm/vit_small_patch16_224.augreg_in21k",
                                                 "kwargs": {}})) is None
    (tmp_path / "my_clip").mkdir()
    monkeypatch.chdir(tmp_path)
    assert check._memo_file("facts", json.dumps({"backbone": "open_clip:my_clip", "kwargs": {}})) is None
    assert check._memo_file("facts", json.dumps({"backbone": "timm:vit_small_patch16_224", "kwargs": {}})) is not None
