"""Exact order statistics: the k-th smallest value and top-k thresholds of long rows.

One routine, :func:`kth_smallest`, serves every method that needs an exact order statistic: TIES
(global and per-tensor trim), PCB (the clip quantiles and the drop threshold), the FREE experts
(:func:`topk_mask`) and, fed from blocks, ``merge()``'s column blocks and the streaming merges
(:mod:`mergelib.streaming`).

**Result.** ``kth_smallest(x, k)`` is ``sorted(x)[k - 1]`` along ``dim``, the same value as
``torch.kthvalue(x, k).values`` bit for bit (the returned value is an element of ``x``, in ``x``'s
dtype). The only freedom is the sign of a zero result when a row holds both ``-0.0`` and ``+0.0``
(they compare equal, so which of the two ``torch.kthvalue`` returns depends on its partition order);
both are equal as values and in every comparison the methods make.

**Algorithm** (rows of at least ``LONG_ROW`` entries; shorter rows go to ``torch.kthvalue`` on the
CPU or ``torch.topk`` on CUDA, which are fast there):

1. *Bracket from a sample.* Of ``SAMPLE`` entries at fixed pseudo-random positions, the ranks
   ``k/n * m -+ (5 sigma + 16)`` give values ``lo <= hi`` that bracket the k-th value with
   overwhelming probability (on the CPU only those ranks are selected, NumPy's ``partition``, and the
   few hundred entries between them sorted: a sort of the whole sample took a fifth of a per-tensor
   TIES merge; elsewhere the sample is sorted).
2. *Exact count.* One pass over the row, in cache-sized chunks (every chunk is read from memory once;
   the comparisons run on it while it is in cache): ``c = #{x < lo}`` and the candidates
   ``{lo <= x <= hi}`` (about 2 % of the row). On the CPU this pass runs compiled where it can
   (:func:`mergelib.kernels.count_brackets`: float32 and bf16 rows, and task vectors read from the state
   dicts in place), else in NumPy (float64 and float16 rows, bf16 in float32 chunks, or without Numba),
   whose masks, counts and extraction are several times faster than torch's on one core; on CUDA in
   torch. A bracket on one value (``lo == hi``: heavy ties, such as
   the zeros of a DARE-dropped task vector) is only counted. Likewise a value that makes up at least
   ``1/TIE_SHARE`` of the sample and lies in the bracket (the exact zeros of a task vector whose
   fine-tune left many weights unchanged, such as embedding rows of unseen tokens) is counted, not
   kept: the candidates are the bracket's other entries.
3. If ``c < k <= c + #candidates (+ #tied)`` the answer is the ``(k - c)``-th smallest of the
   candidates and the tied copies (NumPy's ``partition`` or ``torch.kthvalue`` on the small candidate
   set; the tied value itself where the rank falls on it); otherwise (a sample that missed, never seen
   in practice) the routine falls back to ``torch.kthvalue`` on the row: always exact.

Several ranks of one row (PCB's two clip points) share the same pass. On CUDA the whole row is one
chunk: a few boolean temporaries of the row's size, no ``N x D`` index tensors.
:func:`kth_smallest_columns` runs the same algorithm on a matrix given by column blocks (the task
vectors of :func:`mergelib.merge`, computed from the state dicts, never stored), and
:mod:`mergelib.streaming` on blocks read from disk.

:func:`set_backend` (``"auto"`` or ``"torch"``) switches every caller back to the plain
``torch.kthvalue`` / ``torch.topk`` path, for benchmarks (``benchmarks/bench_merge.py --kth torch``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import kernels as _kernels

__all__ = ["kth_smallest", "kth_smallest_columns", "topk_threshold", "topk_mask", "set_backend",
           "get_backend", "backend", "LONG_ROW", "SAMPLE", "CHUNK", "TIE_SHARE"]

LONG_ROW = 1 << 16   # rows at least this long use the sampled bracket + exact count
SAMPLE = 1 << 15     # sample size for the bracket
# Elements per chunk of the counting pass on the CPU (2 MiB of float32), and of the N x C column blocks
# of TIES and PCB (mergelib.competition). Each chunk costs a few dozen torch and NumPy calls, so shorter
# chunks pay for the calls and longer ones leave the caches: TIES with the global trim on the benchmark's
# 8 x 14.2M set took 10.5-11.6x a read pass with 2**18, 9.8-9.9x with 2**19, 9.6-10.1x with 2**20 and
# 10.9-11.4x with 2**21 (one thread, three interleaved rounds); TIES per tensor 15.8-17.5x with 2**19
# against 18.0-18.7x with 2**18; PCB too noisy to rank (26.7-33.7x against 30.1-32.6x). (Ratios to
# bench_merge's read pass of then, tvs.sum(0), about 2.7x slower than a read.) The chunking never
# changes a result (exact counts; column blocks on 1024-aligned bounds).
CHUNK = 1 << 19
NUMPY_CHUNK = 1 << 16  # the same for the NumPy counting pass (its buffers stay in L2)
# A value in a bracket that makes up at least 1/TIE_SHARE of the sample is counted, not kept as a candidate
# (a bracket holds about 2 % of a row; a tie of that size would otherwise be most of its candidates). The
# course's MiniLM fine-tunes leave 42-44 % of their weights exactly unchanged: their task vectors' lowest
# |tau| ranks fall in a block of zeros that held every candidate of the bracket, and the streaming merge's
# guard against such brackets (more than 1/16 of a row) sent PCB to its slower histogram passes.
TIE_SHARE = 64
_BACKENDS = ("auto", "torch")
_backend = "auto"


def set_backend(name: str) -> None:
    """``"auto"``: the bracket-and-count routine for long rows; ``"torch"``: always ``torch.kthvalue``
    on the CPU and ``torch.topk`` on CUDA (the code path before issue 13, kept for benchmarks)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown selection backend {name!r}; expected one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def backend(name: str):
    """Context manager form of :func:`set_backend`."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _torch_kth(x: Tensor, k: int, dim: int, keepdim: bool) -> Tensor:
    """The plain path: ``kthvalue`` on the CPU, ``topk`` of the smaller side on CUDA (multi-block)."""
    n = x.shape[dim]
    if x.device.type == "cpu":
        return torch.kthvalue(x, k, dim=dim, keepdim=keepdim).values
    if k <= n - k + 1:
        return torch.topk(x, k, dim=dim, largest=False, sorted=False).values.amax(dim=dim, keepdim=keepdim)
    return torch.topk(x, n - k + 1, dim=dim, largest=True, sorted=False).values.amin(dim=dim, keepdim=keepdim)


@lru_cache(maxsize=32)
def _sample_index(n: int, m: int, device: str) -> Tensor:
    """``m`` fixed pseudo-random positions in ``[0, n)``, sorted (memory is then read in order)."""
    g = torch.Generator().manual_seed(0x5E1EC7 ^ n)
    return torch.randint(0, n, (m,), generator=g).sort().values.to(device)


def _chunks(n: int, device: torch.device) -> list[tuple[int, int]]:
    step = n if device.type != "cpu" else CHUNK
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def bracket_margin(m: int, p: float) -> float:
    """Half-width, in ranks of a sample of ``m`` entries, of the bracket around the sample rank ``p * m``
    of a row's k-th value (``p = k / n``): five standard deviations of the sample rank, plus 16."""
    return 5.0 * math.sqrt(m * p * (1 - p)) + 16


def sample_span(k: int, n: int, m: int) -> tuple[int, int]:
    """The sample ranks ``(lo, hi)`` (0-based; below 0 or from ``m`` on: open on that side) whose values
    bracket the k-th smallest of a row of ``n`` entries, from a sorted sample of ``m`` of them."""
    p = k / n
    margin = bracket_margin(m, p)
    return math.floor(p * m - margin), math.ceil(p * m + margin)


def _brackets(sample: Tensor, n: int, ks: Sequence[int]) -> list[tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Per rank k: values ``lo <= hi`` of the sorted ``sample`` (of a row of ``n`` entries) that bracket
    the k-th smallest with overwhelming probability (None: open on that side), and ``tie``: the value in
    the bracket that the counting pass counts instead of keeping (:data:`TIE_SHARE`; ``lo`` where
    ``lo == hi``), or None."""
    m = sample.numel()
    spans = [sample_span(k, n, m) for k in ks]
    if _numpy_pass_ok(sample):  # only the brackets' ranks in order (introselect), then each bracket's part
        a = np.array(_as_numpy(sample))  # sorted: a few hundred entries each, not the 32K of the sample
        a.partition(sorted({min(max(i, 0), m - 1) for span in spans for i in span}))
        s = torch.from_numpy(a)
        part = lambda i0, i1: torch.from_numpy(np.sort(a[i0:i1]))  # noqa: E731
        count = lambda v: int(np.count_nonzero(a == v.numpy()))  # noqa: E731
    else:
        s = sample.sort().values
        part = lambda i0, i1: s[i0:i1]  # noqa: E731
        count = lambda v: int(torch.searchsorted(s, v, right=True) - torch.searchsorted(s, v))  # noqa: E731
    out = []
    for lo_i, hi_i in spans:
        # clones, not views: a view would keep the whole sample alive for as long as the bracket
        lo, hi = (s[lo_i].clone() if lo_i >= 0 else None), (s[hi_i].clone() if hi_i < m else None)
        if lo is not None and lo == hi:
            tie = lo
        else:  # the most repeated value of the bracket's part of the sample, if it is frequent in the sample
            vals, counts = torch.unique_consecutive(part(max(lo_i, 0), min(hi_i, m - 1) + 1), return_counts=True)
            v = vals[counts.argmax()].reshape(1).clone()
            tie = v[0] if count(v) * TIE_SHARE >= m else None
        out.append((lo, hi, tie))
    return out


def _finish(ks: Sequence[int], below: list[int], cands: list[list[Tensor]], numpy_pass: bool,
            whole_row) -> list[Tensor]:
    """The k-th values from the counts below each bracket and its candidates; ``whole_row()`` gives
    the row (of ``|x|`` where absolute) for the exact fallback when a sample missed."""
    out = []
    for j, k in enumerate(ks):
        tied = cands[j][0] if isinstance(cands[j][0], _Tied) else None
        cand = tied.rest if tied is not None else torch.cat(cands[j]) if len(cands[j]) > 1 else cands[j][0]
        r = k - below[j]
        if tied is not None:  # sorted: the candidates below the tied value, its copies, those above it
            n_lt = int((cand < tied.value).sum())
            if n_lt < r <= n_lt + tied.count:
                out.append(tied.value)
                continue
            if r > n_lt:
                r -= tied.count
        if 1 <= r <= cand.numel():
            if numpy_pass:  # numpy's introselect: the same value, several times faster than kthvalue
                out.append(torch.from_numpy(np.partition(cand.numpy(), r - 1)[r - 1 : r].copy()).reshape(()))
            else:
                out.append(_torch_kth(cand, r, 0, False))
        else:  # the sample missed the bracket: exact fallback
            out.append(_torch_kth(whole_row(), k, 0, False))
    return out


def _select_row(row: Tensor, ks: Sequence[int], absolute: bool) -> list[Tensor]:
    """Exact k-th smallest values (0-dim tensors) of the 1-D ``row`` (of ``|row|`` if ``absolute``)."""
    n = row.numel()
    s = row[_sample_index(n, min(SAMPLE, n), str(row.device))]
    brackets = _brackets(s.abs() if absolute else s, n, ks)
    numpy_pass = _numpy_pass_ok(row)
    if numpy_pass and _kernels.available(row) and kernel_brackets([brackets]):  # compiled, in place
        below, cands = kernel_counts(_kernels.count_brackets([(0.0 if absolute else None, [row])], [brackets]),
                                     [brackets])[0]
    elif numpy_pass:  # 1 x CHUNK blocks of the row (views; bf16 converted to float32 one block at a time)
        blocks = (_as_numpy(row[a0:a1])[None] for a0, a1 in _chunks(n, row.device))
        below, cands = _count_blocks(blocks, [brackets], _numpy_dtype(row.dtype), min(NUMPY_CHUNK, n),
                                     absolute)[0].result()
    else:
        below, cands = _count_pass_torch(row, _chunks(n, row.device), brackets, absolute)
    vals = _finish(ks, below, cands, numpy_pass, lambda: row.abs() if absolute else row)
    return [v.to(row.dtype) for v in vals]  # bf16 counted in float32: the same values, cast back exactly


def kth_smallest_columns(cols, k: int | Sequence[int], absolute: bool = True) -> Tensor:
    """The k-th smallest value (of ``|x|`` where ``absolute``) of every row of a matrix given by
    column blocks, as an ``N x 1`` tensor: the values of ``kth_smallest(X, k, dim=1, keepdim=True)``
    (``N x len(k)`` for a sequence of ranks, counted in the same pass).

    ``cols``: an ``N x n`` matrix that is never materialised (:class:`mergelib.task_vectors.TaskVectorColumns`):
    ``cols.shape``, ``.dtype``, ``.device``, ``.block(c0, c1, out)``, ``.gather(positions)`` and
    ``.row(i)``. One pass over the column blocks counts every row at once (the NumPy counting pass on
    the CPU); rows are built whole only for short rows, the ``"torch"`` backend, or a missed sample.
    """
    n_rows, n = cols.shape
    ks = [int(k)] if isinstance(k, int) else [int(v) for v in k]
    for v in ks:
        if not 1 <= v <= n:
            raise ValueError(f"k={v} out of range [1, {n}]")
    probe = torch.empty(0, dtype=cols.dtype, device=cols.device)
    if _backend == "torch" or n < LONG_ROW or not _numpy_pass_ok(probe):
        return torch.stack([kth_smallest(cols.row(i), ks, absolute=absolute) for i in range(n_rows)])
    sample = cols.gather(_sample_index(n, min(SAMPLE, n), str(cols.device)))
    brackets = [_brackets(row.abs() if absolute else row, n, ks) for row in sample]
    counted = _count_with_kernel(cols, brackets, absolute)
    if counted is not None:  # the counts and candidates of the NumPy pass below, in one read per rank
        return torch.stack([torch.stack(_finish(ks, below, cands, True,
                                                lambda i=i: cols.row(i).abs() if absolute else cols.row(i)))
                            for i, (below, cands) in enumerate(counted)]).to(cols.dtype)
    width = min(max(1024, (CHUNK // n_rows) // 1024 * 1024), n)
    buf = torch.empty(n_rows, width, dtype=cols.dtype, device=cols.device)
    blocks = (_as_numpy(cols.block(c0, min(c0 + width, n), buf[:, : min(c0 + width, n) - c0]))
              for c0 in range(0, n, width))
    counters = _count_blocks(blocks, brackets, _numpy_dtype(cols.dtype), width, absolute)
    rows = []
    for i, ctr in enumerate(counters):
        below, cands = ctr.result()
        rows.append(torch.stack(_finish(ks, below, cands, True,
                                        lambda i=i: cols.row(i).abs() if absolute else cols.row(i))))
    return torch.stack(rows).to(cols.dtype)


def _count_with_kernel(cols, brackets, absolute: bool):
    """The counting pass with :func:`mergelib.kernels.count_brackets`, reading the state dicts behind
    ``cols`` (a :class:`~mergelib.task_vectors.TaskVectorColumns`) in place: per row ``(below, cands)``
    as :meth:`_NumpyCounter.result` gives them. None where the kernel does not apply (no Numba, tensors
    other than contiguous float32 or bf16 on the CPU, signed values, a bracket on one value without it as
    its tie: :func:`kernel_brackets`): the NumPy pass counts then."""
    if not absolute or not hasattr(cols, "tensors") or cols.dtype != torch.float32:
        return None
    if not _kernels.available(*cols.tensors()) or not kernel_brackets(brackets):
        return None
    keys = cols.layout.keys
    return kernel_counts(_kernels.count_brackets(((cols.pretrained[k], [md[k] for md in cols.models]) for k in keys),
                                                 brackets), brackets)


def kernel_brackets(brackets) -> bool:
    """Whether :func:`mergelib.kernels.count_brackets` can count these brackets (per row, per rank): any
    bracket (open on a side or not) but one on one value (``lo == hi``, heavy ties such as the few distinct
    magnitudes of bf16 task vectors) without that value as its tie (:func:`_brackets` sets it), whose
    entries are counted and none kept, as :class:`_NumpyCounter` does."""
    return not any(lo is not None and hi is not None and bool(lo == hi) and tie is None for row in brackets
                   for lo, hi, tie in row)


def kernel_counts(rows, brackets) -> list[tuple[list[int], list]]:
    """:func:`mergelib.kernels.count_brackets`'s result as :meth:`_NumpyCounter.result` gives it, per row
    ``(below, cands)`` (for :func:`_finish`)."""
    return [([below for below, _, _ in row],
             [[torch.from_numpy(c)] if tie is None else [_Tied(torch.from_numpy(c), tie, points)]
              for (_, points, c), (_, _, tie) in zip(row, brs)])
            for row, brs in zip(rows, brackets)]


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _numpy_pass_ok(row: Tensor) -> bool:
    """The counting pass runs in NumPy for CPU rows: its boolean masks, counts and extraction are
    several times faster there than torch's on one core. NumPy has no bfloat16: bf16 rows are read in
    float32 chunks (every bf16 value is a float32 and the order is the same, so the same counts and
    values). The torch pass (:func:`_count_pass_torch`) is CUDA's."""
    return row.device.type == "cpu" and row.dtype in (*_NUMPY_DTYPES, torch.bfloat16) and not row.requires_grad


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype the counting pass compares ``dtype`` values in (bf16: float32)."""
    return torch.empty(0, dtype=dtype if dtype in _NUMPY_DTYPES else torch.float32).numpy().dtype


def _as_numpy(t: Tensor) -> np.ndarray:
    """``t`` (CPU) as a NumPy array in :func:`_numpy_dtype` (a view, or a float32 copy of bf16)."""
    return t.detach().numpy() if t.dtype in _NUMPY_DTYPES else t.detach().float().numpy()


class _NumpyCounter:
    """Per bracket, ``#{x < lo}``, ``#{x == tie}`` and the other entries in ``[lo, hi]`` of a row fed
    chunk by chunk (NumPy arrays of at most ``width`` entries). Comparisons are made in the row's dtype:
    ``lo``/``hi``/``tie`` are elements of the row, so exactly representable in it. With ``limit``, more
    than ``limit`` candidates for a bracket (rows of a few distinct values) set ``overflow`` and stop
    the counting."""

    def __init__(self, brackets, dtype, width: int, absolute: bool, limit: int | None = None):
        self.absolute = absolute
        self.limit = limit  # at most this many candidates per bracket, else ``overflow`` (heavy ties)
        self.overflow = False
        self.kept = [0] * len(brackets)
        self.buf = np.empty(width, dtype=dtype)
        self.m_lt = np.empty(width, dtype=bool)
        self.m_in = np.empty(width, dtype=bool)
        self.m_eq = np.empty(width, dtype=bool)
        self.lims = [tuple(None if v is None else dtype.type(v.item()) for v in b) for b in brackets]
        self.below = [0] * len(brackets)
        # the candidates of each bracket in one growing array (few large allocations: many small
        # ones kept alive would fragment the heap, which then cannot shrink)
        self.store = [np.empty(max(width, 1024), dtype=dtype) for _ in brackets]
        self.points = [0] * len(brackets)  # entries equal to tie (all of them for a one-value bracket)

    def add(self, chunk) -> None:
        if self.overflow:
            return
        w = chunk.shape[0]
        c = np.abs(chunk, out=self.buf[:w]) if self.absolute else chunk
        lt, inside = self.m_lt[:w], self.m_in[:w]
        for j, (lo, hi, tie) in enumerate(self.lims):
            if lo is None and hi is None and tie is None:
                self._keep(j, c, None)
                continue
            if lo is None:
                np.less_equal(c, hi, out=inside) if hi is not None else inside.fill(True)
            else:
                self.below[j] += int(np.count_nonzero(np.less(c, lo, out=lt)))
                if hi is None:
                    np.logical_not(lt, out=inside)
                else:
                    np.less_equal(c, hi, out=inside)
                    inside &= np.logical_not(lt, out=lt)
                    if lo == hi:  # a bracket on one value (heavy ties, e.g. zeros): count, keep nothing
                        self.points[j] += int(np.count_nonzero(inside))
                        continue
            if tie is not None:  # count the tied value, keep the others (tie lies in [lo, hi])
                eq = np.equal(c, tie, out=self.m_eq[:w])
                self.points[j] += int(np.count_nonzero(eq))
                inside &= np.logical_not(eq, out=eq)
            if not self._keep(j, c, inside):
                return

    def _keep(self, j: int, c, inside) -> bool:
        """Append the entries of ``c`` where ``inside`` (all if None) to bracket j's store; False (and
        ``overflow``) past ``limit``."""
        cnt = c.shape[0] if inside is None else int(np.count_nonzero(inside))
        n0 = self.kept[j]
        if self.limit is not None and n0 + cnt > self.limit:
            self.overflow = True
            self.store = [None] * len(self.lims)  # free them: the caller falls back
            return False
        if n0 + cnt > self.store[j].shape[0]:
            grown = np.empty(max(2 * self.store[j].shape[0], n0 + cnt), dtype=self.store[j].dtype)
            grown[:n0] = self.store[j][:n0]
            self.store[j] = grown
        dst = self.store[j][n0:n0 + cnt]
        if inside is None:
            dst[:] = c
        else:
            np.compress(inside, c, out=dst)
        self.kept[j] = n0 + cnt
        return True

    def result(self) -> tuple[list[int], list]:
        """``(below, cands)``; the candidates of a bracket with a tied value are ``[_Tied(...)]``."""
        return self.below, [[torch.from_numpy(st[:kept]) if tie is None else
                             _Tied(torch.from_numpy(st[:kept]), torch.tensor(tie), n)]
                            for (_, _, tie), st, n, kept in zip(self.lims, self.store, self.points, self.kept)]


class _Tied:
    """The candidates of a bracket with a tied value: ``count`` copies of ``value`` (0-dim), and the
    other candidates ``rest`` (1-D, none for a bracket on one value)."""

    def __init__(self, rest: Tensor, value: Tensor, count: int):
        self.rest, self.value, self.count = rest, value, count

    def numel(self) -> int:
        return self.rest.numel() + self.count


def _count_blocks(blocks, brackets, dtype, width: int, absolute: bool, limit: int | None = None) -> list[_NumpyCounter]:
    """One :class:`_NumpyCounter` per row (``brackets[r]``), fed from ``N x w`` NumPy blocks (any w)
    in chunks of at most ``width`` entries: the counting pass of :func:`kth_smallest_columns` and of
    the streaming merges (:mod:`mergelib.streaming`)."""
    counters = [_NumpyCounter(br, dtype, width, absolute, limit) for br in brackets]
    for xb in blocks:
        for a0 in range(0, xb.shape[1], width):
            for ctr, row in zip(counters, xb):
                ctr.add(row[a0:a0 + width])
    return counters


def _count_pass_torch(row: Tensor, chunks, brackets, absolute: bool):
    """``(below, cands)`` of :class:`_NumpyCounter` with torch operations, over the chunks of ``row``
    (CUDA; on the CPU only where NumPy cannot read the row): per bracket ``#{x < lo}``, ``#{x == tie}``
    and the other entries in ``[lo, hi]``. One chunk is the whole row on CUDA, so no per-chunk host round trips."""
    below, tied = [0] * len(brackets), [0] * len(brackets)
    cands: list[list[Tensor]] = [[] for _ in brackets]
    # counts below lo as a float32 0/1 sum (faster than a bool one on the CPU; exact below 2**24)
    count = torch.empty(chunks[0][1], dtype=torch.float32, device=row.device) if chunks[0][1] <= 1 << 24 else None
    for a0, a1 in chunks:
        c = row[a0:a1]
        if absolute:
            c = c.abs()
        for j, (lo, hi, tie) in enumerate(brackets):
            if lo is None and hi is None and tie is None:
                cands[j].append(c)
                continue
            if lo is None:
                inside = c <= hi if hi is not None else torch.ones_like(c, dtype=torch.bool)
            else:
                lt = (c < lo) if count is None else torch.lt(c, lo, out=count[: a1 - a0])
                below[j] += int(lt.sum())
                inside = c >= lo if hi is None else torch.ge(c, lo).logical_and_(c <= hi)
            if tie is not None:  # counted, not kept (tie lies in [lo, hi])
                eq = c == tie
                tied[j] += int(eq.sum())
                inside.logical_and_(eq.logical_not_())
            cands[j].append(c[inside])
    return below, [[_Tied(torch.cat(cj), tie, tied[j])] if tie is not None else cj
                   for j, (cj, (_, _, tie)) in enumerate(zip(cands, brackets))]


def kth_smallest(x: Tensor, k: int | Sequence[int], dim: int = -1, keepdim: bool = False,
                 absolute: bool = False) -> Tensor:
    """The k-th smallest value (1-based, ``k`` in ``[1, n]``) along ``dim``: ``sorted(x)[k - 1]``.

    ``x``: any shape, float (fp32, fp64, bf16, fp16) or integer, CPU or CUDA, finite. ``k``: an int, or
    a sequence of ints (several ranks of the same rows in one pass: the result then has an extra last
    dimension of size ``len(k)``). ``absolute=True`` gives the order statistics of ``|x|`` without
    materialising ``|x|``. Bit for bit the value of ``torch.kthvalue(x, k, dim).values`` (module
    docstring: up to the sign of a zero result when a row mixes -0.0 and +0.0).
    """
    n = x.shape[dim] if x.ndim else 1
    many = not isinstance(k, int)
    ks = [int(v) for v in k] if many else [int(k)]
    for v in ks:
        if not 1 <= v <= n:
            raise ValueError(f"k={v} out of range [1, {n}]")
    if x.ndim == 0:
        x = x.reshape(1)
    dim = dim % x.ndim
    if _backend == "torch" or n < LONG_ROW:
        xs = x.abs() if absolute else x
        vals = [_torch_kth(xs, v, dim, keepdim) for v in ks]
        return torch.stack(vals, -1) if many else vals[0]
    xm = x.movedim(dim, -1)
    lead = xm.shape[:-1]
    rows = xm.reshape(-1, n)
    res = torch.stack([torch.stack(_select_row(rows[r], ks, absolute)) for r in range(rows.shape[0])])
    res = res.reshape(*lead, len(ks))  # lead dims, ranks
    if keepdim:
        res = res.unsqueeze(dim)  # insert the reduced dim back (ranks stay last)
    return res if many else res.squeeze(-1)


def topk_threshold(x: Tensor, keep: int, dim: int = -1, keepdim: bool = False,
                   absolute: bool = True) -> Tensor:
    """The ``keep``-th largest value along ``dim`` (of ``|x|`` by default): ``keep`` in ``[1, n]``."""
    n = x.shape[dim]
    return kth_smallest(x, n - keep + 1, dim=dim, keepdim=keepdim, absolute=absolute)


def topk_mask(x: Tensor, keep: int, dim: int = -1, absolute: bool = True) -> Tensor:
    """Boolean mask of exactly ``keep`` largest entries (of ``|x|``) per row along ``dim``.

    Entries above the threshold are all kept; ties at the threshold are kept in index order (the
    lowest indices first), so the mask is deterministic and the same on every device.
    ``keep <= 0``: nothing; ``keep >= n``: everything.
    """
    n = x.shape[dim]
    if keep <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if keep >= n:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.abs() if absolute else x
    t = topk_threshold(x, keep, dim=dim, keepdim=True, absolute=absolute)
    mask = a > t
    need = keep - mask.sum(dim, keepdim=True)
    if bool((need > 0).any()):
        eq = a == t
        rank = eq.cumsum(dim, dtype=torch.int32)
        mask |= eq & (rank <= need)
    return mask
