"""`stitchcache plan` computes storage from the models' real shapes before any work."""
from pathlib import Path

from stitchcache.plan import load_config, plan

TINY = Path(__file__).parent / "data" / "tiny.yaml"


def test_plan_bytes_follow_model_shapes():
    cfg = load_config(TINY)
    p = plan(cfg, do_measure=True)
    sup = cfg["models"]["sup"]["kwargs"]
    grid = (sup["img_size"] // sup["patch_size"]) ** 2
    per_layer = (grid + 1) * sup["embed_dim"] * 2  # CLS + grid tokens, float16
    row = next(r for r in p["rows"] if r["model"] == "sup" and r["split"] == "train")
    assert row["bytes_per_layer_image"] == per_layer
    assert row["bytes_per_image"] == per_layer * (sup["depth"] + 2)  # h_0..h_L and final
    assert row["bytes"] == row["bytes_per_image"] * row["images"]
    assert p["feature_bytes"] == sum(r["bytes"] for r in p["rows"])
    assert all(r["images_per_s"] > 0 for r in p["rows"])
    pairs = len(cfg["stitch"]["pairs"]) + 2  # + S->S and T->T controls
    assert p["stitch_jobs"] == pairs * len(cfg["stitch"]["layers"]) * len(cfg["stitch"]["methods"])
