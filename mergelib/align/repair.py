"""REPAIR: renormalising the merged network's units (Jordan et al., ICLR 2023; METHODS.md §12).

Averaging two aligned networks shrinks the variance of their hidden units ("variance collapse").
For networks without BatchNorm, REPAIR rescales every chosen layer's pre-activation channels c to
interpolated target statistics:

    mu*_c    = (1 - alpha) mu_A,c    + alpha mu_B,c
    sigma*_c = (1 - alpha) sigma_A,c + alpha sigma_B,c

measured on the endpoints (B already aligned to A). The paper inserts a BatchNorm with weight sigma*
and bias mu* after the merged layer, resets its statistics (mean m_c, var v_c) on training data and
fuses it:

    W'_c = W_c sigma*_c / sqrt(v_c + eps),     b'_c = mu*_c + sigma*_c (b_c - m_c) / sqrt(v_c + eps)

We fuse layer by layer in forward order, measuring (m, v) of layer l in the merged network whose
earlier layers are already corrected -- what one train-mode pass through all inserted BNs computes.
All standard deviations are sqrt(var + eps) with the population variance, so with identical
endpoints REPAIR is exactly a no-op (up to float rounding).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..models import MLP
from .bn import has_batchnorm
from .features import iter_inputs, model_device, record_sites
from .spec import to_rows

__all__ = ["repair", "channel_stats"]


@torch.no_grad()
def channel_stats(model: nn.Module, modules: Sequence[str], data: Iterable[Any], num_batches: int | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, population variance) of each module's output over ``data``, float64.

    Channels: dim 1 of 4-D outputs, the last dim otherwise. The model runs in eval mode (restored)."""
    sums: dict[str, list] = {m: [0, 0.0, 0.0] for m in modules}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    dev = model_device(model)
    try:
        with record_sites(model, [(m, "output") for m in modules]) as rec:
            for x in iter_inputs(data, num_batches):
                model(x.to(dev))
                for m in modules:
                    t = rec[m, "output"]
                    t = (to_rows(t, 1).T if t.dim() == 4 else t.reshape(-1, t.shape[-1])).double()
                    sums[m][0] += t.shape[0]
                    sums[m][1] = sums[m][1] + t.sum(0)
                    sums[m][2] = sums[m][2] + (t * t).sum(0)
    finally:
        for mod, t in modes:
            mod.train(t)
    out = {}
    for m, (n, s, ss) in sums.items():
        if n == 0:
            raise ValueError("channel_stats: data yielded no batches")
        mean = s / n
        out[m] = (mean, (ss / n - mean * mean).clamp_min(0))
    return out


@torch.no_grad()
def repair(model_a: nn.Module, model_b: nn.Module, merged: nn.Module, data: Iterable[Any], alpha: float = 0.5,
           layers: Sequence[str] | None = None, eps: float = 1e-5, num_batches: int | None = None) -> nn.Module:
    """Apply REPAIR to ``merged`` in place (and return it).

    ``model_b`` must already be aligned to ``model_a`` (same unit order), ``merged`` is typically
    ``merge_aligned(spec, sd_a, sd_b_aligned, alpha=alpha)`` loaded into a model. ``layers``: names of
    the nn.Linear / nn.Conv2d modules (with bias) to repair, default for :class:`MLP`: every hidden
    layer. Networks with BatchNorm should use :func:`reset_bn_stats` instead (raises here).
    """
    if has_batchnorm(merged):
        raise ValueError("repair: the merged model has BatchNorm layers; use reset_bn_stats instead")
    if layers is None:
        if not isinstance(merged, MLP):
            raise ValueError(f"repair: pass layers=[...] for a {type(merged).__name__}")
        layers = [f"layers.{i}" for i in range(len(merged.layers))]
    named = dict(merged.named_modules())
    for name in layers:
        mod = named.get(name)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or mod.bias is None:
            raise ValueError(f"repair: {name!r} must be an nn.Linear or nn.Conv2d with a bias")
    stats_a = channel_stats(model_a, layers, data, num_batches)
    stats_b = channel_stats(model_b, layers, data, num_batches)
    for name in layers:
        (ma, va), (mb, vb) = stats_a[name], stats_b[name]
        mu_t = (1 - alpha) * ma + alpha * mb
        sd_t = (1 - alpha) * (va + eps).sqrt() + alpha * (vb + eps).sqrt()
        m, v = channel_stats(merged, [name], data, num_batches)[name]
        scale = sd_t / (v + eps).sqrt()
        mod = named[name]
        shape = (-1,) + (1,) * (mod.weight.dim() - 1)
        w, b = mod.weight, mod.bias
        b.copy_((mu_t + scale * (b.double() - m.to(b.device))).to(b.device, b.dtype))
        w.copy_((w.double() * scale.to(w.device).view(shape)).to(w.dtype))
    return merged
