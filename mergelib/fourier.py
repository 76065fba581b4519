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

Filters are batched over leading dimensions (``N x H x W``: all tasks of one matrix in one call). When
the mask is Hermitian-symmetric (always in paper mode, official mode on even sizes) the filter runs as
``rfft2``/``irfft2``, which equals ``ifft2(M . fft2(v)).real`` at half the cost and memory.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import torch
from torch import Tensor

from .competition import check_fraction
from .task_vectors import FlatLayout

__all__ = ["fr_mask", "fr_filter", "align_magnitudes", "fr_paper_coefficients", "fr_merge"]

_MODES = ("official", "paper")


def _check_mode(mode: str, base: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}; expected one of {_MODES}")
    if base not in ("min", "max"):
        raise ValueError(f"base={base!r}; expected 'min' or 'max'")


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
    h, w = (int(s) for s in shape)
    if ratio < 0:
        raise ValueError(f"ratio={ratio!r} must be >= 0")
    wt, _ = _weights_cpu(h, w, float(ratio), mode, base, False)
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
    Linear in ``w``; the identity when the mask keeps everything.
    """
    _check_mode(mode, base)
    if w.ndim < 2:
        raise ValueError(f"fr_filter needs a (..., H, W) tensor, got shape {tuple(w.shape)}")
    if ratio < 0:
        raise ValueError(f"ratio={ratio!r} must be >= 0")
    if compat_double_ring and mode != "official":
        raise ValueError("compat_double_ring only applies to mode='official'")
    h, wd = w.shape[-2:]
    wt, symmetric = _weights(h, wd, ratio, mode, base, compat_double_ring, w.device)
    x = w.float()
    if symmetric:
        spec = torch.fft.rfft2(x)
        spec.mul_(wt)  # wt is the (H, W // 2 + 1) half here
        return torch.fft.irfft2(spec, s=(h, wd))
    spec = torch.fft.fft2(x)
    spec.mul_(wt)
    return torch.fft.ifft2(spec).real.contiguous()


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
    e = tvs.abs().mean(1)
    return e / e.sum().clamp_min(torch.finfo(e.dtype).tiny)


def fr_merge(tvs: Tensor, layout: FlatLayout, ratio: float = 0.7, mode: str = "official", base: str = "min",
             align: str = "official", compat_official: bool = False, compat_double_ring: bool = False,
             inplace: bool = False) -> Tensor:
    """FR-Merging of ``N x D`` float32 task vectors -> merged ``D`` float32 task vector (before c).

    1. every 2-D segment is filtered with :func:`fr_filter` (all N tasks of a tensor in one batched
       FFT); other segments (biases, norms, embeddings, conv kernels) are left unfiltered;
    2. ``align="official"``: :func:`align_magnitudes` per tensor (on the filtered vectors), then
       tau_m = sum_i FR(tau_i); ``align="paper"``: tau_m = sum_i lambda_i FR(tau_i) with
       :func:`fr_paper_coefficients` (a weighted average: use an ~N times larger c);
       ``align="none"``: plain sum;
    3. ``compat_official``: keys without "weight" in their name take task 1's delta instead of the
       sum (the official ``__add__`` quirk).

    The model is theta_0 + c * tau_m (c = 0.7 for 8 ViT-B/32 tasks). ``inplace`` filters ``tvs``.
    """
    if align not in ("official", "paper", "none"):
        raise ValueError(f"align={align!r}; expected 'official', 'paper' or 'none'")
    n, D = tvs.shape
    if layout.D != D:
        raise ValueError(f"layout.D={layout.D} does not match tvs with D={D}")
    x = tvs if inplace else tvs.clone()
    for k, shape, off, numel in zip(layout.keys, layout.shapes, layout.offsets, layout.numels):
        if len(shape) == 2:
            seg = x[:, off:off + numel]
            seg.copy_(fr_filter(seg.view(n, *shape), ratio, mode, base, compat_double_ring).view(n, numel))
    if align == "official":
        align_magnitudes(x, layout, inplace=True)
        merged = x.sum(0)
    elif align == "paper":
        merged = fr_paper_coefficients(x).to(x.dtype) @ x
    else:
        merged = x.sum(0)
    if compat_official:
        for k, s, e in layout.segments():
            if "weight" not in k:
                merged[s:e] = x[0, s:e]
    return merged
