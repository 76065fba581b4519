"""Fused CUDA kernels (`Triton <https://triton-lang.org>`_): TIES's trim thresholds and its trim-elect-mean
sweep, in three reads of the task vectors instead of some twenty-five, and task arithmetic's sums in one.

On a GPU every eager torch operation is one pass over memory: TIES from the ``N x D`` matrix took 41 ms
on an H200 for the ViT-B/32-sized benchmark set, where one read takes 0.65 ms
(``benchmarks/results_gpu.md``). The kernels here do what :mod:`mergelib.kernels` does on the CPU: the
**same float32 operations in the same order** for every entry, in one pass.

* :func:`kth_abs_rows`: the exact k-th smallest ``|x|`` of every row of an ``N x n`` matrix (TIES's
  official trim threshold, ``torch.kthvalue``'s value): a bracket ``[lo, hi]`` per row from a sorted
  sample (no host round trip), one pass that counts the entries below ``lo`` and packs those inside
  the bracket, then a sort of the few candidates. A bracket that the sample missed, or one holding too
  many candidates (a heavily repeated value), falls back to :func:`mergelib.selection.kth_smallest`.
* :func:`ties_sweep`: trim (official rule, ``|x| >= threshold``), sign election (``"mass"`` or
  ``"count"``) and disjoint mean, column block by column block, the rows added in order from zero as
  :func:`mergelib.competition._ties_fused` adds them, divisions rounded as IEEE divisions: the bits of
  the torch code. With the ``"mass"`` rule a first pass counts the votes that decide the sign of the
  columns whose trimmed sum is 0.
* :func:`sum_task_vectors`: ``merge()``'s task-arithmetic sums ``0 + (theta_1 - theta_0) + ...`` from
  the state dicts, every input entry read once (:func:`mergelib.merging._sum_foreach`).

They run where :func:`available` says so: Triton importable, CUDA tensors, the kernels not switched off
(``MERGELIB_KERNELS=torch``, as for :mod:`mergelib.kernels`). ``tests/test_gpu_kernels.py`` runs them in
Triton's interpreter on the CPU against the torch code, ``tests/test_cuda.py`` compiled on a GPU.
"""
from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace

import torch
from torch import Tensor

from . import kernels as _kernels

SAMPLE = 1 << 20  # sample of each row for its bracket (sorted on the GPU: the bracket spans ~0.5 % of the row)
BLOCK = 1024  # columns per program of the TIES sweep
COUNT_BLOCK = 4096  # entries per program of the counting pass (one pair of atomic adds each)


@lru_cache(maxsize=None)
def _triton():
    """(triton, triton.language), or None where Triton is missing or older than 3.3 (the kernels take
    tuples of pointers): the torch code runs then."""
    try:
        import triton
        import triton.language as tl
    except ImportError:  # an optional accelerator
        return None
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (triton, tl) if (major, minor) >= (3, 3) else None


# The tests run the kernels on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1 set before triton
# is imported (the repository's conftest.py does where there is no CUDA), and this switch on
# (tests/test_gpu_kernels.py)
_on_cpu_interpreted = False


def available(*tensors: Tensor) -> bool:
    """True when the kernels are on (:func:`mergelib.kernels.enabled`), Triton is installed and every
    tensor is a CUDA tensor (a CPU one in the tests' interpreted runs) that needs no gradient."""
    if not _kernels.enabled() or not tensors:
        return False
    want = "cpu" if _on_cpu_interpreted else "cuda"
    # the devices first: CPU merges never import triton (a second of start-up)
    return all(t.device.type == want and not t.requires_grad for t in tensors) and _triton() is not None


@lru_cache(maxsize=None)
def _compiled():
    """The Triton kernels (defined on first use: importing this module needs no Triton)."""
    triton, tl = _triton()

    @triton.jit
    def count_bracket(x_ptr, row_stride, n, lo_ptr, hi_ptr, below_ptr, cnt_ptr, cand_ptr, cap,
                      BLOCK: tl.constexpr):
        row = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = cols < n
        a = tl.abs(tl.load(x_ptr + row.to(tl.int64) * row_stride + cols, mask=inb, other=0.0).to(tl.float32))
        lo = tl.load(lo_ptr + row)
        hi = tl.load(hi_ptr + row)
        below = tl.sum((inb & (a < lo)).to(tl.int32), axis=0)
        tl.atomic_add(below_ptr + row, below.to(tl.int64))
        inside = inb & (a >= lo) & (a <= hi)
        flags = inside.to(tl.int32)
        start = tl.atomic_add(cnt_ptr + row, tl.sum(flags, axis=0).to(tl.int64))
        pos = start + (tl.cumsum(flags, axis=0) - 1).to(tl.int64)
        tl.store(cand_ptr + row.to(tl.int64) * cap + pos, a, mask=inside & (pos < cap))

    @triton.jit
    def ties_pass(x_ptr, row_stride, n_rows, n, thr_ptr, out_ptr, votes_ptr,
                  MODE: tl.constexpr, GE: tl.constexpr, BLOCK: tl.constexpr):
        # MODE 0: votes only (#(sum > 0) - #(sum < 0)); 1: "mass" rule, 2: "count" rule (sums of signs);
        # GE: gamma = + where the sum is >= 0, else where it is > 0
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = cols < n
        tot = tl.zeros([BLOCK], dtype=tl.float32)
        xp = x_ptr + cols  # advanced by a row at a time: pointer arithmetic, no 32-bit row offsets
        for i in range(n_rows):
            x = tl.load(xp, mask=inb, other=0.0).to(tl.float32)
            xp += row_stride
            t = tl.where(tl.abs(x) >= tl.load(thr_ptr + i), x, x * 0.0)
            if MODE == 2:
                tot += (t > 0).to(tl.float32) - (t < 0).to(tl.float32)
            else:
                tot += t
        if MODE == 0:
            v = tl.sum((inb & (tot > 0)).to(tl.int32) - (inb & (tot < 0)).to(tl.int32), axis=0)
            tl.atomic_add(votes_ptr, v.to(tl.int64))
        else:
            if GE:
                s = tl.where(tot >= 0, 1.0, -1.0)
            else:
                s = tl.where(tot > 0, 1.0, -1.0)
            num = tl.zeros([BLOCK], dtype=tl.float32)
            cnt = tl.zeros([BLOCK], dtype=tl.float32)
            xp = x_ptr + cols
            for i in range(n_rows):  # the block's rows again (from the L2 cache)
                x = tl.load(xp, mask=inb, other=0.0).to(tl.float32)
                xp += row_stride
                t = tl.where(tl.abs(x) >= tl.load(thr_ptr + i), x, x * 0.0) * s
                num += tl.maximum(t, 0.0)
                cnt += (t > 0).to(tl.float32)
            tl.store(out_ptr + cols, tl.math.div_rn(num * s, tl.maximum(cnt, 1.0)), mask=inb)

    @triton.jit
    def sum_deltas(base_ptr, out_ptr, bad_ptr, models, numel, scale,
                   NM: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, SCALE: tl.constexpr,
                   BLOCK: tl.constexpr):
        # out = (0 or out) + (m_0 - base) + ... + (m_{NM-1} - base) in float32 (models: a tuple of NM
        # pointers); LAST: count the non-finite sums into bad_ptr, then (SCALE) out = base + scale * out
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < numel
        b = tl.load(base_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if FIRST:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        else:
            acc = tl.load(out_ptr + offs, mask=inb, other=0.0)
        for i in tl.static_range(NM):
            acc += tl.load(models[i] + offs, mask=inb, other=0.0).to(tl.float32) - b
        if LAST:
            big = tl.abs(acc) > 3.4028234663852886e38  # above the largest float32: +-inf
            bad = tl.sum((inb & ((acc != acc) | big)).to(tl.int32), axis=0)
            if bad > 0:
                tl.atomic_add(bad_ptr, bad)
            if SCALE:
                acc = b + scale * acc
        tl.store(out_ptr + offs, acc, mask=inb)

    return SimpleNamespace(triton=triton, count_bracket=count_bracket, ties_pass=ties_pass, sum_deltas=sum_deltas)


def kth_abs_rows(x: Tensor, k: int) -> Tensor:
    """``torch.kthvalue(x.abs(), k, dim=1, keepdim=True).values`` of an ``N x n`` matrix whose rows are
    contiguous (``x.stride(1) == 1``; any row stride: a segment of a wider matrix), float32, bf16 or fp16,
    finite: the same value (``N x 1``, ``x``'s dtype)."""
    from . import selection as _select
    K = _compiled()
    triton, count_bracket = K.triton, K.count_bracket
    n_rows, n = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range [1, {n}]")
    dev = x.device
    m = min(SAMPLE, n)
    idx = _select._sample_index(n, m, str(dev))
    s = x[:, idx].abs().float().sort(dim=1).values  # N x m, sorted
    lo_i, hi_i = _select.sample_span(k, n, m)
    lo = s[:, lo_i].contiguous() if lo_i >= 0 else torch.full((n_rows,), -1.0, device=dev)
    hi = s[:, hi_i].contiguous() if hi_i < m else torch.full((n_rows,), math.inf, device=dev)
    expected = (min(hi_i, m - 1) - max(lo_i, 0) + 1) / m * n
    cap = min(n, int(1.5 * expected) + 4096)  # the count is binomial around expected: far below 1.5x
    below = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    cnt = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    cand = torch.full((n_rows, cap), math.inf, dtype=torch.float32, device=dev)
    count_bracket[(triton.cdiv(n, COUNT_BLOCK), n_rows)](x, x.stride(0), n, lo, hi, below, cnt, cand, cap,
                                                         BLOCK=COUNT_BLOCK, num_warps=8)
    counts = torch.stack((below, cnt)).tolist()  # the one host round trip
    vals = cand.sort(dim=1).values
    out = []
    for i, (b, c) in enumerate(zip(*counts)):
        r = k - b
        if 1 <= r <= c <= cap:
            out.append(vals[i, r - 1])
        else:  # the sample missed the bracket, or the bracket holds too many entries: the exact torch path
            out.append(_select.kth_smallest(x[i].float(), k, absolute=True))
    return torch.stack(out).to(x.dtype).view(n_rows, 1)


def ties_sweep(x: Tensor, segments, sign_rule: str, majority: int | None = None) -> Tensor:
    """TIES on the float32 ``N x D`` matrix ``x`` (rows contiguous) with the official trim: ``segments``
    ``[(start, end, thresholds), ...]`` cover its columns, each with its ``N x 1`` thresholds (None keeps
    every entry). Returns the ``D`` float32 merged task vector with the bits of
    :func:`mergelib.competition._ties_fused`. ``majority`` (``"mass"`` rule): the sign that the columns
    whose trimmed sum is 0 take (> 0: +); None counts the votes of ``x`` first (one more pass and one
    host round trip): #(sum > 0) - #(sum < 0) over all columns, as the torch code does."""
    K = _compiled()
    triton, ties_pass = K.triton, K.ties_pass
    n_rows, D = x.shape
    out = torch.empty(D, dtype=torch.float32, device=x.device)
    zero = torch.zeros(n_rows, dtype=torch.float32, device=x.device)
    segs = [(s, e, zero if thr is None else thr.reshape(n_rows).float().contiguous()) for s, e, thr in segments]

    def sweep(mode: int, ge: bool, votes: Tensor | None = None) -> None:
        for s, e, thr in segs:
            ties_pass[(triton.cdiv(e - s, BLOCK),)](x[:, s:], x.stride(0), n_rows, e - s, thr, out[s:],
                                                   out if votes is None else votes, MODE=mode, GE=ge, BLOCK=BLOCK)

    if sign_rule == "count":
        sweep(2, True)  # gamma = + where sum(sign) >= 0
        return out
    if majority is None:
        votes = torch.zeros((), dtype=torch.int64, device=x.device)
        sweep(0, False, votes)
        majority = int(votes)
    sweep(1, majority > 0)
    return out


MODELS_PER_LAUNCH = 8  # fine-tuned tensors read per launch of the task-arithmetic sum


def sum_task_vectors(bases: list[Tensor], models: list[list[Tensor]], outs: list[Tensor],
                     scale: float | None = None) -> list[int]:
    """Task arithmetic's sums on CUDA: for every tensor ``j``, ``outs[j] = 0 + (m_1 - b) + (m_2 - b) + ...``
    over its fine-tuned tensors ``models[j]`` in order, with ``b = bases[j]``, in float32 (the float
    operations of :func:`mergelib.merging._sum_per_tensor`), each entry of the inputs read once (up to
    :data:`MODELS_PER_LAUNCH` tasks per launch; more go on in the same order). ``scale``: then
    ``outs[j] = b + scale * outs[j]`` (``torch.add(b, sum, alpha=scale)``). All tensors contiguous and
    flat, ``outs`` float32; inputs float32, bf16 or fp16. Returns per tensor the number of non-finite
    sums (one host round trip for all)."""
    K = _compiled()
    bad = torch.zeros(len(outs), dtype=torch.int32, device=outs[0].device)
    for j, (b, ms, out) in enumerate(zip(bases, models, outs)):
        numel = out.numel()
        grid = (K.triton.cdiv(numel, BLOCK),)
        for g0 in range(0, len(ms), MODELS_PER_LAUNCH):
            group = ms[g0:g0 + MODELS_PER_LAUNCH]
            last = g0 + MODELS_PER_LAUNCH >= len(ms)
            K.sum_deltas[grid](b, out, bad[j:], tuple(group), numel, 0.0 if scale is None else float(scale),
                               NM=len(group), FIRST=g0 == 0, LAST=last, SCALE=last and scale is not None,
                               BLOCK=BLOCK)
    return bad.tolist()
