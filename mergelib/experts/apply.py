"""FREE-Merging's per-task parameters: the merged backbone plus one task's expert (METHODS.md section 6)."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from .base import APPLY_MODES, Expert, LowRankExpert, SparseExpert, _shape_str

__all__ = ["free_params"]


def _check_expert_against(expert: Expert, sd: Mapping[str, Tensor], sd_name: str) -> None:
    if not isinstance(expert, Expert):
        raise TypeError(f"expert must be a SparseExpert or LowRankExpert, got {type(expert).__name__}")
    expert.check_compatible(sd, "expert", sd_name)


def free_params(theta0: Mapping[str, Tensor], backbone_tv: Mapping[str, Tensor], lam_b: float,
                expert: Expert, lam_e: float, mode: str = "add") -> dict[str, Tensor]:
    """The parameters that FREE-Merging uses for one task (materialised: a full state dict).

    Args:
        theta0: pretrained state dict ``theta_0``.
        backbone_tv: the backbone's task vector ``s`` (e.g. ``sum_j FR(tau_j)``), a subset of
            ``theta0``'s keys; missing keys count as zero.
        lam_b: backbone coefficient.
        expert: the task's :class:`SparseExpert` (values ``e = mu*M``) or :class:`LowRankExpert`.
        lam_e: expert coefficient.
        mode: ``"add"`` (paper, default): ``theta = theta0 + lam_b*s + lam_e*e`` on every entry.
            ``"replace"`` (official ``eval_single_dataset_with_router`` / ``sum_two``): the expert
            *replaces* the backbone on its support ``S``:
            ``theta = theta0 + lam_e*e`` on ``S`` and ``theta0 + lam_b*s`` elsewhere.
            The official code writes ``theta = theta0 + c*z`` with ``z = e`` on ``S`` and ``z = c*s``
            elsewhere, i.e. ``lam_b = c**2``, ``lam_e = c`` (ViT-B/32 FREE: ``c = 0.5``). A low-rank
            expert has no sparse support and was trained additively: ``"replace"`` rejects it.

    The two modes agree off ``S`` exactly and differ on ``S`` by ``lam_b*s``.

    Returns:
        key -> tensor for every key of ``theta0``, computed in float32 and cast to ``theta0``'s dtype.
        Integer tensors, and float tensors touched by neither ``backbone_tv`` nor the expert, are the
        very tensors of ``theta0`` (shared, not copied). For on-the-fly application without a copy
        per task use :class:`mergelib.routing.FreeMergedModel`.
    """
    if mode not in APPLY_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {APPLY_MODES}")
    _check_expert_against(expert, theta0, "pretrained state dict")
    for key, v in backbone_tv.items():
        if key not in theta0:
            raise ValueError(f"backbone_tv tensor {key!r} is not in the pretrained state dict")
        if v.shape != theta0[key].shape:
            raise ValueError(f"backbone_tv tensor {key!r} has shape {_shape_str(v.shape)}, the pretrained "
                             f"state dict has {_shape_str(theta0[key].shape)}")
    if mode == "replace" and not isinstance(expert, SparseExpert):
        raise ValueError("mode='replace' needs a SparseExpert (a support to replace); low-rank experts "
                         "are trained on top of the merged backbone and apply with mode='add'")
    dense_delta = expert.to_dense() if isinstance(expert, LowRankExpert) else {}
    out: dict[str, Tensor] = {}
    for key, t0 in theta0.items():
        if not t0.is_floating_point():
            out[key] = t0
            continue
        base = t0.float()
        if key in backbone_tv:
            base = base + lam_b * backbone_tv[key].to(base.device).float()
        if key in expert.shapes:
            if isinstance(expert, SparseExpert):
                rows, cols = expert.grid(key)
                idx = expert.indices[key].to(base.device).long()
                vals = lam_e * expert.values[key].to(base.device).float()
                base = base.reshape(rows, cols).clone()
                if mode == "add":
                    base.scatter_add_(1, idx, vals)
                else:
                    base.scatter_(1, idx, t0.float().reshape(rows, cols).gather(1, idx) + vals)
                base = base.view(t0.shape)
            else:
                base = base + lam_e * dense_delta[key].to(base.device).float()
        out[key] = base.to(t0.dtype)
    return out

