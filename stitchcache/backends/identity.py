"""What defines a model's tokens besides its weights, known without building it.

``model_inputs(backbone, kwargs, checkpoint)`` -> ``{"files": {...}, "versions": {...}}``:

* ``files``: the content digest of every file the family reads to build the network or its
  preprocessing (``"absent"`` where a file the family would read is not there, so adding it later
  changes the identity too):

  - ``open_clip:<model>.json``: that model-config JSON; ``open_clip:<dir>``: its
    ``open_clip_config.json`` (architecture and preprocess_cfg);
  - ``hf:``: ``config.json`` and ``preprocessor_config.json`` of the directory the model and its
    image processor are read from (the weights directory, or the ``arch`` directory / hub snapshot);
  - ``timm:local-dir:<dir>``: its ``config.json``; other ``timm:`` names: none (the architecture and its pretrained_cfg come from timm itself; overlays are
    constructor kwargs, which are part of the keys anyway).

* ``versions``: the packages whose code computes the tokens: torch, torchvision and Pillow
  (decoding, resizing) for every model, plus the model's own library (open_clip also uses timm
  for SigLIP towers). Full version strings: an upgrade re-extracts (see docs/stages/extract.md).

Both the request key (``stitchcache.inputs``, at DAG time) and the store key (``extract``) use this
one function, so they cannot disagree about what matters.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import os
from pathlib import Path

from ..digest import file_digest

BASE_PACKAGES = ("torch", "torchvision", "pillow")
LIBRARY_PACKAGES = {"timm": ("timm",), "open_clip": ("open_clip_torch", "timm"), "hf": ("transformers",)}
HF_FILES = ("config.json", "preprocessor_config.json")


@functools.lru_cache(maxsize=None)
def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def numeric_versions(library: str) -> dict[str, str]:
    """Versions of the packages that compute a ``library`` model's tokens (name -> version)."""
    pkgs = BASE_PACKAGES + LIBRARY_PACKAGES.get(library, ())
    return {p: v for p in pkgs if (v := _version(p)) is not None}


def _digest_or_absent(p: Path) -> str:
    return file_digest(p) if p.is_file() else "absent"


def _open_clip_files(arch: str) -> dict[str, str]:
    p = Path(os.path.expanduser(arch))
    if p.suffix == ".json":
        return {"model_config": file_digest(p) if p.is_file() else f"missing:{p}"}
    if p.is_dir():
        return {"open_clip_config.json": _digest_or_absent(p / "open_clip_config.json")}
    return {}  # a built-in name: its config ships with open_clip (its version is keyed)


def _hf_dir(arch: str, kwargs: dict, checkpoint) -> tuple[Path | None, str | None]:
    """The directory hf_backend reads config / image processor from (mirrors hf_backend.build)."""
    if checkpoint is not None and Path(os.path.expanduser(str(checkpoint))).is_dir():
        return Path(os.path.expanduser(str(checkpoint))), None  # the weights directory
    if kwargs.get("config") is not None:
        return None, None  # built from a config dict (part of the kwargs), processor defaults
    from .hf_backend import _local_dir
    from .weights import WeightsNotFound

    try:
        return _local_dir(arch), None
    except WeightsNotFound as e:
        return None, f"missing:{e}"


def _hf_files(arch: str, kwargs: dict, checkpoint) -> dict[str, str]:
    d, missing = _hf_dir(arch, kwargs, checkpoint)
    if missing:
        return {"dir": missing}
    if d is None:
        return {}
    return {name: _digest_or_absent(d / name) for name in HF_FILES}


def model_inputs(backbone: str, kwargs: dict | None = None, checkpoint=None) -> dict:
    """Files and library versions that define a model's tokens (see the module docstring).

    ``backbone``: 'timm:ARCH' | 'open_clip:ARCH' | 'hf:ARCH' or a registry name (resolved first)."""
    from . import parse_name
    from .registry import is_registered, resolve_model

    kwargs = dict(kwargs or {})
    weights_root = kwargs.pop("weights_root", None)  # as create_backbone takes it
    if is_registered(backbone):
        r = resolve_model({"name": backbone, "checkpoint": checkpoint, "kwargs": kwargs}, weights_root=weights_root,
                          require_weights=False)
        backbone, checkpoint, kwargs = r["name"], r["checkpoint"], dict(r["kwargs"] or {})
    lib, arch = parse_name(backbone)
    if lib == "open_clip":
        files = _open_clip_files(arch)
    elif lib == "hf":
        files = _hf_files(arch, kwargs, checkpoint)
    elif arch.startswith("local-dir:"):  # timm reads config.json (architecture, pretrained_cfg) there
        files = {"config.json": _digest_or_absent(Path(os.path.expanduser(arch[len("local-dir:"):])) / "config.json")}
    else:
        files = {}
    return {"files": files, "versions": numeric_versions(lib)}
