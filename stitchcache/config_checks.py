"""Cross-checks of a (schema-valid) experiment config that the JSON schema cannot express, run before
any job: by the workflow while it builds the DAG (``workflow/rules/common.smk``, dry runs too) and by
``stitchcache plan``.

``config_errors(cfg)`` returns every problem at once, each a ``ConfigError`` naming the config key and,
for models, the model's config name with its backbone. With ``models=True`` (the default) the stitched
models are built on the ``meta`` device from their library configs (``backends.check``; no weights are
read) so that an unknown architecture or library, a misspelt constructor kwarg, a stitch layer beyond a
model's depth, token grids that differ within a pair, a checkpoint whose tensors do not fit and a
missing HF directory stop the run here, not after extraction. With ``data=True`` the train and val
splits of every stitch dataset that numbers classes by name are opened and their class lists compared.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STITCH_SPLITS = ("train", "val")
NAMED_CLASS_TYPES = ("image_folder", "image_list")  # datasets whose label order comes from names


@dataclass(frozen=True)
class ConfigError:
    key: str  # e.g. "stitch.layers[1]", "models.sup.kwargs"
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigErrors(ValueError):
    def __init__(self, errors: list[ConfigError], source: str = "config"):
        self.errors = list(errors)
        super().__init__(format_errors(self.errors, source))


def format_errors(errors: list[ConfigError], source: str = "config") -> str:
    """One message listing every error (one line each)."""
    if len(errors) == 1:
        return f"config error at {errors[0]}"
    return f"{len(errors)} config errors in {source}:\n" + "\n".join(f"  config error at {e}" for e in errors)


def stitched_models(cfg: dict) -> list[str]:
    """Models that appear in a pair, in config order."""
    used = {name for pair in cfg["stitch"]["pairs"] for name in pair}
    return [name for name in cfg["models"] if name in used]


def stitch_datasets(cfg: dict) -> list[str]:
    st = cfg["stitch"]
    return list(st["datasets"]) if st.get("datasets") else [st["dataset"]]


def schema_errors(cfg, schema_path) -> list[ConfigError]:
    """Every JSON-schema error of ``cfg`` (jsonschema's own messages), keyed by the path it is at."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    out = []
    for e in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path))):
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
        out.append(ConfigError(key or "(top level)", e.message))
    return out


# ---- the config alone -------------------------------------------------------------------------
def _structure_errors(cfg: dict) -> list[ConfigError]:
    from .backends.registry import is_registered, list_models

    out = []
    datasets, models, st = cfg["datasets"], cfg["models"], cfg["stitch"]
    for i, name in enumerate(stitch_datasets(cfg)):
        if name not in datasets:
            out.append(ConfigError(f"stitch.datasets[{i}]", f"unknown dataset {name!r} (datasets: {', '.join(datasets)})"))
            continue
        splits = datasets[name]["splits"]
        for split in STITCH_SPLITS:
            if split not in splits:
                out.append(ConfigError(f"datasets.{name}.splits",
                                       f"the stitch dataset needs a split named {split!r} (has: {', '.join(splits)})"))
    for name, m in models.items():
        if ":" not in m["backbone"] and not is_registered(m["backbone"]):
            out.append(ConfigError(f"models.{name}.backbone",
                                   f"{m['backbone']!r} is neither 'library:architecture' nor a registry model "
                                   f"(registry: {', '.join(list_models())})"))
    for i, pair in enumerate(st["pairs"]):
        for j, name in enumerate(pair):
            if name not in models:
                out.append(ConfigError(f"stitch.pairs[{i}][{j}]", f"unknown model {name!r} (models: {', '.join(models)})"))
    for name, m in models.items():
        pre = m.get("pretrain")
        if pre is None:
            continue
        if m.get("checkpoint") is not None:
            out.append(ConfigError(f"models.{name}.checkpoint", "a model with `pretrain:` gets its checkpoint from the "
                                   "pretrain stage; set checkpoint: null"))
        if pre["dataset"] not in datasets:
            out.append(ConfigError(f"models.{name}.pretrain.dataset",
                                   f"unknown dataset {pre['dataset']!r} (datasets: {', '.join(datasets)})"))
        elif pre.get("split", "pretrain") not in datasets[pre["dataset"]]["splits"]:
            has = ", ".join(datasets[pre["dataset"]]["splits"])
            out.append(ConfigError(f"models.{name}.pretrain.split",
                                   f"dataset {pre['dataset']!r} has no split {pre.get('split', 'pretrain')!r} (has: {has})"))
    wanted = (cfg.get("extract") or {}).get("layers", "all")
    if wanted != "all":
        missing = sorted(set(st.get("layers", [])) - set(wanted))
        if missing:
            out.append(ConfigError("extract.layers", f"stitch layers {missing} are not extracted (extract.layers: {wanted})"))
    return out


# ---- the models, built on the meta device -----------------------------------------------------
def _model_label(name: str, m: dict, spec: dict) -> str:
    """'sup' (timm:vit_small_patch16_224) / 'dinov2' (dinov2-l14 = timm:vit_large_...)."""
    resolved = "" if spec["backbone"] == m["backbone"] else f" = {spec['backbone']}"
    return f"{name!r} ({m['backbone']}{resolved})"


def _model_errors(cfg: dict) -> list[ConfigError]:
    from .backends.check import ModelCheckError, checkpoint_problems, model_facts
    from .backends.registry import check_grids, is_registered
    from .inputs import concrete_model_spec

    out, facts = [], {}
    models, st = cfg["models"], cfg["stitch"]
    for name in stitched_models(cfg):
        m = models[name]
        if ":" not in m["backbone"] and not is_registered(m["backbone"]):
            continue  # reported above
        spec = concrete_model_spec(name, m, weights_root=cfg.get("weights_root"))
        label = _model_label(name, m, spec)
        ckpt = spec.get("checkpoint")
        if spec["backbone"].startswith("hf:") and ckpt is not None and not Path(ckpt).expanduser().exists() \
                and "config" not in (spec.get("kwargs") or {}):
            continue  # an HF model's architecture is in its (missing) directory: reported as a missing input
        try:
            facts[name] = f = model_facts(spec)
        except ModelCheckError as e:
            field = "backbone" if e.field == "checkpoint" and m.get("checkpoint") is None else e.field
            key = f"models.{name}.{field}"
            out.append(ConfigError(key, f"model {label}: {e.message}"))
            continue
        if "pretrain" not in m:
            for problem in checkpoint_problems(spec):
                key = f"models.{name}.checkpoint" if m.get("checkpoint") is not None else f"models.{name}.backbone"
                out.append(ConfigError(key, f"model {label}: {problem}"))
        for i, layer in enumerate(st.get("layers", [])):
            if not 1 <= layer <= f.depth - 1:
                out.append(ConfigError(f"stitch.layers[{i}]", f"layer {layer} is outside 1..{f.depth - 1} for model "
                                       f"{label} (depth {f.depth}, from {f.source})"))
        wanted = (cfg.get("extract") or {}).get("layers", "all")
        if wanted != "all":
            bad = sorted(l for l in wanted if not 0 <= l <= f.depth)
            if bad:
                out.append(ConfigError("extract.layers", f"layers {bad} are outside 0..{f.depth} for model {label} "
                                       f"(depth {f.depth}, from {f.source})"))
    for i, (src, tgt) in enumerate(st["pairs"]):
        if src in facts and tgt in facts:
            try:
                check_grids(facts[src].as_grid_dict(_model_label(src, models[src], {"backbone": models[src]["backbone"]})),
                            facts[tgt].as_grid_dict(_model_label(tgt, models[tgt], {"backbone": models[tgt]["backbone"]})))
            except ValueError as e:
                out.append(ConfigError(f"stitch.pairs[{i}]", f"{str(e)} Set the image size in models.{src}.kwargs or "
                                       f"models.{tgt}.kwargs."))
    return out


# ---- the data ----------------------------------------------------------------------------------
def _class_errors(cfg: dict) -> list[ConfigError]:
    from .data import open_split
    from .data.registry import class_order_advice

    out = []
    for name in stitch_datasets(cfg):
        d = cfg["datasets"].get(name)
        if d is None or d.get("type") not in NAMED_CLASS_TYPES or not all(s in d["splits"] for s in STITCH_SPLITS):
            continue
        entry = {**d, "name": name}
        try:
            tr, va = (open_split(entry, s) for s in STITCH_SPLITS)
        except Exception:  # missing or unreadable data is reported with the missing inputs
            continue
        a, b = list(tr.classes or []), list(va.classes or [])
        if a != b:
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            out.append(ConfigError(f"datasets.{name}.splits", f"train and val number their classes differently "
                                   f"({len(a)} vs {len(b)} classes; train only: {only_a[:5]}, val only: {only_b[:5]}"
                                   f"{', same names in another order' if not only_a and not only_b else ''}): "
                                   f"label i would mean another class in each; {class_order_advice(d['type'])}"))
    return out


def config_errors(cfg: dict, models: bool = True, data: bool = True) -> list[ConfigError]:
    """Every cross-check error of ``cfg`` (schema defaults filled in), in config order."""
    errors = _structure_errors(cfg)  # (the model / data checks skip names that do not resolve)
    if models:
        errors += _model_errors(cfg)
    if data:
        errors += _class_errors(cfg)
    return errors


def check_config(cfg: dict, models: bool = True, data: bool = True, source: str = "config") -> None:
    """Raise ``ConfigErrors`` (all of them in one message) if ``cfg`` has any."""
    errors = config_errors(cfg, models=models, data=data)
    if errors:
        raise ConfigErrors(errors, source)
