"""Fused CPU kernels: the same float operations as the torch code, in one pass per entry.

Every merge here is memory-bound in principle: its floor is one read of the task vectors. Written as
eager torch operations on cache-sized chunks, a merge still runs one vectorised loop per operation, and
on one CPU core each such loop costs about as much as reading the data from memory
(``benchmarks/results_cpu.md``): task arithmetic from state dicts needs two (the subtraction from the
base and the sum), TIES about fifteen. The functions here compile (with `Numba <https://numba.pydata.org>`_)
one loop per method that makes the **same float32 operations in the same order** for every entry, so
the results are the torch code's bit for bit; only the number of passes over memory changes.

* :func:`sum_task_vectors`: ``sum_i (theta_i - theta_0)`` per entry, from zero, the tasks in order
  (task arithmetic and averaging in :func:`mergelib.merge`), and with ``scale`` the merged weights
  ``theta_0 + lambda * sum`` in the same loop, rounded once as ``torch.add(..., alpha=lambda)`` does
  where :func:`fused_add_matches_torch`.
* :func:`ties_sweep` (and :func:`ties_majority_positive`): TIES's trim, sign election and disjoint
  mean of one tensor from the state dicts, given the trim thresholds
  (:func:`mergelib.competition._ties_fused` for the ``"mass"`` sign rule), with the official trim or the
  exact one (:class:`ExactTrim`, :func:`exact_trim`: which ties at the threshold are kept).
* :func:`pcb_scores` and :func:`pcb_weighted_sum`: PCB's two sweeps (official code) from the state dicts,
  around torch's ``exp`` and ``tanh`` (:func:`mergelib.competition._pcb_official`): the arguments of
  ``exp`` and ``tanh`` in one loop, then, given the balancing scores and their row thresholds, the
  weighted sums of the clipped task vectors. Between them, :class:`KeptScores` keeps of each row only the
  scores above a floor below its drop threshold, with their positions, and counts the others
  (:func:`mergelib.competition._pcb_official_sparse`): at the official density 0.05 the weighted sums
  need no ``N x D`` matrix of scores. Where ``tanh(p)`` is ``p``, an upper bound of each score, written
  by :func:`pcb_scores` with its arguments, leaves ``exp`` to the few entries that may reach the floor
  (:meth:`KeptScores.add_bounded`).
* :func:`weighted_row_sum` and :func:`copy_l1_norm`: FR-Merging's aligned sum of the filtered rows (the
  float operations of scaling each row and adding the rows in order) and, as each task's filtered
  matrix is stored, its L1 norm accumulated in float64 (:func:`mergelib.fourier.fr_tensor`).
* :func:`dare_drop`: DARE's drop and rescale of one tensor, its mask drawn as ``torch.rand`` draws it
  from a seeded CPU generator (ATen's MT19937, reproduced: :func:`dare_matches_torch` checks it)
  (:func:`mergelib.competition.dare_flat`).
* :func:`count_brackets`: the counting pass of the exact order statistics
  (:func:`mergelib.selection.kth_smallest_columns`: TIES's trim thresholds, PCB's clip values, over
  ``|theta_i - theta_0|``; :func:`mergelib.selection.kth_smallest` of CPU rows: PCB's drop threshold), each
  entry read once per rank.

They are an accelerator, not a second definition: the torch code in :mod:`mergelib.merging` and
:mod:`mergelib.competition` is what the notebooks teach, and ``tests/test_kernels.py`` checks every
kernel against it bit for bit. :func:`available` says whether a kernel can run (Numba installed,
contiguous float32 or bf16 CPU tensors, kernels not switched off); otherwise the callers use the torch
code (float16 checkpoints, per-task lambdas of the sums, TIES's other rules; on CUDA,
:mod:`mergelib.gpu_kernels` where it applies).
``MERGELIB_KERNELS=torch`` in the environment, or :func:`use` (``with kernels.use(False): ...``),
switches them off, e.g. for ``benchmarks/bench_merge.py --kernels torch``.

The loops are in :mod:`mergelib._kernel_loops`, imported on first use (it imports Numba). Each
compiles on its first call for a new number of tasks (about a second) and is cached on disk next to
that file when it is writable, so later processes load it (a few tenths of a second).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["available", "enabled", "use", "sum_task_vectors", "fused_add_matches_torch", "copy_l1_norm",
           "weighted_row_sum", "ties_thresholds", "ExactTrim", "count_above", "exact_trim", "ties_sweep",
           "ties_majority_positive", "pcb_scores", "pcb_weighted_sum", "KeptScores", "blocks_reaching", "count_brackets",
           "dare_threshold", "dare_matches_torch", "dare_drop"]

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


_INPUT_DTYPES = (torch.float32, torch.bfloat16)


def available(*tensors: Tensor) -> bool:
    """True when the kernels are on, Numba is installed and the tensors are contiguous CPU tensors of
    one dtype, float32 or bfloat16, that need no gradient (the kernels read them as NumPy arrays in
    place; bf16 as its uint16 bits, widened exactly to float32 as ``Tensor.float()`` does: the torch code
    computes in float32 too)."""
    if not _enabled or _numba() is None or len({t.dtype for t in tensors}) > 1:
        return False  # (one dtype: the loops take the task tensors as one tuple of arrays of one type)
    return all(t.device.type == "cpu" and t.dtype in _INPUT_DTYPES and t.is_contiguous() and not t.requires_grad
               for t in tensors)


def _np(t: Tensor | np.ndarray) -> np.ndarray:
    """``t`` flat as a NumPy array in place: float32 as it is, bf16 as its bits (uint16); a NumPy array (made
    by this function, e.g. through :meth:`~mergelib.task_vectors.TaskVectorColumns.flat`) as it is."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _loops():
    from . import _kernel_loops  # imports Numba (a module, so imported once)
    return _kernel_loops


def _scale(scale: float | None) -> tuple[np.float32, bool]:
    """The loops' ``(scale, final)`` arguments: write ``base + scale * value`` (fused) or the value."""
    return np.float32(0.0 if scale is None else scale), scale is not None


# ----------------------------------------------------------------------------------------------
# Public wrappers (one tensor at a time; the callers loop over a state dict's keys)
# ----------------------------------------------------------------------------------------------
def sum_task_vectors(out: Tensor, finetuned: Sequence[Tensor], base: Tensor, scale: float | None = None) -> int:
    """``out = sum_i (finetuned_i - base)`` entry by entry, from zero, the tasks in order: the float
    operations (and bits) of ``out.zero_()`` then ``out.add_(f_i - base)`` for each task. With
    ``scale``, ``out = base + scale * sum`` instead, as ``torch.add(base, sum, alpha=scale)`` computes it
    (one fused multiply-add; only where :func:`fused_add_matches_torch`). ``out``: a contiguous float32
    CPU tensor; the others: contiguous float32 or bf16 CPU tensors of one dtype (:func:`available`), all
    with ``base.numel()`` entries. Returns the number of non-finite sums (0: every sum is finite)."""
    return int(_loops().sum_task_vectors(_np(out), tuple(_np(f) for f in finetuned), _np(base), *_scale(scale)))


def copy_l1_norm(out: Tensor, x: Tensor) -> float:
    """``out.copy_(x)`` and ``sum |x|``, accumulated in float64, in one pass over contiguous float32 CPU
    tensors of one size (the compiler picks the order of the additions: a float64 sum of float32
    values, it differs from ``x.abs().sum(dtype=torch.float64)`` by about 1e-16 relative, and their
    float32 roundings agree but where the sum falls that close to a rounding boundary). FR-Merging's
    filtered matrix of one task stored and its magnitude taken while it is in cache
    (:func:`mergelib.fourier.fr_tensor`)."""
    return float(_loops().copy_l1_norm(_np(out), _np(x)))


def weighted_row_sum(out: Tensor, rows: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``out = sum_i weights_i * rows_i`` entry by entry, from zero, the rows in order: the float operations
    (and bits) of scaling each row (``rows_i * weights_i``, rounded) and then ``out.zero_()`` and
    ``out.add_(scaled_i)`` for each row, in one pass instead of three (FR-Merging's aligned sum,
    :func:`mergelib.fourier.fr_tensor`). ``out``, ``rows``: contiguous float32 CPU tensors of one size;
    ``weights``: ``N`` floats. Returns ``out``."""
    w = weights.detach().to("cpu", torch.float32).contiguous().numpy()
    _loops().weighted_row_sum(_np(out), tuple(_np(r) for r in rows), w)
    return out


@lru_cache(maxsize=None)
def fused_add_matches_torch() -> bool:
    """Whether ``torch.add(a, b, alpha=s)`` on float32 CPU tensors rounds once (``fma(b, s, a)``), as
    ATen's vectorised kernels do on CPUs with FMA (AVX2, AVX-512), so that :func:`sum_task_vectors`
    may fuse the final step of task arithmetic. Checked on 65,536 values, where ``a + s * b`` rounded
    twice differs in about 3,000, through ATen's vectorised loop (one call), and on 4,095 of them
    through its scalar loop (calls of 7 entries, shorter than a vector), so that every entry of a
    tensor gets torch's bits."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1 << 16, generator=g)
    b = torch.randn(1 << 16, generator=g) * torch.logspace(-6, 0, 1 << 16)
    f = (b + a).numpy()
    out = torch.empty_like(a)
    _loops().sum_task_vectors(out.numpy(), (f,), a.numpy(), np.float32(0.3), True)
    sums = torch.from_numpy(f) - a  # the sums the kernel forms: 0 + (f - a)
    vector = torch.add(a, sums, alpha=0.3)
    scalar = torch.cat([torch.add(a[i:i + 7], sums[i:i + 7], alpha=0.3) for i in range(0, 4095, 7)])
    return (torch.equal(out.view(torch.int32), vector.view(torch.int32))
            and torch.equal(out[:4095].view(torch.int32), scalar.view(torch.int32)))


def ties_thresholds(thr: Tensor | None, n: int) -> Tensor:
    """The sweeps' ``thr`` from a trim plan's thresholds of ``n`` task vectors (one per task, float32), for
    the official trim. ``None`` (density 1: keep every entry) gives zeros: ``|x| >= 0`` holds for every
    finite ``x``, and the kept entry is ``x * 1 = x``."""
    return torch.zeros(n) if thr is None else thr.reshape(-1).float()


class ExactTrim:
    """TIES's exact trim (``trim_rule="exact"``) of one trim segment (a tensor, or the whole model for
    the global trim), for :func:`ties_sweep` and :func:`ties_majority_positive` in place of the official
    trim's thresholds: ``thr`` (``N`` float32, the ``keep``-th largest |x| of each row) and the tie
    budget. Every ``|x| > thr[i]`` is kept, and of the ties ``|x| == thr[i]`` the first ``need[i] = keep -
    #(|x| > thr[i])`` in flat order, as the torch code keeps them (:func:`mergelib.competition.trim`).
    The sweeps count the ties as they go, tensor by tensor in the segment's order: ``taken[i]`` so far,
    and ``cut[i]``, the flat position of the last tie kept once the budget ran out (``NO_CUT`` until
    then, -1 when no tie is kept); ``offset``, the flat position of the next tensor to sweep in the
    segment (:func:`ties_sweep` advances it). Made by :func:`exact_trim`."""

    NO_CUT = np.iinfo(np.int64).max

    def __init__(self, thr: Tensor, need):
        self.thr = thr.detach().reshape(-1).float().contiguous()
        self.thr_np = self.thr.numpy()
        # |x| >= the next float32 above thr: the ties dropped (NaN thresholds, "keep none", stay NaN)
        self.thr_next = np.nextafter(self.thr_np, np.float32(np.inf)).astype(np.float32)
        self.need = np.array(need.numpy() if isinstance(need, Tensor) else need, dtype=np.int64).reshape(-1)
        self.taken = np.zeros_like(self.need)
        self.cut = np.where(self.need > 0, self.NO_CUT, -1).astype(np.int64)
        self.offset = 0

    def parts(self, finetuned: Sequence[np.ndarray], base: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Take the ties of the segment's next tensor (its inputs as the loops read them) and advance
        ``offset`` past it; returns its parts ``(j0, j1, thresholds)``: entries ``[j0, j1)`` keep or drop
        each row's ties as the thresholds ``thr`` or ``thr_next`` say (split after each cut inside it)."""
        loops, m = _loops(), base.shape[0]
        ends = [m]
        for i, f in enumerate(finetuned):
            if self.taken[i] < self.need[i]:
                self.taken[i], at = loops.take_ties(f, base, self.thr_np[i], self.taken[i], self.need[i])
                if at >= 0:
                    self.cut[i] = self.offset + at
                    ends.append(at + 1)
        out, j0 = [], 0
        for j1 in sorted(set(ends)):
            if j1 > j0:
                out.append((j0, j1, np.where(self.offset + j0 <= self.cut, self.thr_np, self.thr_next)))
            j0 = j1
        self.offset += m
        return out

    def fresh(self) -> "ExactTrim":
        """The same trim before any tensor is swept (for a second pass over the segment)."""
        return ExactTrim(self.thr, self.need)


def count_above(segments, thr: Tensor) -> np.ndarray:
    """``#(|f_i - base| > thr_i)`` per row ``i`` over the tensors of a segment, given as ``(base,
    [finetuned_i])`` (an int64 array; a NaN entry counts as above: it is neither below nor equal)."""
    loops = _loops()
    t = thr.detach().reshape(-1).float().numpy()
    above = np.zeros(t.shape[0], dtype=np.int64)
    for base, fts in segments:
        b = _np(base)
        for i, f in enumerate(fts):
            below, points = loops.count_point(_np(f), b, t[i])
            above[i] += b.shape[0] - int(below) - int(points)
    return above


def exact_trim(thr: Tensor | None, keep: int, d: int, n: int, segments) -> ExactTrim:
    """The :class:`ExactTrim` of a segment of ``d`` entries per row (``n`` rows; its tensors ``segments``
    as for :func:`count_above`, which counts the entries above the thresholds) from a trim plan's entry
    ``(thr, keep)`` (:func:`mergelib.competition._trim_plan`: the ``keep``-th largest |x| per row, None
    where every entry or none is kept). Every entry: threshold ``-inf`` (``|x| >= -inf``: all but NaN,
    which then stays NaN); none: NaN (``|x| >= NaN`` never holds: every ``x * 0``, so a NaN or inf input
    still reaches the result)."""
    if thr is None:
        return ExactTrim(torch.full((n,), -np.inf if keep >= d else np.nan), np.zeros(n))
    return ExactTrim(thr, keep - count_above(segments, thr))


def ties_sweep(out: Tensor, zero: Tensor, finetuned: Sequence[Tensor], base: Tensor, thr: Tensor | ExactTrim,
               scale: float | None = None) -> tuple[int, int, int]:
    """TIES on one tensor from the state dicts (``"mass"`` sign rule; the operations of
    :func:`mergelib.competition._ties_fused` with ``majority=None``): writes the merged task vector
    (the value for a negative majority sign where the trimmed sum is 0) into ``out``, and marks in
    ``zero`` the entries whose bits a positive majority sign may change: where the trimmed sum is 0 and
    the entries cancel, or the written ``+-0`` shows its sign (written as it is, or added to a base of
    ``+-0``); see :mod:`mergelib._kernel_loops`. Returns ``#(sum > 0) - #(sum < 0)`` over the tensor's
    entries, the number of non-finite results (a NaN or inf in an input reaches its column's result)
    and the number of marked entries.
    ``thr``: the ``N`` trim thresholds of the official trim (float32), or the segment's
    :class:`ExactTrim` for the exact one (its tie budget taken from, and advanced past, this tensor).
    With ``scale``, ``out = base + scale * merged`` instead (as :func:`sum_task_vectors`). After all
    tensors, if the votes are positive, call :func:`ties_majority_positive` on each, with the same
    ``scale``."""
    o, z, fts, b = _np(out), zero.reshape(-1).numpy(), tuple(_np(f) for f in finetuned), _np(base)
    if not isinstance(thr, ExactTrim):
        votes, bad, marked = _loops().ties_sweep(o, z, fts, b, thr.detach().reshape(-1).numpy(), *_scale(scale))
        return int(votes), int(bad), int(marked)
    votes = bad = marked = 0
    for j0, j1, t in thr.parts(fts, b):
        v, nb, mk = _loops().ties_sweep(o[j0:j1], z[j0:j1], tuple(f[j0:j1] for f in fts), b[j0:j1], t, *_scale(scale))
        votes, bad, marked = votes + int(v), bad + int(nb), marked + int(mk)
    return votes, bad, marked


_NO_POSITIONS = np.empty(0, dtype=np.int64)


def ties_majority_positive(out: Tensor, zero: Tensor, finetuned: Sequence[Tensor], base: Tensor,
                           thr: Tensor | ExactTrim, scale: float | None = None, at: int | Tensor = 0) -> Tensor:
    """Where ``zero`` (:func:`ties_sweep`'s marks), the value for a positive majority sign: the mean of
    the positive trimmed entries, +0.0 where there are none (``base + scale *`` that with ``scale``).
    Every entry is independent of the others: the loop may run on entries gathered from a tensor.
    ``thr`` as for :func:`ties_sweep` (an :class:`ExactTrim` after the sweep of its whole segment); for
    the exact trim, ``at`` is the flat position in the segment of the tensor's first entry (its
    ``offset`` before its sweep), or of every entry (an int64 tensor, for gathered entries)."""
    args = _np(out), zero.reshape(-1).numpy(), tuple(_np(f) for f in finetuned), _np(base)
    if isinstance(thr, ExactTrim):
        offset, positions = (at, _NO_POSITIONS) if isinstance(at, int) else (0, at.reshape(-1).numpy())
        _loops().ties_majority_positive_exact(*args, thr.thr_np, thr.thr_next, thr.cut, offset, positions,
                                              *_scale(scale))
    else:
        _loops().ties_majority_positive(*args, thr.detach().reshape(-1).numpy(), *_scale(scale))
    return out


def pcb_scores(z: Tensor | np.ndarray, p: Tensor | np.ndarray, col: int, finetuned: Sequence[Tensor], base: Tensor,
               lo: np.ndarray, hi: np.ndarray, span: np.ndarray, bounds: np.ndarray | None = None) -> tuple[int, int]:
    """PCB's steps 1-3 (official code, :func:`mergelib.competition._pcb_official_row`) up to ``exp`` and
    ``tanh``, for one tensor's entries ``j``, written at columns ``col + j`` of the ``N x C`` float32 blocks
    ``z`` and ``p`` (C-contiguous): with ``x_i = finetuned_i - base`` and ``tot`` the sum of the ``x_i``
    (rows in order, from zero), ``z = N * ((clamp(|x_i|, lo_i, hi_i) - lo_i) / span_i) ** 2`` (intra is
    ``exp(z)``) and ``p = x_i * tot`` (inter is ``tanh(p)``); ``lo``, ``hi``, ``span`` (``hi - lo``, inf
    where 0): ``N`` float32 (:func:`f32`). Returns the number of non-finite ``tot`` (0: every input entry is
    finite) and the number of entries of ``p`` with ``|p| >= 2**-12`` (or NaN), where ``tanh(p)`` may
    differ from ``p`` (:data:`mergelib.competition.TANH_IDENTITY_BELOW`). The inputs may also be the NumPy
    arrays of :func:`_np` and ``z``, ``p`` of ``Tensor.numpy()``: converting them once per merge rather than
    once per call saves about 0.1 ms a call (a PCB merge makes hundreds). ``bounds``: an ``N x C`` float32
    array (:meth:`ScoreCandidates.bounds`) for upper bounds of the scores ``exp(z) * tanh(p)`` (for ``z`` in
    ``[0, ScoreCandidates.BOUNDED_TASKS]``)."""
    z, p = (t.numpy() if isinstance(t, Tensor) else t for t in (z, p))
    bad, big = _loops().pcb_scores(z, p, col, tuple(_np(f) for f in finetuned), _np(base), lo, hi, span,
                                   np.float32(len(finetuned)), bounds)
    return int(bad), int(big)


def pcb_weighted_sum(num: Tensor | np.ndarray, den: Tensor | np.ndarray, beta: Tensor | np.ndarray,
                     finetuned: Sequence[Tensor], base: Tensor,
                     lo: np.ndarray, hi: np.ndarray, q: np.ndarray, span: np.ndarray, lam: np.ndarray | None,
                     beta_col: int = 0) -> None:
    """PCB's steps 5-6 (official code, :func:`mergelib.competition._pcb_official_add`) for one tensor's
    entries: adds ``sum_i s_i * lam_i * tau'_i`` to ``num`` and ``sum_i s_i`` to ``den`` (the tasks in
    order), with ``s_i = (max(beta_i, q_i) - q_i) / span_i`` (``span``: ``max_i - q_i``, inf where 0) and
    ``tau'_i = sign(x_i) * clamp(|x_i|, lo_i, hi_i)``, ``x_i = finetuned_i - base``. ``beta``: an ``N x C``
    C-contiguous float32 block of balancing scores holding the tensor's at columns ``beta_col..``; ``lo``,
    ``hi``, ``q``, ``span``, and ``lam`` (the per-task coefficients, or None: all 1,
    :func:`mergelib.competition._pcb_lambdas`): ``N`` float32 (:func:`f32`). Inputs as for
    :func:`pcb_scores`."""
    scaled = lam is not None
    num, den, beta = (t.numpy() if isinstance(t, Tensor) else t for t in (num, den, beta))
    _loops().pcb_weighted_sum(num, den, beta, beta_col,
                              tuple(_np(f) for f in finetuned), _np(base), lo, hi, q, span,
                              lam if scaled else np.ones(len(finetuned), dtype=np.float32), scaled)


class ScoreCandidates:
    """PCB's balancing scores ``exp(z) * tanh(p)`` of an ``N x w`` block taken only where an upper bound of the
    score reaches a threshold of its row (the candidates): :func:`pcb_scores` writes the bounds with ``z`` and
    ``p`` (:meth:`bounds`), one compiled pass finds the candidates, and torch takes ``exp`` (and ``tanh``, where
    some ``|p|`` reaches ``2**-12``) of them packed together. An entry's ``exp`` and ``tanh`` have the same bits
    wherever it lies in a tensor (``tests/test_kernels.py`` checks both on the build that runs them), so each
    candidate's score has the bits of the dense block's ``exp(z) * tanh(p)``; an entry whose bound is below the
    threshold scores below it too (the bound, :func:`mergelib._kernel_loops.score_bound`, holds for ``0 <= z <=
    N`` with ``N <= BOUNDED_TASKS``, and ``tanh(p) <= p`` for ``p >= 0``; a score is at most 0 where ``p <= 0``,
    so every threshold must be above 0). The buffers are reused from block to block."""

    # tasks up to which the bound of exp(z), z <= N, stays a float32 (2**k a normal float32 up to z = 87:
    # _kernel_loops.score_bound)
    BOUNDED_TASKS = 80

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}
        self._tensors: dict[str, Tensor] = {}

    def bounds(self, n: int, w: int) -> np.ndarray:
        """The ``n x w`` array into which :func:`pcb_scores` writes the bounds that the next call reads."""
        return self._scratch("bounds", n * w).reshape(n, w)

    def candidates(self, z: Tensor, p: Tensor, below: np.ndarray, tanh: bool = False):
        """The scores of the entries of the block ``(z, p)`` whose bound (:meth:`bounds`) is above ``below[i]``
        (float32, per row), packed row after row: ``(scores, offsets, counts, positions, under)``, row ``i``'s
        candidates at ``scores[offsets[i]:offsets[i] + counts[i]]``, in column order, their block columns
        ``positions[i, :counts[i]]``; ``under[i]``: the number of the others. ``tanh``: whether some ``|p|``
        of the block reaches ``2**-12`` (:func:`pcb_scores`' second count), where ``tanh(p)`` may differ from
        ``p``: torch's ``tanh`` of the candidates' ``p`` that reach it, gathered (it is the identity below, so
        the bits of :func:`mergelib.competition._tanh_` on the block, which skips whole blocks below it)."""
        n, w = z.shape
        cposs = self._scratch("positions", n * (w + 16), np.int64).reshape(n, w + 16)
        counts = self._scratch("counts", 3 * n, np.int64).reshape(3, n)
        counts.fill(0)
        counts, under, offsets = counts  # (offsets: filled by the gather)
        kept = self._scratch("bounds kept", n * (w + 16)).reshape(n, w + 16)  # (not read)
        _loops().pcb_keep_above(self.bounds(n, w), below, 0, kept, cposs, counts, under, under)  # the candidates
        bigs = self._scratch("bigs", n * w, np.int64)
        total, nbig = _loops().pcb_gather_candidates(z.numpy(), p.numpy(), cposs, counts, offsets,
                                                     self._scratch("z", n * w), self._scratch("p", n * w), bigs)
        z_t, p_t = self._tensor("z")[:total], self._tensor("p")[:total]
        if tanh and nbig:  # tanh of the few candidates where it may differ from p (it is p at the others)
            at = torch.from_numpy(bigs[:nbig])
            p_t[at] = p_t[at].tanh_()
        scores = torch.mul(z_t.exp_(), p_t, out=z_t).numpy()  # intra * inter, as on the block
        return scores, offsets, counts, cposs, under

    def fill(self, z: Tensor, p: Tensor, thresholds: np.ndarray, fill: np.ndarray, out: Tensor,
             tanh: bool = False) -> None:
        """The ``N x w`` block ``out`` (contiguous float32) holds the scores ``exp(z) * tanh(p)`` wherever the
        bound reaches the row's threshold (``thresholds``: ``N`` float32, all above 0), ``fill[i]`` elsewhere
        (where the score is below the threshold). ``tanh`` as for :meth:`candidates`."""
        below = np.nextafter(thresholds, np.float32(-np.inf))  # a bound above it is at or above the threshold
        scores, offsets, counts, cposs, _ = self.candidates(z, p, below, tanh)
        _loops().pcb_scatter_candidates(out.numpy(), scores, offsets, counts, cposs, fill)

    def _scratch(self, name: str, size: int, dtype=np.float32) -> np.ndarray:
        """A reused array of ``size`` entries (grown as needed; not kept)."""
        a = self._buffers.get(name)
        if a is None or a.shape[0] < size:
            a = self._buffers[name] = np.empty(max(size, 1), dtype)
            self._tensors.pop(name, None)
        return a[:size]

    def _tensor(self, name: str) -> Tensor:
        """The tensor over the whole of :meth:`_scratch`'s array ``name`` (made once per array)."""
        t = self._tensors.get(name)
        if t is None:
            t = self._tensors[name] = torch.from_numpy(self._buffers[name])
        return t


class KeptScores:
    """PCB's balancing scores above a floor per row, kept with their positions (model columns), for the
    weighted sums at the few entries that take part in them (:func:`mergelib.competition._pcb_official_sparse`).
    Fed ``N x w`` blocks of scores in column order (:meth:`add`: one compiled pass, 16 entries at a time), it
    counts per row the scores below the floor and those equal to it, and appends the others; the row's
    drop threshold then comes from the counts and the kept scores (:meth:`kth`), exactly."""

    BOUNDED_TASKS = ScoreCandidates.BOUNDED_TASKS  # the most tasks add_bounded takes

    def __init__(self, floors: np.ndarray, capacity: int, limit: int):
        n = floors.shape[0]
        self.floors = np.ascontiguousarray(floors, dtype=np.float32)
        self.vals = np.empty((n, capacity), dtype=np.float32)
        self.poss = np.empty((n, capacity), dtype=np.int64)
        self.kept = np.zeros(n, dtype=np.int64)
        self.below = np.zeros(n, dtype=np.int64)
        self.at = np.zeros(n, dtype=np.int64)
        self.limit = limit
        # the largest float32 below each floor: a bound above it is at or above the floor (add_bounded)
        self.below_floors = np.nextafter(self.floors, np.float32(-np.inf))
        self._candidates = ScoreCandidates()

    def add(self, betas: Tensor, col: int) -> bool:
        """Counts and keeps the ``N x w`` scores ``betas`` (contiguous float32) of columns ``col..col + w``.
        False when a row then keeps more than ``limit`` entries (the caller gives up on the counts)."""
        self._room(betas.shape[1] + 16)  # the 16-lane stores write up to 15 entries past the kept ones
        _loops().pcb_keep_above(betas.numpy(), self.floors, col, self.vals, self.poss, self.kept, self.below,
                                self.at)
        return int(self.kept.max()) <= self.limit

    def _room(self, more: int) -> None:
        """Room for ``more`` entries after every row's kept ones (each row grown by doubling, keeping them)."""
        need = int(self.kept.max()) + more
        if need > self.vals.shape[1]:
            cap = max(2 * self.vals.shape[1], need)
            vals, poss = np.empty((len(self.kept), cap), np.float32), np.empty((len(self.kept), cap), np.int64)
            k = int(self.kept.max())
            vals[:, :k], poss[:, :k] = self.vals[:, :k], self.poss[:, :k]
            self.vals, self.poss = vals, poss

    def bounds(self, n: int, w: int) -> np.ndarray:
        """The ``n x w`` array into which :func:`pcb_scores` writes the bounds that :meth:`add_bounded` reads."""
        return self._candidates.bounds(n, w)

    def add_bounded(self, z: Tensor, p: Tensor, col: int, maxima: np.ndarray, tanh: bool = False) -> bool:
        """:meth:`add` of the scores ``exp(z) * tanh(p)`` of an ``N x w`` block (contiguous float32; ``0 <= z <=
        N``, ``N <= BOUNDED_TASKS``) without ``exp`` of every entry: an upper bound of each score (:meth:`bounds`,
        written by :func:`pcb_scores` with ``z`` and ``p``) rules out those below the row's floor, counted, and
        torch takes ``exp`` and the product only at the others, the candidates (:class:`ScoreCandidates`);
        they then go through :meth:`add`'s counting and keeping. ``tanh``: whether some ``|p|`` reaches
        ``2**-12`` (:meth:`ScoreCandidates.candidates`).
        ``maxima``: the rows' largest scores so far (float32, raised here; the largest score is always a
        candidate). Needs every floor above 0 (an entry with ``p <= 0`` scores at most 0 and is not a
        candidate). The same counts and kept scores as :meth:`add` of the block ``exp(z) * tanh(p)``."""
        betas, offsets, counts, cposs, below = self._candidates.candidates(z, p, self.below_floors, tanh)
        self.below += below  # a bound below the floor: the score is below it too
        self._room(int(counts.max()))
        _loops().pcb_keep_candidates(betas, offsets, counts, cposs, self.floors, col, self.vals, self.poss, self.kept,
                                     self.below, self.at, maxima)
        return int(self.kept.max()) <= self.limit

    def kth(self, i: int, k: int, hi: float | None = None) -> np.float32 | None:
        """Row ``i``'s ``k``-th smallest score (every score of the row counted or kept, all finite), or None if
        the floor lies above it (the sample missed). ``hi``: a value at or above it with high probability
        (the sample's bracket), so that only the kept scores up to it are selected among."""
        r = k - int(self.below[i])
        if r < 1:
            return None
        if r <= self.at[i]:
            return self.floors[i]
        r -= int(self.at[i])
        v = self.vals[i, : self.kept[i]]
        if hi is not None:  # the kept scores up to hi, by the counting pass's loop (a NumPy mask took 2 ms a row)
            store = np.empty(v.shape[0], dtype=np.float32)
            _, _, m = _loops().count_bracket(v, None, np.float32(-np.inf), np.float32(hi), None, store)
            if r <= m:
                return np.partition(store[:m], r - 1)[r - 1]
        return np.partition(v, r - 1)[r - 1] if r <= v.shape[0] else None

    def ranges(self, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the kept entries ``[start, end)`` at columns ``c0..c1`` (positions ascend in each row)."""
        rows = [self.poss[i, : self.kept[i]] for i in range(len(self.kept))]
        return (np.array([np.searchsorted(r, c0) for r in rows], np.int64),
                np.array([np.searchsorted(r, c1) for r in rows], np.int64))

    def scatter(self, block: Tensor, c0: int, fill: np.ndarray) -> None:
        """The scores of columns ``c0..c0 + w`` into the ``N x w`` float32 ``block`` (contiguous): each row
        filled with ``fill`` (its drop threshold: every score at or below it gets weight ``+0``), then its
        kept scores at their columns, as :func:`pcb_weighted_sum` then reads them."""
        starts, ends = self.ranges(c0, c0 + block.shape[1])
        _loops().pcb_scatter_kept(block.numpy(), self.vals, self.poss, starts, ends, c0, fill)


def blocks_reaching(blocks: Tensor, t: float) -> Tensor:
    """The rows of ``blocks`` (``B x w``, contiguous float32) that hold an entry with ``|x| >= t`` or NaN, as
    an int64 index tensor: one vectorised pass (torch's ``aminmax``, over the blocks and along them, took
    2.3 s of a streamed PCB's 8.7 s on a set whose cross terms reach ``tanh``'s range)."""
    flags = np.empty(blocks.shape[0], dtype=np.bool_)
    _loops().blocks_reaching(blocks.reshape(-1).numpy(), np.float32(t), blocks.shape[1], flags)
    return torch.from_numpy(np.flatnonzero(flags))


def f32(t: Tensor) -> np.ndarray:
    """A vector of ``N`` values (any shape, e.g. ``N x 1``) as a contiguous float32 NumPy array, for the
    PCB loops' per-task arguments."""
    return t.detach().reshape(-1).float().contiguous().numpy()


# Entries per call of the counting kernel. The pass runs step by step, every row and rank on a step before
# the next: a row's step (512 KB of float32) and the base's (read by every row) stay in the core's L2 between
# the calls, so each is read from memory once, not once per rank and per row (the ViT-B/32-sized set's PCB
# clip values, 8 rows and 2 ranks: 72-80 -> 50-54 ms; benchmarks/results_cpu.md, twenty-second session).
_COUNT_STEP = 1 << 17


def count_brackets(segments, brackets, limit: int | None = None) -> list[list[tuple[int, int, np.ndarray]]] | None:
    """The counting pass of the exact order statistics (:func:`mergelib.selection.kth_smallest_columns`
    and :func:`~mergelib.selection.kth_smallest` on CPU rows), in steps of ``_COUNT_STEP`` entries, each
    step of a row counted for all its ranks while it is in cache.
    ``segments``: an iterable of ``(base, [row_i])`` per part of the rows, in order, each taken once (a
    generator is fine): ``base`` a tensor (the values are the task vectors' ``|row_i - base|``), a number
    (``|row_i - base|``: 0 gives the magnitudes of the rows) or None (the rows' own values, signed);
    ``brackets[i]``: row ``i``'s ``(lo, hi, tie)`` per rank (:func:`mergelib.selection._brackets`; None:
    open on that side; ``lo == hi`` only with ``tie == lo``: a bracket on one value, whose entries are
    counted and none kept). Returns per row and rank ``(#(c < lo), #(c == tie), the other c in [lo, hi])``,
    the counts and candidates of :class:`mergelib.selection._NumpyCounter` (a NaN is in no bracket here).

    The loop writes the candidates at the end of their rank's buffer, which has room for a whole call
    after them (doubled when full): each candidate is copied once, by the loop (16 at a time, with a
    compress store: :func:`mergelib._kernel_loops.compress16`). With ``limit``, a rank that keeps more than
    ``limit`` candidates (rows of a few distinct values) stops the count, which returns None (the streamed
    merges then take their exact histogram passes, in bounded memory)."""
    loops = _loops()
    bounds = [[(np.float32(-np.inf if lo is None else lo.item()), np.float32(np.inf if hi is None else hi.item()),
                None if tie is None else np.float32(tie.item())) for lo, hi, tie in row] for row in brackets]
    below = [[0] * len(row) for row in bounds]
    points = [[0] * len(row) for row in bounds]
    kept = [[0] * len(row) for row in bounds]
    store = [[np.empty(0, dtype=np.float32) for _ in row] for row in bounds]
    for base, fts in segments:
        base = _np(base) if isinstance(base, Tensor) else None if base is None else np.float32(base)
        rows = [_np(fts[i]) for i in range(len(bounds))]
        m = rows[0].shape[0] if rows else 0
        for a0 in range(0, m, _COUNT_STEP):  # a step of every row and rank, while the base's part is in cache
            a1 = min(a0 + _COUNT_STEP, m)
            b_part = base[a0:a1] if isinstance(base, np.ndarray) else base
            for i, row in enumerate(bounds):
                f = rows[i][a0:a1]
                for j, (lo, hi, tie) in enumerate(row):
                    if lo == hi:  # one value: counted, nothing kept
                        b, p = loops.count_point(f, b_part, lo)
                        below[i][j] += int(b)
                        points[i][j] += int(p)
                        continue
                    k0 = kept[i][j]
                    if store[i][j].shape[0] < k0 + (a1 - a0):  # room for every entry of the call
                        grown = np.empty(max(2 * store[i][j].shape[0], k0 + (a1 - a0)), dtype=np.float32)
                        grown[:k0] = store[i][j][:k0]
                        store[i][j] = grown
                    b, p, k = loops.count_bracket(f, b_part, lo, hi, tie, store[i][j][k0:])
                    points[i][j] += int(p)
                    below[i][j] += int(b)
                    kept[i][j] = k0 + int(k)
                    if limit is not None and kept[i][j] > limit:
                        return None
    return [[(below[i][j], points[i][j], store[i][j][:kept[i][j]]) for j in range(len(row))]
            for i, row in enumerate(bounds)]


def dare_threshold(p: float) -> int:
    """DARE keeps an entry where its uniform ``u >= p``; torch compares in float32, and ``u`` is a multiple of
    ``2**-24`` (24 random bits), so the kept entries are those whose 24 bits reach ``ceil(float32(p) * 2**24)``."""
    return int(math.ceil(float(np.float32(p)) * 2.0 ** 24))


@lru_cache(maxsize=None)
def dare_matches_torch() -> bool:
    """Whether ``torch.rand(n, generator=torch.Generator().manual_seed(seed))`` draws what the loops compute
    (ATen's ``at::mt19937`` with its serial CPU kernel, ``(draw & 0xFFFFFF) * 2**-24``): checked once per
    process on 3 seeds (one above 2**32) and lengths around the generator's 624-word state. Where a torch
    version draws otherwise, :func:`mergelib.competition.dare_flat` keeps torch's own draws."""
    loops = _loops()
    for seed, n in ((0, 1), (5489, 1250), (2 ** 40 + 17, 4099)):
        draws = np.empty(n, dtype=np.int64)
        loops.mt19937_uniform24(np.int64(seed), draws)
        ref = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        if not np.array_equal(draws.astype(np.float64) * 2.0 ** -24, ref.double().numpy()):
            return False
    return True


def dare_drop(src: Tensor, out: Tensor, seed: int, p: float) -> None:
    """``out = src * keep / (1 - p)``, ``keep = torch.rand(n, generator=torch.Generator().manual_seed(seed)) >= p``
    as 0/1 (float32): the bits of ``torch.mul(src, keep, out=out)`` then ``out.div_(1 - p)``, in one pass
    over ``out`` (``src`` copied into it first unless they are one tensor) that draws the mask as it goes
    (about a read and a write of the tensor; torch's draws alone took 10x that on the course's CPU). ``src``,
    ``out``: contiguous float32 CPU tensors of the same size (they may be the same tensor); the caller checks
    :func:`available` and :func:`dare_matches_torch`. ``seed``: any int >= 0 (as ``manual_seed``)."""
    if out.data_ptr() != src.data_ptr():
        out.copy_(src)
    _loops().dare_drop_(_np(out), np.int64(seed & 0xFFFFFFFF), np.int64(dare_threshold(p)), np.float32(1 - p))
