"""Stitch layers, the stitched model, and the training losses."""
