"""VFM Stitch Tree (VST): a shared trunk up to layer k, one branch per VFM behind its stitch.

vst.py      the module (StitchTree), fusion, building from stitch checkpoints
cost.py     the paper's analytic cost table (Table 11) + measured FLOPs, params, memory, latency
export.py   one self-contained artefact; ``load_tree(path)``: a LLaVA-style vision tower
evaluate.py probes of fused cached features: single vs VST-k vs Full, normalized gain (Table 12)
plan.py     the best tree within a cost budget
cli.py      ``stitchcache tree cost | export | evaluate | report | plan``
"""
from .vst import FUSIONS, StitchTree, TreeError, TreeOptions, full_tokens, fuse, tree_from_checkpoints

__all__ = ["FUSIONS", "StitchTree", "TreeError", "TreeOptions", "full_tokens", "fuse", "tree_from_checkpoints"]
