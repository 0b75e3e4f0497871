"""What a tree costs: the paper's analytic model (Table 11) and measurements of the user's models.

Analytic (paper, Appendix B.5.1): with n VFMs of one depth L' (the layer the features are taken
from: 23 for a 24-block ViT-L whose second-last layer feeds the MLLM), running one VFM costs L'
blocks; "Full" adds (n - 1) * L' blocks (+ (n-1) * 100 %); VST-k adds the (n - 1) branch tails of
L' - k blocks: + (n - 1) * (L' - k) / L'. Extended here with the stitch layers' own cost, in blocks:
an MLP stitch D -> H -> D costs 2 * 2 * D * H FLOPs per token against a block's
2 * (4 D^2 + 2 * r * D^2) + 4 * T * D (qkv + proj, MLP of ratio r, attention scores and mixing).

Measured (``measure``): FLOPs (torch.utils.flop_counter.FlopCounterMode), parameters the forward
uses, peak memory of activations and latency of one VFM, Full (every VFM end to end on its own
input) and the tree, for the models actually configured.
"""
from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .vst import StitchTree, full_tokens

PAPER_DEPTH = 23  # 24-layer ViT-L, features from layer 23
PAPER_POINTS = (6, 14, 22)
PAPER_VFMS = (2, 3, 4, 5)


def vst_extra(n: int, k: int, depth: int = PAPER_DEPTH, stitch_blocks: float = 0.0) -> float:
    """Extra backbone cost of VST-k with n VFMs relative to one VFM, as a fraction (0.39 = 39 %)."""
    if not 0 <= k <= depth:
        raise ValueError(f"split point k={k} is outside 0..{depth}")
    return (n - 1) * ((depth - k) + stitch_blocks) / depth


def full_extra(n: int) -> float:
    return float(n - 1)


def block_flops(width: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs of one ViT block on one image (a multiply-add = 2 FLOPs)."""
    d = width
    return tokens * (2 * 4 * d * d + 2 * 2 * mlp_ratio * d * d) + 2 * 2 * tokens * tokens * d


def stitch_flops(kind: str, d_in: int, d_out: int, tokens: int, hidden: int | None = None) -> float:
    if kind in ("linear", "linear_lstsq"):
        return tokens * 2 * d_in * d_out
    if kind == "mlp":
        h = hidden or d_out
        return tokens * 2 * (d_in * h + h * d_out)
    if kind == "lora":  # a copy of a source block (+ adapters, negligible) + the width projection
        return block_flops(d_in, tokens) + (0 if d_in == d_out else tokens * 2 * d_in * d_out)
    raise ValueError(f"unknown stitch kind {kind!r}")


def analytic_table(vfms=PAPER_VFMS, points=PAPER_POINTS, depth: int = PAPER_DEPTH, stitch: str | None = "mlp",
                   width: int = 1024, tokens: int = 257) -> list[dict]:
    """Table 11 rows: extra cost in % of one VFM; ``*_stitch`` columns add the stitches' cost
    (``stitch`` kind at ``width`` / ``tokens``: ViT-L/14 at 224 px by default)."""
    s = stitch_flops(stitch, width, width, tokens) / block_flops(width, tokens) if stitch else 0.0
    rows = []
    for n in vfms:
        row = {"vfms": n, "full": 100 * full_extra(n)}
        for k in points:
            row[f"vst{k}"] = 100 * vst_extra(n, k, depth)
            row[f"vst{k}_stitch"] = 100 * vst_extra(n, k, depth, s)
        rows.append(row)
    return rows


def analytic_markdown(rows: list[dict], points=PAPER_POINTS, depth: int = PAPER_DEPTH, stitch: str | None = "mlp") -> str:
    head = ["VFMs", "Full"] + [f"VST-{k}" for k in points]
    lines = [f"Extra backbone cost vs one VFM ({depth}-layer depth; in brackets with the {stitch} stitches)"
             if stitch else f"Extra backbone cost vs one VFM ({depth}-layer depth)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["vfms"]), f"{r['full']:.0f}%"]
        for k in points:
            cells.append(f"{r[f'vst{k}']:.1f}%" + (f" ({r[f'vst{k}_stitch']:.1f}%)" if stitch else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- measured ---------------------------------------------------------------------------------

def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, plus the CPU attention kernel: torch 2.14 counts 0 FLOPs for
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention``
    runs on a CPU), which would hide the attention's T^2 cost; it gets the flash-attention formula."""
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


class _PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors created inside (activations), freed when their last reference goes:
    CPU peak memory without an allocator hook. On CUDA, ``measure`` uses the allocator's counters."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _release(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in self._seen and st.nbytes():
                    self._seen.add(key)
                    self.live += st.nbytes()
                    weakref.finalize(t, self._release, key, st.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _used_params(fn, modules) -> int:
    """Parameters the forward really uses (those that receive a gradient)."""
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        out = fn()
        out = torch.cat([o.flatten() for o in (out if isinstance(out, (list, tuple)) else [out])])
        grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return sum(p.numel() for p, g in zip(params, grads) if g is not None)


def _profile(fn, modules, device, repeats: int) -> dict:
    with torch.no_grad():
        fn()  # warm-up
        with flop_counter() as fc:
            fn()
        flops = fc.get_total_flops()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with _PeakMemory() as pm:
                fn()
            peak = pm.peak
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return {"flops": flops, "params": _used_params(fn, modules), "peak_bytes": int(peak),
            "latency_s": statistics.median(times)}


def measure(tree: StitchTree, batch_size: int = 2, repeats: int = 5, device=None) -> dict:
    """One VFM (the trunk alone, to its selected layer) vs Full vs this tree, for one batch of
    random images at each model's own resolution (the tree feeds every branch the trunk's image)."""
    device = torch.device(device or "cpu")
    tree = tree.to(device).eval()
    models = {n: tree.model(n) for n in tree.names}
    g = torch.Generator().manual_seed(0)
    px = {n: torch.randn(batch_size, tree.trunk.preprocess.channels, *m.image_size, generator=g).to(device)
          for n, m in models.items()}
    trunk_px = px[tree.trunk_name]
    opts = tree.options
    rows = {
        "single": _profile(lambda: full_tokens({tree.trunk_name: tree.trunk}, px, opts), [tree.trunk], device, repeats),
        "full": _profile(lambda: full_tokens(models, px, opts), list(models.values()), device, repeats),
        "vst": _profile(lambda: tree.branch_tokens(tree.trunk_tokens(trunk_px)), [tree], device, repeats),
    }
    one = rows["single"]
    for r in rows.values():
        r.update({f"{m}_ratio": r[m] / one[m] if one[m] else None for m in ("flops", "params", "peak_bytes", "latency_s")})
    return {"k": tree.k, "vfms": len(tree.names), "names": tree.names, "layers": tree.layers, "batch_size": batch_size,
            "device": str(device), "configs": rows,
            "analytic_extra": vst_extra(len(tree.names), tree.k, tree.layers[tree.trunk_name]),
            "measured_extra_flops": rows["vst"]["flops"] / one["flops"] - 1,
            "full_measured_extra_flops": rows["full"]["flops"] / one["flops"] - 1}


def measured_markdown(results: list[dict]) -> str:
    lines = ["| tree | config | GFLOPs/img | x one VFM | params used (M) | peak act. MB | latency ms |",
             "|---|---|---|---|---|---|---|"]
    for m in results:
        label = f"VST-{m['k']} ({' + '.join(m['names'])})"
        for name, r in m["configs"].items():
            cfg = {"single": f"one VFM ({m['names'][0]})", "full": "Full", "vst": f"VST-{m['k']}"}[name]
            lines.append(f"| {label} | {cfg} | {r['flops'] / m['batch_size'] / 1e9:.4g} | {r['flops_ratio']:.3f} | "
                         f"{r['params'] / 1e6:.4g} | {r['peak_bytes'] / 2**20:.4g} | {1e3 * r['latency_s']:.3g} |")
    return "\n".join(lines) + "\n"
