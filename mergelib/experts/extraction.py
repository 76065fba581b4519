"""FREE-Merging's training-free experts: extraction (mask and budget) and the rescale factor mu.

The expert of task i is ``e_i = mu_i * M(tau_i, k)`` (Zheng & Wang, ICCV 2025; METHODS.md section 6):
``M`` keeps a fraction ``k`` of the raw task vector's entries by magnitude, ``mu`` rescales them.

**Budgets** (which entries ``M`` keeps), named because paper and code differ and because the official
rule empties narrow matrices:

* ``"tensor"`` (default): ``round(numel * k)`` entries per tensor, the largest ``|tau|`` over the whole
  tensor -- the paper's "top-d of the magnitudes", at exactly the budget at every width.
* ``"row_floor"`` (the official ``TaskVectorMiddleKeep``): per row, the top ``floor(cols * k)``
  entries. At k = 0.01 that keeps 7 of 768 columns (ViT-B/32), but **0** of 64 or 96: every row of the
  course's small ViTs would be empty, and the expert would store nothing.
* ``"row_min1"``: per row, the top ``max(1, floor(cols * k))``: never an empty row, at the price of
  exceeding the budget on narrow matrices (1/64 = 1.6% instead of 1% at k = 0.01, cols = 64).

Counts are computed in exact rational arithmetic (``k`` as the nearest fraction with denominator
<= 1e9): in floating point ``100 * 0.29 = 28.999999999999996`` and ``int()`` of it is 28, not 29.

**mu** is computed over the *kept* entries only: a tensor that keeps nothing (a zero row budget) or
only zeros (an all-zero task vector tensor) takes no part in either mean, so it cannot shrink or
inflate mu.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..hparams import check_choice, check_number
from .base import SparseExpert, _index_dtype, _rows_cols, _select_keys, _shape_str

__all__ = ["extract_expert", "expert_scale", "budget_count", "BUDGETS", "RESCALE_MODES"]

RESCALE_MODES = ("official", "paper")
BUDGETS = ("tensor", "row_floor", "row_min1")
DEFAULT_BUDGET = "tensor"


def _check_k(k) -> float:
    return check_number(k, "k", low=0.0, high=1.0, low_open=True)


def budget_count(n: int, k: float, rounding: str = "floor") -> int:
    """``floor(n * k)`` or ``round(n * k)`` (halves up), exactly: ``k`` is taken as the nearest
    fraction with denominator <= 1e9, so ``budget_count(100, 0.29) == 29`` (``int(100 * 0.29) == 28``)."""
    x = Fraction(int(n)) * Fraction(k).limit_denominator(10**9)
    return math.floor(x) if rounding == "floor" else math.floor(x + Fraction(1, 2))


def _mean_over_kept(per_key: Sequence[float], kept: Sequence[bool]) -> float:
    vals = [float(v) for v, ok in zip(per_key, kept) if ok]
    return sum(vals) / len(vals) if vals else float("nan")


def expert_scale(kept_mean_abs: Sequence[Tensor] | Sequence[float], ref_mean_abs: Sequence[Tensor] | Sequence[float],
                 k: float, rescale: str = "official", lam: float = 1.0) -> float:
    """The rescale factor ``mu`` of a FREE expert from per-key statistics.

    Args:
        kept_mean_abs: per key, the mean magnitude of the **kept** entries of the task vector
            (``sum|kept| / number kept``); NaN (or 0) for a key that keeps nothing or only zeros.
            Such keys are left out of both means below.
        ref_mean_abs: per key, ``mean|v|`` of the reference vector (the FR-filtered task vector
            for ``"official"``; see :func:`extract_expert` for ``"paper"``).
        k: the kept fraction, in (0, 1].
        rescale: ``"official"`` -- ``utils.cal_rescaling`` of the official code:
            ``mu = -log10(k) * m_top / E`` with ``m_top = mean_keys(mean |kept|)`` (the official
            ``mean|M| / k``, exact whatever the rounding of the budget) and ``E = mean_keys(mean|FR(tau)|)``;
            ``"paper"`` -- ``mu = -E(M) * ln(k) / (lam * E(v))`` with ``E(M) = k * m_top`` and
            ``E(v) = mean_keys(mean|v|)``.
        lam: the task's merge coefficient lambda_i (paper form only).

    Both vanish at ``k = 1`` (log 1 = 0). **[OPEN]** (METHODS.md 6, 15.3): the paper's log base is
    unstated, it divides by ``lam * E(v)`` and has no ``1/k``; the code uses log10, divides by ``E``
    alone and applies ``1/k``. For k=0.01 the official ``mu`` is ``2 * m_top / E`` (4.9 and 6.8 measured
    on Gaussian task vectors of ViT(dim=192, depth=6) and ViT-B/32 shapes) while the paper form, with
    ``lam = 1`` and the same ``E``, is smaller by the factor ``1 / (k ln 10)`` (43 at k=0.01; about 0.16
    there), which is why both are kept as named modes.
    """
    k = _check_k(k)
    check_choice(rescale, "rescale", RESCALE_MODES)
    kept_vals = [float(torch.as_tensor(x)) for x in kept_mean_abs]
    if len(kept_vals) != len(ref_mean_abs):
        raise ValueError(f"kept_mean_abs has {len(kept_vals)} keys, ref_mean_abs {len(ref_mean_abs)}")
    kept = [math.isfinite(v) and v > 0 for v in kept_vals]
    m = _mean_over_kept(kept_vals, kept)
    e = _mean_over_kept([float(torch.as_tensor(x)) for x in ref_mean_abs], kept)
    if not math.isfinite(m):
        return 0.0  # nothing kept: the expert is empty, mu is irrelevant
    if not math.isfinite(e) or e <= 0:
        raise ValueError(f"the reference mean magnitude E must be positive, got {e} "
                         "(an all-zero task vector has no expert scale)")
    if rescale == "official":
        return -math.log10(k) * m / e
    lam = check_number(lam, "lam", low=0.0, low_open=True)
    return -k * m * math.log(k) / (lam * e)


def _keep_rows(t2: Tensor, kk: int) -> Tensor:
    """Column indices ``(rows, kk)`` of the kk largest ``|t2|`` per row, sorted within the row."""
    return torch.topk(t2.abs().float(), kk, dim=1, sorted=False).indices.sort(dim=1).values


def extract_expert(tv: Mapping[str, Tensor], k: float, rescale: str | float | None = "official",
                   filtered_tv: Mapping[str, Tensor] | None = None, lam: float = 1.0,
                   keys: Sequence[str] | None = None, budget: str = DEFAULT_BUDGET) -> SparseExpert:
    """FREE-Merging's training-free expert ``e = mu * M(tau, k)`` of one task, stored sparsely.

    Args:
        tv: the task's *raw* (unfiltered) task vector, key -> finite tensor (``finetuned - pretrained``).
        k: kept fraction, in (0, 1]. FREE: 0.01 (ViT-B/32, 8 tasks), 0.02 (30 tasks).
        rescale: how ``mu`` is chosen (see :func:`expert_scale`, over the kept entries only):
            ``"official"`` (default; the official code, needs ``filtered_tv``):
            ``mu = -log10(k) * m_top / E``, ``m_top`` = mean magnitude of the kept entries,
            ``E = mean_keys(mean|FR(tau)|)``;
            ``"paper"``: ``mu = -E(M) ln(k) / (lam E(v))`` with ``v = filtered_tv`` when given, else the
            raw ``tv`` (**[OPEN]**: which vector the paper's E(v) averages is not stated);
            ``None``: ``mu = 1`` (plain top-k mask); a number: that ``mu``.
        filtered_tv: the FR-filtered task vector ``FR(tau)`` (key -> tensor of the same shapes). It must
            hold every expert key; for keys the filter skips (biases) pass the raw ``tau``.
        lam: the task's merge coefficient (``"paper"`` only).
        keys: the tensors to take part (default: every floating-point, non-empty tensor of ``tv``;
            FREE's ViT code uses keys containing ``attn`` or ``mlp``).
        budget: which entries are kept (module docstring): ``"tensor"`` (default, the paper's top-d:
            ``round(numel * k)`` per tensor by magnitude, stored with the ``"flat"`` layout),
            ``"row_floor"`` (official: ``floor(cols * k)`` per row; empty rows when ``cols * k < 1``),
            ``"row_min1"`` (``max(1, floor(cols * k))`` per row). Rows are the last dim (1-D tensors one
            row). Ties among equal magnitudes are broken by ``torch.topk`` (may differ by device).

    Returns:
        :class:`SparseExpert` with values ``mu * tau`` on the kept entries, in ``tv``'s dtype and device.
    """
    k = _check_k(k)
    check_choice(budget, "budget", BUDGETS)
    keys = _select_keys(tv, keys, "task vector")
    if not keys:
        raise ValueError("no floating-point tensors to build an expert from")
    values, indices, shapes, layouts, kept_mean_abs = {}, {}, {}, {}, []
    for key in keys:
        t = tv[key].detach()
        if not bool(torch.isfinite(t).all()):
            from ..task_vectors import NonFiniteError
            raise NonFiniteError(f"task vector tensor {key!r} has non-finite values")
        if budget == "tensor":
            rows, cols, layouts[key] = 1, t.numel(), "flat"
            kk = budget_count(cols, k, "round")
        else:
            rows, cols = _rows_cols(t.shape)
            kk = budget_count(cols, k)
            kk = max(1, kk) if budget == "row_min1" else kk
        t2 = t.reshape(rows, cols)
        idx = _keep_rows(t2, kk)
        vals = t2.gather(1, idx)
        kept_mean_abs.append(vals.abs().double().mean() if vals.numel() else float("nan"))
        values[key], indices[key], shapes[key] = vals, idx.to(_index_dtype(cols)), tuple(t.shape)

    if rescale is None:
        mu = 1.0
    elif isinstance(rescale, numbers.Real) and not isinstance(rescale, bool):
        mu = check_number(rescale, "rescale")
    elif rescale in RESCALE_MODES:
        if rescale == "official" and filtered_tv is None:
            raise ValueError("rescale='official' needs filtered_tv (the FR-filtered task vector): "
                             "E = mean over keys of mean|FR(tau)|")
        ref = filtered_tv if filtered_tv is not None else tv
        ref_mean_abs = []
        for key in keys:
            if key not in ref:
                raise ValueError(f"filtered_tv has no tensor {key!r} (pass the raw tau for unfiltered keys)")
            if tuple(ref[key].shape) != shapes[key]:
                raise ValueError(f"filtered_tv tensor {key!r} has shape {_shape_str(ref[key].shape)}, "
                                 f"the task vector has {_shape_str(shapes[key])}")
            ref_mean_abs.append(ref[key].detach().abs().double().mean())
        mu = expert_scale(kept_mean_abs, ref_mean_abs, k, rescale, lam)
    else:
        raise ValueError(f"unknown rescale {rescale!r}; expected one of {RESCALE_MODES}, None or a number")

    values = {key: (v.float() * mu).to(v.dtype) for key, v in values.items()}
    meta = {"rescale": rescale if not isinstance(rescale, numbers.Real) else float(rescale), "budget": budget}
    return SparseExpert(values, indices, shapes, mu=mu, k=k, meta=meta, layouts=layouts)
