"""`stitchcache plan`: storage from the models' real shapes, GPU-time estimates scaled from a reference
accelerator, several stitch datasets and registry models, all before any work (no weights, no data)."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_vit

from stitchcache.plan import (REFERENCES, CostModel, build_random_init, ffm_fit, forward_flops, load_config,
                              model_shape, plan)

TINY = Path(__file__).parent / "data" / "tiny.yaml"
TOL = 1e-9


def test_plan_bytes_follow_model_shapes():
    cfg = load_config(TINY)
    p = plan(cfg, do_measure=True)
    sup = cfg["models"]["sup"]["kwargs"]
    grid = (sup["img_size"] // sup["patch_size"]) ** 2
    per_layer = (grid + 1) * sup["embed_dim"] * 2  # CLS + grid tokens, float16
    row = next(r for r in p["rows"] if r["model"] == "sup" and r["split"] == "train")
    assert row["bytes_per_layer_image"] == per_layer
    assert row["bytes_per_image"] == per_layer * (sup["depth"] + 2) + 8 + 8  # h_0..h_L and final, int64 label, int64 row order
    assert row["bytes"] == row["bytes_per_image"] * row["images"]
    assert p["feature_bytes"] == sum(r["bytes"] for r in p["rows"])
    assert all(r["images_per_s"] > 0 for r in p["rows"])
    pairs = len(cfg["stitch"]["pairs"]) + 2  # + S->S and T->T controls
    grid_jobs = pairs * len(cfg["stitch"]["layers"]) * len(cfg["stitch"]["stitch_layers"]) * len(cfg["stitch"]["methods"])
    assert p["stitch_jobs"] == grid_jobs
    assert p["jobs"]["train"] == p["jobs"]["evaluate"] == grid_jobs
    assert p["jobs"]["extract"] == 2 * 2 and p["jobs"]["probe"] == 2 and p["jobs"]["pretrain"] == 2


# ---- storage against a real store ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_store_bytes_match_a_real_store(tmp_path, image_folder, dtype):
    """Token arrays (uncompressed) take exactly the planned bytes on disk; labels and scales their raw size."""
    import zarr

    from stitchcache.extract import extract

    spec = tiny_vit(width=24, img=20, patch=4, depth=2)
    rec = extract({"name": "a", **spec}, image_folder, "train", tmp_path / "cache",
                  {"chunk_size": 16, "num_workers": 0, "device": "cpu", "dtype": dtype})  # 48 = 3 whole chunks
    store = Path(rec["store"])
    group = zarr.open_group(str(store), mode="r")
    arrays = [d for d in store.iterdir() if d.is_dir() and d.name not in ("labels", "order", "progress")]
    tokens = [d for d in arrays if not d.name.endswith("_scale")]
    assert {d.name for d in tokens} == {"layer_00", "layer_01", "layer_02", "final"}
    on_disk = sum(f.stat().st_size for d in tokens for f in d.rglob("*") if f.is_file() and f.name != "zarr.json")
    # labels, the row order and int8 scales are small and zarr compresses them: the plan counts their raw size
    labels = group["labels"].nbytes + group["order"].nbytes + sum(group[d.name].nbytes for d in arrays if d.name.endswith("_scale"))
    assert (len(arrays) - len(tokens)) == (4 if dtype == "int8" else 0)
    cfg = {"datasets": {"toy": {k: v for k, v in image_folder.items() if k != "name"}},
           "models": {"a": spec}, "extract": {"dtype": dtype, "compressor": "none"},
           "stitch": {"datasets": ["toy"], "pairs": [["a", "a"]], "layers": [1]}}
    p = plan(cfg, do_measure=False)
    row = next(r for r in p["rows"] if r["split"] == "train")
    assert row["images"] == 48 and row["layers"] == 4  # h_0, h_1, h_2 and final
    assert row["bytes"] == on_disk + labels


# ---- FLOPs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"mlp_ratio": 2.0}, {"reg_tokens": 4}, {"class_token": False, "global_pool": "avg"}])
def test_flops_formula_matches_a_direct_count(extra):
    """(8 + 4r) T D^2 + 4 T^2 D per block + the patch projection == torch's own count of a forward."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = tiny_vit(width=32, img=20, patch=4, depth=3, **extra)
    bb = build_random_init("t", spec, meta=False)
    for m in bb.modules():  # explicit q k^T and attn v matmuls: CPU fused attention is not counted by torch
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    shape = model_shape(bb)
    assert shape["mlp_ratio"] == extra.get("mlp_ratio", 4.0)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bb.forward_layers(torch.randn(1, 3, 20, 20), [bb.depth])
    assert shape["forward_flops"] == fc.get_total_flops()
    # the shapes do not depend on where the parameters live: meta (no memory) == a real init
    meta = build_random_init("t", spec, meta=True)
    assert next(meta.parameters()).device.type == "meta"
    assert model_shape(meta) == shape


def test_meta_build_falls_back_to_a_real_random_init(monkeypatch):
    import stitchcache.backends.check as check

    def refuses_meta(*a, **k):
        raise NotImplementedError("Cannot copy out of meta tensor")

    monkeypatch.setattr(check, "_build_meta", refuses_meta)
    check._facts.cache_clear()  # the meta builds are memoised per spec
    try:
        bb = build_random_init("t", tiny_vit(), meta=True)
        assert next(bb.parameters()).device.type == "cpu"
    finally:
        check._facts.cache_clear()


# ---- the reference and the FFM fit ---------------------------------------------------------------------
def test_ffm_fit_reproduces_the_reference_points():
    ref = REFERENCES["h100"]
    fit = ffm_fit(ref)
    assert [p["layer"] for p in fit["points"]] == sorted(ref["ffm_step_img_s"])
    for pt in fit["points"]:
        assert abs(pt["fit_img_s"] / pt["img_s"] - 1) < 0.02, pt
    assert fit["max_abs_error"] == max(abs(p["error"]) for p in fit["points"]) < 0.02
    # the fit itself: points on an exact line are recovered exactly
    fake = copy.deepcopy(ref)
    fake["ffm_step_img_s"] = {l: 1 / (3e-5 + 6e-5 * (24 - l)) for l in (2, 10, 20)}
    exact = ffm_fit(fake)
    assert exact["a"] == pytest.approx(3e-5, rel=1e-9) and exact["b"] == pytest.approx(6e-5, rel=1e-9)
    # a frozen block's forward is a fraction of its fwd+bwd (about 0.40 here; 1/3..1/2 is physical)
    assert 1 / 3 < CostModel("h100").fwd_ratio < 1 / 2


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="unknown reference"):
        CostModel("tpu")


# ---- configs built here (data absent: sizes from count:) --------------------------------------------
def _cfg(counts: dict, layers=(1,), methods=("lfm", "ffm", "tlt", "ffm_tlt"), stitch_layers=("mlp",), **train):
    datasets = {d: {"type": "image_folder", "root": f"/nonexistent/{d}",
                    "splits": {s: ({"count": n} if n is not None else {}) for s, n in zip(("train", "val"), c)}}
                for d, c in counts.items()}
    return {"datasets": datasets,
            "models": {"a": tiny_vit(width=32, img=16, patch=4, depth=3),
                       "b": tiny_vit(width=48, img=28, patch=7, depth=3)},
            "extract": {"dtype": "float16", "compressor": "none"},
            "stitch": {"datasets": list(counts), "pairs": [["a", "b"]], "self_stitch": True, "layers": list(layers),
                       "stitch_layers": list(stitch_layers), "methods": list(methods)},
            "train": {"max_epochs": 3, "lr_grid": [1e-3], **train}}


def _hours(p):
    g = p["gpu_hours"]
    return {"extract": g["extract"], **{f"train_{m}": v for m, v in g["train"].items()}, "evaluate": g["evaluate"]}


def test_two_datasets_sum_both():
    both = plan(_cfg({"d1": (100, 40), "d2": (30, 20)}), do_measure=False)
    one = plan(_cfg({"d1": (100, 40)}), do_measure=False)
    two = plan(_cfg({"d2": (30, 20)}), do_measure=False)
    assert set(both["datasets"]) == {"d1", "d2"} and {r["dataset"] for r in both["rows"]} == {"d1", "d2"}
    for key in ("feature_bytes", "export_bytes", "checkpoint_bytes", "stitch_jobs"):
        assert both[key] == one[key] + two[key], key
    for k, v in _hours(both).items():
        assert v == pytest.approx(_hours(one)[k] + _hours(two)[k], rel=TOL), k
        assert v > 0, k
    for rule in ("extract", "probe", "train", "evaluate"):
        assert both["jobs"][rule] == one["jobs"][rule] + two["jobs"][rule]
    # the per-dataset breakdown is the single-dataset plan
    assert both["datasets"]["d2"]["feature_bytes"] == two["feature_bytes"]
    assert both["datasets"]["d1"]["images"] == {"train": 100, "val": 40}


def test_estimates_scale_with_images_epochs_and_tail():
    base = plan(_cfg({"d": (100, 40)}), do_measure=False)
    double = plan(_cfg({"d": (200, 80)}), do_measure=False)
    for k, v in _hours(base).items():
        assert _hours(double)[k] == pytest.approx(2 * v, rel=TOL), k
    assert double["feature_bytes"] == 2 * base["feature_bytes"]
    # training is an upper bound of max_epochs x |lr_grid| passes; evaluation does not depend on them
    more = plan(_cfg({"d": (100, 40)}, max_epochs=6, lr_grid=[1e-3, 1e-4]), do_measure=False)
    for m in ("lfm", "ffm", "tlt", "ffm_tlt"):
        assert more["gpu_hours"]["train"][m] == pytest.approx(4 * base["gpu_hours"]["train"][m], rel=TOL)
    assert more["gpu_hours"]["evaluate"] == pytest.approx(base["gpu_hours"]["evaluate"], rel=TOL)
    # a deeper tail (earlier stitch point) costs more; lfm never runs the tail. Tiny models are bound by
    # reading the cache (the tail costs nothing), so this needs ViT-L-sized ones (built on meta: instant)
    def big(layer):
        cfg = _cfg({"d": (100, 40)}, layers=(layer,))
        vit_l = {"backbone": "timm:vit_small_patch16_224",
                 "kwargs": {"img_size": 224, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16}}
        cfg["models"] = {"a": vit_l, "b": vit_l}
        return plan(cfg, do_measure=False)

    early, late = big(2), big(14)
    for m in ("ffm", "tlt", "ffm_tlt"):
        assert early["gpu_hours"]["train"][m] > 1.5 * late["gpu_hours"]["train"][m], m
        assert early["datasets"]["d"]["train_bound"][m] == {"compute": 3}  # a->b, a->a, b->b
    assert early["gpu_hours"]["train"]["lfm"] == pytest.approx(late["gpu_hours"]["train"]["lfm"], rel=TOL)
    assert early["datasets"]["d"]["train_bound"]["lfm"] == {"read": 3}
    assert early["gpu_hours"]["evaluate"] > late["gpu_hours"]["evaluate"]


def test_extraction_time_is_the_slowest_of_compute_copy_and_write():
    p = plan(_cfg({"d": (100, 40)}), do_measure=False)
    cost = CostModel("h100")
    ref = REFERENCES["h100"]
    for r in p["rows"]:
        shape = p["shapes"][r["model"]]
        b = r["bounds_s_per_image"]
        assert b["compute"] == pytest.approx(shape["forward_flops"] / forward_flops(cost.ref_shape) / ref["capture_img_s"])
        assert b["write"] == pytest.approx(r["bytes_per_image"] / ref["write_bytes_s"]["none"])
        assert b["copy"] == pytest.approx((r["bytes_per_image"] - 8 - 8) / ref["host_copy_bytes_s"])  # no label, no order
        assert r["gpu_seconds"] == pytest.approx(r["images"] * max(b.values())) and r["bound"] == max(b, key=b.get)


def test_registry_models_are_planned_without_weights(tmp_path, monkeypatch, capsys):
    """Paper models by registry name: shapes read from a random init built without any weights (on the
    meta device: milliseconds and no memory even for ViT-L); the data is absent, sizes come from count:."""
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("STITCHCACHE_WEIGHTS", str(weights))
    cfg = _cfg({"fmow": (14260, 1612), "ade": (20210, None)}, layers=(2, 22), stitch_layers=("mlp", "lora"))
    cfg["models"] = {"dinov2": {"backbone": "dinov2-l14"}, "siglip2": {"backbone": "siglip2-l16"},
                     "dinov3": {"backbone": "dinov3-l16"}}
    cfg["stitch"]["pairs"] = [["dinov2", "siglip2"], ["dinov3", "dinov2"]]
    p = plan(cfg, do_measure=False)
    assert list(weights.iterdir()) == []  # nothing looked for, nothing written
    tokens = {"dinov2": 257, "siglip2": 256, "dinov3": 261}  # CLS; none; CLS + 4 registers (16 x 16 grid each)
    for name, t in tokens.items():
        s = p["shapes"][name]
        assert (s["tokens"], s["width"], s["depth"], s["mlp_ratio"]) == (t, 1024, 24, 4.0)
        row = next(r for r in p["rows"] if r["model"] == name and r["dataset"] == "fmow" and r["split"] == "train")
        assert row["images"] == 14260 and row["bytes_per_layer_image"] == t * 1024 * 2
        assert row["bytes_per_image"] == t * 1024 * 2 * 26 + 8 + 8  # + label, row order
    # DINOv2-L/14 at 224 px is the reference model: it captures at exactly the reference rate
    d2 = next(r for r in p["rows"] if r["model"] == "dinov2")
    assert 1 / d2["bounds_s_per_image"]["compute"] == pytest.approx(REFERENCES["h100"]["capture_img_s"])
    assert d2["bound"] == "write"  # 26 ViT-L arrays per image: the disk, not the GPU, sets the pace
    # the ade val split: no data, no count -> unknown, counted as 0 and said so
    assert "ade/val" in p["unknown_sizes"]
    assert next(r for r in p["rows"] if r["dataset"] == "ade" and r["split"] == "val")["images"] is None
    from stitchcache.plan import print_plan

    print_plan(p)
    out = capsys.readouterr().out
    assert "ade/val: size unknown" in out and "(+?)" in out


def test_cli_prints_the_summary(tmp_path, capsys):
    from stitchcache.cli import main

    cfg = _cfg({"d1": (100, 40), "d2": (60, None)}, stitch_layers=("mlp", "linear"))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", "--no-measure", "--reference", "h100", "--configfile", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("feature stores", "GPU-h per dataset", "UPPER BOUND", "max_epochs = 3", "jobs per rule: extract 8, "
                 "probe 4, train 48, evaluate 48, table 1, plot 1", "d2/val: size unknown", "max error", "h100"):
        assert text in out, text
    rows = [line.split() for line in out.splitlines() if line.startswith(("d1 ", "d2 "))]
    assert any(r[:3] == ["d2", "a", "val"] and r[3] == "?" for r in rows)
    p = plan(load_config(path), do_measure=False)
    json.dumps(p["gpu_hours"])  # plain numbers
    assert np.isfinite(p["gpu_hours"]["total"]) and p["gpu_hours"]["total"] > 0
