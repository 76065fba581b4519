"""Resetting BatchNorm statistics after a merge (Jordan et al. 2023, "RESET"; METHODS.md §12)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .features import iter_inputs, model_device

__all__ = ["reset_bn_stats", "has_batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Iterable[Any], num_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running mean/var as the cumulative average over ``data``.

    Sets ``momentum=None`` (cumulative moving average), calls ``reset_running_stats()``, runs the
    model in train mode under ``no_grad`` over ``num_batches`` batches (default: all), then restores
    each module's train/eval flag and each BN's momentum. Modifies ``model`` in place and returns it.
    The result equals the mean over batches of the batch means and of the unbiased batch variances.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    dev = model_device(model)
    try:
        for m in bns:
            m.momentum = None
            m.reset_running_stats()
        model.train()
        n = 0
        for x in iter_inputs(data, num_batches):
            model(x.to(dev))
            n += 1
        if n == 0:
            raise ValueError("reset_bn_stats: data yielded no batches")
    finally:
        for m, t in modes:
            m.train(t)
        for m, mom in momenta:
            m.momentum = mom
    return model
