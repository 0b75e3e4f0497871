"""Downstream tasks: the head, loss and metric of classification and of semantic segmentation.

classification  labels (N,) int64.  Head (``Head``): linear on pooled final tokens.
                Loss: cross-entropy. Metric: ``accuracy``.
segmentation    labels (N, H, W) uint8 masks at the model's input size, ``ignore_index`` (255) for
                unlabelled pixels. Head (``SegHead``): one linear map per patch token (prefix tokens
                dropped) -> logit map on the token grid (C, h, w) -> bilinear upsampling
                (align_corners=False) to the mask size -> per-pixel cross-entropy over the labelled
                pixels. Metric: ``miou``: a confusion matrix accumulated over the whole validation
                split (streamed in batches); IoU_c = TP / (TP + FP + FN) for every class present in
                the ground truth or the prediction (union > 0); mIoU = their mean. Pixel accuracy is
                reported beside it.

A feature store says which task it holds in its attributes (``task``, ``num_classes``,
``ignore_index``); stores written before these existed are classification.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache.loader import iter_batches, pool_tokens
from .data.base import CLASSIFICATION, IGNORE_INDEX, SEGMENTATION

TASKS = (CLASSIFICATION, SEGMENTATION)
METRIC = {CLASSIFICATION: "accuracy", SEGMENTATION: "miou"}
# images per upsampled-logit computation at evaluation (B x C x H x W float32 at a time)
EVAL_UPSAMPLE_CHUNK = 8


def task_info(attrs: dict) -> dict:
    """{"task", "num_classes", "ignore_index", "metric"} from store attributes or a feature record."""
    task = attrs.get("task") or CLASSIFICATION
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    ignore = attrs.get("ignore_index")
    if task == SEGMENTATION and ignore is None:
        ignore = IGNORE_INDEX
    return {"task": task, "num_classes": attrs.get("num_classes"), "ignore_index": ignore, "metric": METRIC[task]}


def store_grid(store, num_prefix: int | None = None) -> tuple[int, int]:
    """The token grid (h, w) of a feature store: from its model facts or its ``grid`` attribute."""
    a = store.attrs
    grid = a.get("grid") or (a.get("model") or {}).get("grid")
    if grid:
        return int(grid[0]), int(grid[1])
    raise ValueError(f"feature store {store.path} records no token grid (attribute `grid` or `model.grid`); "
                     "a segmentation head needs it")


class Head(nn.Module):
    """Linear classifier on pooled final tokens (TLT's head; also the linear probe)."""

    def __init__(self, width: int, num_classes: int, num_prefix: int, pool: str = "mean"):
        super().__init__()
        self.config = {"width": width, "num_classes": num_classes, "num_prefix": num_prefix, "pool": pool}
        self.fc = nn.Linear(width, num_classes)

    def forward(self, z):  # (B, T, D) -> (B, C)
        return self.fc(pool_tokens(z, self.config["num_prefix"], self.config["pool"]))


class SegHead(nn.Module):
    """Per-patch linear head: final tokens (B, T, D) -> logits on the token grid (B, C, h, w)."""

    def __init__(self, width: int, num_classes: int, num_prefix: int, grid, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        grid = [int(grid[0]), int(grid[1])]
        self.config = {"task": SEGMENTATION, "width": int(width), "num_classes": int(num_classes),
                       "num_prefix": int(num_prefix), "grid": grid, "ignore_index": int(ignore_index)}
        self.fc = nn.Linear(width, num_classes)

    def forward(self, z):
        p = self.config["num_prefix"]
        h, w = self.config["grid"]
        tokens = z[:, p:]
        if tokens.shape[1] != h * w:
            raise ValueError(f"segmentation head: {tokens.shape[1]} patch tokens after dropping {p} prefix "
                             f"tokens, but the grid is {h}x{w}")
        logits = self.fc(tokens)  # (B, h*w, C), row-major over the grid like the patch tokens
        return logits.transpose(1, 2).reshape(z.shape[0], -1, h, w)


class Standardized(nn.Module):
    """A head on standardised tokens ((z - mean) / std per channel; the probe's fixed statistics)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, head: nn.Module):
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(1, 1, -1))
        self.register_buffer("std", std.float().reshape(1, 1, -1))
        self.head = head

    def forward(self, z):
        return self.head((z - self.mean) / self.std)


def make_head(cfg: dict) -> nn.Module:
    """The TLT head of a checkpoint's ``spec["head"]`` (classification configs carry no ``task``)."""
    if cfg.get("task", CLASSIFICATION) == SEGMENTATION:
        return SegHead(cfg["width"], cfg["num_classes"], cfg["num_prefix"], cfg["grid"],
                       cfg.get("ignore_index", IGNORE_INDEX))
    return Head(cfg["width"], cfg["num_classes"], cfg["num_prefix"], cfg.get("pool", "mean"))


def head_config(info: dict, target_facts: dict, pool: str = "mean") -> dict:
    """The TLT head's config for a task (``info``: ``task_info`` of the training store)."""
    cfg = {"width": int(target_facts["width"]), "num_classes": int(info["num_classes"]),
           "num_prefix": int(target_facts["num_prefix_tokens"])}
    if info["task"] == SEGMENTATION:
        return {**cfg, "task": SEGMENTATION, "grid": [int(g) for g in target_facts["grid"]],
                "ignore_index": int(info["ignore_index"])}
    return {**cfg, "pool": pool}


# ---- losses -----------------------------------------------------------------------------------
def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, C, h, w) grid logits -> (B, C, H, W), bilinear, align_corners=False, float32."""
    return F.interpolate(logits.float(), size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def seg_loss(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX,
             reduction: str = "mean") -> torch.Tensor:
    """Per-pixel cross-entropy of grid logits upsampled to the masks' size, labelled pixels only.
    ``mean``: over the labelled pixels of the batch (0 when there are none); ``sum``: their sum."""
    masks = masks.long()
    total = F.cross_entropy(upsample(logits, masks.shape[-2:]), masks, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (masks != ignore_index).sum().clamp_min(1)


def head_loss(head: nn.Module, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task loss of ``head`` on final tokens ``z``: CE (classification) or per-pixel CE."""
    if isinstance(head, SegHead) or (isinstance(head, Standardized) and isinstance(head.head, SegHead)):
        h = head.head if isinstance(head, Standardized) else head
        return seg_loss(head(z), labels, h.config["ignore_index"])
    return F.cross_entropy(head(z), labels)


def tlt_loss(tail, head, h_src, labels):
    """Task loss training: the task loss of the head on the stitched final tokens."""
    return head_loss(head, tail(h_src), labels)


# ---- metrics ----------------------------------------------------------------------------------
class Confusion:
    """A (C, C) confusion matrix (rows: ground truth, columns: prediction) over labelled pixels."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device=None):
        self.c, self.ignore = int(num_classes), int(ignore_index)
        self.m = torch.zeros(self.c * self.c, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        gt = gt.to(self.m.device).long().reshape(-1)
        pred = pred.to(self.m.device).long().reshape(-1)
        keep = gt != self.ignore
        gt, pred = gt[keep], pred[keep]
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.c):
            raise ValueError(f"mask label {int(gt.max())} outside 0..{self.c - 1} (ignore index {self.ignore})")
        self.m += torch.bincount(gt * self.c + pred, minlength=self.c * self.c)

    def result(self) -> dict:
        m = self.m.reshape(self.c, self.c).double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        total = m.sum()
        return {"miou": float(iou.mean()) if present.any() else float("nan"),
                "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
                "classes_present": int(present.sum()), "pixels": int(total)}


def predict_masks(logits: torch.Tensor, size, chunk: int = EVAL_UPSAMPLE_CHUNK) -> torch.Tensor:
    """Argmax class per pixel of grid logits upsampled to ``size``, a few images at a time."""
    return torch.cat([upsample(logits[i:i + chunk], size).argmax(1) for i in range(0, len(logits), chunk)])


@torch.no_grad()
def head_metrics(head: nn.Module, batches, device, info: dict, per_image: bool = False) -> dict:
    """The task metric of ``head`` over ``batches`` of (final tokens, labels), streamed:
    {"metric", "score", "accuracy"} or {"metric", "score", "miou", "pixel_acc", "classes_present"}.
    ``per_image``: also "per_image": {"pred": (N,) int64} (classification) or {"miou", "pixel_acc":
    (N,) float64, each image's own confusion matrix; NaN for an image without labelled pixels}."""
    head.eval()
    rows = {}
    if info["task"] == SEGMENTATION:
        conf = Confusion(info["num_classes"], info["ignore_index"], device)
        for z, y in batches:
            logits = head(z.to(device))
            pred = predict_masks(logits, y.shape[-2:])
            conf.update(pred, y)
            if per_image:
                for p1, y1 in zip(pred, y):
                    c = Confusion(info["num_classes"], info["ignore_index"], device)
                    c.update(p1, y1)
                    r1 = c.result()
                    rows.setdefault("miou", []).append(r1["miou"])
                    rows.setdefault("pixel_acc", []).append(r1["pixel_acc"])
        r = conf.result()
        out = {"metric": "miou", "score": r["miou"], **r}
    else:
        correct, n = 0, 0
        for z, y in batches:
            pred = head(z.to(device)).argmax(1).cpu()
            correct += (pred == y).sum().item()
            n += len(y)
            if per_image:
                rows.setdefault("pred", []).append(pred.numpy().astype(np.int64))
        acc = correct / max(n, 1)
        out = {"metric": "accuracy", "score": acc, "accuracy": acc}
    if per_image:
        out["per_image"] = {k: (np.concatenate(v) if k == "pred" else np.asarray(v, dtype=np.float64))
                            for k, v in rows.items()}
    return out


def channel_stats(array, num_prefix: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over every patch token of a (N, T, D) token array, streamed."""
    s = s2 = None
    n = 0
    for (z,) in iter_batches([array], batch_size):
        p = z[:, num_prefix:].reshape(-1, z.shape[-1]).double()
        s = p.sum(0) if s is None else s + p.sum(0)
        s2 = (p * p).sum(0) if s2 is None else s2 + (p * p).sum(0)
        n += p.shape[0]
    if not n:
        raise ValueError("channel_stats: empty token array")
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


def check_same_classes(train_attrs: dict, val_attrs: dict, what: str) -> None:
    """Train and val label indices must mean the same classes (where the stores record names)."""
    from .data.registry import class_order_advice

    a, b = train_attrs.get("classes"), val_attrs.get("classes")
    if a is not None and b is not None and list(a) != list(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"{what}: the train and val splits number their classes differently "
                         f"(train only: {only_a[:5]}, val only: {only_b[:5]}, {len(a)} vs {len(b)} classes); "
                         + class_order_advice(None))  # stores do not record the dataset type
