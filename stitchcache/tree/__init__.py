"""VFM Stitch Tree (VST): a shared trunk up to layer k, one branch per VFM behind its stitch.

vst.py      the module (StitchTree), fusion, building from stitch checkpoints
cost.py     the paper's analytic cost table (Table 11) + measured FLOPs, params, memory, latency
export.py   one self-contained artefact; ``load_tree(path)``: a LLaVA-style vision tower
evaluate.py probes of fused cached features: single vs VST-k vs Full, normalized gain (Table 12)
plan.py     the best tree within a cost budget
cli.py      ``stitchcache tree cost | export | evaluate | report | plan``
"""
import importlib

__all__ = ["FUSIONS", "StitchTree", "TreeError", "TreeOptions", "full_tokens", "fuse", "tree_from_checkpoints"]


def __getattr__(name: str):
    # vst.py is an nn.Module (torch): imported on first use, so the workflow's DAG build, which reads
    # tree.config, starts without torch (issue 15)
    if name in __all__:
        return getattr(importlib.import_module(".vst", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
