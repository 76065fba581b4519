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
from typing import Mapping, NamedTuple

import torch
from torch import Tensor

from . import gpu_kernels as _gpu
from . import kernels
from .competition import _check_matrix, _like, _row_sum, check_finite
from .hparams import check_choice, check_flag, check_number
from .task_vectors import FlatLayout, Scratch, _sub_into, empty_matrix

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


def _filter(w: Tensor, ratio: float, mode: str, base: str, compat_double_ring: bool) -> Tensor:
    """:func:`fr_filter` without the checks: a new float32 tensor. A single matrix of
    ``_ONE_TASK_AT_A_TIME`` entries or more on the CPU goes through :func:`_filter_band` (a merge filters
    such matrices one task at a time, so each task's result has the bits of ``fr_filter`` of its matrix)."""
    h, wd = w.shape[-2:]
    if w.ndim == 2 and w.device.type == "cpu" and w.numel() >= _ONE_TASK_AT_A_TIME:
        band = _band(h, wd, ratio, mode, base, compat_double_ring)
        if band is not None:
            y = _filter_band(w.float(), band)
            return y.t().contiguous() if band.transposed else y
    wt, symmetric = _weights(h, wd, ratio, mode, base, compat_double_ring, w.device)
    x = w.float()
    if symmetric:
        spec = torch.fft.rfft2(x)
        spec.mul_(wt)  # wt is the (H, W // 2 + 1) half here
        return torch.fft.irfft2(spec, s=(h, wd))
    spec = torch.fft.fft2(x)
    spec.mul_(wt)
    return torch.fft.ifft2(spec).real.contiguous()


class _Band(NamedTuple):
    """Where a Hermitian-symmetric mask keeps anything, for :func:`_filter_band`: the half spectrum's
    columns ``c0 .. c1 - 1`` of the matrix (``transposed``: of its transpose), and their weights
    transposed (``(c1 - c0) x rows``, contiguous)."""
    transposed: bool
    c0: int
    c1: int
    weights_t: Tensor
    zeros: Tensor | None  # where every weight is 0 or 1: the flat positions of the zeros in weights_t


@lru_cache(maxsize=64)
def _band(h: int, w: int, ratio: float, mode: str, base: str, compat: bool) -> _Band | None:
    """The kept band of the half spectrum's columns for an ``h x w`` matrix, in whichever orientation
    keeps fewer columns (the transpose only when that halves them at least: its path costs a full
    ``rfft2`` and a transposed merged matrix, :func:`_filter_band`); ``None`` for a mask that is not
    Hermitian-symmetric (odd sizes in official mode: the complex transform). Official mode's disc
    around the array centre keeps a narrow band: 538 of 1537 columns of a 768 x 3072 matrix's half
    spectrum, and of a 3072 x 768 matrix's transpose (none of its own 385 columns is empty); paper
    mode's high-pass keeps them all."""
    wt, symmetric = _weights_cpu(h, w, ratio, mode, base, compat)
    if not symmetric:
        return None
    bands = []
    for transposed, m in ((False, wt), (True, wt.t())):
        half = m[:, : m.shape[1] // 2 + 1]
        kept = half.ne(0).any(0).nonzero().flatten().tolist() or [0, -1]  # nothing kept: an empty band
        bands.append(((kept[-1] + 1 - kept[0]) / half.shape[1], transposed, kept[0], kept[-1] + 1, half))
    share, transposed, c0, c1, half = bands[1] if 2 * bands[1][0] < bands[0][0] else bands[0]
    weights_t = half[:, c0:c1].t().contiguous()
    binary = bool(((weights_t == 0) | (weights_t == 1)).all())
    return _Band(transposed, c0, c1, weights_t, (weights_t.view(-1) == 0).nonzero().flatten() if binary else None)


def _filter_band(x: Tensor, band: _Band, scratch: Scratch | None = None, total: Tensor | None = None) -> Tensor:
    """One ``h x w`` float32 CPU matrix filtered through 1-D transforms along contiguous rows, the
    transforms that run over the band only (:func:`_band`) skipping the columns that the mask empties;
    returns the filtered matrix, or, where ``band.transposed``, its transpose (contiguous). The values of
    ``irfft2(M . rfft2(x))`` up to rounding, for 35-50 % of the work on ViT-B/32's 3072 x 768, 768 x 3072
    and 2304 x 768 matrices (official mode), whose band holds 35-47 % of the columns, and without the
    transform along H over strided columns that torch's ``irfft2`` runs on the CPU, which MKL does slowly
    (12-20 ms for one of those matrices here, against 3-4 ms for ``rfft2``).

    * The band in the matrix's own half spectrum (columns ``c0 .. c1 - 1`` of ``rfft`` along W): those
      columns, transposed, get the transform along H, the mask and its inverse, and go back, transposed,
      into a half spectrum that is zero elsewhere; the real inverse along W ends it.
    * The band in the transpose's half spectrum (``band.transposed``: rows ``c0 .. c1 - 1`` of
      ``rfft2``, the frequencies along H that the mask keeps): ``rfft2`` (MKL's 2-D transform; a
      transposed copy of the input cost more), those rows completed to every frequency along W by
      Hermitian symmetry (X[u, v] = conj X[-u mod H, W - v]), the mask, the inverse along W; transposed
      into the transpose's half spectrum, zero elsewhere, the real inverse along H gives the filtered
      transpose.

    The half spectrum to invert is a ``scratch`` buffer where one is given, zeroed once for each shape
    and band (:meth:`~mergelib.task_vectors.Scratch.zeroed`): the next task's band overwrites the same
    columns, so the zeros (50-65 % of it) are not written again.

    No transform gets ``out=``: torch computes into a new tensor and copies it into ``out`` (1-3 ms more
    per transform of such a matrix). The mask's weights multiply the band, or, where they are all 0 or 1,
    only its zeros are written (the disc's edge: 9 % of a ViT band). ``total``: a 0-d float32 tensor
    that receives the sum of ``x``, read off the forward transform's DC column (no pass of its own)."""
    h, w = x.shape
    c0, c1 = band.c0, band.c1
    if band.transposed:
        spec = torch.fft.rfft2(x)  # h x (w // 2 + 1)
    else:
        spec = torch.fft.rfft(x)  # along W: h x (w // 2 + 1)
    if total is not None:  # the DC bin of rfft2, the sum of the DC column of rfft (the rows' sums)
        total.copy_(spec[0, 0].real) if band.transposed else torch.sum(spec[:, 0].real, 0, out=total)
    if band.transposed:
        rows, cols = w, h // 2 + 1  # the transpose's half spectrum
        if c1 > c0:
            mirror = (h - torch.arange(c0, c1)) % h
            kept = torch.cat([spec[c0:c1], spec[mirror, 1:w - w // 2].flip(1).conj()], dim=1)  # every v
            kept = torch.fft.ifft(_mask_band(kept, band))  # along W
    else:
        rows, cols = h, w // 2 + 1
        if c1 > c0:
            kept = torch.fft.fft(spec[:, c0:c1].t().contiguous())  # along H, the band's columns only
            kept = torch.fft.ifft(_mask_band(kept, band))
    # the half spectrum to invert: zero outside the band (zeroed once per shape and band in a scratch buffer)
    half = (torch.zeros((rows, cols), dtype=spec.dtype) if scratch is None else
            scratch.zeroed("half spectrum", rows * cols, (rows, cols, c0, c1), spec.dtype).view(rows, cols))
    if c1 > c0:
        half[:, c0:c1] = kept.t()
    return torch.fft.irfft(half, n=h if band.transposed else w)  # along the rows: the transpose's H, or W


def _mask_band(z: Tensor, band: _Band) -> Tensor:
    """The band's spectrum ``z`` (laid out as ``band.weights_t``, contiguous) times the mask, in place."""
    if band.zeros is None:
        return z.mul_(band.weights_t)
    return z.view(-1).index_fill_(0, band.zeros, 0).view(z.shape)


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
        seg = out[:, s:e]
        seg.mul_(_align_factors(seg.abs().mean(1))[:, None])
    return out


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
              row_sums: Tensor | None = None, keep_input: bool = False) -> Tensor:
    """FR-Merging of one tensor: its ``N x numel`` contiguous float32 task vectors ``x`` (overwritten,
    unless ``keep_input``) -> its merged ``numel`` task vector, for ``align="official"`` or ``"none"``
    (the per-tensor alignments; ``"paper"`` weighs the tasks over the whole model, see :func:`fr_merge`).

    1. filter: a 2-D ``shape`` is filtered with :func:`fr_filter`, all N tasks in one batched FFT
       (on the CPU, matrices of ``_ONE_TASK_AT_A_TIME`` entries or more one task at a time, through
       :func:`_filter_band`: the bits of :func:`fr_filter` of each task's matrix);
       any other shape is left as it is;
    2. align (``"official"``): every task's tensor scaled to the largest task's mean |.|
       (:func:`align_magnitudes`; for the tensors filtered one task at a time, m_i from the filtered
       rows' L1 norms, see :func:`_fr_filter_align`);
    3. combine: the N scaled rows summed in order (from zero, one row at a time), or, with
       ``compat_official`` and no "weight" in ``key``, task 1's scaled row.

    :func:`fr_merge` runs this on each tensor of the flat matrix and :func:`mergelib.merge_files` on
    each tensor read from disk, so both give the same bits. ``scratch``: buffers reused from tensor to
    tensor by the caller's loop (:class:`~mergelib.task_vectors.Scratch`; the same bits). ``out``: a
    contiguous ``numel`` float32 tensor to write the result into (:func:`fr_merge`'s merged vector).
    ``row_sums``: an ``N`` float32 tensor (contiguous) that receives the sums of ``x``'s rows, for a
    finiteness check that the caller makes once for all tensors (a NaN or inf makes its row's sum
    non-finite; so can an overflow of finite values): a 2-D tensor's sums are read off its forward
    transform's DC bins on a GPU and, for the matrices filtered one task at a time, on the CPU (no pass
    and no host round trip of their own).
    ``keep_input`` (CPU, a matrix filtered one task at a time): ``x`` is only read, its rows contiguous at
    any row stride (:func:`fr_merge`: a segment of the flat matrix; ``merge()``: a :class:`_TaskRows`), and
    the tasks are filtered straight from it (no copy of the block first) into a ``scratch`` buffer.
    """
    if x.device.type == "cuda":
        return _fr_tensor_two_reads(x, shape, ratio, mode, base, align, compat_double_ring, out,
                                    first_task_only=compat_official and "weight" not in key, row_sums=row_sums)
    x, factors, transposed = _fr_filter_align(x, shape, ratio, mode, base, align, compat_double_ring, scratch,
                                              keep_input, row_sums)
    if compat_official and "weight" not in key:  # task 1's (aligned) row; x may be the caller's scratch buffer
        merged = x[0].clone() if factors is None else torch.mul(x[0], factors[0])
    else:
        merged = _weighted_row_sum(x, factors, None if transposed else out,
                                   scratch.get("merged_t", x.shape[1]) if transposed and scratch is not None else None)
    if transposed:  # the merged matrix back from its transpose
        result = torch.empty(x.shape[1]) if out is None else out
        return result.view(-1).view(shape).copy_(merged.view(shape[1], shape[0]).t()).view(-1)
    if out is not None and merged.data_ptr() != out.data_ptr():
        return out.copy_(merged)
    return merged


def _store_l1_norm(out: Tensor, y: Tensor) -> float:
    """``out.copy_(y)`` (contiguous float32 CPU tensors of one size) and ``sum |y|`` accumulated in float64,
    in one pass where the compiled kernel runs (:func:`mergelib.kernels.copy_l1_norm`), else torch's copy
    and sum: FR's m_i for a large matrix, a float that the caller rounds to float32, which makes it
    independent of the order of the sum in all but the rarest cases."""
    if kernels.available(out, y):
        return kernels.copy_l1_norm(out, y)
    out.copy_(y)
    return float(y.abs().sum(dtype=torch.float64))


def _weighted_row_sum(x: Tensor, factors: Tensor | None, out: Tensor | None = None,
                      buffer: Tensor | None = None) -> Tensor:
    """``sum_i factors_i * x_i`` of the rows of a contiguous ``N x numel`` float32 CPU block, from zero,
    in order (each product rounded, then each sum: the float operations of ``x.mul_(factors[:, None])``
    and :func:`~mergelib.competition._row_sum`), in one pass where the compiled kernel runs
    (:func:`mergelib.kernels.weighted_row_sum`); ``factors=None``: the plain sum. Into ``out`` if given,
    else into ``buffer`` (a scratch buffer) if given, else a new tensor. ``x`` may be scaled in place."""
    out = buffer if out is None else out
    if factors is None:
        return _row_sum(x, out=out)
    acc = torch.empty(x.shape[1], dtype=x.dtype) if out is None else out
    if kernels.available(x, acc):
        return kernels.weighted_row_sum(acc, list(x), factors)
    return _row_sum(x.mul_(factors[:, None]), out=acc)


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


# On the CPU, matrices of at least this many entries are filtered one task at a time (_filter_band), smaller
# ones (and all on a GPU) in one batched rfft2 / irfft2. A task's FFT temporaries then bound the peak memory
# of a streamed merge instead of N tasks' (4 tasks of a 4096 x 1024 matrix: 311 -> 113 MB above the inputs),
# and the 1-D transforms along rows skip the mask's empty columns: 8 tasks of a 768 x 768 matrix took 24 ms
# against 57 ms batched, of a 1536 x 384 one 17 ms against 56 ms; from 512 x 512 down the two are even.
# Per task or batched, MKL's bits differ on some processors (an Intel Xeon), so the smaller matrices keep
# the batched call and the results of earlier versions (ViT-B/32's 768 x 768 and MiniLM's 1536 x 384 took the
# batched call up to 2026-12-04, matrices of 2**20 entries or more the 2-D transforms one task at a time).
# fr_merge, merge() and merge_files() all filter through _fr_filter_align, so they agree bit for bit
# with each other on any processor.
_ONE_TASK_AT_A_TIME = 1 << 19


def _fr_filter_align(x: Tensor, shape: tuple[int, ...], ratio: float, mode: str, base: str, align: str,
                     compat_double_ring: bool, scratch: Scratch | None = None, keep_input: bool = False,
                     row_sums: Tensor | None = None) -> tuple[Tensor, Tensor | None, bool]:
    """Steps 1-2 of :func:`fr_tensor` (on the CPU; ``fr_merge``'s paper alignment on any device):
    ``(block, factors, transposed)``, the filtered ``N x numel`` block (2-D ``shape``), for
    ``align="official"`` its rows' alignment factors max_j m_j / m_i (else ``None``), which the caller
    applies in its sum, and whether the block's rows hold the filtered matrices transposed.

    A matrix of ``_ONE_TASK_AT_A_TIME`` entries or more on the CPU is filtered one task at a time
    (:func:`_filter_band`: the bits of :func:`fr_filter` of the task's matrix), each result written over
    its row of ``x`` (``keep_input``: into a ``scratch`` block, ``x`` read only), transposed where its
    band is (``transposed``: the caller transposes the one merged matrix, not N filtered ones); m_i are
    the filtered matrices' L1 norms, taken as they are stored (their ratios are those of the mean |.|;
    the GPU takes the same norms). The smaller ones are filtered in one batched call (``x`` contiguous,
    overwritten), and m_i is mean |.| of the block's rows: the bits of :func:`align_magnitudes` and of
    earlier versions. ``row_sums`` (``N`` float32): receives the sums of ``x``'s rows, read off the
    transforms of the tasks filtered one at a time, else summed."""
    n = x.shape[0]
    official = align == "official"
    if _one_task_at_a_time(shape, x.device):
        band = _band(*shape, ratio, mode, base, compat_double_ring)
        block = x  # each task's filtered matrix over its own row, or with keep_input into a scratch block
        if keep_input:
            block = (Scratch() if scratch is None else scratch).get("block", x.numel(), device=x.device)
            block = block.view(n, x.shape[1])
        norms = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            m = x[i].view(shape)
            if band is not None:
                y = _filter_band(m, band, scratch, None if row_sums is None else row_sums[i])
            else:  # the complex transform (odd sizes in official mode)
                if row_sums is not None:
                    torch.sum(m, (0, 1), out=row_sums[i])
                y = _filter(m, ratio, mode, base, compat_double_ring)
            norms[i] = _store_l1_norm(block[i], y.view(-1))
        return block, _align_factors(norms.float()) if official else None, band is not None and band.transposed
    if keep_input:
        raise ValueError("keep_input applies only to the matrices filtered one task at a time on the CPU")
    if row_sums is not None:
        torch.sum(x, 1, out=row_sums)
    if len(shape) == 2:
        x = _filter(x.view(n, *shape), ratio, mode, base, compat_double_ring).view(n, -1)
    if not official:
        return x, None, False
    return x, _align_factors(torch.abs(x, out=_like(scratch, "abs", x)).mean(1)), False


def _one_task_at_a_time(shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether :func:`_fr_filter_align` filters a tensor of this shape on this device one task at a time
    (and so can read its tasks from a read-only view or from :class:`_TaskRows`, ``keep_input``)."""
    return len(shape) == 2 and torch.device(device).type == "cpu" and math.prod(shape) >= _ONE_TASK_AT_A_TIME


class _TaskRows:
    """The ``N x numel`` task vectors of one tensor from state dicts, each row ``finetuned_i - base`` in
    float32 computed when it is read (``rows[i]``, by :func:`~mergelib.task_vectors._sub_into`: the bits of
    :func:`~mergelib.task_vectors.flatten`) into one reused buffer of ``numel`` entries, valid until the
    next read. ``merge()`` hands this to :func:`fr_tensor` (``keep_input``) for the matrices filtered one
    task at a time, so that their filtered tasks are its only ``N x numel`` block (one write of it, not
    two: the task vectors were a block of their own)."""

    def __init__(self, finetuned: list[Tensor], base: Tensor, buffer: Tensor):
        self.finetuned, self.base, self.buffer = [f.reshape(-1) for f in finetuned], base.reshape(-1), buffer
        self.shape = (len(finetuned), base.numel())
        self.device = buffer.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def __getitem__(self, i: int) -> Tensor:
        _sub_into(self.finetuned[i], self.base, self.buffer)
        return self.buffer


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
    # with the per-tensor alignments the input is checked at the end, through each tensor's row sums that
    # its forward transform gives (on the CPU, for the matrices filtered one task at a time; the others are
    # summed): a check up front was a pass (on a GPU with a host round trip: 3 % of the time; on the CPU
    # 1x a read of the task vectors, 5 % of the time)
    late_check = align != "paper"
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
            # read in place on CUDA (fr_tensor writes nothing into it there) and for the matrices the CPU
            # filters one task at a time (keep_input), else a copy that fr_tensor may overwrite
            keep = _one_task_at_a_time(shape, tvs.device) and tvs.stride(1) == 1
            seg = (tvs[:, s:e] if tvs.device.type == "cuda" or keep
                   else scratch.get("block", n * (e - s), device=tvs.device).view(n, e - s).copy_(tvs[:, s:e]))
            fr_tensor(seg, k, shape, ratio, mode, base, align, compat_official, compat_double_ring, scratch,
                      out=merged[s:e], row_sums=None if sums is None else sums[i], keep_input=keep)
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
            blk, _, transposed = _fr_filter_align(seg, shape, ratio, mode, base, "paper", compat_double_ring, scratch)
            if transposed:  # each task's matrix back from its transpose
                x[:, s:e].view(n, *shape).copy_(blk.view(n, shape[1], shape[0]).transpose(1, 2))
            else:
                x[:, s:e] = blk
    merged = fr_paper_coefficients(x).to(x.dtype) @ x
    if compat_official:
        for k, s, e in layout.segments():
            if "weight" not in k:
                merged[s:e] = x[0, s:e]
    return merged
