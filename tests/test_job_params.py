"""A job's params are exactly the config it depends on (stitchcache/job_params.py, called by common.smk):
a key it does not read must not appear (editing it would re-run the job), a key it reads must."""
import copy
import json

import pytest

from stitchcache import job_params as jp


@pytest.fixture
def cfg():
    return {
        "device": "cpu", "seed": 3, "seeds": [0, 1], "gpu_jobs": "auto",
        "datasets": {"ds": {"type": "image_folder", "root": "/data", "splits": {
            "train": {"source": "train", "start": 0, "count": 100},
            "val": {"holdout": {"of": "train", "fraction": 0.1, "seed": 0}},
            "test": {"source": "test"}, "pretrain": {"source": "train", "start": 500, "count": 50}}}},
        "models": {"m": {"backbone": "timm:vit_small_patch16_224", "kwargs": {"depth": 2}, "checkpoint": None,
                         "pretrain": {"objective": "supervised", "dataset": "ds", "split": "pretrain", "epochs": 1}}},
        "extract": {"batch_size": 64, "view": "shared"}, "train": {"max_epochs": 5, "lr_grid": [0.001]},
        "probe": {"max_epochs": 3}, "evaluate": {"keep_exports": False},
    }


def test_settings_carry_the_once_seed_or_the_jobs_own(cfg):
    assert json.loads(jp.extract_settings(cfg)) == {"batch_size": 64, "view": "shared", "seed": 3, "device": "cpu"}
    assert json.loads(jp.train_settings(cfg, "1"))["seed"] == 1
    ev = json.loads(jp.evaluate_settings(cfg, 1))
    assert ev["seed"] == 1 and ev["train"] == json.loads(jp.train_settings(cfg, 1)) and ev["keep_exports"] is False


def test_the_table_asks_for_the_train_section_without_a_seed(cfg):
    t = json.loads(jp.table_settings(cfg))
    assert t["train"] == {"max_epochs": 5, "lr_grid": [0.001], "device": "cpu"} and t["seeds"] == [0, 1]
    assert t["probe_job"] == json.loads(jp.probe_settings(cfg))


def test_a_dataset_spec_holds_only_the_splits_deciding_its_images(cfg):
    before = jp.dataset_spec(cfg, "ds", "train")
    assert set(json.loads(before)["splits"]) == {"train", "val"}   # val is held out of train
    edited = copy.deepcopy(cfg)
    edited["datasets"]["ds"]["splits"]["test"]["count"] = 7         # another split: same params
    assert jp.dataset_spec(edited, "ds", "train") == before
    edited["datasets"]["ds"]["splits"]["val"]["holdout"]["seed"] = 1  # the holdout changes train's images
    assert jp.dataset_spec(edited, "ds", "train") != before
    assert set(json.loads(jp.dataset_spec(cfg, "ds", "test"))["splits"]) == {"test"}


def test_pretraining_depends_on_the_view_and_trains_from_random_init(cfg):
    spec = json.loads(jp.pretrain_model_spec(cfg, "m"))
    assert spec["checkpoint"] is None and spec["name"] == "m"
    before = jp.pretrain_settings(cfg, "m")
    cfg["extract"]["view"] = "native"
    assert jp.pretrain_settings(cfg, "m") != before
    assert set(json.loads(jp.pretrain_dataset(cfg, "m"))["splits"]) == {"pretrain"}


@pytest.mark.parametrize("gpu_jobs, device, visible, smi, want", [
    (True, "cpu", None, None, True), (False, "cuda", None, "/x", False),
    ("auto", "cuda", None, None, True), ("auto", "cpu", None, "/x", False),
    ("auto", "auto", None, "/usr/bin/nvidia-smi", True), ("auto", "auto", "-1", "/usr/bin/nvidia-smi", False),
    ("auto", "auto", "", "/usr/bin/nvidia-smi", False), ("auto", "auto", "0", None, False),
])
def test_accelerator_in_use(cfg, gpu_jobs, device, visible, smi, want):
    cfg.update(gpu_jobs=gpu_jobs, device=device)
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert jp.accelerator_in_use(cfg, environ=env, which=lambda name: smi) is want
    assert jp.train_gpu("lfm", 1) == 0 and jp.train_gpu("ffm", 1) == 1
