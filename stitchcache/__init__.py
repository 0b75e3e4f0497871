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


def load_tree(path, **kwargs):
    """An exported VFM Stitch Tree as a LLaVA-style vision tower (``stitchcache tree export``)."""
    from .tree.export import load_tree as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "create_backbone", "load_stitched", "load_tree", "open_store"]
