"""One training loop for every trainable thing (stitch layers, TLT heads, linear probes).

AdamW; for each learning rate of a grid, up to ``max_epochs`` epochs with early stopping
(``patience``) on the validation loss; the grid point with the best validation loss wins. An epoch
counts as an improvement only when it lowers the validation loss *of the last improvement* by more
than the relative ``min_delta`` (0 = any decrease) and by more than the absolute ``min_delta_abs``
(so a loss that falls by less per epoch but more over a few epochs keeps training; 0 = no floor; the
stitch trainer sets it for the matching losses from ``train.min_delta_var``: a loss that keeps falling
by a constant fraction per epoch never trips a relative threshold, an absolute floor stops it); the
weights kept are those of the lowest loss either way.
How each run ended is recorded: ``stop`` (``patience`` or ``max_epochs``), ``epochs_run`` and
``tail_fall``, the relative fall of the best validation loss over the run's last ``patience`` epochs
(> 0: the loss was still making new lows when the run ended, by less than ``min_delta``, or the cap
cut it; its best loss is then an upper bound of what longer training reaches; None when the run was
shorter than ``patience`` epochs).
A checkpoint ``<out>.partial`` is written after every epoch; a restarted job resumes from it only if
it was started with exactly the same fingerprint and fit config (else it is discarded, logged).
bf16 autocast on CUDA, fp32 on CPU. Seeded.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .provenance import differs
from .runtime import autocast, log


@dataclass
class FitConfig:
    lr_grid: list[float] = field(default_factory=lambda: [1e-3])
    max_epochs: int = 100
    patience: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    min_delta: float = 0.0  # relative: improvement means val < best * (1 - min_delta)
    min_delta_abs: float = 0.0  # absolute: ... and best - val > min_delta_abs

    @classmethod
    def from_settings(cls, s: dict) -> "FitConfig":
        return cls(lr_grid=[float(x) for x in s.get("lr_grid", [1e-3])], max_epochs=int(s.get("max_epochs", 100)),
                   patience=int(s.get("patience", 5)), weight_decay=float(s.get("weight_decay", 0.0)),
                   seed=int(s.get("seed", 0)), min_delta=float(s.get("min_delta", 0.0)),
                   min_delta_abs=float(s.get("min_delta_abs", 0.0)))


@dataclass
class FitResult:
    state: dict  # best trainable state dict
    lr: float
    epochs: int  # epochs of the chosen run until its best validation loss
    val_loss: float
    history: list[dict]
    epochs_run: int = 0  # epochs the chosen run trained
    stop: str = ""  # "patience" (early stopping) or "max_epochs" (the cap)
    tail_fall: float | None = None  # see the module docstring

    @property
    def still_falling(self) -> bool:
        return bool(self.tail_fall and self.tail_fall > 0)


def tail_fall(val_losses: list[float], patience: int) -> float | None:
    """Relative fall of the running minimum of ``val_losses`` over its last ``patience`` entries:
    (min before the window − min overall) / min before the window; None when there are no earlier
    epochs (or that minimum is not positive)."""
    if patience < 1 or len(val_losses) <= patience:
        return None
    before = min(val_losses[:-patience])
    if not (math.isfinite(before) and before > 0):
        return None
    return max(0.0, (before - min(val_losses)) / before)


def fit(build: Callable[[], nn.Module], batches: Callable[[int], Iterable], loss_fn: Callable, val_loss: Callable,
        cfg: FitConfig, device: torch.device, partial: str | os.PathLike | None = None, desc: str = "",
        fingerprint: dict | None = None) -> FitResult:
    """build(): a freshly initialised trainable module; batches(epoch): the epoch's batches;
    loss_fn(module, batch) -> scalar; val_loss(module) -> float (no grad).

    ``partial`` records ``fingerprint`` (what the run was started with: settings, inputs, init, code;
    see provenance.py) and the fit config; a partial whose record differs in anything is discarded
    with a log line, never resumed (finished grid points included)."""
    fingerprint = {**(fingerprint or {}), "fit": dataclasses.asdict(cfg)}
    state = _load_partial(partial, fingerprint, desc)
    results = state["results"] if state else []
    for li, lr in enumerate(cfg.lr_grid):
        if li < len(results):
            continue  # this grid point finished before a restart
        torch.manual_seed(cfg.seed + li)
        module = build().to(device)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        run = {"lr": lr, "epoch": 0, "best_val": math.inf, "ref_val": math.inf, "best_epoch": 0, "bad": 0,
               "best_state": None, "history": []}
        if state and state.get("current", {}).get("lr_index") == li and state["current"].get("lr") == lr:
            cur = state["current"]
            module.load_state_dict(cur["state"])
            opt.load_state_dict(cur["opt"])
            run = cur["run"]
            log(f"{desc} resuming lr={lr:g} after epoch {run['epoch']}")
        while run["epoch"] < cfg.max_epochs and run["bad"] < cfg.patience:
            epoch = run["epoch"]
            t0 = time.time()
            module.train()
            total, n = 0.0, 0
            for batch in batches(cfg.seed * 1000 + epoch):
                batch = [b.to(device, non_blocking=True) for b in batch]
                with autocast(device):
                    loss = loss_fn(module, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(batch[0])
                n += len(batch[0])
            module.eval()
            with torch.no_grad(), autocast(device):
                v = float(val_loss(module))
            run["epoch"] = epoch + 1
            run["history"].append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "val_loss": v,
                                   "seconds": time.time() - t0})
            # patience counts epochs since the last *significant* improvement, measured against the loss
            # at that improvement (``ref_val``), not the running best: a loss falling by less than
            # min_delta per epoch but more over a few epochs is still training (Keras / Lightning)
            ref = run.get("ref_val", run["best_val"])
            significant = (v < ref * (1 - cfg.min_delta) and ref - v > cfg.min_delta_abs
                           if math.isfinite(ref) else True)
            if v < run["best_val"]:
                run.update(best_val=v, best_epoch=epoch + 1,
                           best_state={k: t.detach().cpu().clone() for k, t in module.state_dict().items()})
            if significant:
                run.update(ref_val=v, bad=0)
            else:
                run["bad"] += 1
            log(f"{desc} lr={lr:g} epoch {epoch + 1}: train {total / max(n, 1):.4g} val {v:.4g}")
            _save_partial(partial, {"fingerprint": fingerprint, "results": results, "current": {
                "lr_index": li, "lr": lr, "state": module.state_dict(), "opt": opt.state_dict(), "run": run}})
        vals = [h["val_loss"] for h in run["history"]]
        results.append({"lr": lr, "val_loss": run["best_val"], "epochs": run["best_epoch"],
                        "state": run["best_state"], "history": run["history"], "epochs_run": run["epoch"],
                        "stop": "patience" if run["bad"] >= cfg.patience else "max_epochs",
                        "tail_fall": tail_fall(vals, cfg.patience)})
        _save_partial(partial, {"fingerprint": fingerprint, "results": results})
    best = min(results, key=lambda r: r["val_loss"])
    history = [{"lr": r["lr"], **h} for r in results for h in r["history"]]
    return FitResult(state=best["state"], lr=best["lr"], epochs=best["epochs"], val_loss=best["val_loss"],
                     history=history, epochs_run=best.get("epochs_run", best["epochs"]), stop=best.get("stop", ""),
                     tail_fall=best.get("tail_fall"))


def _load_partial(path, fingerprint: dict, desc: str):
    if path is None or not Path(path).exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    recorded = state.get("fingerprint") if isinstance(state, dict) else None
    if recorded != fingerprint:
        what = f"{desc} partial checkpoint {str(path)!r}".strip()
        if recorded and recorded.get("fit") != fingerprint["fit"]:
            log(f"discarding {what}: it was started with another fit config "
                f"({recorded.get('fit')} there, {fingerprint['fit']} now)")
        else:
            differs(recorded, fingerprint, what)
        Path(path).unlink()
        return None
    return state


def _save_partial(path, obj):
    if path is None:
        return
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def mean_over(batches: Iterable, fn: Callable) -> float:
    """Mean of fn(batch) weighted by batch size."""
    total, n = 0.0, 0
    for batch in batches:
        total += float(fn(batch)) * len(batch[0])
        n += len(batch[0])
    return total / max(n, 1)
