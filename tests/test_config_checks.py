"""Checks that used to come after the expensive work (extraction, job start) now run while planning:
in `stitchcache plan` (one message, every error, exit code 2) and in the workflow's dry run, each
naming the config key and the model's config name. Models are built on the meta device; checkpoints
are judged by their key / shape lists; no weights are loaded and no image is decoded."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from stitchcache.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"
SUP_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}  # tiny.yaml's sup


def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def timm_state_dict(**kwargs) -> dict:
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **kwargs).state_dict()


def open_clip_json(path: Path, layers: int) -> str:
    """An open_clip model-config JSON: a 16 px, patch-4 image tower of `layers` blocks (4x4 grid)."""
    path.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": layers, "width": 32, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}))
    return str(path)


def image_folder_split(root: Path, classes) -> str:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    return str(root)


def add_model(cfg: dict, name: str, model: dict, partner: str = "sup") -> None:
    cfg["models"][name] = model
    cfg["stitch"]["pairs"].append([name, partner])


# ---- the cases: (mutate(cfg, tmp_path), texts every report must contain) --------------------------------
def unknown_library(cfg, tmp):
    cfg["models"]["ssl"]["backbone"] = "timmm:vit_small_patch16_224"


def unknown_architecture(cfg, tmp):
    add_model(cfg, "arch", {"backbone": "timm:vit_smol_patch16_224", "kwargs": dict(SUP_KWARGS)})


def misspelt_kwarg(cfg, tmp):
    cfg["models"]["sup"]["kwargs"]["dept"] = cfg["models"]["sup"]["kwargs"].pop("depth")


def layer_beyond_depth_from_file(cfg, tmp):  # an open_clip model JSON of 2 blocks: stitch layers lie in 1..1
    add_model(cfg, "oc", {"backbone": f"open_clip:{open_clip_json(tmp / 'tiny-oc.json', layers=2)}"})


def layer_beyond_registry_depth(cfg, tmp):  # dinov2-l14 has 24 blocks (timm's config; no weights needed)
    cfg["weights_root"] = str(tmp / "no-weights")
    cfg["stitch"]["layers"] = [2, 24]
    for m in ("sup", "ssl"):
        cfg["models"][m]["kwargs"]["depth"] = 25
    add_model(cfg, "dino", {"backbone": "dinov2-l14", "kwargs": {"img_size": 56}})


def mismatched_grids(cfg, tmp):  # ssl at 56 px / patch 7 sees an 8x8 grid, sup a 4x4 one
    cfg["models"]["ssl"]["kwargs"]["img_size"] = 56


def shape_mismatched_checkpoint(cfg, tmp):  # weights of a width-48 ViT for a width-32 config
    from safetensors.torch import save_file

    save_file(timm_state_dict(**{**SUP_KWARGS, "embed_dim": 48}), str(tmp / "w48.safetensors"))
    add_model(cfg, "fixed", {"backbone": "timm:vit_small_patch16_224", "kwargs": dict(SUP_KWARGS),
                             "checkpoint": str(tmp / "w48.safetensors")})


def other_architecture_checkpoint(cfg, tmp):  # a ResNet-like state dict: no key in common
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, tmp / "resnet.pt")
    add_model(cfg, "fixed", {"backbone": "timm:vit_small_patch16_224", "kwargs": dict(SUP_KWARGS),
                             "checkpoint": str(tmp / "resnet.pt")})


def missing_hf_directory(cfg, tmp):
    add_model(cfg, "hfm", {"backbone": f"hf:{tmp / 'models' / 'dinov2-small'}"})


def hf_dir(path: Path, weights: bool, layers: int = 3) -> str:
    """A save_pretrained directory of a tiny DINOv2 (16 px, patch 4); config only if not weights."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4)
    if weights:
        Dinov2Model(cfg).save_pretrained(path)
    else:
        cfg.save_pretrained(path)
    return str(path)


def layer_beyond_hf_config_depth(cfg, tmp):  # config.json says 2 blocks
    add_model(cfg, "hfm", {"backbone": f"hf:{hf_dir(tmp / 'dinov2-2', weights=True, layers=2)}"})


def hf_directory_without_weights(cfg, tmp):
    add_model(cfg, "hfm", {"backbone": f"hf:{hf_dir(tmp / 'dinov2-tiny', weights=False)}"})


def train_val_classes_differ(cfg, tmp):
    cfg["datasets"]["folder"] = {"type": "image_folder", "splits": {
        "train": {"root": image_folder_split(tmp / "train", ["cat", "dog"])},
        "val": {"root": image_folder_split(tmp / "val", ["cat", "fox"])}}}
    cfg["stitch"]["datasets"] = ["folder"]


CASES = {
    "unknown_library": (unknown_library, ["models.ssl.backbone", "'ssl'", "unknown library 'timmm'"]),
    "unknown_architecture": (unknown_architecture, ["models.arch.backbone", "'arch'",
                                                    "timm has no architecture 'vit_smol_patch16_224'"]),
    "misspelt_kwarg": (misspelt_kwarg, ["models.sup.kwargs", "'sup'", "unexpected keyword argument 'dept'"]),
    "layer_beyond_depth_from_file": (layer_beyond_depth_from_file,
                                     ["stitch.layers[1]", "layer 2 is outside 1..1 for model 'oc'", "tiny-oc.json"]),
    "layer_beyond_registry_depth": (layer_beyond_registry_depth,
                                    ["stitch.layers[1]", "layer 24 is outside 1..23 for model 'dino' (dinov2-l14 = "
                                     "timm:vit_large_patch14_dinov2.lvd142m)", "depth 24"]),
    "mismatched_grids": (mismatched_grids, ["stitch.pairs[0]", "token grids differ", "'sup'", "'ssl'", "4x4", "8x8"]),
    "shape_mismatched_checkpoint": (shape_mismatched_checkpoint,
                                    ["models.fixed.checkpoint", "'fixed'", "w48.safetensors", "other shapes",
                                     "[48]", "[32]"]),
    "other_architecture_checkpoint": (other_architecture_checkpoint,
                                      ["models.fixed.checkpoint", "'fixed'", "resnet.pt", "another architecture"]),
    "missing_hf_directory": (missing_hf_directory, ["models.hfm.backbone", "'hfm'", "dinov2-small", "does not exist"]),
    "layer_beyond_hf_config_depth": (layer_beyond_hf_config_depth,
                                     ["stitch.layers[1]", "layer 2 is outside 1..1 for model 'hfm'",
                                      "dinov2-2/config.json"]),
    "hf_directory_without_weights": (hf_directory_without_weights,
                                     ["models.hfm.backbone", "'hfm'", "no model.safetensors", "dinov2-tiny"]),
    "train_val_classes_differ": (train_val_classes_differ,
                                 ["datasets.folder.splits", "train only: ['dog']", "val only: ['fox']",
                                  "same class sub-folders"]),
}


def case_config(tmp_path, *names) -> dict:
    cfg = tiny()
    for name in names:
        d = tmp_path / name
        d.mkdir()
        CASES[name][0](cfg, d)
    return cfg


def run_plan(tmp_path, cfg, capsys) -> tuple[int, str]:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = cli(["plan", "--no-measure", "--configfile", str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("case", list(CASES))
def test_plan_reports_the_problem_before_any_work(tmp_path, capsys, case):
    rc, text = run_plan(tmp_path, case_config(tmp_path, case), capsys)
    assert rc == 2, text
    assert "Traceback" not in text and "GPU-h" not in text  # a message, not an estimate of a broken run
    for t in CASES[case][1]:
        assert t in text, (t, text)


def test_plan_lists_every_error_at_once(tmp_path, capsys):
    rc, text = run_plan(tmp_path, case_config(tmp_path, "misspelt_kwarg", "unknown_architecture",
                                              "other_architecture_checkpoint"), capsys)
    assert rc == 2
    assert "3 config errors" in text
    for case in ("misspelt_kwarg", "unknown_architecture", "other_architecture_checkpoint"):
        assert all(t in text for t in CASES[case][1]), (case, text)


def test_plan_lists_every_schema_error_at_once(tmp_path, capsys):
    cfg = tiny()
    cfg["train"]["max_epoch"] = 3
    cfg["probe"]["pool"] = "max"
    rc, text = run_plan(tmp_path, cfg, capsys)
    assert rc == 2 and "Traceback" not in text
    assert "train: Additional properties are not allowed ('max_epoch' was unexpected)" in text
    assert "probe.pool: 'max' is not one of" in text


def test_fitting_checkpoints_and_configs_pass(tmp_path, capsys):
    """No false alarms: timm weights of the configured shape (safetensors and torch files), a valid
    open_clip JSON, an HF save_pretrained directory (as the architecture and as the checkpoint) and
    equal class lists plan normally."""
    from safetensors.torch import save_file

    from stitchcache.config_checks import config_errors
    from stitchcache.plan import load_config

    cfg = tiny()
    save_file(timm_state_dict(**SUP_KWARGS), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": timm_state_dict(**SUP_KWARGS)}, tmp_path / "w.pt")
    add_model(cfg, "fixed", {"backbone": "timm:vit_small_patch16_224", "kwargs": dict(SUP_KWARGS),
                             "checkpoint": str(tmp_path / "w.safetensors")})
    add_model(cfg, "fixed_pt", {"backbone": "timm:vit_small_patch16_224", "kwargs": dict(SUP_KWARGS),
                                "checkpoint": str(tmp_path / "w.pt")})
    add_model(cfg, "oc", {"backbone": f"open_clip:{open_clip_json(tmp_path / 'oc.json', layers=3)}"})
    add_model(cfg, "hfm", {"backbone": f"hf:{hf_dir(tmp_path / 'dinov2-tiny', weights=True)}"})
    add_model(cfg, "hfc", {"backbone": "hf:Dinov2Model", "checkpoint": str(tmp_path / "dinov2-tiny")})
    cfg["datasets"]["folder"] = {"type": "image_folder", "splits": {
        "train": {"root": image_folder_split(tmp_path / "train", ["cat", "dog"])},
        "val": {"root": image_folder_split(tmp_path / "val", ["cat", "dog"])}}}
    cfg["stitch"]["datasets"] = ["fmnist", "folder"]
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert config_errors(load_config(path)) == []
    rc, text = run_plan(tmp_path, cfg, capsys)
    assert rc == 0 and "GPU-h" in text, text


def test_stores_with_differing_classes_get_advice_that_applies():
    """The job-time check (stores made before this check existed) gives advice each dataset type accepts."""
    from stitchcache.data.registry import _DATASET_KEYS, class_order_advice
    from stitchcache.tasks import check_same_classes

    with pytest.raises(ValueError) as e:
        check_same_classes({"classes": ["a", "b"]}, {"classes": ["a", "c"]}, "probe")
    msg = str(e.value)
    assert "image_folder: give both split folders the same class sub-folders" in msg
    assert "image_list: give the dataset a `classes:` file" in msg
    assert "classes" not in _DATASET_KEYS["image_folder"] and "`classes:`" not in class_order_advice("image_folder")
    assert "classes" in _DATASET_KEYS["image_list"] and "`classes:`" in class_order_advice("image_list")


def test_dry_run_reports_every_case_before_any_job(tmp_path):
    """`snakemake -n` stops while building the DAG with all the cases above in one message."""
    from test_workflow import make_workdir, snakemake

    groups = [["unknown_library", "misspelt_kwarg", "layer_beyond_depth_from_file",
               "shape_mismatched_checkpoint", "missing_hf_directory", "train_val_classes_differ"],
              ["unknown_architecture", "other_architecture_checkpoint", "layer_beyond_registry_depth",
               "mismatched_grids"]]  # (a pair's grids are compared once both models build)
    for i, names in enumerate(groups):
        base = tmp_path / f"g{i}"
        base.mkdir()
        wd = make_workdir(base, case_config(base, *names))
        proc = snakemake(wd, "-n", check=False, timeout=600)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, text
        count = re.search(r"(\d+) config errors", text)
        assert count and int(count.group(1)) >= len(names), text  # one message with all of them
        for name in names:
            for t in CASES[name][1]:
                assert t in text, (name, t, text)
        assert not (wd / "logs").exists() and not (wd / "results").exists()
