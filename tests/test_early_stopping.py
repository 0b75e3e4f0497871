"""Early stopping in the one training loop (stitchcache/train.py): `min_delta` makes a validation
loss that still creeps down by less than a relative `min_delta` per epoch count as no improvement,
so runs whose loss has flattened stop instead of running to `max_epochs` (the demo's LFM did)."""
import torch
from torch import nn

from stitchcache.train import FitConfig, fit


def creeping_fit(min_delta: float, max_epochs: int = 30):
    """A validation loss that falls by 10 % for 3 epochs, then by 0.01 % per epoch forever."""
    vals = iter([1.0 * 0.9 ** i for i in range(4)] + [0.9 ** 3 * (1 - 1e-4) ** i for i in range(1, 100)])
    cfg = FitConfig(lr_grid=[0.1], max_epochs=max_epochs, patience=3, min_delta=min_delta)
    x = torch.randn(8, 2)
    return fit(lambda: nn.Linear(2, 1), lambda epoch: [(x,)], lambda m, b: m(b[0]).pow(2).mean(),
               lambda m: next(vals), cfg, torch.device("cpu"))


def test_without_min_delta_a_creeping_loss_runs_to_the_cap():
    res = creeping_fit(0.0)
    assert len(res.history) == 30


def test_min_delta_stops_a_flattened_run_and_keeps_the_best_epoch():
    res = creeping_fit(1e-3)
    # epochs 1-4 improve by 10 %; 5, 6, 7 improve by 0.01 % each: patience 3 ends the run after epoch 7
    assert len(res.history) == 7
    # the tiny improvements still count for which weights are kept: the best loss is epoch 7's
    assert res.epochs == 7 and abs(res.val_loss - 0.9 ** 3 * (1 - 1e-4) ** 3) < 1e-12


def test_min_delta_is_part_of_the_settings():
    assert FitConfig.from_settings({"min_delta": 0.002}).min_delta == 0.002
    assert FitConfig.from_settings({}).min_delta == 0.0


def geometric_fit(min_delta: float, min_delta_abs: float, max_epochs: int = 80):
    """A validation loss that falls by 5 % of itself every epoch from 0.1, forever (a self-stitch
    converging towards the identity): every step is 5 % relative, so no relative min_delta < 5 % fires."""
    vals = iter([0.1 * 0.95 ** i for i in range(200)])
    cfg = FitConfig(lr_grid=[0.1], max_epochs=max_epochs, patience=3, min_delta=min_delta,
                    min_delta_abs=min_delta_abs)
    x = torch.randn(8, 2)
    return fit(lambda: nn.Linear(2, 1), lambda epoch: [(x,)], lambda m, b: m(b[0]).pow(2).mean(),
               lambda m: next(vals), cfg, torch.device("cpu"))


def test_a_geometric_decrease_outruns_a_relative_min_delta():
    assert len(geometric_fit(0.005, 0.0).history) == 80


def test_an_absolute_floor_stops_a_geometric_decrease():
    res = geometric_fit(0.005, 1e-3)
    # epoch k (1-based, k >= 2) improves by 0.1 * 0.95**(k-2) * 0.05; that is >= 1e-3 until 0.95**(k-2) < 0.2,
    # i.e. up to k = 33; epochs 34, 35, 36 fall short of the floor: patience 3 ends the run after epoch 36
    assert len(res.history) == 36
    assert res.epochs == 36  # the weights kept are still the lowest loss's


def test_min_delta_abs_is_part_of_the_settings():
    assert FitConfig.from_settings({"min_delta_abs": 0.01}).min_delta_abs == 0.01
    assert FitConfig.from_settings({}).min_delta_abs == 0.0
