"""Fused CPU kernels: the same float operations as the torch code, in one pass per entry.

Every merge here is memory-bound in principle: its floor is one read of the task vectors. Written as
eager torch operations on cache-sized chunks, a merge still runs one vectorised loop per operation, and
on one CPU core each such loop costs about as much as reading the data from memory
(``benchmarks/results_cpu.md``): task arithmetic from state dicts needs two (the subtraction from the
base and the sum), TIES about fifteen. The functions here compile (with `Numba <https://numba.pydata.org>`_)
one loop per method that makes the **same float32 operations in the same order** for every entry, so
the results are the torch code's bit for bit; only the number of passes over memory changes.

* :func:`sum_task_vectors`: ``sum_i (theta_i - theta_0)`` per entry, from zero, the tasks in order
  (task arithmetic and averaging in :func:`mergelib.merge`).
* :func:`ties_sweep`: TIES's trim, sign election and disjoint mean of one tensor from the state dicts,
  given the trim thresholds (:func:`mergelib.competition._ties_fused` for the official trim and the
  ``"mass"`` sign rule).

They are an accelerator, not a second definition: the torch code in :mod:`mergelib.merging` and
:mod:`mergelib.competition` is what the notebooks teach, and ``tests/test_kernels.py`` checks every
kernel against it bit for bit. :func:`available` says whether a kernel can run (Numba installed, CPU
float32 contiguous tensors, kernels not switched off); otherwise the callers use the torch code.
``MERGELIB_KERNELS=torch`` in the environment, or :func:`use` (``with kernels.use(False): ...``),
switches them off, e.g. for ``benchmarks/bench_merge.py --kernels torch``.

Compilation happens on first use (about a second per kernel and number of tasks) and is cached on
disk next to this file when it is writable.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["available", "enabled", "use", "sum_task_vectors", "ties_sweep", "ties_majority_positive",
           "count_brackets"]

_enabled = os.environ.get("MERGELIB_KERNELS", "auto").strip().lower() not in ("torch", "off", "0", "none")


def enabled() -> bool:
    """Whether the kernels are switched on (they still need Numba: :func:`available`)."""
    return _enabled


@contextmanager
def use(on: bool):
    """``with use(False):`` runs the torch code inside the block (``use(True)``: the kernels, if Numba
    is installed)."""
    global _enabled
    old, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = old


@lru_cache(maxsize=None)
def _numba():
    try:
        import numba
    except ImportError:  # an optional accelerator: the torch code runs instead
        return None
    return numba


def available(*tensors: Tensor) -> bool:
    """True when the kernels are on, Numba is installed and every tensor is a contiguous float32 CPU
    tensor that needs no gradient (the kernels read them as NumPy arrays in place)."""
    if not _enabled or _numba() is None:
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad
               for t in tensors)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


# ----------------------------------------------------------------------------------------------
# The compiled loops. float32 constants are np.float32: a Python float literal would promote the
# arithmetic to float64 and change the bits. The loops run over entries j on the outside, so that the
# compiler vectorises them; the few task values of an entry stay in registers.
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _compiled():
    nb = _numba()
    jit = nb.njit(cache=True, nogil=True, boundscheck=False)
    zero32 = np.float32(0.0)
    one32 = np.float32(1.0)
    inf32 = np.float32(np.inf)

    @jit
    def sum_tv(out, fts, base):
        # out[j] = ((0 + (f_0[j] - b[j])) + (f_1[j] - b[j])) + ...: the adds of acc.zero_(); acc.add_(t_i).
        # Returns the number of non-finite sums (|NaN| < inf is false)
        bad = 0
        for j in range(out.shape[0]):
            b = base[j]
            acc = zero32
            for f in fts:
                acc += f[j] - b
            out[j] = acc
            bad += not abs(acc) < inf32
        return bad

    @jit
    def ties(out, zero, fts, base, thr):
        # per entry j, with x_i = f_i[j] - b[j]:
        #   t_i = x_i * (|x_i| >= thr_i)                  the official trim (a 0/1 float mask: x * 0 = +-0)
        #   tot = (0 + t_0) + t_1 + ...;  s = +1 if tot > 0 else -1
        #   out = ((0 + relu(t_0 s)) + relu(t_1 s) + ...) * s / max(#(t_i s > 0), 1)
        # relu keeps a NaN (as clamp_min does): a non-finite input reaches the result.
        # Returns #(tot > 0) - #(tot < 0) (the majority-sign votes) and the number of non-finite results
        # (a NaN or inf input makes its column's result NaN or inf); zero[j] = (tot == 0).
        votes = 0
        bad = 0
        for j in range(out.shape[0]):
            b = base[j]
            tot = zero32
            for i in range(len(fts)):
                x = fts[i][j] - b
                tot += x * (one32 if abs(x) >= thr[i] else zero32)
            if tot > zero32:
                votes += 1
                s = one32
            else:
                if tot < zero32:
                    votes -= 1
                s = -one32
            zero[j] = tot == zero32
            num = zero32
            cnt = zero32
            for i in range(len(fts)):
                x = fts[i][j] - b
                a = (x * (one32 if abs(x) >= thr[i] else zero32)) * s
                if a > zero32:
                    cnt += one32
                num += zero32 if a < zero32 else a
            v = (num * s) / (cnt if cnt > one32 else one32)
            out[j] = v
            bad += not abs(v) < inf32
        return votes, bad

    @jit
    def ties_positive(out, zero, fts, base, thr):
        # where tot == 0 and the majority sign is +: the mean of the positive trimmed entries (+0.0 if none)
        for j in range(out.shape[0]):
            if zero[j]:
                b = base[j]
                num = zero32
                cnt = zero32
                for i in range(len(fts)):
                    x = fts[i][j] - b
                    t = x * (one32 if abs(x) >= thr[i] else zero32)
                    if t > zero32:
                        cnt += one32
                    num += zero32 if t < zero32 else t
                out[j] = num / (cnt if cnt > one32 else one32)

    @jit
    def count(f, base, lo, hi, store):
        # the counting pass of mergelib.selection over c = |f - base| for a bracket lo < hi: returns
        # (#(c < lo), k) with the k entries in [lo, hi] in store[:k]. Branch-free: every c is written at
        # store[k], and k moves on only if c is kept (store holds at least len(f) entries)
        below, k = 0, 0
        for j in range(f.shape[0]):
            c = abs(f[j] - base[j])
            below += c < lo
            store[k] = c
            k += (c >= lo) & (c <= hi)
        return below, k

    @jit
    def count_tie(f, base, lo, hi, tie, store):
        # the same with a tied value in the bracket, counted and not kept: (#(c < lo), #(c == tie), k)
        below, points, k = 0, 0, 0
        for j in range(f.shape[0]):
            c = abs(f[j] - base[j])
            below += c < lo
            eq = c == tie
            points += eq
            store[k] = c
            k += (c >= lo) & (c <= hi) & (not eq)
        return below, points, k

    return {"sum": sum_tv, "ties": ties, "ties_positive": ties_positive, "count": count, "count_tie": count_tie}


# ----------------------------------------------------------------------------------------------
# Public wrappers (one tensor at a time; the callers loop over a state dict's keys)
# ----------------------------------------------------------------------------------------------
def sum_task_vectors(out: Tensor, finetuned: Sequence[Tensor], base: Tensor) -> int:
    """``out = sum_i (finetuned_i - base)`` entry by entry, from zero, the tasks in order: the float
    operations (and bits) of ``out.zero_()`` then ``out.add_(f_i - base)`` for each task.
    All tensors: contiguous float32 CPU tensors with ``base.numel()`` entries (:func:`available`).
    Returns the number of non-finite sums (0: every sum is finite)."""
    return int(_compiled()["sum"](_np(out), tuple(_np(f) for f in finetuned), _np(base)))


def ties_sweep(out: Tensor, zero: Tensor, finetuned: Sequence[Tensor], base: Tensor, thr: Tensor) -> tuple[int, int]:
    """TIES on one tensor from the state dicts (official trim, ``"mass"`` sign rule; the operations of
    :func:`mergelib.competition._ties_fused` with ``majority=None``): writes the merged task vector
    (the value for a negative majority sign where the trimmed sum is 0) into ``out`` and
    ``zero = (trimmed sum == 0)``; returns ``#(sum > 0) - #(sum < 0)`` over the tensor's entries and the
    number of non-finite results (a NaN or inf in an input reaches its column's result).
    ``thr``: the ``N`` trim thresholds (float32). After all tensors, if the votes are positive, call
    :func:`ties_majority_positive` on each."""
    votes, bad = _compiled()["ties"](_np(out), zero.reshape(-1).numpy(), tuple(_np(f) for f in finetuned),
                                     _np(base), thr.detach().reshape(-1).numpy())
    return int(votes), int(bad)


def ties_majority_positive(out: Tensor, zero: Tensor, finetuned: Sequence[Tensor], base: Tensor,
                           thr: Tensor) -> Tensor:
    """Where ``zero`` (the trimmed sum is 0), the value for a positive majority sign: the mean of the
    positive trimmed entries, +0.0 where there are none."""
    _compiled()["ties_positive"](_np(out), zero.reshape(-1).numpy(), tuple(_np(f) for f in finetuned),
                                 _np(base), thr.detach().reshape(-1).numpy())
    return out




_COUNT_STEP = 1 << 20  # entries per call of the counting kernel (its store: 4 MB, reused)


def count_brackets(segments, brackets) -> list[list[tuple[int, int, np.ndarray]]]:
    """The counting pass of :func:`mergelib.selection.kth_smallest_columns` (absolute values) over task
    vectors given by state-dict tensors, one read of each entry per rank. ``segments``: ``(base,
    [finetuned_i])`` per key in the flat order; ``brackets[i]``: row ``i``'s ``(lo, hi, tie)`` per rank
    (:func:`mergelib.selection._brackets`, with ``lo < hi`` both given). Returns per row and rank
    ``(#(|x| < lo), #(|x| == tie), the other |x| in [lo, hi])``, the counts and candidates of
    :class:`mergelib.selection._NumpyCounter`."""
    compiled = _compiled()
    store = np.empty(min(_COUNT_STEP, max(b.numel() for b, _ in segments)), dtype=np.float32)
    segs = [(_np(base), [_np(f) for f in fts]) for base, fts in segments]
    out = []
    for i, row in enumerate(brackets):
        res = []
        for lo, hi, tie in row:
            lo, hi = np.float32(lo.item()), np.float32(hi.item())
            below = points = 0
            kept = []
            for base, fts in segs:
                f = fts[i]
                for a0 in range(0, base.shape[0], _COUNT_STEP):
                    a1 = min(a0 + _COUNT_STEP, base.shape[0])
                    if tie is None:
                        b, k = compiled["count"](f[a0:a1], base[a0:a1], lo, hi, store)
                    else:
                        b, p, k = compiled["count_tie"](f[a0:a1], base[a0:a1], lo, hi, np.float32(tie.item()), store)
                        points += p
                    below += b
                    kept.append(store[:k].copy())
            res.append((below, points, np.concatenate(kept)))
        out.append(res)
    return out
