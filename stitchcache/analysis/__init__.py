"""Analyses from the feature cache and the per-image predictions (docs/stages/analysis.md):
Table 10 (``predictions``) and the layer x layer linear-CKA atlas (``cka``, ``atlas``)."""
