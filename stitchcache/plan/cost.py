"""The cost model of ``stitchcache plan``: reference accelerators (measured numbers only), FLOPs of
a ViT forward and the seconds per image of each kind of work (see the package doc for the formulas).
"""
from __future__ import annotations

ITEMSIZE = {"float16": 2, "float32": 4, "int8": 1}
SCALE_BYTES = {"int8": 4}  # int8 stores add one float32 scale per token
LABEL_BYTES = 8  # classification labels: int64 per image; segmentation: uint8 mask at the input size
ORDER_BYTES = 8  # the store's row order: int64 per image (docs/stages/extract.md, "Row order")
SEGMENTATION_TYPES = ("ade20k",)  # dataset types whose labels are masks (when the data cannot be opened)
TRAIN_METHODS = ("lfm", "ffm", "tlt", "ffm_tlt")

# Reference accelerators: measured numbers only, each with where it came from. Add a machine by
# adding an entry with the same keys (and measure the same things on it).
REFERENCES: dict[str, dict] = {
    "h100": {
        "device": "NVIDIA H100, bf16 autocast",
        "source": "stitchcache reference measurements on an H100 (design notes, 'Measured reference "
                  "points'): random-weight ViT-L/14, 224 px, bf16, batch 256",
        # the model the numbers were measured on
        "model": {"tokens": 257, "width": 1024, "depth": 24, "mlp_ratio": 4.0, "patch_size": 14,
                  "channels": 3, "grid_cells": 256},
        "forward_img_s": 2026.0,       # plain forward
        "capture_img_s": 2015.0,       # forward capturing all 24 layers on the GPU
        "host_copy_bytes_s": 17.5e9,   # 24 layers copied to pinned host memory: 1385 img/s = 17.5 GB/s
        "write_bytes_s": {"none": 1.3e9,   # NVMe direct write
                          "zstd": 1.2e9,   # zstd-1 Zarr write
                          "blosc": 1.2e9},  # not measured: the zstd number stands in for it
        # FFM step (MLP stitch + frozen target tail fwd+bwd), batch 128, img/s at stitch point l
        "ffm_step_img_s": {2: 878.0, 6: 1070.0, 10: 1360.0, 14: 1890.0, 18: 3115.0, 22: 8247.0},
        "ffm_batch_size": 128,
        # reading cached tokens. NOT an H100 measurement: the in-process reader's warm rate on the
        # development machine (docs/stages/extract.md, 5-6 GB/s; lower end); a cold NVMe can be slower
        "read_bytes_s": 5.0e9,
    },
}



# ---- FLOPs ------------------------------------------------------------------------------------
def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """Matrix-product FLOPs of one ViT block for one image: ``(8 + 4 r) T D^2 + 4 T^2 D``."""
    T, D = tokens, width
    return (8 + 4 * mlp_ratio) * T * D * D + 4 * T * T * D


def forward_flops(shape: dict) -> float:
    """FLOPs of a whole forward for one image: patch embedding + L blocks."""
    embed = 2 * shape["grid_cells"] * shape["channels"] * shape["patch_size"] ** 2 * shape["width"]
    return embed + shape["depth"] * block_flops(shape["tokens"], shape["width"], shape["mlp_ratio"])



# ---- the cost model ----------------------------------------------------------------------------
def ffm_fit(ref: dict) -> dict:
    """Fit ``t(n) = a + b n`` (seconds per image, tail of n blocks) to the reference FFM steps by least
    squares on relative error; returns a, b and each point's measured / fitted img/s and error."""
    import numpy as np

    depth = ref["model"]["depth"]
    pts = sorted(ref["ffm_step_img_s"].items())
    n = np.array([depth - l for l, _ in pts], float)
    rate = np.array([r for _, r in pts], float)
    t = 1.0 / rate
    A = np.stack([np.ones_like(n), n], 1) / t[:, None]  # rows weighted by 1/t: relative error
    (a, b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    fitted = 1.0 / (a + b * n)
    points = [{"layer": l, "tail_blocks": int(k), "img_s": float(r), "fit_img_s": float(f),
               "error": float(f / r - 1)} for (l, r), k, f in zip(pts, n, fitted)]
    return {"a": float(a), "b": float(b), "points": points,
            "max_abs_error": max(abs(p["error"]) for p in points)}


class CostModel:
    """Seconds per image of each kind of work, on the reference accelerator (see the module doc)."""

    def __init__(self, reference: str = "h100"):
        if reference not in REFERENCES:
            raise ValueError(f"unknown reference {reference!r} (known: {', '.join(REFERENCES)})")
        self.name, self.ref = reference, REFERENCES[reference]
        m = dict(self.ref["model"])
        self.ref_shape = m
        self.ref_block = block_flops(m["tokens"], m["width"], m["mlp_ratio"])
        self.ref_forward = forward_flops(m)
        self.ref_volume = m["tokens"] * m["width"]
        self.fit = ffm_fit(self.ref)
        self.a, self.b = self.fit["a"], self.fit["b"]
        self.fwd_per_flop = 1.0 / (self.ref["forward_img_s"] * self.ref_forward)
        self.capture_per_flop = 1.0 / (self.ref["capture_img_s"] * self.ref_forward)
        self.fb_per_flop = self.b / self.ref_block  # frozen block fwd+bwd, seconds per forward FLOP
        self.fwd_ratio = self.fwd_per_flop / self.fb_per_flop  # forward / (fwd+bwd) of a block, ~0.40
        self.read = self.ref["read_bytes_s"]
        self.copy = self.ref["host_copy_bytes_s"]

    def write_rate(self, compressor: str) -> float:
        return self.ref["write_bytes_s"].get(compressor or "none", self.ref["write_bytes_s"]["none"])

    def capture(self, shape: dict) -> float:
        return shape["forward_flops"] * self.capture_per_flop

    def forward(self, shape: dict) -> float:
        return shape["forward_flops"] * self.fwd_per_flop

    def step(self, tgt: dict, tail_blocks: int, extra_flops: float = 0.0) -> float:
        """Stitch + ``tail_blocks`` frozen target blocks, forward and backward (one image)."""
        over = self.a * tgt["tokens"] * tgt["width"] / self.ref_volume
        return over + (tail_blocks * tgt["block_flops"] + extra_flops) * self.fb_per_flop

    def step_forward(self, tgt: dict, tail_blocks: int, extra_flops: float = 0.0) -> float:
        """The same, forward only (validation passes, export)."""
        over = self.a * self.fwd_ratio * tgt["tokens"] * tgt["width"] / self.ref_volume
        return over + (tail_blocks * tgt["block_flops"] + extra_flops) * self.fwd_per_flop


def _bound(**seconds) -> tuple[float, str]:
    name = max(seconds, key=seconds.get)
    return seconds[name], name

