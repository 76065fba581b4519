"""Fused CUDA kernels (`Triton <https://triton-lang.org>`_): TIES's trim thresholds and its trim-elect-mean
sweep, in three reads of the task vectors instead of some twenty-five; PCB in four reads (two for its
clip values) without its ``N x D`` scores; ``flatten`` and task arithmetic's sums in one read, one launch
for all tensors; FR's mask and aligned sum around cuFFT's transforms.

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
  the state dicts, every input entry read once (:func:`mergelib.merging._sum_foreach`), and
  :func:`stack_task_vectors`: :func:`mergelib.task_vectors.flatten`'s ``N x D`` matrix. Both launch once
  for all tensors of a dtype, over a table of their addresses (a launch per tensor cost more of Python's
  time than the GPU spent on the data).
* :func:`pcb_official`: PCB-Merging (official form) in three passes that recompute the balancing
  scores instead of storing them, after :func:`kth_abs_rows` for the clip values. Its ``tanh`` is its own
  (libdevice's does not run in the interpreter), so its results are close to the torch code's, not
  its bits.
* :func:`mask_spectrum` and :func:`aligned_row_sum`: FR-Merging's filter mask applied in place to the
  half spectra (only the zeroed part written; each task's DC bin, its sum, kept for the finiteness
  check), and its aligned sum with the alignment's weights and the inverse transform's scale computed
  in the kernel (:func:`mergelib.fourier._fr_tensor_two_reads`).

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
    def sum_deltas(table_ptr, bad_ptr, scale, DTYPE: tl.constexpr, NM: tl.constexpr, FIRST: tl.constexpr,
                   LAST: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        # one tensor's block per program, the tensors in a table (int64 rows: numel, the addresses of the
        # base, the output and NM fine-tuned tensors; one launch for all tensors): out = (0 or out) +
        # (m_0 - base) + ... + (m_{NM-1} - base) in float32; LAST: count the non-finite sums into
        # bad_ptr[tensor], then (SCALE) out = base + scale * out
        j = tl.program_id(1)
        row = table_ptr + j * (NM + 3)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < tl.load(row)  # programs past a shorter tensor's end do nothing
        if tl.program_id(0).to(tl.int64) * BLOCK < tl.load(row):
            base_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
            out_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
            b = tl.load(base_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            if FIRST:
                acc = tl.zeros([BLOCK], dtype=tl.float32)
            else:
                acc = tl.load(out_ptr + offs, mask=inb, other=0.0)
            for i in tl.static_range(NM):
                m_ptr = tl.load(row + 3 + i).to(tl.pointer_type(DTYPE))
                acc += tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32) - b
            if LAST:
                big = tl.abs(acc) > 3.4028234663852886e38  # above the largest float32: +-inf
                bad = tl.sum((inb & ((acc != acc) | big)).to(tl.int32), axis=0)
                if bad > 0:
                    tl.atomic_add(bad_ptr + j, bad)
                if SCALE:
                    acc = b + scale * acc
            tl.store(out_ptr + offs, acc, mask=inb)

    @triton.jit
    def aligned_rows(x_ptr, row_stride, n_rows, n, mag_ptr, scale, out_ptr, ALIGN: tl.constexpr,
                     BLOCK: tl.constexpr):
        # out = 0 + x_0 * w_0 + x_1 * w_1 + ... (the rows in order) over a block of columns, with
        # w_i = (max_j mag_j / mag_i) * scale (0 where mag_i is 0: FR's alignment) or, without ALIGN, scale
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = cols < n
        if ALIGN:
            top = tl.load(mag_ptr)
            mp = mag_ptr + 1
            for i in range(1, n_rows):
                top = tl.maximum(top, tl.load(mp))
                mp += 1
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        xp = x_ptr + cols
        mp = mag_ptr
        for i in range(n_rows):
            w = scale
            if ALIGN:
                m = tl.load(mp)
                w = tl.where(m > 0, tl.math.div_rn(top, tl.where(m > 0, m, 1.0)), 0.0) * scale
            acc += tl.load(xp, mask=inb, other=0.0) * w
            xp += row_stride
            mp += 1
        tl.store(out_ptr + cols, acc, mask=inb)

    @triton.jit
    def mask_spectrum(s_ptr, w_ptr, m, dc_ptr, DC: tl.constexpr, BLOCK: tl.constexpr):
        # in place on task program_id(1)'s spectrum of m complex entries (2 m float32: real and imaginary
        # parts interleaved) times the m multipliers w: zeros written where w is 0 (nothing read), nothing
        # read or written where w is 1, x * w elsewhere (the official mask's double-counted ring: 2).
        # With DC, the task's DC bin (real part: the sum of its entries) goes to dc_ptr[task] first.
        f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = f < 2 * m
        w = tl.load(w_ptr + f // 2, mask=inb, other=1.0)
        task = tl.program_id(1)
        p = s_ptr + task.to(tl.int64) * (2 * m) + f
        if DC:
            if tl.program_id(0) == 0:
                tl.store(dc_ptr + task, tl.load(s_ptr + task.to(tl.int64) * (2 * m)))
        tl.store(p, tl.zeros([BLOCK], dtype=tl.float32), mask=inb & (w == 0.0))
        scaled = inb & (w != 0.0) & (w != 1.0)
        tl.store(p, tl.load(p, mask=scaled, other=0.0) * w, mask=scaled)

    @triton.jit
    def stack_deltas(table_ptr, out_ptr, row_len, DTYPE: tl.constexpr, NM: tl.constexpr, SUB: tl.constexpr,
                     BLOCK: tl.constexpr):
        # one tensor's block per program, the tensors in a table (int64 rows: numel, the base's address,
        # the column the tensor starts at, the addresses of NM fine-tuned tensors): out[i, col + e] =
        # m_i[e] - base[e] (SUB; else m_i[e]) in float32, for the NM rows of out (rows of row_len entries)
        j = tl.program_id(1)
        row = table_ptr + j * (NM + 3)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if tl.program_id(0).to(tl.int64) * BLOCK < tl.load(row):
            inb = offs < tl.load(row)
            if SUB:
                b = tl.load(tl.load(row + 1).to(tl.pointer_type(DTYPE)) + offs, mask=inb, other=0.0).to(tl.float32)
            op = out_ptr + tl.load(row + 2) + offs
            for i in tl.static_range(NM):
                m = tl.load(tl.load(row + 3 + i).to(tl.pointer_type(DTYPE)) + offs, mask=inb, other=0.0).to(tl.float32)
                if SUB:
                    m = m - b
                tl.store(op, m, mask=inb)
                op += row_len

    @triton.jit
    def pcb_pass(x_ptr, row_stride, n_rows, fn, n, idx_ptr, lo_ptr, hi_ptr, span_ptr,
                 blo_ptr, bhi_ptr, below_ptr, cnt_ptr, cand_ptr, cap, bmax_ptr, nprog,
                 q_ptr, qspan_ptr, lam_ptr, out_ptr,
                 MODE: tl.constexpr, HAS_LAM: tl.constexpr, BLOCK: tl.constexpr):
        # PCB official on a block of columns, all rows: the column sums (rows in order from 0), then per
        # row a = clamp(|x|, lo, hi), beta = exp(fn * ((a - lo) / span)^2) * tanh(x * sum). MODE 0: beta
        # at the columns idx (n of them) into out (N x n); 1: count the betas below the row's bracket
        # [blo, bhi], pack those inside into cand (N x cap) and write the block's max into bmax
        # (N x nprog); 2: the merge, out = sum_i s_i * lam_i * tau'_i / max(sum_i s_i, 1e-12) with
        # s = (max(beta, q) - q) / qspan and tau' = sign(x) * a, rows added in order from 0
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        if MODE == 0:
            cols = tl.load(idx_ptr + offs, mask=inb, other=0)
        else:
            cols = offs
        tot = tl.zeros([BLOCK], dtype=tl.float32)
        xp = x_ptr + cols  # advanced by a row at a time
        for i in range(n_rows):
            tot += tl.load(xp, mask=inb, other=0.0)
            xp += row_stride
        num = tl.zeros([BLOCK], dtype=tl.float32)
        den = tl.zeros([BLOCK], dtype=tl.float32)
        xp = x_ptr + cols
        op = out_ptr + offs  # MODE 0: the row's scores, advanced by a row at a time
        cp = cand_ptr  # MODE 1: the row's candidates
        for i in range(n_rows):  # the block's rows again (from the L2 cache)
            x = tl.load(xp, mask=inb, other=0.0)
            xp += row_stride
            lo = tl.load(lo_ptr + i)
            a = tl.minimum(tl.maximum(tl.abs(x), lo), tl.load(hi_ptr + i))
            d = tl.math.div_rn(a - lo, tl.load(span_ptr + i))
            # tanh(x * tot) in float32 within a few ulp (Cephes' tanhf: an odd polynomial below 0.625,
            # (1 - e^-2|y|) / (1 + e^-2|y|) above), and y itself below 2**-12 as torch's tanh
            # (competition.TANH_IDENTITY_BELOW); libdevice's tanh does not run in Triton's interpreter
            y = x * tot
            ay = tl.abs(y)
            z = y * y
            poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
                    - 3.33332819422e-1) * z * y + y
            e = tl.exp(-2.0 * ay)
            big = (1.0 - e) / (1.0 + e)
            th = tl.where(ay < 2.44140625e-4, y, tl.where(ay < 0.625, poly, tl.where(y < 0, -big, big)))
            beta = tl.exp(d * d * fn) * th
            if MODE == 0:
                tl.store(op, beta, mask=inb)
                op += n
            elif MODE == 1:
                blo = tl.load(blo_ptr + i)
                below = tl.sum((inb & (beta < blo)).to(tl.int32), axis=0)
                tl.atomic_add(below_ptr + i, below.to(tl.int64))
                inside = inb & (beta >= blo) & (beta <= tl.load(bhi_ptr + i))
                flags = inside.to(tl.int32)
                start = tl.atomic_add(cnt_ptr + i, tl.sum(flags, axis=0).to(tl.int64))
                pos = start + (tl.cumsum(flags, axis=0) - 1).to(tl.int64)
                tl.store(cp + pos, beta, mask=inside & (pos < cap))
                cp += cap
                tl.store(bmax_ptr + i * nprog + pid, tl.max(tl.where(inb, beta, -float("inf")), axis=0))
            else:
                q = tl.load(q_ptr + i)
                s = tl.math.div_rn(tl.maximum(beta, q) - q, tl.load(qspan_ptr + i))
                tp = a * ((x > 0).to(tl.float32) - (x < 0).to(tl.float32))
                if HAS_LAM:
                    tp = tp * tl.load(lam_ptr + i)
                num += tp * s
                den += s
        if MODE == 2:
            tl.store(out_ptr + offs, tl.math.div_rn(num, tl.maximum(den, 1e-12)), mask=inb)

    return SimpleNamespace(triton=triton, count_bracket=count_bracket, ties_pass=ties_pass, sum_deltas=sum_deltas,
                           aligned_rows=aligned_rows, mask_spectrum=mask_spectrum, stack_deltas=stack_deltas,
                           pcb_pass=pcb_pass)


class _Bracket:
    """A bracket ``[lo, hi]`` around the k-th smallest value of each row of ``n`` entries, from the rows'
    sorted samples ``s`` (``N x m``; ``floor``: the lower end where the bracket is open below), and the
    buffers that a counting pass fills: ``below`` (entries under ``lo``), ``cnt`` and ``cand`` (those in
    the bracket, packed, at most ``cap`` a row). Shared by :func:`kth_abs_rows` and :func:`pcb_official`."""

    def __init__(self, s: Tensor, k: int, n: int, floor: float):
        from . import selection as _select
        n_rows, m = s.shape
        dev = s.device
        lo_i, hi_i = _select.sample_span(k, n, m)
        self.k = k
        self.lo = s[:, lo_i].contiguous() if lo_i >= 0 else torch.full((n_rows,), floor, device=dev)
        self.hi = s[:, hi_i].contiguous() if hi_i < m else torch.full((n_rows,), math.inf, device=dev)
        expected = (min(hi_i, m - 1) - max(lo_i, 0) + 1) / m * n
        self.cap = min(n, int(1.5 * expected) + 4096)  # the count is binomial around expected: far below 1.5x
        self.below = torch.zeros(n_rows, dtype=torch.int64, device=dev)
        self.cnt = torch.zeros(n_rows, dtype=torch.int64, device=dev)
        self.cand = torch.full((n_rows, self.cap), math.inf, dtype=torch.float32, device=dev)

    def values(self, exact) -> Tensor:
        """The rows' k-th smallest values (``N``, float32) once the counting pass has run: from the sorted
        candidates, or ``exact(i)`` for a row whose bracket the sample missed or which holds more than
        ``cap`` entries (a heavily repeated value)."""
        counts = torch.stack((self.below, self.cnt)).tolist()  # the one host round trip
        vals = self.cand.sort(dim=1).values
        return torch.stack([vals[i, self.k - b - 1] if 1 <= self.k - b <= c <= self.cap else exact(i)
                            for i, (b, c) in enumerate(zip(*counts))])


def kth_abs_rows(x: Tensor, k: int) -> Tensor:
    """``torch.kthvalue(x.abs(), k, dim=1, keepdim=True).values`` of an ``N x n`` matrix whose rows are
    contiguous (``x.stride(1) == 1``; any row stride: a segment of a wider matrix), float32, bf16 or fp16,
    finite: the same value (``N x 1``, ``x``'s dtype)."""
    from . import selection as _select
    K = _compiled()
    n_rows, n = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range [1, {n}]")
    m = min(SAMPLE, n)
    idx = _select._sample_index(n, m, str(x.device))
    br = _Bracket(x[:, idx].abs().float().sort(dim=1).values, k, n, floor=-1.0)
    K.count_bracket[(K.triton.cdiv(n, COUNT_BLOCK), n_rows)](x, x.stride(0), n, br.lo, br.hi, br.below, br.cnt,
                                                             br.cand, br.cap, BLOCK=COUNT_BLOCK, num_warps=8)
    kth = br.values(lambda i: _select.kth_smallest(x[i].float(), k, absolute=True))
    return kth.to(x.dtype).view(n_rows, 1)


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


def aligned_row_sum(x: Tensor, mags: Tensor | None, scale: float, out: Tensor | None = None) -> Tensor:
    """FR's aligned sum on CUDA (:func:`mergelib.fourier._fr_tensor_two_reads`): ``0 + x_0 * w_0 + x_1 * w_1
    + ...`` of the float32 ``N x n`` matrix ``x`` (rows contiguous, any row stride), the rows in order, in
    one read, with ``w_i = (max_j mags_j / mags_i) * scale`` (0 where ``mags_i`` is 0) from the ``N``
    float32 row magnitudes ``mags``, or ``w_i = scale`` without them. The weights are computed in the
    kernel (a handful of torch launches per tensor saved); no matrix product, which cuBLAS may run as
    TF32. Into ``out`` (contiguous, ``n`` float32) when given."""
    K = _compiled()
    n_rows, n = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device) if out is None else out
    mags_arg = x if mags is None else mags.float().contiguous()  # x stands in for the magnitudes not read
    K.aligned_rows[(K.triton.cdiv(n, BLOCK),)](x, x.stride(0), n_rows, n, mags_arg, float(scale), out,
                                               ALIGN=mags is not None, BLOCK=BLOCK)
    return out


def mask_spectrum(spec: Tensor, w: Tensor, dc: Tensor | None = None) -> Tensor:
    """``spec.mul_(w)`` for a contiguous complex64 ``N x H x Wh`` half spectrum and the ``H x Wh`` float32
    multipliers ``w`` of FR's filter (0 and 1; 2 on the official code's double-counted ring), in place,
    writing only where ``w`` is not 1 and reading only where it is neither 0 nor 1 (the official mask
    zeroes 58-68 % of a ViT's rectangular spectra and keeps the rest as it is). The same values, except
    that a zeroed entry is +0 where ``x * 0`` gives -0 for a negative ``x``. ``dc`` (``N`` float32,
    contiguous): receives each task's DC bin before the mask, the real part of ``spec[:, 0, 0]``."""
    K = _compiled()
    m = w.numel()
    if spec.dtype != torch.complex64 or not spec.is_contiguous() or spec.shape[-2:] != w.shape:
        raise ValueError(f"mask_spectrum needs a contiguous complex64 (..., {tuple(w.shape)}) spectrum, "
                         f"got {spec.dtype} {tuple(spec.shape)}")
    n = spec.numel() // m
    if dc is not None and (dc.dtype != torch.float32 or dc.numel() != n or not dc.is_contiguous()):
        raise ValueError(f"mask_spectrum's dc must be {n} contiguous float32, got {dc.dtype} {tuple(dc.shape)}")
    if n:
        real = torch.view_as_real(spec)
        K.mask_spectrum[(K.triton.cdiv(2 * m, BLOCK), n)](real, w.float().contiguous(), m,
                                                           real if dc is None else dc, DC=dc is not None,
                                                           BLOCK=BLOCK)
    return spec


MODELS_PER_LAUNCH = 8  # fine-tuned tensors read per launch of the task-arithmetic sum and of flatten


def _address_tables(models: list[list[Tensor]], lead):
    """The launches of a kernel that reads tensors by address (``sum_deltas``, ``stack_deltas``): for each
    dtype of ``models[j]`` (tensor ``j``'s fine-tuned tensors, one per task) and each group of up to
    :data:`MODELS_PER_LAUNCH` tasks, yield ``(dtype, js, group, grid, table)``: the tensors ``js`` of that
    dtype, the tasks ``group`` (a ``range``), the grid (programs per tensor, tensors) and the CPU int64
    table whose row for tensor ``j`` is ``lead(j)`` (numel and two more entries) followed by the group's
    addresses."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, ms in enumerate(models):
        by_dtype.setdefault(ms[0].dtype, []).append(j)
    n_models = len(models[0])
    for dtype, js in by_dtype.items():
        width = max(1, _compiled().triton.cdiv(max(models[j][0].numel() for j in js), BLOCK))
        for g0 in range(0, n_models, MODELS_PER_LAUNCH):
            group = range(g0, min(g0 + MODELS_PER_LAUNCH, n_models))
            table = torch.tensor([[*lead(j), *(models[j][i].data_ptr() for i in group)] for j in js],
                                 dtype=torch.int64)
            yield dtype, js, group, (width, len(js)), table


def sum_task_vectors(bases: list[Tensor], models: list[list[Tensor]], outs: list[Tensor],
                     scale: float | None = None) -> list[int]:
    """Task arithmetic's sums on CUDA: for every tensor ``j``, ``outs[j] = 0 + (m_1 - b) + (m_2 - b) + ...``
    over its fine-tuned tensors ``models[j]`` in order, with ``b = bases[j]``, in float32 (the float
    operations of :func:`mergelib.merging._sum_per_tensor`), each entry of the inputs read once. One launch
    covers every tensor of a dtype (a table of their addresses: a launch per tensor cost 40 us of Python
    each, two thirds of ``merge()``'s time on the benchmark's 48 tensors) and up to
    :data:`MODELS_PER_LAUNCH` tasks; more go on in the same order. ``scale``: then
    ``outs[j] = b + scale * outs[j]`` (``torch.add(b, sum, alpha=scale)``). All tensors contiguous (read
    flat, by address), ``outs`` float32 of the inputs' numel; a tensor's inputs all float32, bf16 or fp16.
    Returns per tensor the number of non-finite sums (one host round trip for all)."""
    K = _compiled()
    tl = _triton()[1]
    dev = outs[0].device
    bad = torch.zeros(len(outs), dtype=torch.int32, device=dev)
    n_models = len(models[0])
    lead = lambda j: (outs[j].numel(), bases[j].data_ptr(), outs[j].data_ptr())  # noqa: E731
    for dtype, js, group, grid, table in _address_tables(models, lead):
        last = group.stop == n_models
        counts = torch.zeros(len(js), dtype=torch.int32, device=dev)
        K.sum_deltas[grid](table.to(dev), counts, 0.0 if scale is None else float(scale),
                           DTYPE=_TL_DTYPES[dtype](tl), NM=len(group), FIRST=group.start == 0, LAST=last,
                           SCALE=last and scale is not None, BLOCK=BLOCK)
        if last:
            bad.index_add_(0, torch.tensor(js, dtype=torch.int64).to(dev), counts)
    return bad.tolist()


def stack_task_vectors(models: list[list[Tensor]], bases: list[Tensor] | None, out: Tensor,
                       starts: list[int]) -> None:
    """:func:`mergelib.task_vectors.flatten` on CUDA: ``out[i, s_j : s_j + numel_j] = models[j][i] - bases[j]``
    (``models[j][i]`` itself when ``bases`` is None) in float32 for every tensor ``j`` (``s_j = starts[j]``)
    and task ``i``: each input entry read once, one launch per dtype and :data:`MODELS_PER_LAUNCH` tasks
    (a table of the tensors' addresses; a subtraction kernel per tensor and task cost 15-20 us of Python
    each, 384 of them for the benchmark's set). The float operations of ``torch.sub`` in float32, so the
    same bits. ``out``: contiguous float32 ``N x D``; the inputs contiguous, a tensor's all one dtype."""
    K = _compiled()
    tl = _triton()[1]
    lead = lambda j: (models[j][0].numel(), 0 if bases is None else bases[j].data_ptr(), starts[j])  # noqa: E731
    for dtype, js, group, grid, table in _address_tables(models, lead):
        K.stack_deltas[grid](table.to(out.device), out[group.start], out.shape[1], DTYPE=_TL_DTYPES[dtype](tl),
                             NM=len(group), SUB=bases is not None, BLOCK=BLOCK)


_TL_DTYPES = {torch.float32: lambda tl: tl.float32, torch.bfloat16: lambda tl: tl.bfloat16,
              torch.float16: lambda tl: tl.float16}


class _PCBRows:
    """The per-row arguments of PCB's kernel (``pcb_pass``) for the float32 ``N x D`` matrix ``x``: the clip
    values ``lo``, ``hi`` (``N``), ``span = hi - lo`` (inf where 0, as :func:`mergelib.competition._safe_den`)
    and the task coefficients ``lams`` (None: all 1); :meth:`run` launches one mode."""

    def __init__(self, x: Tensor, lo: Tensor, hi: Tensor, lams=None):
        n = x.shape[0]
        self.x, self.lo, self.hi = x, lo.reshape(n).float().contiguous(), hi.reshape(n).float().contiguous()
        self.inf = torch.full_like(self.lo, math.inf)
        self.span = torch.where(self.hi > self.lo, self.hi - self.lo, self.inf)
        self.has_lam = lams is not None and any(float(v) != 1.0 for v in lams)
        self.lam = torch.tensor([float(v) for v in lams] if self.has_lam else [1.0], dtype=torch.float32,
                                device=x.device)

    def run(self, mode: int, n: int, block: int, idx=None, blo=None, bhi=None, below=None, cnt=None, cand=None,
            cap=0, bmax=None, nprog=0, q=None, qspan=None, out=None) -> None:
        K = _compiled()
        x = self.x

        def arg(t):  # self.lam stands in for the tensors that a mode does not read
            return self.lam if t is None else t

        K.pcb_pass[(K.triton.cdiv(n, block),)](
            x, x.stride(0), x.shape[0], float(x.shape[0]), n, arg(idx), self.lo, self.hi, self.span, arg(blo),
            arg(bhi), arg(below), arg(cnt), arg(cand), cap, arg(bmax), nprog, arg(q), arg(qspan), self.lam, arg(out),
            MODE=mode, HAS_LAM=self.has_lam, BLOCK=block)

    def scores(self, idx: Tensor) -> Tensor:
        """PCB's scores beta (``N x len(idx)``) at the columns ``idx`` (int64)."""
        out = torch.empty(self.x.shape[0], idx.numel(), dtype=torch.float32, device=self.x.device)
        self.run(0, idx.numel(), BLOCK, idx=idx, out=out)
        return out


def pcb_scores(x: Tensor, lo: Tensor, hi: Tensor, idx: Tensor | None = None) -> Tensor:
    """beta = exp(N * ((clamp(|x|, lo, hi) - lo) / (hi - lo))^2) * tanh(x * sum_j x_j) of the float32
    ``N x D`` matrix ``x`` (rows contiguous) at the columns ``idx`` (all when None), the row clip values
    ``lo``, ``hi`` given: PCB's balancing scores (:func:`mergelib.competition.pcb_scores`, official mode)
    as :func:`pcb_official` computes them."""
    idx = torch.arange(x.shape[1], device=x.device) if idx is None else idx
    return _PCBRows(x, lo, hi).scores(idx)


def pcb_official(x: Tensor, lo_k: int, hi_k: int, q_k: int, lams) -> Tensor:
    """PCB official (:func:`mergelib.competition.pcb_merge`, steps 1-6) of the float32 ``N x D`` matrix ``x``
    (rows contiguous, finite), without its ``N x D`` scores: the clip values (ranks ``lo_k``, ``hi_k`` of
    ``|x|``) by :func:`kth_abs_rows`; the scores beta at a sorted sample of columns for a bracket around
    each row's drop threshold (rank ``q_k``); one pass that recomputes beta, counts it below the bracket,
    packs it inside and takes its row maxima; a sort of the candidates for the exact threshold q of these
    betas; one pass that recomputes beta and takes the weighted mean. ``lams``: the per-task
    coefficients. Returns the ``D`` float32 merged task vector.

    The float operations of the torch code in its order, but with Triton's ``exp`` and a tanh of a few
    ulp (Cephes' ``tanhf``): the result is close to the torch code's, not its bits (nor are torch's CUDA
    ``exp`` and ``tanh`` the CPU's). A row whose bracket the sample missed, or which holds too many
    candidates (a heavily repeated score: sparse task vectors, whose zeros all score 0), takes its
    threshold from these betas written out whole and :func:`mergelib.selection.kth_smallest`."""
    from . import selection as _select
    n_rows, D = x.shape
    dev = x.device
    rows = _PCBRows(x, kth_abs_rows(x, lo_k), kth_abs_rows(x, hi_k), lams)
    m = min(SAMPLE, D)
    br = _Bracket(rows.scores(_select._sample_index(D, m, str(dev))).sort(dim=1).values, q_k, D, floor=-math.inf)
    nprog = _compiled().triton.cdiv(D, COUNT_BLOCK)
    bmax = torch.empty(n_rows, nprog, dtype=torch.float32, device=dev)
    rows.run(1, D, COUNT_BLOCK, blo=br.lo, bhi=br.hi, below=br.below, cnt=br.cnt, cand=br.cand, cap=br.cap,
             bmax=bmax, nprog=nprog)
    beta_max = bmax.amax(1)
    whole = lru_cache(lambda: rows.scores(torch.arange(D, device=dev)))  # every beta, only if a row needs it
    q = br.values(lambda i: _select.kth_smallest(whole()[i], q_k))
    qspan = torch.where(beta_max > q, beta_max - q, rows.inf)
    out = torch.empty(D, dtype=torch.float32, device=dev)
    rows.run(2, D, BLOCK, q=q, qspan=qspan, out=out)
    return out
