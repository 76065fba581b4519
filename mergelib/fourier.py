"""FR-Merging: Fourier filtering of task vectors (Zheng & Wang, ICCV 2025; METHODS.md section 5).

Each 2-D task-vector matrix v (H x W) is filtered in the 2-D frequency domain,
G = F^-1{ M . F{v} }, and the filtered task vectors are summed: theta = theta_0 + c * sum_i FR(tau_i).
Two masks M, named modes because paper and code disagree ([OPEN], METHODS.md 15.1):

* ``mode="official"`` (FREE-Merging ``TaskVectorFFT.cal_low_and_high_fft_for_tensor``): unshifted
  ``fft2``; keep the coefficients whose index-space distance to the array centre
  (floor(H/2), floor(W/2)) is <= R = ratio * min(H, W) (``base="max"``: max(H, W), RoBERTa code).
  Unshifted, the array centre is the Nyquist corner, so this keeps the highest frequencies and drops
  DC and its neighbourhood.
* ``mode="paper"``: the paper's ideal high-pass H = 1[sqrt(eta^2 + gamma^2) >= D0] on the centred
  spectrum (fftshift, zero the disc of radius D0 around DC, ifftshift), D0 = ratio * min(H, W) / 2
  (our mapping; the paper's D0 values are unknown).

Filters are batched over leading dimensions (``N x H x W``: all tasks of one matrix in one call; a merge
filters large matrices one task at a time, see ``_ONE_TASK_AT_A_TIME``). When
the mask is Hermitian-symmetric (always in paper mode, official mode on even sizes) the filter runs as
``rfft2``/``irfft2``, which equals ``ifft2(M . fft2(v)).real`` at half the cost and memory.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Mapping

import torch
from torch import Tensor

from . import gpu_kernels as _gpu
from .competition import _check_matrix, _like, _row_sum, check_finite
from .hparams import check_choice, check_flag, check_number
from .task_vectors import FlatLayout, Scratch, empty_matrix

__all__ = ["fr_mask", "fr_filter", "align_magnitudes", "fr_paper_coefficients", "fr_merge", "fr_tensor",
           "fr_filtered_keys", "fr_check_selection", "FRFilterWarning"]

_MODES = ("official", "paper")


class FRFilterWarning(UserWarning):
    """FR-Merging left some selected tensors unfiltered because they are not 2-D (e.g. conv kernels)."""


def _check_mode(mode: str, base: str) -> None:
    check_choice(mode, "mode", _MODES)
    check_choice(base, "base", ("min", "max"))


def _check_ratio(ratio) -> float:
    """FR's radius factor: R = ratio * base(H, W); a finite real >= 0 (values > 1 are meaningful)."""
    return check_number(ratio, "ratio", low=0.0)


def _distance(h: int, w: int) -> Tensor:
    """sqrt((u - floor(H/2))^2 + (v - floor(W/2))^2) on the index grid, float32 (as the official code)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.sqrt((x - w // 2) ** 2 + (y - h // 2) ** 2)


@lru_cache(maxsize=64)
def _weights_cpu(h: int, w: int, ratio: float, mode: str, base: str, compat_double_ring: bool) -> tuple[Tensor, bool]:
    """Float32 (H, W) multiplier in the unshifted FFT layout, and whether it is Hermitian-symmetric."""
    size = min(h, w) if base == "min" else max(h, w)
    d = _distance(h, w)
    if mode == "official":
        radius = size * ratio
        if compat_double_ring:  # band (low <= d <= R) + low (d <= low): ring d == low counted twice
            low = min(h, w) // 10
            wt = ((d >= low) & (d <= radius)).float() + (d <= low).float()
        else:
            wt = (d <= radius).float()
    else:
        d0 = ratio * size / 2
        wt = torch.fft.ifftshift((d >= d0).float())  # built centred, moved back to the unshifted layout
    mirror = torch.roll(torch.flip(wt, (0, 1)), shifts=(1, 1), dims=(0, 1))  # wt[(-u) % H, (-v) % W]
    return wt, bool(torch.equal(wt, mirror))


def fr_mask(shape: tuple[int, int], ratio: float, mode: str = "official", base: str = "min",
            device: torch.device | str | None = None) -> Tensor:
    """Boolean (H, W) mask of the **kept** FFT coefficients, in the unshifted ``torch.fft.fft2`` layout.

    official: keep d(u, v) <= ratio * base(H, W), d the index distance to (floor(H/2), floor(W/2)).
    paper: keep |f| >= D0 = ratio * base(H, W) / 2, |f| the distance of the signed frequency to DC
    (i.e. ``ifftshift`` of the centred disc complement). ``ratio >= 0``.
    """
    _check_mode(mode, base)
    ratio = _check_ratio(ratio)
    h, w = (int(s) for s in shape)
    wt, _ = _weights_cpu(h, w, ratio, mode, base, False)
    return (wt > 0).to(device)


@lru_cache(maxsize=64)
def _weights_on(h: int, w: int, ratio: float, mode: str, base: str, compat: bool, device: str) -> tuple[Tensor, bool]:
    """The multiplier on ``device`` (cached: no host-to-device copy per call); the rfft half if symmetric."""
    wt, sym = _weights_cpu(h, w, ratio, mode, base, compat)
    if sym:
        wt = wt[:, : w // 2 + 1].contiguous()
    return wt.to(device), sym


def _weights(h: int, w: int, ratio: float, mode: str, base: str, compat: bool, device) -> tuple[Tensor, bool]:
    return _weights_on(h, w, float(ratio), mode, base, bool(compat), str(torch.device(device)))


def fr_filter(w: Tensor, ratio: float, mode: str = "official", base: str = "min",
              compat_double_ring: bool = False) -> Tensor:
    """Fourier-filter the last two dims: ``ifft2(M . fft2(w)).real``, M from :func:`fr_mask`.

    ``w``: ``(..., H, W)`` any float dtype, any device (batched over leading dims); returns float32 of
    the same shape. ``compat_double_ring`` (official mode only) reproduces the official code's sum of
    a band mask and a low mask whose shared ring d = floor(min(H, W) / 10) counts twice.
    Linear in ``w``; the identity when the mask keeps everything. ``w`` must be finite
    (``NonFiniteError``); ``ratio`` a finite real >= 0 (``HyperparameterError``).
    """
    _check_mode(mode, base)
    ratio = _check_ratio(ratio)
    check_flag(compat_double_ring, "compat_double_ring")
    if w.ndim < 2:
        raise ValueError(f"fr_filter needs a (..., H, W) tensor, got shape {tuple(w.shape)}")
    if compat_double_ring and mode != "official":
        raise ValueError("compat_double_ring only applies to mode='official'")
    check_finite(w, "w")
    return _filter(w, ratio, mode, base, compat_double_ring)


def _filter(w: Tensor, ratio: float, mode: str, base: str, compat_double_ring: bool,
            inplace: bool = False, scratch: Scratch | None = None) -> Tensor:
    """:func:`fr_filter` without the checks. ``inplace`` writes the result into ``w`` where the real
    transform applies (a Hermitian-symmetric mask) and ``w`` is float32 and contiguous, and returns a new
    tensor otherwise (the caller compares the result with ``w``); ``scratch`` (:class:`~mergelib.task_vectors.Scratch`) holds the half spectrum, so that a
    merge that filters one task and one tensor at a time allocates nothing per transform. Neither
    changes a bit of the result."""
    h, wd = w.shape[-2:]
    wt, symmetric = _weights(h, wd, ratio, mode, base, compat_double_ring, w.device)
    x = w.float()
    if symmetric:
        half = (*w.shape[:-1], wd // 2 + 1)
        buf = None if scratch is None else scratch.get("spectrum", math.prod(half), torch.complex64, w.device).view(half)
        spec = torch.fft.rfft2(x, out=buf)
        spec.mul_(wt)  # wt is the (H, W // 2 + 1) half here
        inplace = inplace and w.dtype == torch.float32 and w.is_contiguous()
        if w.ndim == 2 and w.device.type == "cpu" and w.numel() >= _ONE_TASK_AT_A_TIME:
            return _irfft2_by_rows(spec, wd, w if inplace else None, scratch)
        return torch.fft.irfft2(spec, s=(h, wd), out=w if inplace else None)
    spec = torch.fft.fft2(x)
    spec.mul_(wt)
    return torch.fft.ifft2(spec).real.contiguous()


def _irfft2_by_rows(spec: Tensor, w: int, out: Tensor | None = None, scratch: Scratch | None = None) -> Tensor:
    """``irfft2(spec, s=(h, w))`` of a contiguous ``h x (w // 2 + 1)`` half spectrum on the CPU, in
    contiguous 1-D transforms: the inverse along ``h`` on the transposed spectrum, then the real inverse
    along ``w``. torch's ``irfft2`` on the CPU runs its transform along ``h`` over strided columns, which
    MKL does slowly: 12-20 ms for one 3072 x 768 or 768 x 3072 matrix here, against 3-4 ms for the
    forward ``rfft2``; this path takes 4-7 ms, two transposed copies included. The same values up to
    rounding (not the bits of ``irfft2``). ``scratch``: holds the transposed spectrum."""
    h, wh = spec.shape
    t = (torch.empty((wh, h), dtype=spec.dtype) if scratch is None
         else scratch.get("spectrum_t", spec.numel(), spec.dtype).view(wh, h))
    t.copy_(spec.t())
    rows = torch.fft.ifft(t, dim=-1, out=spec.view(wh, h))  # the transform along h, the spectrum overwritten
    t = t.view(h, wh).copy_(rows.t())
    return torch.fft.irfft(t, n=w, dim=-1, out=out)


def _align_factors(mean_abs: Tensor) -> Tensor:
    """max_j m_j / m_i per task (N); 0 for an all-zero task (the official code gives NaN there)."""
    mx = mean_abs.amax(0, keepdim=True)
    return torch.where(mean_abs > 0, mx / mean_abs, torch.zeros_like(mean_abs))


def align_magnitudes(tvs_per_key: Mapping[str, Tensor] | Tensor, layout: FlatLayout | None = None,
                     inplace: bool = False):
    """Official per-layer magnitude alignment (FREE ``utils.align_each_layer``).

    For each tensor key l: m_{i,l} = mean|tau_{i,l}| and tau_{i,l} <- tau_{i,l} * max_j m_{j,l} / m_{i,l},
    so every task's tensor gets the mean |.| of the largest task.

    ``tvs_per_key``: a mapping ``key -> N x ...`` stacked tensor (returns a new mapping), a single
    ``N x ...`` tensor (returns a tensor), or a flat ``N x D`` matrix with its ``layout`` (each
    segment aligned separately). Dtypes are kept; ``inplace`` scales the given tensors.
    """
    if isinstance(tvs_per_key, Mapping):
        return {k: align_magnitudes(v, inplace=inplace) for k, v in tvs_per_key.items()}
    x = tvs_per_key
    out = x if inplace else x.clone()
    if layout is None:
        f = _align_factors(x.reshape(x.shape[0], -1).abs().mean(1))
        return out.mul_(f.view(-1, *([1] * (x.ndim - 1))).to(out.dtype))
    if layout.D != x.shape[-1]:
        raise ValueError(f"layout.D={layout.D} does not match the matrix with D={x.shape[-1]}")
    for _, s, e in layout.segments():
        _align_rows(out[:, s:e])
    return out


def _align_rows(x: Tensor, scratch: Scratch | None = None) -> Tensor:
    """Align the N rows of one tensor's ``N x numel`` task vectors in place (m_i = mean|row_i|);
    ``|x|`` goes into a ``scratch`` buffer where one is given (``x`` contiguous)."""
    return x.mul_(_align_factors(torch.abs(x, out=_like(scratch, "abs", x)).mean(1))[:, None])


def fr_paper_coefficients(tvs: Tensor) -> Tensor:
    """The paper's merge coefficients lambda_i = E(v_i) / sum_j E(v_j), ``N x D`` -> ``N`` float32.

    E is taken as the mean magnitude mean|v_i| (the signed mean of a task vector is ~0 and would
    make lambda ill-conditioned; FREE's code also uses mean|.| for E). [OPEN] in METHODS.md.
    """
    # |tvs| of a contiguous matrix into a huge-page buffer (a fresh N x D copy faulted in 110 K pages on the
    # benchmark's set), the same values in the same layout, so the same mean
    a = torch.abs(tvs, out=empty_matrix(tuple(tvs.shape), tvs.dtype, tvs.device)) if tvs.is_contiguous() else tvs.abs()
    e = a.mean(1)
    return e / e.sum().clamp_min(torch.finfo(e.dtype).tiny)


def _some(items: list[str], most: int = 5) -> str:
    return ", ".join(items[:most]) + (f", ... (+{len(items) - most})" if len(items) > most else "")


def fr_filtered_keys(layout: FlatLayout) -> list[str]:
    """The keys that :func:`fr_merge` filters: the 2-D tensors of ``layout`` (all others are summed
    unfiltered: biases and norms as in the official code; conv kernels with a :class:`FRFilterWarning`)."""
    return [k for k, s in zip(layout.keys, layout.shapes) if len(s) == 2]


def _fr_options(ratio, mode: str, base: str, align: str, compat_official: bool, compat_double_ring: bool) -> float:
    """Checks FR-Merging's hyperparameters; returns ``ratio`` as a float."""
    _check_mode(mode, base)
    ratio = _check_ratio(ratio)
    check_choice(align, "align", ("official", "paper", "none"))
    check_flag(compat_official, "compat_official")
    check_flag(compat_double_ring, "compat_double_ring")
    if compat_double_ring and mode != "official":
        raise ValueError("compat_double_ring only applies to mode='official'")
    return ratio


def fr_check_selection(layout: FlatLayout, stacklevel: int = 2) -> list[str]:
    """FR-Merging's checks on the selected tensors (shapes only): ``ValueError`` when none is 2-D, one
    :class:`FRFilterWarning` naming those with more than 2 dims. Returns :func:`fr_filtered_keys`."""
    filtered = fr_filtered_keys(layout)
    skipped = [f"{k} {s}" for k, s in zip(layout.keys, layout.shapes) if len(s) > 2]
    if not filtered:
        shapes = [f"{k} {s}" for k, s in zip(layout.keys, layout.shapes)]
        raise ValueError(f"FR-Merging filters 2-D weight matrices only, and none of the {len(layout.keys)} "
                         f"selected tensors is 2-D (shapes: {_some(shapes)}); "
                         "the result would be plain task arithmetic. Use method='task_arithmetic', or "
                         "select the 2-D tensors.")
    if skipped:
        warnings.warn(f"FR-Merging filters 2-D matrices only: {len(skipped)} selected tensor(s) with more than "
                      f"2 dims are summed unfiltered ({_some(skipped)}); filtered: {len(filtered)} tensor(s) "
                      f"({_some(filtered)})", FRFilterWarning, stacklevel=stacklevel + 1)
    return filtered


def fr_tensor(x: Tensor, key: str, shape: tuple[int, ...], ratio: float = 0.7, mode: str = "official",
              base: str = "min", align: str = "official", compat_official: bool = False,
              compat_double_ring: bool = False, scratch: Scratch | None = None, out: Tensor | None = None,
              row_sums: Tensor | None = None) -> Tensor:
    """FR-Merging of one tensor: its ``N x numel`` contiguous float32 task vectors ``x`` (overwritten)
    -> its merged ``numel`` task vector, for ``align="official"`` or ``"none"`` (the per-tensor
    alignments; ``"paper"`` weighs the tasks over the whole model, see :func:`fr_merge`).

    1. filter: a 2-D ``shape`` is filtered with :func:`fr_filter`, all N tasks in one batched FFT
       (on the CPU, tensors of ``_ONE_TASK_AT_A_TIME`` entries or more one task at a time, the same
       bits);
       any other shape is left as it is;
    2. align (``"official"``): every task's tensor scaled to the largest task's mean |.|
       (:func:`align_magnitudes`);
    3. combine: the N rows summed in order (from zero, one row at a time), or, with
       ``compat_official`` and no "weight" in ``key``, task 1's row.

    :func:`fr_merge` runs this on each tensor of the flat matrix and :func:`mergelib.merge_files` on
    each tensor read from disk, so both give the same bits. ``scratch``: buffers reused from tensor to
    tensor by the caller's loop (:class:`~mergelib.task_vectors.Scratch`; the same bits). ``out``: a
    contiguous ``numel`` float32 tensor to write the result into (:func:`fr_merge`'s merged vector).
    ``row_sums``: an ``N`` float32 tensor (contiguous) that receives the sums of ``x``'s rows, for a
    finiteness check that the caller makes once for all tensors (a NaN or inf makes its row's sum
    non-finite; so can an overflow of finite values): on a GPU, a 2-D tensor's sums are its spectrum's
    DC bins, read off the forward transform (no pass and no host round trip of their own).
    """
    if x.device.type == "cuda":
        return _fr_tensor_two_reads(x, shape, ratio, mode, base, align, compat_double_ring, out,
                                    first_task_only=compat_official and "weight" not in key, row_sums=row_sums)
    if row_sums is not None:
        torch.sum(x, 1, out=row_sums)
    x = _fr_filter_align(x, shape, ratio, mode, base, align, compat_double_ring, scratch)
    if compat_official and "weight" not in key:  # x may be the caller's scratch buffer, reused for the next tensor
        return x[0].clone() if out is None else out.copy_(x[0])
    return _row_sum(x, out=out)


def _filter_unscaled(w: Tensor, ratio: float, mode: str, base: str, compat_double_ring: bool,
                     row_sums: Tensor | None = None) -> tuple[Tensor, float]:
    """:func:`_filter` on a GPU, its inverse transform left unscaled: ``(y, s)`` with ``y * s`` the
    filtered ``w``, so that FR's aligned sum applies ``s = 1 / (H W)`` with its weights instead of a pass
    over the block (torch's inverse transform scales its output in a pass of its own). The mask goes on
    in place through :func:`mergelib.gpu_kernels.mask_spectrum` (only the zeroed part of the spectrum
    written) where Triton runs. The same values up to rounding (and the sign of zeros). ``row_sums``
    (``N`` float32): receives each task's sum, the DC bin of its spectrum (no pass of its own)."""
    h, wd = w.shape[-2:]
    wt, symmetric = _weights(h, wd, ratio, mode, base, compat_double_ring, w.device)
    if not symmetric:  # the complex transform, scaled as before
        if row_sums is not None:
            torch.sum(w, (-2, -1), out=row_sums)
        return _filter(w, ratio, mode, base, compat_double_ring), 1.0
    spec = torch.fft.rfft2(w.float())
    if _gpu.available(spec):
        _gpu.mask_spectrum(spec, wt, row_sums)
    else:
        if row_sums is not None:
            row_sums.copy_(spec[:, 0, 0].real)
        spec.mul_(wt)
    return torch.fft.irfft2(spec, s=(h, wd), norm="forward"), 1.0 / (h * wd)


def _fr_tensor_two_reads(x: Tensor, shape: tuple[int, ...], ratio: float, mode: str, base: str, align: str,
                         compat_double_ring: bool, out: Tensor | None = None, first_task_only: bool = False,
                         row_sums: Tensor | None = None) -> Tensor:
    """:func:`fr_tensor` on a GPU, ``x`` read and never written (rows contiguous; any row stride: a
    segment of the flat matrix): after the filter (:func:`_filter_unscaled`), whose inverse transform
    writes a new block, the alignment's row magnitudes are the rows' L1 norms (one read) and the aligned
    sum is one more read (:func:`mergelib.gpu_kernels.aligned_row_sum`: the weights max_j |x_j| / |x_i|
    times the transform's scale computed in the kernel, the rows added in order, no matrix product,
    which cuBLAS may run as TF32 if the user allows it), where the CPU code takes |x|, its mean, scales
    the rows in place and adds them one at a time (eight passes over the block, each a kernel launch).
    The same sums up to rounding. Without Triton, the scaled rows are added one at a time.
    ``first_task_only`` (``compat_official``'s non-weight tensors): task 1's aligned row instead of the
    sum. ``row_sums``: as for :func:`fr_tensor`."""
    n = x.shape[0]
    scale = 1.0
    if len(shape) == 2:
        x, scale = _filter_unscaled(x.view(n, *shape), ratio, mode, base, compat_double_ring, row_sums)
        x = x.view(n, -1)
    elif row_sums is not None:
        torch.sum(x, 1, out=row_sums)
    mags = torch.linalg.vector_norm(x, 1, dim=1) if align == "official" else None  # the ratios of mean |x_i|
    if not first_task_only and x.dtype == torch.float32 and x.stride(1) == 1 and _gpu.available(x):
        return _gpu.aligned_row_sum(x, mags, scale, out)
    w = (_align_factors(mags) if mags is not None else torch.ones(n, dtype=x.dtype, device=x.device)) * scale
    if first_task_only:
        return torch.mul(x[0], w[0], out=out)
    acc = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if out is None else out.zero_()
    for row, wi in zip(x, w):
        acc.add_(row * wi)
    return acc


# On the CPU, tensors of at least this many entries are filtered one task at a time, smaller ones (and
# all on a GPU) in one batched FFT. A task's FFT temporaries (the spectrum, the inverse transform's
# copies of it, the output) then bound the peak memory of a streamed merge instead of N tasks' (4 tasks
# of a 4096 x 1024 matrix: 311 -> 113 MB above the inputs), and one task's transform stays in cache
# (1.6x faster here). Per task or batched, MKL gave the same bits for every shape of this size we tried (ViT,
# MiniLM, 4096 x 1024, odd sizes) on an AMD Zen 4, but not on an Intel Xeon (2026-12-04: 1024 x 1024 and
# 1024 x 1030 batches differ in their last bits), and for some tiny odd shapes (7 x 5) the batched inverse
# differs everywhere, so small tensors keep the batched call, and with it the results of earlier versions.
# fr_merge, merge() and merge_files() all filter through _fr_filter_align, so they agree bit for bit
# with each other on any processor.
_ONE_TASK_AT_A_TIME = 1 << 20


def _fr_filter_align(x: Tensor, shape: tuple[int, ...], ratio: float, mode: str, base: str, align: str,
                     compat_double_ring: bool, scratch: Scratch | None = None) -> Tensor:
    """Steps 1-2 of :func:`fr_tensor`: the filtered (2-D ``shape``) and aligned (``align="official"``)
    ``N x numel`` block; ``x`` (contiguous) may be overwritten."""
    n = x.shape[0]
    if len(shape) == 2 and n > 1 and x.shape[1] >= _ONE_TASK_AT_A_TIME and x.device.type == "cpu":
        scratch = Scratch() if scratch is None else scratch  # one spectrum buffer for all tasks
        for row in x:  # each task's filtered tensor replaces its row
            out = _filter(row.view(shape), ratio, mode, base, compat_double_ring, inplace=True, scratch=scratch)
            if out.data_ptr() != row.data_ptr():  # the complex path (odd sizes) returns a new tensor
                row.copy_(out.view(-1))
    elif len(shape) == 2:
        x = _filter(x.view(n, *shape), ratio, mode, base, compat_double_ring).view(n, -1)
    if align == "official":
        _align_rows(x, scratch)
    return x


def fr_merge(tvs: Tensor, layout: FlatLayout, ratio: float = 0.7, mode: str = "official", base: str = "min",
             align: str = "official", compat_official: bool = False, compat_double_ring: bool = False,
             inplace: bool = False) -> Tensor:
    """FR-Merging of ``N x D`` float32 task vectors -> merged ``D`` float32 task vector (before c).

    1. every 2-D segment is filtered with :func:`fr_filter` (all N tasks of a tensor in one batched
       FFT, or one task at a time for large tensors on the CPU, see :func:`fr_tensor`;
       :func:`fr_filtered_keys`); other segments (biases, norms, embeddings) are left unfiltered;
       tensors with more than 2 dims (conv kernels) are left unfiltered with an :class:`FRFilterWarning`
       that names them, and a selection with no 2-D tensor at all raises ``ValueError``
       (:func:`fr_check_selection`);
    2. ``align="official"``: :func:`align_magnitudes` per tensor (on the filtered vectors), then
       tau_m = sum_i FR(tau_i); ``align="paper"``: tau_m = sum_i lambda_i FR(tau_i) with
       :func:`fr_paper_coefficients` (a weighted average: use an ~N times larger c);
       ``align="none"``: plain sum;
    3. ``compat_official``: keys without "weight" in their name take task 1's delta instead of the
       sum (the official ``__add__`` quirk).

    With ``align="official"`` or ``"none"`` everything happens per tensor, in :func:`fr_tensor`
    (the sums add the rows in order). The model is theta_0 + c * tau_m (c = 0.7 for 8 ViT-B/32
    tasks). ``tvs`` is never written to, except with ``align="paper"`` and ``inplace``, which
    filters it in place instead of in a copy.
    """
    ratio = _fr_options(ratio, mode, base, align, compat_official, compat_double_ring)
    # on a GPU (per-tensor alignments) the input is checked at the end, through each tensor's row sums
    # that its forward transform gives: a check up front was a pass and a host round trip (3 % of the time)
    late_check = tvs.device.type == "cuda" and align != "paper"
    n, D = _check_matrix(tvs, finite=not late_check)
    if layout.D != D:
        raise ValueError(f"layout.D={layout.D} does not match tvs with D={D}")
    fr_check_selection(layout, stacklevel=2)
    segments = [(k, shape, s, e) for shape, (k, s, e) in zip(layout.shapes, layout.segments())]
    if align != "paper":
        merged = empty_matrix((D,), device=tvs.device)  # huge pages (task_vectors.HUGE_PAGE_BYTES)
        scratch = Scratch()  # a tensor's N x numel copy, spectrum and |.|, reused from tensor to tensor
        if tvs.device.type != "cuda":
            scratch.reserve(n * max(e - s for _, _, s, e in segments), ("block", "abs"), device=tvs.device)
        sums = torch.empty(len(segments), n, device=tvs.device) if late_check else None
        for i, (k, shape, s, e) in enumerate(segments):
            # on CUDA read in place (fr_tensor writes nothing into it there), else a copy it may overwrite
            seg = (tvs[:, s:e] if tvs.device.type == "cuda"
                   else scratch.get("block", n * (e - s), device=tvs.device).view(n, e - s).copy_(tvs[:, s:e]))
            fr_tensor(seg, k, shape, ratio, mode, base, align, compat_official, compat_double_ring, scratch,
                      out=merged[s:e], row_sums=None if sums is None else sums[i])
        if sums is not None and not bool(torch.isfinite(sums).all()):
            check_finite(tvs)  # NonFiniteError, unless finite entries only overflowed a sum
        return merged
    # the copy on huge pages, and each matrix filtered in one reused block (a fresh copy of the whole
    # matrix and one of each N x numel block faulted in 340 K pages per merge of the benchmark's set)
    x = tvs if inplace else empty_matrix((n, D), dtype=tvs.dtype, device=tvs.device).copy_(tvs)
    scratch = Scratch()  # the block, and the spectrum of the tensors filtered one task at a time
    for k, shape, s, e in segments:
        if len(shape) == 2:
            seg = scratch.get("block", n * (e - s), x.dtype, x.device).view(n, e - s).copy_(x[:, s:e])
            x[:, s:e] = _fr_filter_align(seg, shape, ratio, mode, base, "paper", compat_double_ring, scratch)
    merged = fr_paper_coefficients(x).to(x.dtype) @ x
    if compat_official:
        for k, s, e in layout.segments():
            if "weight" not in k:
                merged[s:e] = x[0, s:e]
    return merged
