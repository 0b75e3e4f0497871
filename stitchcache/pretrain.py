"""pretrain: train a small ViT for the embedded demo, so the demo has two genuinely different encoders.

Inputs are preprocessed as extraction will store them (``settings["view"]`` = the workflow's
``extract.view``, default shared), so the encoder is probed and stitched on the images it was trained on.

Objectives:
  supervised  cross-entropy of a linear head on mean-pooled final tokens (head discarded afterwards)
  simclr      NT-Xent between two augmented views (random resized crop, flip, brightness / contrast
              jitter, random erasing), projection MLP
              discarded afterwards; no labels used

The result is an ordinary timm state dict (``torch.save``), loaded back through the same
``create_backbone("timm:...", checkpoint=...)`` path a downloaded timm checkpoint takes.
A checkpoint ``<out>.partial`` is written after every epoch; a restarted job resumes from it when it
was written for the same model spec, dataset spec and settings (else it starts from scratch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .backends import create_backbone
from .cache.keys import TOKEN_SETTING_DEFAULTS
from .data import open_split
from .provenance import code_digest, differs, fingerprint
from .runtime import json_arg, log, pick_device, seed_everything, set_threads

OBJECTIVES = ("supervised", "simclr")


class TwoViews:
    """SimCLR-style augmentation: two random views of one image, then the model's own normalisation.

    Random resized crop + flip + brightness / contrast jitter (SimCLR's colour distortion, for grey
    images) + random erasing. Crop + flip alone left the demo's SimCLR encoder below a linear probe
    on the raw pixels; the jitter and erasing lifted its probe by about 6 points (docs/stages/pretrain.md)."""

    def __init__(self, pre):
        from torchvision import transforms as T

        self.t = T.Compose([
            T.Lambda(lambda im: im.convert("RGB") if pre.channels == 3 else im.convert("L")),
            T.RandomResizedCrop(pre.size, scale=(0.35, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
            T.RandomErasing(p=0.5, scale=(0.02, 0.2)),
        ])

    def __call__(self, img):
        return torch.stack([self.t(img), self.t(img)])  # (2, C, H, W)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z: (2B, P) with views i and i+B paired."""
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / temperature
    n = z.shape[0] // 2
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def pretrain(model_spec: dict, dataset_spec: dict, settings: dict, out: Path) -> None:
    objective = settings.get("objective", "supervised")
    if objective not in OBJECTIVES:
        raise SystemExit(f"error: models.{model_spec.get('name')}.pretrain.objective {objective!r} "
                         f"must be one of {OBJECTIVES}")
    seed_everything(int(settings.get("seed", 0)))
    device = pick_device(settings.get("device", "auto"))
    bb = create_backbone(model_spec["backbone"], checkpoint=None, **(model_spec.get("kwargs") or {}))
    bb.model.requires_grad_(True)
    data = open_split(dataset_spec, settings.get("split", "pretrain"))
    width = bb.width
    # the images the encoder will be probed and stitched on: extraction's view (extract.view), not the
    # library's native transform (timm's crop_pct 0.9 would train on 10 %-zoomed images)
    pre = bb.preprocess.for_view(settings.get("view", TOKEN_SETTING_DEFAULTS["view"]))
    if objective == "supervised":
        head = nn.Linear(width, data.num_classes)
        transform = pre.transform()
    else:
        head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 64))
        transform = TwoViews(pre)
    trainable = nn.ModuleDict({"backbone": bb.model, "head": head}).to(device)
    epochs = int(settings.get("epochs", 4))
    bs = int(settings.get("batch_size", 128))
    loader = torch.utils.data.DataLoader(data.torch(transform), batch_size=bs, shuffle=True, drop_last=True,
                                         num_workers=int(settings.get("num_workers", 2)),
                                         generator=torch.Generator().manual_seed(int(settings.get("seed", 0))))
    opt = torch.optim.AdamW(trainable.parameters(), lr=float(settings.get("lr", 1e-3)),
                            weight_decay=float(settings.get("weight_decay", 0.05)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(settings.get("lr", 1e-3)),
                                                total_steps=max(epochs * len(loader), 1), pct_start=0.15)
    partial = out.with_name(out.name + ".partial")
    start = 0
    # what this run is started with; a partial started with anything else is discarded, not resumed
    fp = fingerprint(settings, inputs={"model": model_spec, "dataset": dataset_spec},
                     code=code_digest("stitchcache.pretrain"))
    state = torch.load(partial, map_location="cpu", weights_only=True) if partial.exists() else None
    if state is not None and differs(state.get("fingerprint"), fp,
                                     f"pretraining partial checkpoint {str(partial)!r}"):
        partial.unlink()
        state = None
    if state is not None:
        trainable.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = int(state["epoch"])
        log(f"resuming pretraining of {model_spec.get('name')} after epoch {start}")
    temperature = float(settings.get("temperature", 0.2))
    np_ = bb.num_prefix_tokens
    for epoch in range(start, epochs):
        trainable.train()
        t0, total, correct, n = time.time(), 0.0, 0, 0
        bar = tqdm(loader, desc=f"pretrain {model_spec.get('name')} ({objective}) epoch {epoch + 1}/{epochs}",
                   file=sys.stderr, mininterval=5.0, dynamic_ncols=True)
        for x, y, _ in bar:
            x, y = x.to(device), y.to(device)
            if objective == "supervised":
                logits = head(bb(x)[:, np_:].mean(1))
                loss = F.cross_entropy(logits, y)
                correct += (logits.argmax(1) == y).sum().item()
            else:
                views = torch.cat([x[:, 0], x[:, 1]])  # (2B, C, H, W)
                loss = nt_xent(head(bb(views)[:, np_:].mean(1)), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            n += len(y)
        acc = f", train acc {100 * correct / n:.1f}%" if objective == "supervised" else ""
        log(f"pretrain {model_spec.get('name')} epoch {epoch + 1}/{epochs}: loss {total / n:.4f}{acc} "
            f"({time.time() - t0:.0f}s)")
        _atomic_save({"model": trainable.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                      "epoch": epoch + 1, "fingerprint": fp}, partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({k: v.detach().cpu() for k, v in bb.model.state_dict().items()}, out)
    partial.unlink(missing_ok=True)
    log(f"wrote {out}")


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-spec", required=True, help="JSON: a config models.<name> entry plus its name")
    p.add_argument("--dataset-spec", required=True, help="JSON: the pretraining dataset entry plus its name")
    p.add_argument("--settings", default="{}", help="JSON: the model's pretrain section plus seed/device")
    p.add_argument("--out", required=True, help="state dict to write (.pt)")


def main(args) -> int:
    set_threads()
    pretrain(json_arg(args.model_spec, "--model-spec"), json_arg(args.dataset_spec, "--dataset-spec"),
             json_arg(args.settings, "--settings"), Path(args.out))
    return 0
