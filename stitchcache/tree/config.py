"""The workflow's ``tree:`` config section: defaults and the checks the schema cannot express.

``tree.trees.<name>``: trunk (a model), branches (other models, 1..4), layers (split points k;
default: every stitch point), stitch (the stitch layer choice; default mlp), method (default ffm),
datasets (default: the classification datasets of ``stitch.datasets``), fusion, select_layer,
select_feature, final_norm (see vst.py). A tree uses the stitches trunk -> branch that the stitch
stage trains, so each (trunk, branch) must be a configured pair and every k a stitch point.
"""
from __future__ import annotations

TREE_DEFAULTS = {"stitch": "mlp", "method": "ffm", "fusion": "concat", "select_layer": -1,
                 "select_feature": "patch", "final_norm": "auto"}
SEGMENTATION_TYPES = ("ade20k",)


def resolve_trees(cfg: dict) -> dict[str, dict]:
    """name -> the tree's settings with defaults filled in."""
    st = cfg["stitch"]
    # (unknown dataset names are left to the config checks, which name the key)
    classification = [d for d in st["datasets"]
                      if d in cfg["datasets"] and cfg["datasets"][d]["type"] not in SEGMENTATION_TYPES]
    out = {}
    for name, t in ((cfg.get("tree") or {}).get("trees") or {}).items():
        out[name] = {**TREE_DEFAULTS, "layers": list(st["layers"]), "datasets": classification, **t,
                     "branches": list(t["branches"])}
    return out


def check_trees(cfg: dict) -> list[tuple[str, str]]:
    """(config key, message) for every problem; empty when the trees can be built."""
    errors = []
    st, models = cfg["stitch"], cfg["models"]
    pairs = {tuple(p) for p in st["pairs"]}
    for name, t in resolve_trees(cfg).items():
        key = f"tree.trees.{name}"
        if t["trunk"] not in models:
            errors.append((f"{key}.trunk", f"unknown model {t['trunk']!r} (models: {', '.join(models)})"))
        if not 1 <= len(t["branches"]) <= 4:
            errors.append((f"{key}.branches", f"a tree has 2 to 5 VFMs: 1 to 4 branches, got {len(t['branches'])}"))
        if len(set(t["branches"])) != len(t["branches"]):
            errors.append((f"{key}.branches", "a model appears twice"))
        for i, b in enumerate(t["branches"]):
            if b not in models:
                errors.append((f"{key}.branches[{i}]", f"unknown model {b!r} (models: {', '.join(models)})"))
            elif b == t["trunk"]:
                errors.append((f"{key}.branches[{i}]", f"{b!r} is the trunk (its own tail is always a branch)"))
            elif (t["trunk"], b) not in pairs:
                errors.append((f"{key}.branches[{i}]", f"no stitch {t['trunk']} -> {b} is trained: add "
                               f"[{t['trunk']}, {b}] to stitch.pairs"))
        for i, k in enumerate(t["layers"]):
            if k not in st["layers"]:
                errors.append((f"{key}.layers[{i}]", f"split point {k} is not a stitch point (stitch.layers: "
                               f"{st['layers']})"))
        if t["stitch"] not in st["stitch_layers"]:
            errors.append((f"{key}.stitch", f"{t['stitch']!r} is not trained (stitch.stitch_layers: "
                           f"{st['stitch_layers']})"))
        if t["method"] not in st["methods"]:
            errors.append((f"{key}.method", f"{t['method']!r} is not trained (stitch.methods: {st['methods']})"))
        for i, d in enumerate(t["datasets"]):
            if d not in st["datasets"]:
                errors.append((f"{key}.datasets[{i}]", f"{d!r} is not a stitch dataset (stitch.datasets: "
                               f"{st['datasets']})"))
            elif cfg["datasets"][d]["type"] in SEGMENTATION_TYPES:
                errors.append((f"{key}.datasets[{i}]", f"{d!r} is a segmentation dataset; the tree probe is a "
                               "classification probe"))
        if not t["datasets"]:
            errors.append((f"{key}.datasets", "no classification dataset to evaluate the tree on"))
    return errors
