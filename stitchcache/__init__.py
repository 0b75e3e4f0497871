"""stitchcache: model stitching between vision foundation models from a shared feature cache."""
from __future__ import annotations

__version__ = "0.1.0"


def create_backbone(*args, **kwargs):
    from .backends import create_backbone as _create

    return _create(*args, **kwargs)


def open_store(path):
    from .cache import open_store as _open

    return _open(path)


def load_stitched(path, **kwargs):
    from .stitch.model import load_stitched as _load

    return _load(path, **kwargs)


def find_store(config, dataset: str, model: str, split: str, workdir=None):
    """The feature store the workflow made for (dataset, model, split) under ``config`` (results.py)."""
    from .results import find_store as _find

    return _find(config, dataset, model, split, workdir=workdir)


def record_path(config, dataset: str, model: str, split: str, workdir=None):
    from .results import record_path as _record_path

    return _record_path(config, dataset, model, split, workdir=workdir)


def load_tree(path, **kwargs):
    """An exported VFM Stitch Tree as a LLaVA-style vision tower (``stitchcache tree export``)."""
    from .tree.export import load_tree as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "create_backbone", "find_store", "load_stitched", "load_tree", "open_store", "record_path"]
