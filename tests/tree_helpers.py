"""Tiny random-init backbones and hand-written stitch checkpoints for the VST tests."""
import torch

from conftest import tiny_vit
from stitchcache.backends import backbone_from_spec
from stitchcache.stitch.layers import Stitch, make_stitch_config
from stitchcache.stitch.model import save_checkpoint

# five different tiny ViTs on one 8x8 grid (widths, resolutions and prefixes differ)
MODELS = {
    "a": tiny_vit(width=32),
    "b": tiny_vit(width=48, img=64, patch=8),
    "c": tiny_vit(width=24, img=16, patch=2, class_token=False, global_pool="avg"),
    "d": tiny_vit(width=32, depth=4, reg_tokens=2),
    "e": tiny_vit(width=40, img=56, patch=7),
}


def backbone(name):
    return backbone_from_spec({"name": MODELS[name]["backbone"], "kwargs": MODELS[name]["kwargs"]})


def write_stitch(path, src: str, tgt: str, k: int, kind: str = "mlp", identity: bool = False, seed: int = 0):
    """A stitch checkpoint as the train stage writes it (random stitch weights, or an identity linear)."""
    s, t = backbone(src), backbone(tgt)
    sf, tf = s.describe(), t.describe()
    cfg = make_stitch_config("linear" if identity else kind, sf, tf, layer=k)
    if identity:
        cfg["init"] = "identity"
    torch.manual_seed(seed)
    stitch = Stitch(cfg, source=s)
    spec = {"source": s.spec, "target": t.spec, "source_facts": sf, "target_facts": tf, "layer": k,
            "stitch": cfg, "method": "ffm", "head": None, "dataset": "toy", "source_name": src, "target_name": tgt}
    save_checkpoint(path, spec, stitch, None, {"lr": 1e-3, "epochs": 1, "seed": 0, "train_seconds": 0.0})
    return path
