"""Trained experts (beyond the paper): LoRA-style low-rank experts at a byte budget, trained on a task's
data on top of the frozen merged backbone and the task's frozen head."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..utils import minibatch_indices, progress_bar
from .base import LowRankExpert, _select_keys, _shape_str, check_state_dict

__all__ = ["allocate_ranks", "train_expert"]


def allocate_ranks(shapes: Mapping[str, Sequence[int]], budget_bytes: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Ranks per matrix so that a :class:`LowRankExpert` stores at most ``budget_bytes``.

    A key of shape ``S`` costs ``r * (S[0] + prod(S[1:])) * itemsize`` bytes at rank ``r`` (capped at
    ``min(S[0], prod(S[1:]))``). All keys first get the same rank ``floor(budget / sum of rank-1
    costs)``; the remainder is handed out one rank at a time, round-robin in key order, while it fits.
    Keys left at rank 0 are omitted from the result. Raises ``ValueError`` if nothing fits.
    """
    item = torch.empty((), dtype=dtype).element_size()
    cost, cap = {}, {}
    for key, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"tensor {key!r} has shape {_shape_str(shape)}: low-rank needs ndim >= 2")
        rows, cols = int(shape[0]), math.prod(int(s) for s in shape[1:])
        cost[key], cap[key] = (rows + cols) * item, min(rows, cols)
    if not cost:
        raise ValueError("no tensors to allocate ranks to")
    budget = int(budget_bytes)
    uniform = budget // sum(cost.values())
    ranks = {key: min(uniform, cap[key]) for key in cost}
    left = budget - sum(ranks[key] * cost[key] for key in cost)
    changed = True
    while changed:
        changed = False
        for key in cost:
            if ranks[key] < cap[key] and cost[key] <= left:
                ranks[key] += 1
                left -= cost[key]
                changed = True
    ranks = {key: r for key, r in ranks.items() if r > 0}
    if not ranks:
        raise ValueError(f"budget of {budget} bytes is too small: rank 1 on the smallest matrix needs "
                         f"{min(cost.values())} bytes")
    return ranks


def _default_matrix_keys(sd: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and v.dim() == 2]


def _resolve_device(device, sd: Mapping[str, Tensor]) -> torch.device:
    if device is None:
        return next(iter(sd.values())).device
    from .utils import resolve_device
    return resolve_device(device)


def train_expert(backbone_module: nn.Module, merged_sd: Mapping[str, Tensor], head: nn.Module,
                 x: Tensor, y: Tensor, budget_bytes: int, *, steps: int = 200, lr: float = 1e-3,
                 batch_size: int = 64, seed: int = 0, generator: torch.Generator | None = None,
                 device: str | torch.device | None = None, keys: Sequence[str] | None = None,
                 weight_decay: float = 0.0, init_std: float | None = None,
                 progress: bool = True) -> LowRankExpert:
    """Train a LoRA-style expert for one task at a byte budget, on a frozen merged backbone.

    The forward pass is ``head(functional_call(backbone_module, merged + {key: merged[key] + B@A}, x))``:
    the merged tensors, the backbone module's own weights and the head stay frozen, only the factors
    ``A, B`` are learned, and no copy of the model is made. The backbone runs in eval mode (BatchNorm
    statistics are not updated). Cross-entropy loss, Adam(W), ``steps`` minibatches drawn without
    replacement per epoch from ``generator`` (or ``torch.Generator().manual_seed(seed)``).

    Args:
        backbone_module: the backbone whose structure is used (e.g. ``mergelib.models.ViT``).
        merged_sd: the merged backbone's state dict; keys and shapes must match the module.
        head: the task's head (``nn.Linear``), frozen.
        x: training inputs ``(N, ...)``; y: integer labels ``(N,)``. Any device; batches are moved.
        budget_bytes: storage budget, e.g. ``extract_expert(...).nbytes``; ranks via :func:`allocate_ranks`.
        keys: matrices to adapt (default: every 2-D floating tensor of ``merged_sd``; tensors with
            ndim > 2 are seen as ``S[0] x prod(S[1:])`` when listed explicitly).
        init_std: std of the initial ``A`` (default ``1/sqrt(cols)``); ``B`` starts at 0, so training
            starts exactly at the merged model.
        device: where to train (default: the device of ``merged_sd``; ``"auto"`` picks CUDA if present).

    Returns:
        :class:`LowRankExpert` (factors in float32 on ``device``), applied with ``lam_e = 1`` in mode
        ``"add"``; ``expert.meta`` holds ``loss_history`` (per step), ``ranks``, ``budget_bytes``.
    """
    check_state_dict(backbone_module, merged_sd)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same positive number of samples, got {x.shape[0]} and {y.shape[0]}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    dev = _resolve_device(device, merged_sd)
    keys = _default_matrix_keys(merged_sd) if keys is None else _select_keys(merged_sd, keys, "merged state dict")
    shapes = {key: tuple(merged_sd[key].shape) for key in keys}
    ranks = allocate_ranks(shapes, budget_bytes, torch.float32)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    merged = {k: v.detach().to(dev) for k, v in merged_sd.items()}
    head_state = {k: v.detach().to(dev) for k, v in head.state_dict().items()}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for key, r in ranks.items():
        rows, cols = shapes[key][0], math.prod(shapes[key][1:])
        std = init_std if init_std is not None else 1.0 / math.sqrt(cols)
        a = (torch.randn(r, cols, generator=gen) * std).to(dev).requires_grad_()
        b = torch.zeros(rows, r, device=dev, requires_grad=True)
        factors[key] = (b, a)
    opt = torch.optim.AdamW([t for pair in factors.values() for t in pair], lr=lr, weight_decay=weight_decay)

    def loss_on(xb: Tensor, yb: Tensor) -> Tensor:
        params = dict(merged)
        for key, (b, a) in factors.items():
            params[key] = merged[key] + (b @ a).view(shapes[key]).to(merged[key].dtype)
        feats = functional_call(backbone_module, params, (xb,))
        return F.cross_entropy(functional_call(head, head_state, (feats,)), yb)

    history = []
    was_training = backbone_module.training
    backbone_module.eval()
    try:
        batches = minibatch_indices(x.shape[0], batch_size, steps, gen)
        bar = progress_bar(batches, total=steps, desc="train expert", disable=not progress, leave=False)
        for idx in bar:
            loss = loss_on(x[idx.to(x.device)].to(dev), y[idx.to(y.device)].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
    finally:
        backbone_module.train(was_training)
    done = {key: (b.detach(), a.detach()) for key, (b, a) in factors.items()}
    meta = {"loss_history": history, "ranks": ranks, "budget_bytes": int(budget_bytes),
            "steps": steps, "lr": lr, "batch_size": batch_size}
    return LowRankExpert(done, {key: shapes[key] for key in done}, meta=meta)

