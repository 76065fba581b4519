"""Linear interpolation between two aligned models and the loss/accuracy barrier along the path.

    theta(alpha) = (1 - alpha) theta_A + alpha theta_B                      (METHODS.md §9 step 4)
    loss barrier = max_alpha [ L(theta(alpha)) - ((1 - alpha) L(theta_A) + alpha L(theta_B)) ]
    acc barrier  = max_alpha [ ((1 - alpha) acc(theta_A) + alpha acc(theta_B)) - acc(theta(alpha)) ]
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .bn import reset_bn_stats
from .spec import PermutationSpec, apply_permutation

__all__ = ["interpolate", "merge_aligned", "barrier"]


def interpolate(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * sd_a + alpha * sd_b`` for floating tensors (computed in float32, cast back to
    A's dtype); non-float tensors (``num_batches_tracked``) are taken from ``sd_a``. Keys must match."""
    if set(sd_a) != set(sd_b):
        raise KeyError(f"state dicts differ: only in A {sorted(set(sd_a) - set(sd_b))}, "
                       f"only in B {sorted(set(sd_b) - set(sd_a))}")
    out = {}
    for k, a in sd_a.items():
        b = sd_b[k]
        if a.shape != b.shape:
            raise ValueError(f"tensor {k!r}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        if a.is_floating_point():
            out[k] = ((1 - alpha) * a.float() + alpha * b.to(a.device).float()).to(a.dtype)
        else:
            out[k] = a.clone()
    return out


def merge_aligned(spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                  perm: Mapping[str, torch.Tensor] | None = None, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """theta = (1 - alpha) theta_A + alpha pi(theta_B); ``perm=None`` means ``sd_b`` is already aligned.

    BatchNorm running statistics are averaged too: call :func:`reset_bn_stats` on the merged model
    (METHODS.md §12) before evaluating it."""
    sd_b = apply_permutation(spec, perm, sd_b) if perm is not None else sd_b
    return interpolate(sd_a, sd_b, alpha)


def barrier(model_fn: Callable[[], nn.Module], sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
            eval_fn: Callable[[nn.Module], Mapping[str, float]], alphas: Sequence[float] | None = None,
            reset_bn_data: Iterable[Any] | None = None, num_batches: int | None = None) -> dict[str, Any]:
    """Evaluate the linear path between two (aligned) state dicts.

    ``model_fn()`` returns a fresh model of the right architecture (on the device to evaluate on);
    ``eval_fn(model)`` returns a dict with ``"loss"`` and/or ``"acc"``. ``alphas`` defaults to 11
    points on [0, 1] and must contain 0 and 1. ``reset_bn_data``: if given, BatchNorm statistics are
    reset on it at every interior point (REPAIR's "RESET").

    Returns ``{"alphas": [...], "loss": [...], "acc": [...], "loss_barrier": float,
    "acc_barrier": float}`` (entries only for the metrics ``eval_fn`` reports).
    """
    alphas = [float(a) for a in (alphas if alphas is not None else torch.linspace(0, 1, 11).tolist())]
    if 0.0 not in alphas or 1.0 not in alphas:
        raise ValueError("alphas must contain the endpoints 0 and 1")
    rows = []
    for a in alphas:
        model = model_fn()
        model.load_state_dict(interpolate(sd_a, sd_b, a))
        if reset_bn_data is not None and 0.0 < a < 1.0:
            reset_bn_stats(model, reset_bn_data, num_batches)
        model.eval()
        with torch.no_grad():
            rows.append({k: float(v) for k, v in eval_fn(model).items()})
    out: dict[str, Any] = {"alphas": alphas}
    i0, i1 = alphas.index(0.0), alphas.index(1.0)
    for metric, sign in (("loss", 1.0), ("acc", -1.0)):
        if metric not in rows[0]:
            continue
        vals = [r[metric] for r in rows]
        out[metric] = vals
        line = [(1 - a) * vals[i0] + a * vals[i1] for a in alphas]
        out[f"{metric}_barrier"] = max(sign * (v - l) for v, l in zip(vals, line))
    return out
