"""Sparsify and resolve parameter competition: TIES, DARE and PCB-Merging (METHODS.md 3, 4, 7).

Every function works on a flat task-vector matrix ``tvs`` of shape ``N x D`` (N tasks, D
parameters in the fixed sorted key order of :func:`mergelib.task_vectors.flatten`), float32, on any
device, and returns the **merged task vector before the global lambda** (shape ``D``). The merged
model is then ``theta = theta_0 + lambda * tau_m`` (:func:`mergelib.merging.merge` does that).

Performance notes: task-level loops are over the N rows only (never over elements). The
elementwise steps of TIES and PCB (official) run as sweeps over column chunks of the ``N x D``
matrix that fit in cache (:func:`_column_chunks`, the one place that sizes them), so the chain of
operations reads each chunk from memory once; masks and counts there are float 0/1 tensors (exact,
and much faster than bool tensors on the CPU). The extra memory stays at about one ``N x D`` copy
or less. Exact k-th order statistics come from :mod:`mergelib.selection` (a sampled bracket and
one counting pass; ``torch.kthvalue`` / ``torch.topk`` on short rows). ``torch.quantile`` is never
used (it rejects inputs over 2**24 elements).
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import gpu_kernels as _gpu
from . import kernels as _kernels
from . import selection as _select
from .hparams import check_choice, check_number
from .task_vectors import FlatLayout, NonFiniteError, Scratch, TaskVectorColumns, empty_matrix, zeros_matrix

__all__ = [
    "kth_smallest", "all_finite", "check_finite", "TRIM_RULES", "trim", "elect_sign", "disjoint_mean",
    "ties_merge", "dare", "dare_seed",
    "dare_state_dict", "dare_flat", "pcb_scores", "pcb_merge",
]

PCB_CLIP = 0.0001  # pcb-merging.py clamps |tau| to its [0.01%, 99.99%] order statistics
TRIM_RULES = ("official", "exact")  # TIES trim: keep ties at the threshold / keep exactly int(d * density)
# PCB keeps only the balancing scores above a floor below each row's drop threshold (with their positions)
# instead of all N x D of them when the kept share is small: at most this density r (12 bytes per kept
# entry against 4 per score: about 0.3x the scores' memory at the official r = 0.05).
PCB_SPARSE_DENSITY = 0.25
_ALIGN = 1024  # chunk boundaries of the fused TIES pass: multiples of this (same float sums as sum(0))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _density(value) -> float:
    return check_number(value, "density", low=0.0, high=1.0, low_open=True)


def _drop_rate(value) -> float:
    return check_number(value, "p", low=0.0, high=1.0, high_open=True)


def all_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN or inf, in one pass and one host sync, no boolean tensor of
    ``t``'s size: a finite sum proves every entry finite (NaN and inf propagate into a sum; inf - inf
    is NaN); only a non-finite sum (which finite values can give by overflow) is checked again with
    ``aminmax`` (NaN propagates into min and max, +-inf shows as an extreme)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    mn, mx = torch.aminmax(t)
    return bool(torch.isfinite(torch.stack((mn, mx))).all())


def check_finite(t: Tensor, name: str = "tvs") -> None:
    """Raise :class:`~mergelib.task_vectors.NonFiniteError` if ``t`` holds NaN or inf (one ``aminmax``
    pass and one host sync; the counts in the message are computed only on failure)."""
    if not all_finite(t):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise NonFiniteError(f"{name} has non-finite values ({n_nan} NaN, {n_inf} inf); a NaN or inf "
                             "anywhere would silently spoil the merge")


def _check_matrix(tvs: Tensor, name: str = "tvs", finite: bool = True) -> tuple[int, int]:
    if not isinstance(tvs, Tensor) or tvs.ndim != 2:
        raise ValueError(f"{name} must be an N x D tensor, got "
                         f"{tuple(tvs.shape) if isinstance(tvs, Tensor) else type(tvs).__name__}")
    if not tvs.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {tvs.dtype}")
    if tvs.shape[0] < 1 or tvs.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(tvs.shape)}")
    if finite:
        check_finite(tvs, name)
    return tvs.shape[0], tvs.shape[1]


def kth_smallest(x: Tensor, k: int, dim: int = -1, keepdim: bool = False) -> Tensor:
    """The k-th smallest value (1-based, ``k`` in ``[1, n]``) along ``dim``; = ``sorted(x)[k - 1]``.

    Exact, bit for bit the value of ``torch.kthvalue``: :func:`mergelib.selection.kth_smallest` (a
    sampled bracket and one exact counting pass on long rows; ``kthvalue``/``topk`` on short ones).
    """
    return _select.kth_smallest(x, k, dim=dim, keepdim=keepdim)


def _safe_den(den: Tensor) -> Tensor:
    """max - min of a row; 0 (a constant row) becomes inf so that min-max normalisation gives 0."""
    return torch.where(den > 0, den, torch.full_like(den, float("inf")))


def _like(scratch: Scratch | None, name: str, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous buffer of ``t``'s shape (and dtype, or ``dtype``) from ``scratch``, or a fresh one
    without. The merges' per-chunk temporaries come from one :class:`~mergelib.task_vectors.Scratch`
    per merge: fresh blocks of a few MB per chunk were returned to the kernel by glibc and faulted in
    again on the next chunk (450 K page faults, half of a PCB merge's time, when a process runs PCB first)."""
    dtype = t.dtype if dtype is None else dtype
    if scratch is None:
        return torch.empty(t.shape, dtype=dtype, device=t.device)
    return scratch.get(name, t.numel(), dtype, t.device).view(t.shape)


# ----------------------------------------------------------------------------------------------
# TIES-Merging (Yadav et al., NeurIPS 2023)
# ----------------------------------------------------------------------------------------------
def _trim_kth(d: int, density: float) -> int | None:
    """Official ``topk_values_mask``: threshold = kthvalue(|tau|, d - int(d * density)); None = keep all."""
    keep = int(d * density)
    return None if keep >= d else d - keep


def _trim_plan(tvs: Tensor | TaskVectorColumns, density: float, granularity: str, layout: FlatLayout | None,
               trim_rule: str) -> list[tuple[int, int, Tensor | None, int]]:
    """``[(start, end, threshold N x 1 or None, keep), ...]`` per segment of the trim.

    ``threshold`` is the official kthvalue threshold (``trim_rule="official"``) or the ``keep``-th
    largest |tau| (``"exact"``); None keeps the whole segment (official, density 1) or nothing
    (exact, ``keep = 0``). Computed with :func:`mergelib.selection.kth_smallest` (|tau| is never
    materialised as an ``N x D`` copy). ``tvs`` may be a :class:`TaskVectorColumns` (the matrix as
    column blocks): the global threshold then comes from one counting pass over its blocks
    (:func:`mergelib.selection.kth_smallest_columns`), a tensor's from a pass over that tensor's
    columns (:meth:`~mergelib.task_vectors.TaskVectorColumns.columns_of`).
    """
    n, D = tvs.shape
    if granularity == "global":
        segs = [(None, 0, D)]
    else:
        if layout is None or layout.D != D:
            raise ValueError("granularity='tensor' needs the FlatLayout of tvs (layout.D == D)")
        segs = layout.segments()
    plan = []
    for key, s, e in segs:
        d = e - s
        keep = int(d * density)
        if trim_rule == "official":
            kth = _trim_kth(d, density)
        else:
            kth = None if keep <= 0 or keep >= d else d - keep + 1
        if kth is None:
            thr = None
        elif isinstance(tvs, Tensor) and d >= _select.LONG_ROW and _gpu.available(tvs) and tvs.stride(1) == 1:
            thr = _gpu.kth_abs_rows(tvs[:, s:e], kth)  # one fused counting pass (Triton, CUDA)
        elif isinstance(tvs, Tensor):
            thr = _select.kth_smallest(tvs[:, s:e], kth, dim=1, keepdim=True, absolute=True)
        elif (s, e) == (0, D):
            thr = _select.kth_smallest_columns(tvs, kth, absolute=True)
        else:  # one tensor's columns
            thr = _select.kth_smallest_columns(tvs.columns_of(key), kth, absolute=True)
        plan.append((s, e, thr, keep))
    return plan


def _trim_into(out: Tensor, x: Tensor, thr: Tensor | None, keep: int, trim_rule: str,
               taken: Tensor | None, scratch: Scratch | None = None) -> None:
    """Write the trimmed ``x`` (``N x C``, part of one segment) into ``out`` (``N x C``).

    official: ``x * 1[|x| >= thr]`` (the official ``topk_values_mask``; ties kept). exact: every
    entry with ``|x| > thr`` and, in index order, the ties ``|x| == thr`` still needed to reach
    ``keep`` per row (``taken``: ``N x 1`` int64 count of ties already kept in this segment).
    ``scratch``: where the exact rule's temporaries go (:func:`_like`).
    """
    if thr is None:
        if trim_rule == "exact" and keep <= 0:
            out.zero_()
        elif out.data_ptr() != x.data_ptr():
            out.copy_(x)
        return
    if trim_rule == "official":  # a float 0/1 mask (x * 1.0 = x, x * 0.0 = x * False): fast on the CPU
        a = x.abs() if out.data_ptr() == x.data_ptr() else torch.abs(x, out=out)
        torch.mul(x, a.ge_(thr), out=out)
        return
    # float32 0/1 masks: their sums and running counts are exact (a chunk's rows hold fewer than 2**24
    # entries) and several times faster than a bool tensor's on the CPU; x * 1.0 = x, x * 0.0 = x * False
    a = torch.abs(x, out=_like(scratch, "|x|", x))
    eq = torch.eq(a, thr, out=_like(scratch, "eq", a, torch.float32))
    mask = torch.gt(a, thr, out=_like(scratch, "gt", a, torch.float32))
    n_eq = eq.sum(1, keepdim=True).long()
    if bool(n_eq.any()):
        # ties still needed: keep - #(> thr over the whole segment) - taken; precomputed in taken[:, 1]
        need = taken[:, 1:2] - taken[:, 0:1]
        every = need >= n_eq  # rows whose budget covers every tie of this chunk (need <= 0: none)
        part = ((need > 0) & ~every).squeeze(1)  # rows whose budget runs out inside this chunk
        if bool(part.any()):  # the first `need` ties in index order: a running count on those rows only
            rows = part.nonzero().squeeze(1)
            e = eq[rows]
            mask[rows] += e * (e.cumsum(1) <= need[rows])
        mask.add_(eq.mul_(every))  # the rows that take every tie (0 on the others)
        taken[:, 0:1] += torch.minimum(n_eq, need.clamp_min(0))
    torch.mul(x, mask, out=out)


def _exact_tie_budget(tvs: Tensor, plan) -> list[Tensor | None]:
    """For ``trim_rule="exact"``: per segment an ``N x 2`` int64 tensor [ties taken so far, ties
    allowed = keep - #(|x| > thr)] (None where the segment has no threshold)."""
    out = []
    scratch = Scratch()  # a chunk's |x| and comparison, reused (fresh ones were faulted in every chunk)
    n, D = tvs.shape
    width = _column_chunks(n, D, tvs.device)[0][1]  # N x width blocks in cache (the counts are exact)
    for s, e, thr, keep in plan:
        if thr is None:
            out.append(None)
            continue
        gt = torch.zeros(n, 1, dtype=torch.int64, device=tvs.device)
        for a0 in range(s, e, width):
            a1 = min(a0 + width, e)
            a = torch.abs(tvs[:, a0:a1], out=_like(scratch, "|x|", tvs[:, a0:a1]))
            # a float32 0/1 mask: its row sums are exact (fewer than 2**24 entries) and need no int64 copy
            gt += torch.gt(a, thr, out=_like(scratch, "gt", a, torch.float32)).sum(1, keepdim=True).long()
        out.append(torch.cat([torch.zeros_like(gt), keep - gt], 1))
    return out


def trim(tvs: Tensor, density: float, granularity: str = "global", layout: FlatLayout | None = None,
         inplace: bool = False, trim_rule: str = "official") -> Tensor:
    """TIES step 1: keep the top-``density`` fraction of |tau_i| per task, zero the rest.

    ``tvs``: ``N x D`` float. Returns ``N x D`` (the same tensor when ``inplace``).

    * ``trim_rule="official"`` (default; official ``topk_values_mask``): with ``k = d - int(d * density)``,
      ``t_i = kthvalue(|tau_i|, k)`` and ``tau_hat_i = tau_i * 1[|tau_i| >= t_i]``. Ties at the
      threshold are kept, so ``int(d * density) + 1`` entries survive when values are distinct, and
      many more when they are not (bf16 task vectors: docs/methods.md); all if ``density = 1``.
    * ``trim_rule="exact"`` (peft's ``magnitude_based_pruning``, mergekit): exactly
      ``int(d * density)`` entries survive, the largest |tau_i|; ties at the threshold are kept in
      index order (lowest index first).

    ``granularity="global"`` uses the whole row (d = D, the paper); ``"tensor"`` applies the rule to
    every segment of ``layout`` separately (d = numel of the tensor; mergekit's per-tensor variant).
    """
    n, D = _check_matrix(tvs)
    density = _density(density)
    check_choice(granularity, "granularity", ("global", "tensor"))
    check_choice(trim_rule, "trim_rule", TRIM_RULES)
    plan = _trim_plan(tvs, density, granularity, layout, trim_rule)
    budgets = _exact_tie_budget(tvs, plan) if trim_rule == "exact" else [None] * len(plan)
    out = tvs if inplace else empty_matrix(tuple(tvs.shape), dtype=tvs.dtype, device=tvs.device)
    for (s, e, thr, keep), taken in zip(plan, budgets):
        for a0 in range(s, e, _select.CHUNK):
            a1 = min(a0 + _select.CHUNK, e)
            _trim_into(out[:, a0:a1], tvs[:, a0:a1], thr, keep, trim_rule, taken)
    return out


def elect_sign(trimmed: Tensor, rule: str = "mass") -> Tensor:
    """TIES step 2: the elected sign gamma, ``D`` float32 in {-1, +1} (0 only where everything is 0).

    ``trimmed``: ``N x D`` finite floats.

    * ``rule="mass"`` (the paper and the official TIES code): gamma = sign(sum_i tau_hat_i); where the
      sum is exactly 0, gamma takes the majority sign sign(sum_j gamma_j) of the whole vector
      (official ``resolve_zero_signs(..., "majority")``).
    * ``rule="count"`` (mergekit's ``consensus_method="count"``, peft's
      ``majority_sign_method="frequency"``): gamma = +1 where sum_i sign(tau_hat_i) >= 0, else -1,
      so a tied count resolves to **+1**, exactly as both libraries do
      (``majority_sign = where(sign_weight >= 0, 1, -1)``).
    """
    _check_matrix(trimmed, "trimmed")
    check_choice(rule, "sign_rule", ("mass", "count"))
    return _elect_sign(trimmed, rule)


def _elect_sign(trimmed: Tensor, rule: str) -> Tensor:
    if rule == "count":
        count = torch.zeros_like(trimmed[0])
        for row in trimmed:
            count.add_(torch.sign(row))
        return torch.where(count >= 0, 1.0, -1.0).to(trimmed.dtype)
    gamma = torch.sign(trimmed.sum(0))
    majority = torch.sign(gamma.sum())
    return torch.where(gamma == 0, majority, gamma)


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """TIES step 3: tau_m[j] = sum_{i in A_j} tau_hat_i[j] / max(|A_j|, 1) with
    A_j = {i : sign(tau_hat_i[j]) = gamma[j], tau_hat_i[j] != 0}.

    ``trimmed``: ``N x D``, ``sign``: ``D``; returns ``D`` float32. As in the official code, a
    coordinate with gamma = 0 keeps the negative entries (``where(gamma > 0, t > 0, t < 0)``).
    """
    _check_matrix(trimmed, "trimmed")
    return _disjoint_mean(trimmed, sign)


def _disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    # s = +1 where gamma > 0 else -1; then t agrees iff t * s > 0, and its value is relu(t * s) * s
    s = torch.where(sign > 0, 1.0, -1.0).to(trimmed.dtype)
    num = torch.zeros_like(trimmed[0])
    cnt = torch.zeros_like(trimmed[0])
    for row in trimmed:
        agree = torch.mul(row, s)
        cnt.add_(agree > 0)
        num.add_(agree.clamp_min_(0))
    return num.mul_(s).div_(cnt.clamp_min_(1))


def ties_merge(tvs: Tensor, density: float = 0.2, granularity: str = "global", layout: FlatLayout | None = None,
               sign_rule: str = "mass", inplace: bool = False, trim_rule: str = "official",
               check: bool = True) -> Tensor:
    """TIES-Merging of ``N x D`` finite float task vectors -> merged ``D`` float32 task vector tau_m.

    tau_hat = trim(tau, density, granularity, trim_rule) (``"global"``: the paper; ``"tensor"``:
    mergekit; ``trim_rule``: :func:`trim`); gamma = elect_sign(tau_hat, sign_rule);
    tau_m = disjoint_mean(tau_hat, gamma); the model is theta_0 + lambda * tau_m (lambda = 1 without
    validation data). Raises ``NonFiniteError`` for NaN/inf in ``tvs`` and ``HyperparameterError``
    for a bad ``density``, ``granularity``, ``sign_rule`` or ``trim_rule``.

    Implementation: the thresholds come from :mod:`mergelib.selection`; then one fused pass over
    column chunks trims, elects and averages while the chunk is in cache, so ``tvs`` is read about
    twice in all and never copied (``inplace`` is accepted for compatibility; ``tvs`` is not
    modified). The result equals ``disjoint_mean(trim(...), elect_sign(...))``.
    """
    n, D = _check_matrix(tvs, finite=check)
    density = _density(density)
    check_choice(granularity, "granularity", ("global", "tensor"))
    check_choice(sign_rule, "sign_rule", ("mass", "count"))
    check_choice(trim_rule, "trim_rule", TRIM_RULES)
    plan = _trim_plan(tvs, density, granularity, layout, trim_rule)
    budgets = _exact_tie_budget(tvs, plan) if trim_rule == "exact" else [None] * len(plan)
    return _ties_fused(tvs, plan, budgets, trim_rule, sign_rule)


def _row_sum(x: Tensor, out: Tensor | None = None) -> Tensor:
    """sum of the rows in order, from zero (the float operations of the official disjoint mean);
    into ``out`` when given."""
    acc = torch.zeros_like(x[0]) if out is None else out.zero_()
    for row in x:
        acc.add_(row)
    return acc


def _ties_fused(tvs: Tensor, plan, budgets, trim_rule: str, sign_rule: str,
                majority: int | None = None, defer: dict | None = None) -> Tensor:
    """Trim, elect and average ``tvs`` (``N x D``) chunk by chunk (see :func:`ties_merge`).

    ``majority``: the sign taken where the summed trimmed values are exactly 0 (``rule="mass"``);
    None computes it from ``tvs`` itself (the streaming merge passes the model-wide one).

    ``defer`` (a dict; ``rule="mass"``, ``majority=None``): return the result for a negative majority
    sign and leave the patch for a positive one to the caller, who knows the sign only later (the
    streaming merge, whose majority is model-wide): ``defer`` receives ``"votes"`` (#(sum > 0) -
    #(sum < 0) over the columns, float64), ``"zero"`` (bool ``D``: the columns whose sum is 0) and
    ``"cancel"`` (``[(columns, values)]``: where those columns' entries cancel, the values a positive
    majority gives there; elsewhere in ``zero`` it gives +0.0).

    Per chunk: s = +1 where gamma > 0 else -1; t * s > 0 marks the agreeing entries, and
    tau_m = s * sum_i relu(t_i * s) / max(#agreeing, 1): the float operations of :func:`disjoint_mean`,
    the rows summed in order (the same bits however the columns are chunked). Masks and counts are
    float 0/1 tensors (exact; comparisons into bool tensors are several times slower on the CPU).
    Where gamma = 0 and the majority sign (known after the sweep) is +, the result is the positive
    entries' mean: +0.0 where every trimmed entry is 0, computed per column where they cancel.
    """
    n, D = tvs.shape
    dev = tvs.device
    if (trim_rule == "official" and defer is None and isinstance(tvs, Tensor) and tvs.dtype == torch.float32
            and tvs.stride(1) == 1 and _gpu.available(tvs)):  # the same bits in two fused passes (Triton, CUDA)
        return _gpu.ties_sweep(tvs, [(s, e, thr) for s, e, thr, _ in plan], sign_rule, majority)
    out = empty_matrix((D,), dtype=tvs.dtype, device=dev)
    fix_zero = sign_rule == "mass" and majority is None
    zero = torch.empty(D, dtype=torch.bool, device=dev) if fix_zero else None
    cancel: list[tuple[Tensor, Tensor]] = []  # (columns, mean of the positive entries) where gamma = 0
    votes = torch.zeros((), dtype=torch.float64, device=dev)  # #(sum > 0) - #(sum < 0) over the columns
    width = _column_chunks(n, D, dev)[0][1]
    vec = torch.empty(3, width, dtype=tvs.dtype, device=dev)  # per chunk: the column sums, s, a 0/1 mask
    for c0, c1, t, f in _trimmed_chunks(tvs, plan, budgets, trim_rule):
        tot, s, zf = vec[:, : c1 - c0]
        if sign_rule == "count":
            torch.ge(torch.sign(t, out=f).sum(0), 0, out=s)
        else:
            _row_sum(t, out=tot)  # rows in order: the same bits however the columns are chunked
            if fix_zero:
                votes += torch.sign(tot).sum(dtype=torch.float64)
                torch.eq(tot, 0, out=zero[c0:c1])
            # gamma = +1 where the sum is > 0 (and where it is 0 if the given majority sign is +)
            (torch.gt if fix_zero or majority <= 0 else torch.ge)(tot, 0, out=s)
        s.mul_(2.0).sub_(1.0)  # +1 / -1
        t.mul_(s)  # t_i * s > 0: entry i agrees with gamma
        cnt = torch.gt(t, 0, out=f).sum(0)
        if fix_zero and float(torch.dot(torch.eq(tot, 0, out=zf), cnt)) > 0:
            cols = (zero[c0:c1] & (cnt > 0)).nonzero().squeeze(1)  # gamma = 0 with nonzero entries (cancelling)
            tc = t[:, cols].neg_()  # s = -1 there: the trimmed values
            cancel.append((cols + c0, _row_sum(tc.clamp_min(0)).div_((tc > 0).sum(0).to(t.dtype).clamp_min_(1))))
        _row_sum(t.clamp_min_(0), out=out[c0:c1]).mul_(s).div_(cnt.clamp_min_(1))
    if defer is not None:
        if not fix_zero:
            raise ValueError("internal error: defer needs sign_rule='mass' and majority=None")
        defer.update(votes=votes, zero=zero, cancel=cancel)
    elif fix_zero and float(votes) > 0:  # gamma = 0 takes the majority sign (+)
        out.masked_fill_(zero, 0.0)
        for cols, val in cancel:
            out[cols] = val
    return out


def _column_chunks(n: int, D: int, device: torch.device) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` of an ``N x D`` matrix whose ``N x (c1 - c0)`` blocks fit in cache
    (about ``selection.CHUNK`` elements on the CPU, ``2**24`` on other devices). Boundaries are
    multiples of ``_ALIGN``, so a chunked elementwise op gives the bits of the unchunked one."""
    chunk = _select.CHUNK if device.type == "cpu" else 1 << 24  # elements of the N x C chunk
    width = max(_ALIGN, (chunk // n) // _ALIGN * _ALIGN)
    return [(c0, min(c0 + width, D)) for c0 in range(0, D, width)]


def _column_reader(src: Tensor | TaskVectorColumns, width: int):
    """``read(c0, c1)``: columns ``[c0, c1)`` (at most ``width``) of an ``N x D`` matrix (a view) or of a
    :class:`TaskVectorColumns` (computed into one reused buffer, valid until the next call)."""
    if isinstance(src, Tensor):
        return lambda c0, c1: src[:, c0:c1]
    buf = torch.empty(src.shape[0], width, dtype=src.dtype, device=src.device)
    return lambda c0, c1: src.block(c0, c1, buf[:, : c1 - c0])


def _trimmed_chunks(tvs: Tensor | TaskVectorColumns, plan, budgets, trim_rule: str):
    """Yield ``(c0, c1, trimmed, scratch)`` over :func:`_column_chunks` of ``tvs``: the trimmed
    ``N x (c1 - c0)`` block and a scratch block of the same shape (two reused buffers). A
    :class:`TaskVectorColumns` is read block by block into a third buffer."""
    n, D = tvs.shape
    chunks = _column_chunks(n, D, tvs.device)
    width = chunks[0][1] - chunks[0][0]
    read = _column_reader(tvs, width)
    buf = torch.empty(2, n, width, dtype=tvs.dtype, device=tvs.device)
    scratch = Scratch()  # the exact trim rule's temporaries (_trim_into)
    seg_i = 0
    for c0, c1 in chunks:
        t = buf[0, :, : c1 - c0]
        x = read(c0, c1)
        while seg_i < len(plan) and plan[seg_i][1] <= c0:
            seg_i += 1
        j = seg_i
        while j < len(plan) and plan[j][0] < c1:
            s, e, thr, keep = plan[j]
            a0, a1 = max(s, c0), min(e, c1)
            _trim_into(t[:, a0 - c0:a1 - c0], x[:, a0 - c0:a1 - c0], thr, keep, trim_rule, budgets[j], scratch)
            j += 1
        yield c0, c1, t, buf[1, :, : c1 - c0]


# ----------------------------------------------------------------------------------------------
# DARE (Yu et al., ICML 2024)
# ----------------------------------------------------------------------------------------------
def dare(tv: Tensor, p: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """Drop And REscale one tensor: tau_tilde = m * tau / (1 - p), m ~ Bernoulli(1 - p) elementwise.

    ``tv``: any shape, finite float; returns the same shape and dtype (a new tensor). ``p`` in
    ``[0, 1)``; p = 0 is the identity. ``generator`` (required) supplies the uniform draws u; an entry
    is kept when ``u >= p``. Draws are made on the generator's device and moved to ``tv``'s device, so
    the mask depends on the generator, not on where ``tv`` lives (use a CPU generator, as
    :func:`dare_state_dict` and :func:`dare_flat` do, for masks that are the same on every device).
    """
    p = _drop_rate(p)
    if not isinstance(generator, torch.Generator):
        raise TypeError("dare needs an explicit torch.Generator (randomness is never global)")
    check_finite(tv, "tv")
    u = torch.rand(tv.shape, generator=generator, device=generator.device, dtype=torch.float32)
    keep = u.ge_(p).to(device=tv.device, dtype=tv.dtype)
    out = tv * keep
    return out.div_(1 - p) if rescale else out


def dare_seed(seed: int, task: int | str, key: str) -> int:
    """Deterministic 63-bit seed for (base seed, task, tensor key): blake2b of ``"seed/task/key"``.

    Masks therefore do not depend on iteration order or on which other tensors are selected. The
    seeded generator is always a **CPU** ``torch.Generator`` (the draws are moved to the tensor's
    device afterwards): CPU and CUDA generators give different streams for the same seed, and a
    seed must mean one mask wherever the model lives.
    """
    seed = check_number(seed, "seed", kind=int, low=0)
    h = hashlib.blake2b(f"{seed}/{task}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def _dare_keep(shape, p: float, seed: int, task: int | str, key: str, device) -> Tensor:
    """The boolean keep mask ``u >= p`` drawn on the CPU from ``dare_seed(seed, task, key)``, on ``device``."""
    g = torch.Generator().manual_seed(dare_seed(seed, task, key))
    return torch.rand(shape, generator=g, dtype=torch.float32).ge_(p).to(device)


def dare_state_dict(tv: Mapping[str, Tensor], p: float, seed: int, task: int | str = 0,
                    rescale: bool = True) -> dict[str, Tensor]:
    """DARE on every tensor of one task vector, tensor k seeded with ``dare_seed(seed, task, k)``
    (a CPU generator: the same masks on every device).

    Returns a new dict with the same keys, shapes and dtypes (tensors on their own devices). Where
    :mod:`mergelib.kernels` runs, float32 CPU tensors take one compiled pass; the other tensors' masks are
    drawn together on a thread pool (:func:`_draw_keeps`; for tensors on a GPU, one tensor at a time took
    seconds), then applied on each tensor's device.
    """
    p = _drop_rate(p)
    out = {}
    keeps = {}  # key -> its boolean keep mask (CPU), drawn below
    for k, t in tv.items():
        check_finite(t, f"tensor {k!r}")
        if rescale and _dare_compiled(t):  # the same draws and bits in one pass (mergelib.kernels.dare_drop)
            out[k] = torch.empty_like(t)
            _kernels.dare_drop(t, out[k], dare_seed(seed, task, k), p)
        else:
            keeps[k] = torch.empty(t.shape, dtype=torch.bool)
    _draw_keeps([(task, k, keep.view(-1)) for k, keep in keeps.items()], p, seed)
    for k, keep in keeps.items():
        kept = tv[k] * keep.to(tv[k].device)
        out[k] = kept.div_(1 - p) if rescale else kept
    return {k: out[k] for k in tv}


def dare_flat(tvs: Tensor, p: float, layout: FlatLayout, seed: int,
              tasks: Sequence[int | str] | None = None, inplace: bool = False) -> Tensor:
    """DARE on a flat ``N x D`` matrix, segment by segment: row i, tensor k is masked with a CPU
    generator seeded ``dare_seed(seed, tasks[i], k)`` (``tasks`` defaults to ``0..N-1``), so the
    result equals :func:`dare_state_dict` on the unflattened task vectors, and the masks are the same
    on the CPU and on CUDA. Returns ``N x D``.
    """
    n, D = _check_matrix(tvs)
    p = _drop_rate(p)
    if layout.D != D:
        raise ValueError(f"layout.D={layout.D} does not match tvs with D={D}")
    tasks = list(range(n)) if tasks is None else list(tasks)
    if len(tasks) != n:
        raise ValueError(f"tasks has {len(tasks)} entries for {n} rows")
    out = tvs if inplace else empty_matrix(tuple(tvs.shape), dtype=tvs.dtype, device=tvs.device)
    if tvs.device.type != "cpu":  # the CPU draws, all at once, then one multiply on the device
        torch.mul(tvs, _dare_keeps(n, layout, tasks, p, seed).to(tvs.device), out=out)
        return out.div_(1 - p)
    compiled = _dare_compiled(tvs, out)
    for i, task in enumerate(tasks):
        for k, s, e in layout.segments():
            if compiled:  # the same draws, mask and bits in one pass (mergelib.kernels.dare_drop)
                _kernels.dare_drop(tvs[i, s:e], out[i, s:e], dare_seed(seed, task, k), p)
                continue
            torch.mul(tvs[i, s:e], _dare_keep(e - s, p, seed, task, k, tvs.device), out=out[i, s:e])
            out[i, s:e].div_(1 - p)
    return out


def _dare_keeps(n: int, layout: FlatLayout, tasks: Sequence[int | str], p: float, seed: int) -> Tensor:
    """The ``N x D`` boolean keep masks of :func:`dare_flat` on the CPU, tensor by tensor as
    :func:`_dare_keep` draws them (:func:`_draw_keeps`)."""
    keep = torch.empty(n, layout.D, dtype=torch.bool)
    _draw_keeps([(task, k, keep[i, s:e]) for i, task in enumerate(tasks) for k, s, e in layout.segments()], p, seed)
    return keep


def _draw_keeps(jobs: Sequence[tuple[int | str, str, Tensor]], p: float, seed: int) -> None:
    """DARE's keep masks ``u >= p`` of :func:`_dare_keep` into the flat CPU boolean tensors of ``jobs``
    (``(task, key, out)``), on ``torch.get_num_threads()`` threads: each (task, tensor) has its own
    generator, so the draws are independent, and torch releases the GIL while it draws. For tensors on
    the GPU, whose masks must be the CPU's (:func:`dare_seed`): drawn on one thread, the masks of eight
    tasks of 85 M entries took 3.7 s on the H200 machine, 0.46 s on its 16 (``benchmarks/results_gpu.md``;
    TIES takes 6 ms there)."""
    from concurrent.futures import ThreadPoolExecutor

    def draw(job):
        task, k, out = job
        g = torch.Generator().manual_seed(dare_seed(seed, task, k))
        torch.ge(torch.rand(out.numel(), generator=g, dtype=torch.float32), p, out=out)

    if len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            list(pool.map(draw, jobs))
    elif jobs:
        draw(jobs[0])


def _dare_compiled(*tensors: Tensor) -> bool:
    """Whether :func:`mergelib.kernels.dare_drop` gives these float32 CPU tensors DARE's bits (Numba, and
    torch's CPU generator drawing as the loop does)."""
    return (all(t.dtype == torch.float32 for t in tensors) and _kernels.available(*tensors)
            and _kernels.dare_matches_torch())


# ----------------------------------------------------------------------------------------------
# PCB-Merging (Du et al., NeurIPS 2024)
# ----------------------------------------------------------------------------------------------
def _clamp_abs(t: Tensor, lo: Tensor, hi: Tensor, out: Tensor) -> Tensor:
    """clamp(|t|, lo, hi) as min(max(|t|, lo), hi) into ``out`` (the same bits; faster than ``clamp``
    with tensor bounds)."""
    a = torch.abs(t, out=out)
    return torch.minimum(torch.maximum(a, lo, out=a), hi, out=a)


# torch.tanh returns its argument for every float32 |x| < 2**-12: tanh x = x - x**3/3 + ..., and the
# correction is below half an ulp there. Checked on this course's CPU build for every float32 below the
# threshold, both signs (tests/test_competition.py checks the top eight binades under it on whatever build
# runs the tests). PCB's cross term tanh(tau_i * sum_j tau_j) takes products of task-vector entries, of
# order 1e-6 on real fine-tunes, and torch's float32 tanh costs about 2.5 ns per entry on one core (a
# quarter of PCB's time): blocks of entries that are all below the threshold skip it, with the same bits.
TANH_IDENTITY_BELOW = 2.0 ** -12
_TANH_BLOCK = 1024


def _tanh_(x: Tensor) -> Tensor:
    """``x.tanh_()`` with the same bits, skipping the blocks of ``_TANH_BLOCK`` entries whose values all lie
    in (-2**-12, 2**-12) (float32 on the CPU; anything else takes ``tanh_`` whole; a block holding a NaN
    takes it too). The blocks to take come from one compiled pass where :mod:`mergelib.kernels` runs
    (:func:`~mergelib.kernels.blocks_reaching`), else from torch's ``aminmax``."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.numel() < _TANH_BLOCK:
        return x.tanh_()
    flat = x.view(-1)
    whole = flat.numel() - flat.numel() % _TANH_BLOCK
    flat[whole:].tanh_()
    blocks = flat[:whole].view(-1, _TANH_BLOCK)
    if _kernels.available(blocks):  # the blocks to take, in one compiled pass
        need = _kernels.blocks_reaching(blocks, TANH_IDENTITY_BELOW)
    else:
        lo, hi = torch.aminmax(blocks)
        if -TANH_IDENTITY_BELOW < lo.item() and hi.item() < TANH_IDENTITY_BELOW:
            return x  # the common case: no entry of the tensor reaches the threshold
        lo, hi = torch.aminmax(blocks, dim=1)
        need = torch.logical_and(hi < TANH_IDENTITY_BELOW, lo > -TANH_IDENTITY_BELOW).logical_not_().nonzero().view(-1)
    if 2 * need.numel() > blocks.shape[0]:
        blocks.tanh_()
    elif need.numel():
        blocks[need] = blocks[need].tanh_()
    return x


def _pcb_official_row(t: Tensor, total: Tensor, n: int, lo: Tensor, hi: Tensor,
                      tprime: bool = True, scratch: Scratch | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """``pcb-merging.py::PCB_merge`` elementwise, given the clip values ``lo``, ``hi``
    (:func:`_pcb_official_clip`): (tau' = sign(t) * clamp(|t|) or None if not ``tprime``, intra,
    inter). ``t``: one task's row (``lo``, ``hi`` 0-dim) or an ``N x C`` block of all tasks (``lo``,
    ``hi`` ``N x 1``); ``total``: the column sums of the same columns. ``scratch``: where the
    temporaries go (:func:`_like`; intra and inter then live in it until the next call)."""
    a = _clamp_abs(t, lo, hi, _like(scratch, "pcb |t|", t))  # the row's min is now lo and its max hi
    d = (a - lo) if tprime else a.sub_(lo)
    intra = d.div_(_safe_den(hi - lo)).square_().mul_(n).exp_()  # exp(N * minmax(a)^2)
    inter = _tanh_(torch.mul(t, total, out=_like(scratch, "pcb inter", t)))  # tanh(tau_i * sum_j tau_j), raw tau
    return (a.mul_(torch.sign(t)) if tprime else None), intra, inter


def _pcb_official_tprime(t: Tensor, lo: Tensor, hi: Tensor, scratch: Scratch | None = None) -> Tensor:
    """tau' = sign(t) * clamp(|t|, lo, hi) of :func:`_pcb_official_row` alone (the same bits)."""
    return _clamp_abs(t, lo, hi, _like(scratch, "pcb tau'", t)).mul_(torch.sign(t, out=_like(scratch, "pcb sign", t)))


def _pcb_official_clip(t: Tensor, lo_k: int, hi_k: int) -> tuple[Tensor, Tensor]:
    """The row's clip values: the ``lo_k``-th and ``hi_k``-th smallest |t| (:func:`_pcb_official_ks`)."""
    lo, hi = _select.kth_smallest(t, [lo_k, hi_k], absolute=True).unbind(-1)
    return lo, hi


def _pcb_official_ks(D: int) -> tuple[int, int]:
    lo_idx = int(D * PCB_CLIP)
    hi_idx = int(D * (1 - PCB_CLIP) - 1)
    return lo_idx + 1, min(max(hi_idx, 0), D - 1) + 1


def _pcb_q_k(D: int, density: float) -> int:
    """Rank (1-based) of PCB's drop threshold q = sorted_row(beta)[int(D * (1 - r))]."""
    return min(int(D * (1 - density)), D - 1) + 1


def _pcb_official_beta(t: Tensor, total: Tensor, n: int, lo: Tensor, hi: Tensor, out: Tensor | None = None,
                       scratch: Scratch | None = None) -> Tensor:
    """beta = intra * inter (steps 1-4 of :func:`pcb_merge`) of a row or block (:func:`_pcb_official_row`),
    written into ``out`` when given (else into ``scratch``'s buffer, valid until the next call)."""
    _, intra, inter = _pcb_official_row(t, total, n, lo, hi, tprime=False, scratch=scratch)
    return intra.mul_(inter) if out is None else torch.mul(intra, inter, out=out)


def _pcb_official_beta_compiled(pieces, n: int, width: int, lo, hi, span, out: Tensor,
                                scratch: Scratch) -> int:
    """:func:`_pcb_official_beta` of an ``N x width`` chunk of columns given as the state dicts' slices,
    ``pieces`` (:meth:`~mergelib.task_vectors.TaskVectorColumns.pieces`: ``(col, base, finetuned)``), into
    ``out``: the arguments of ``exp`` and ``tanh`` by :func:`mergelib.kernels.pcb_scores`, then torch's
    ``exp_`` and :func:`_tanh_` on ``N x width`` blocks of ``scratch``, the shapes the torch code gives
    them (their bits are ATen's and MKL's, and a vectorised loop's scalar tail may round differently), so
    the same bits. ``lo``, ``hi``, ``span`` (``hi - lo``, inf where 0): ``N`` float32 arrays
    (:func:`mergelib.kernels.f32`). Returns the number of non-finite column sums (0: every entry finite)."""
    z, p, bad, big = _pcb_official_args_compiled(pieces, n, width, lo, hi, span, scratch)
    torch.mul(z.exp_(), _tanh_(p) if big else p, out=out)
    return bad


def _pcb_official_beta_bounded(pieces, n: int, width: int, lo, hi, span, out: Tensor, scratch: Scratch,
                               candidates, thresholds: np.ndarray, fill: np.ndarray) -> int:
    """:func:`_pcb_official_beta_compiled` where only the scores at or above a threshold per row matter (the
    streamed merge's counting pass and write pass): ``out`` holds the exact score wherever a bound of it
    reaches the row's threshold and ``fill[i]`` elsewhere (scores below the threshold), ``exp`` and ``tanh``
    taken only there (:class:`mergelib.kernels.ScoreCandidates` ``candidates``; ``thresholds``: ``N`` float32,
    all above 0); a chunk that :func:`_bounded_chunk` turns down gets every score. Returns the number of
    non-finite column sums."""
    z, p, bad, big = _pcb_official_args_compiled(pieces, n, width, lo, hi, span, scratch, candidates.bounds(n, width))
    if _bounded_chunk(bad, big, n, width):
        candidates.fill(z, p, thresholds, fill, out, big > 0)
    else:
        torch.mul(z.exp_(), _tanh_(p) if big else p, out=out)
    return bad


def _pcb_official_args_compiled(pieces, n: int, width: int, lo, hi, span, scratch: Scratch, bounds=None):
    """The arguments of ``exp`` and ``tanh`` of :func:`_pcb_official_beta_compiled` (``z``, ``p``: ``N x width``
    blocks of ``scratch``), the number of non-finite column sums and the number of entries whose ``tanh``
    may differ from ``p`` (``|p| >= 2**-12`` or NaN). ``bounds``: None, or an ``N x width`` array for the
    scores' upper bounds (:meth:`mergelib.kernels.KeptScores.add_bounded`)."""
    z = scratch.get("pcb |t|", n * width).view(n, width)
    p = scratch.get("pcb inter", n * width).view(n, width)
    bad = big = 0
    zn, pn = z.numpy(), p.numpy()
    for col, base, fts in pieces:
        nb, nbig = _kernels.pcb_scores(zn, pn, col, fts, base, lo, hi, span, bounds)
        bad, big = bad + nb, big + nbig
    return z, p, bad, big


def _pcb_lambdas(lams: Sequence[float], dtype: torch.dtype, device) -> Tensor | None:
    """PCB's per-task coefficients as an ``N x 1`` column for :func:`_pcb_official_add`, or None when all
    are 1 (the default: 1 * tau' = tau' exactly, so the product is skipped)."""
    if all(v == 1.0 for v in lams):
        return None
    return torch.tensor(list(lams), dtype=dtype, device=device).unsqueeze(1)


def _pcb_weighted_sum_args(q: Tensor, beta_max: Tensor, lams: Sequence[float]):
    """Steps 5-6's per-task arguments of :func:`mergelib.kernels.pcb_weighted_sum` (``merge()`` and the
    streamed write pass): ``q``, ``max(beta) - q`` (inf where 0: :func:`_safe_den`) and the lambdas (None:
    all 1), as float32 arrays."""
    lam = _pcb_lambdas(lams, torch.float32, "cpu")
    return _kernels.f32(q), _kernels.f32(_safe_den(beta_max - q)), None if lam is None else _kernels.f32(lam)


def _pcb_official_add(num: Tensor, den: Tensor, tprime: Tensor, beta: Tensor, q: Tensor, beta_max: Tensor,
                      lam: Tensor | None) -> None:
    """Steps 5-6 of :func:`pcb_merge` for an ``N x C`` block of all tasks, elementwise given the rows'
    thresholds ``q``, ``beta_max`` and ``lam`` (``N x 1``; None: all 1, :func:`_pcb_lambdas`):
    s = minmax(max(beta, q)) (entries <= q get 0); num += sum_i s_i * (lam_i * tau'_i),
    den += sum_i s_i, the rows added in order. ``beta`` and ``tprime`` are overwritten."""
    s = torch.maximum(beta, q, out=beta).sub_(q).div_(_safe_den(beta_max - q))  # min is q, max beta_max
    if lam is not None:
        tprime.mul_(lam)  # lam_i * tau'_i
    for row in tprime.mul_(s):  # then * s_i
        num.add_(row)
    for row in s:
        den.add_(row)


def _scaled_softmax_(x: Tensor) -> Tensor:
    """D * softmax(x) over the last dim, in place (mean 1: avoids 1/D-sized values; the factor D is common
    to every task, so it cancels in PCB's weighted average and does not move the top-r mask)."""
    e = x.sub_(x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.mean(-1, keepdim=True))


def _minmax_(x: Tensor) -> Tensor:
    """(x - min) / (max - min), in place."""
    mn, mx = torch.aminmax(x)
    return x.sub_(mn).div_(_safe_den(mx - mn))


def _pcb_paper_inter(tvs: Tensor) -> Tensor:
    """inter_i = sum_j D * softmax(Norm(tau_i * tau_j)); each symmetric pair computed once, in one
    reused ``D`` buffer (a fresh product per pair faulted in 8 GB of pages per merge of the benchmark's
    8 task vectors). Both on huge pages: the scores start from
    :func:`~mergelib.task_vectors.zeros_matrix`, the product buffer from
    :func:`~mergelib.task_vectors.empty_matrix`. N x D."""
    n, D = tvs.shape
    inter = zeros_matrix((n, D), dtype=tvs.dtype, device=tvs.device)
    buf = empty_matrix((D,), dtype=tvs.dtype, device=tvs.device)
    for i in range(n):
        for j in range(i, n):
            s = _scaled_softmax_(_minmax_(torch.mul(tvs[i], tvs[j], out=buf)))
            inter[i].add_(s)
            if j != i:
                inter[j].add_(s)
    return inter


def _pcb_paper_intra(t: Tensor, n: int, out: Tensor | None = None) -> Tensor:
    """intra_i = D * softmax(N * Norm(tau_i * tau_i)), into ``out`` when given. D."""
    return _scaled_softmax_(_minmax_(torch.mul(t, t, out=out)).mul_(n))


def pcb_scores(tvs: Tensor, mode: str = "official") -> tuple[Tensor, Tensor]:
    """PCB balancing scores (intra, inter), each ``N x D`` float32, for inspection and plots.

    * ``mode="official"`` (``pcb-merging.py``): intra_i = exp(N * minmax(a_i)^2) with
      a_i = |tau_i| clamped to its order statistics at ranks int(D*1e-4) and int(D*(1-1e-4) - 1);
      inter_i = tanh(tau_i * sum_j tau_j).
    * ``mode="paper"``: intra_i = Softmax(N * Norm(tau_i * tau_i)),
      inter_i = sum_j Softmax(Norm(tau_i * tau_j)), Norm = min-max over the D entries; softmaxes
      are returned multiplied by D (mean 1; the constant cancels in the merge).

    The balancing score is beta_i = intra_i * inter_i.
    """
    n, D = _check_matrix(tvs)
    check_choice(mode, "mode", ("official", "paper"))
    if mode == "official":
        total = _row_sum(tvs)
        lo_k, hi_k = _pcb_official_ks(D)
        rows = [_pcb_official_row(t, total, n, *_pcb_official_clip(t, lo_k, hi_k))[1:] for t in tvs]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    return torch.stack([_pcb_paper_intra(t, n) for t in tvs]), _pcb_paper_inter(tvs)


def _raise_if_not_finite(src: TaskVectorColumns, chunks: list[tuple[int, int]]) -> None:
    """The exact check behind a non-finite column sum of PCB's sweeps (a sum of finite entries may
    overflow): :class:`NonFiniteError` unless every entry of the column blocks is finite."""
    read = _column_reader(src, chunks[0][1] - chunks[0][0])
    if not all(all_finite(read(c0, c1)) for c0, c1 in chunks):
        raise NonFiniteError("task vectors are not finite")


def _bounded_chunk(bad: int, big: int, n: int, width: int) -> bool:
    """Whether a chunk of PCB's scores takes ``exp`` and ``tanh`` only where a bound of the score reaches a
    threshold (:class:`mergelib.kernels.ScoreCandidates`), given :func:`_pcb_official_args_compiled`'s
    counts: every column sum finite (else the dense path, whose non-finite products it keeps), and at most a
    quarter of the entries in ``tanh``'s range (the bound takes ``tanh(p)`` as ``p``: tight where ``|p|`` is
    small, as for task vectors; where many products are large it would rule out few entries)."""
    return not bad and 4 * big <= n * width


def _pcb_official_sparse(src: TaskVectorColumns, density: float, lams: Sequence[float], lo: Tensor, hi: Tensor,
                         chunks: list[tuple[int, int]]) -> Tensor | None:
    """Steps 2-6 of :func:`_pcb_official` (compiled, from the state dicts) without its ``N x D`` scores: only
    the entries whose score beta exceeds the row's drop threshold q take part in the weighted sums (the
    others' weight is ``+0``), so each row keeps the scores above a floor below q, with their positions,
    and counts the rest (:class:`mergelib.kernels.KeptScores`). The floor and a ceiling come from the
    scores at the sampled columns of the exact order statistics (:func:`mergelib.selection._brackets`;
    the sample's scores only place the bracket, the counts and q are exact). The same bits as the dense
    path; None where a sample missed or a row would keep more than about twice its expected share (the
    caller then takes the dense path)."""
    n, D = src.shape
    q_k = _pcb_q_k(D, density)
    pos = _select._sample_index(D, min(_select.SAMPLE, D), "cpu")
    xs = src.gather(pos)
    sampled = _pcb_official_beta(xs, _row_sum(xs), n, lo, hi)
    brackets = [_select._brackets(sampled[i], D, [q_k])[0] for i in range(n)]
    floors = np.array([-np.inf if b[0] is None else float(b[0]) for b in brackets], dtype=np.float32)
    m, p = pos.numel(), q_k / D  # the entries above the floor: above q, and the bracket's ranks below it
    expected = D * (1 - p) + D * _select.bracket_margin(m, p) / m
    kept = _kernels.KeptScores(floors, capacity=int(1.25 * expected) + 4096, limit=int(2 * expected) + 4096)
    width = chunks[0][1] - chunks[0][0]
    block = empty_matrix((n, width), dtype=src.dtype, device=src.device)
    beta_max = torch.full((n, 1), -math.inf, dtype=src.dtype, device=src.device)
    lo_np, hi_np, clip_span = _kernels.f32(lo), _kernels.f32(hi), _kernels.f32(_safe_den(hi - lo))
    scratch, nonfinite = Scratch(), 0
    arrays = src.flat(_kernels._np)  # NumPy views, sliced per chunk
    # with every floor above 0, exp is taken only where a bound of the score reaches the floor
    bounded = n <= _kernels.KeptScores.BOUNDED_TASKS and bool((floors > 0).all())
    maxima = np.full(n, -np.inf, dtype=np.float32)  # the rows' largest scores in the bounded chunks
    for c0, c1 in chunks:
        b = block.view(-1)[: n * (c1 - c0)].view(n, c1 - c0)  # contiguous rows
        z, p, bad, big = _pcb_official_args_compiled(src.pieces(c0, c1, arrays), n, c1 - c0, lo_np, hi_np,
                                                     clip_span, scratch, kept.bounds(n, c1 - c0) if bounded else None)
        nonfinite += bad
        if bounded and _bounded_chunk(bad, big, n, c1 - c0):  # exp (and tanh) only at the candidates
            if not kept.add_bounded(z, p, c0, maxima, big > 0):
                return None
            continue
        torch.mul(z.exp_(), _tanh_(p) if big else p, out=b)
        torch.maximum(beta_max, b.amax(1, keepdim=True), out=beta_max)
        if not kept.add(b, c0):
            return None
    torch.maximum(beta_max, torch.from_numpy(maxima).unsqueeze(1), out=beta_max)
    if nonfinite:
        _raise_if_not_finite(src, chunks)
    qs = [kept.kth(i, q_k, None if b[1] is None else np.float32(b[1])) for i, b in enumerate(brackets)]
    if any(v is None for v in qs):
        return None
    q = torch.tensor(np.array(qs, dtype=np.float32)).to(src.dtype).unsqueeze(1)
    qs_np, span, lam_np = _pcb_weighted_sum_args(q, beta_max, lams)
    num = zeros_matrix((D,), dtype=src.dtype, device=src.device)
    den = zeros_matrix((D,), dtype=src.dtype, device=src.device)
    num_np, den_np = num.numpy(), den.numpy()
    for c0, c1 in chunks:  # steps 5-6 chunk by chunk: the scores rebuilt in cache, then the dense loop
        b = block.view(-1)[: n * (c1 - c0)].view(n, c1 - c0)
        kept.scatter(b, c0, qs_np)
        b_np = b.numpy()
        for col, base, fts in src.pieces(c0, c1, arrays):
            a0, a1 = c0 + col, c0 + col + base.shape[0]
            _kernels.pcb_weighted_sum(num_np[a0:a1], den_np[a0:a1], b_np, fts, base, lo_np, hi_np, qs_np, span, lam_np,
                                      beta_col=col)
    return num.div_(den.clamp_min_(1e-12))


def _pcb_official(src: Tensor | TaskVectorColumns, density: float, lams: Sequence[float]) -> Tensor:
    """PCB official (:func:`pcb_merge`, steps 1-6) of an ``N x D`` matrix or of a
    :class:`TaskVectorColumns` (read block by block, no ``N x D`` task-vector copy): the row
    statistics, then steps 1-4 over column chunks in cache (beta kept, ``N x D``), the drop thresholds,
    then steps 5-6 with tau' recomputed from tau. With column blocks, finiteness is checked here
    (the column sums of step 3 hold a NaN or inf wherever an entry does); raises :class:`NonFiniteError`.
    Compiled, at densities up to :data:`PCB_SPARSE_DENSITY`, beta is kept only where it may exceed the
    drop threshold (:func:`_pcb_official_sparse`), with the same bits. A float32 matrix on CUDA takes
    :func:`mergelib.gpu_kernels.pcb_official` (Triton: close to these bits, its ``exp`` and ``tanh`` its own).
    """
    n, D = src.shape
    dev = src.device
    columns = not isinstance(src, Tensor)
    q_k = _pcb_q_k(D, density)
    lo_k, hi_k = _pcb_official_ks(D)
    if (not columns and src.dtype == torch.float32 and src.stride(1) == 1 and D >= _select.LONG_ROW
            and _gpu.available(src)):  # three fused passes, no N x D scores (Triton, CUDA)
        return _gpu.pcb_official(src, lo_k, hi_k, q_k, lams)
    if columns:  # step 1's order statistics: one counting pass over the blocks for both ranks
        clip = _select.kth_smallest_columns(src, [lo_k, hi_k], absolute=True)
    else:
        clip = torch.stack([torch.stack(_pcb_official_clip(src[i], lo_k, hi_k)) for i in range(n)])
    lo, hi = clip[:, 0:1], clip[:, 1:2]  # N x 1
    chunks = _column_chunks(n, D, dev)
    read = _column_reader(src, chunks[0][1] - chunks[0][0])
    # steps 1-4 over column chunks in cache: beta (kept, N x D) and its row max
    beta = empty_matrix((n, D), dtype=src.dtype, device=dev)
    beta_max = torch.full((n, 1), -math.inf, dtype=src.dtype, device=dev)
    sums = torch.zeros((), dtype=torch.float64, device=dev)  # sum of the column sums: finite iff tau is
    scratch = Scratch()  # the chunks' temporaries (_like)
    # compiled sweeps from the state dicts (mergelib.kernels: the same float operations, exp and tanh torch's
    # on the same N x C blocks as below, so the same bits)
    fused = columns and _kernels.available(*src.tensors())
    nonfinite = 0  # column sums that are not finite (fused)
    if fused and density <= PCB_SPARSE_DENSITY and D >= _select.LONG_ROW:  # no N x D scores
        merged = _pcb_official_sparse(src, density, lams, lo, hi, chunks)
        if merged is not None:
            return merged
    if fused:
        lo_np, hi_np, clip_span = _kernels.f32(lo), _kernels.f32(hi), _kernels.f32(_safe_den(hi - lo))
        arrays = src.flat(_kernels._np)  # NumPy views, sliced per chunk
    for c0, c1 in chunks:
        b = beta[:, c0:c1]
        if fused:  # intra's exp argument and inter's tanh argument in one loop, then torch's exp and tanh
            nonfinite += _pcb_official_beta_compiled(src.pieces(c0, c1, arrays), n, c1 - c0, lo_np, hi_np, clip_span, b,
                                                     scratch)
        else:
            x = read(c0, c1)
            total = _row_sum(x, out=scratch.get("pcb total", c1 - c0, src.dtype, dev))  # rows in order: the
            if columns:                                                                # same bits tensor by tensor
                sums += total.sum(dtype=torch.float64)
            _pcb_official_beta(x, total, n, lo, hi, out=b, scratch=scratch)
        torch.maximum(beta_max, b.amax(1, keepdim=True), out=beta_max)
    if columns and (nonfinite or not math.isfinite(float(sums))):
        _raise_if_not_finite(src, chunks)
    q = torch.stack([kth_smallest(beta[i], q_k) for i in range(n)]).unsqueeze(1)  # step 5's threshold per row
    num = zeros_matrix((D,), dtype=src.dtype, device=dev)  # huge pages (task_vectors.HUGE_PAGE_BYTES)
    den = zeros_matrix((D,), dtype=src.dtype, device=dev)
    if fused:  # steps 5-6 tensor by tensor, tau' recomputed from the state dicts
        qs, span, lam_np = _pcb_weighted_sum_args(q, beta_max, lams)
        for col, base, fts in src.pieces(0, D, arrays):
            c1 = col + base.shape[0]
            _kernels.pcb_weighted_sum(num[col:c1], den[col:c1], beta, fts, base, lo_np, hi_np, qs, span, lam_np,
                                      beta_col=col)
        return num.div_(den.clamp_min_(1e-12))
    lam = _pcb_lambdas(lams, src.dtype, dev)
    for c0, c1 in chunks:  # steps 5-6, tau' recomputed from tau
        x = read(c0, c1)
        _pcb_official_add(num[c0:c1], den[c0:c1], _pcb_official_tprime(x, lo, hi, scratch), beta[:, c0:c1], q,
                          beta_max, lam)
    return num.div_(den.clamp_min_(1e-12))


def pcb_merge(tvs: Tensor, density: float = 0.05, mode: str = "official",
              lambdas: Sequence[float] | Tensor | None = None) -> Tensor:
    """PCB-Merging of ``N x D`` float task vectors -> merged ``D`` float32 task vector (before the
    global lambda: theta = theta_0 + lambda * tau_m). ``density`` r in (0, 1] is the fraction kept
    (the paper's and the official code's ``ratio`` / ``pcb_ratio``; named ``density`` here as in TIES).
    ``tvs`` must be finite: one NaN or inf would zero the whole merge (``NonFiniteError``).

    ``mode="official"`` reproduces ``pcb-merging.py::PCB_merge(tvs, r)`` step by step (METHODS.md 7),
    with ``sorted_row`` the ascending sort of a row:

    1. a = clamp(|tau|, sorted_row(|tau|)[int(D*1e-4)], sorted_row(|tau|)[int(D*(1-1e-4) - 1)]);
       tau' = sign(tau) * a;
    2. intra = exp(N * minmax_row(a)^2);  3. inter = tanh(tau * sum_j tau_j);  4. beta = intra*inter;
    5. q = sorted_row(beta)[int(D*(1-r))], s = minmax_row(max(beta, q)) (entries <= q get 0);
    6. tau_m = sum_i s_i * lambda_i * tau'_i / clamp(sum_i s_i, min=1e-12).

    Deviation: a constant row (max = min) gives weight 0 where the official code divides 0/0 (NaN).
    sum_j tau_j adds the rows in order (not ``tvs.sum(0)``, whose order varies with the column's
    position), so that :func:`mergelib.merge_files` reproduces it tensor by tensor.

    ``mode="paper"``: beta_i = Softmax(N*Norm(tau_i^2)) * sum_j Softmax(Norm(tau_i*tau_j)),
    m_i = 1[beta_i >= sorted_row(beta_i)[int((1-r) D)]], beta_hat = m * beta,
    tau_m = sum_i beta_hat_i * lambda_i * tau_i / sum_i beta_hat_i (0 where no task is kept).

    ``lambdas``: optional per-task coefficients (PCB's evolutionary search), default all 1.
    """
    n, D = _check_matrix(tvs)
    density = _density(density)
    check_choice(mode, "mode", ("official", "paper"))
    if lambdas is None:
        lams = [1.0] * n
    else:
        lams = [check_number(x, f"lambdas[{i}]") for i, x in
                enumerate(lambdas.tolist() if isinstance(lambdas, Tensor) else lambdas)]
        if len(lams) != n:
            raise ValueError(f"lambdas has {len(lams)} entries for {n} task vectors")
    if mode == "official":
        return _pcb_official(tvs, density, lams)
    q_k = _pcb_q_k(D, density)
    num = zeros_matrix((D,), dtype=tvs.dtype, device=tvs.device)
    den = zeros_matrix((D,), dtype=tvs.dtype, device=tvs.device)
    beta_all = _pcb_paper_inter(tvs)  # mode == "paper"
    intra = empty_matrix((D,), dtype=tvs.dtype, device=tvs.device)
    # m as a 0/1 mask in beta's dtype, in one reused buffer: a bool mask was promoted to a fresh float
    # copy by every product (beta * 1.0 = beta and beta * 0.0 = beta * False: the same bits)
    mask = empty_matrix((D,), dtype=tvs.dtype, device=tvs.device)
    for i in range(n):
        beta = beta_all[i].mul_(_pcb_paper_intra(tvs[i], n, out=intra))
        beta.mul_(torch.ge(beta, kth_smallest(beta, q_k), out=mask))  # beta_hat = m * beta
        num.addcmul_(beta, tvs[i], value=lams[i])
        den.add_(beta)
    return num.div_(den).masked_fill_(den.gt(0).logical_not_(), 0.0)  # 0 where den is not > 0
