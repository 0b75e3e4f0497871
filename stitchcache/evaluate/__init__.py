"""Evaluation: linear probes on pooled final tokens, stitched-model export and distances."""
