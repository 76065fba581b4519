"""Hooked features and their moments, for activation matching, ZipIt!, MuDSC and REPAIR.

For every group g of a spec and both models, the features Z (rows = samples, n_g columns) are read
at the group's :class:`~mergelib.align.spec.Observation` sites: post-nonlinearity (``act`` applied),
conv maps (B, C, H, W) flattened to (B*H*W, C), token features (B, T, C) to (B*T, C). The two
models' features are concatenated to z = [z_A, z_B] (2n) and the moments

    count,  s = sum z  (2n,),  ss = sum z z^T  (2n, 2n)

are accumulated in float64 per observation site. From them:

    Pearson:  corr = (E[zz^T] - E[z]E[z]^T) / (sigma sigma^T)     (METHODS.md §10, ZipIt, MuDSC)
    cross:    E[z z^T]                                             (Git Re-Basin activation matching)

A group observed at several sites (a residual stream, q and k) uses the mean over its sites.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .spec import Observation, PermutationSpec, to_rows

__all__ = ["iter_inputs", "model_device", "GroupMoments", "collect_moments", "similarity_matrix", "site_features"]

_ACTS = {None: lambda x: x, "relu": F.relu, "gelu": F.gelu}


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def iter_inputs(data: Iterable[Any], num_batches: int | None = None) -> Iterator[torch.Tensor]:
    """Yield input tensors from an iterable of batches ``x`` or ``(x, y, ...)`` tuples/lists."""
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not torch.is_tensor(x):
            raise TypeError(f"data batches must be tensors or (x, y) tuples, got {type(x).__name__}")
        yield x


def site_features(t: torch.Tensor, obs: Observation) -> torch.Tensor:
    """Hooked tensor -> (samples, n) features of one observation (act applied, channels last)."""
    t = _ACTS[obs.act](t.detach())
    t = to_rows(t, 1).T if t.dim() == 4 else t.reshape(-1, t.shape[-1])
    return t if obs.index is None else t.index_select(1, obs.index.to(t.device))


@contextmanager
def record_sites(model: nn.Module, modules: Sequence[tuple[str, str]]) -> Iterator[dict]:
    """Register hooks that store the output (or first input) of each (module name, hook) pair."""
    store: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    named = dict(model.named_modules())
    for name, hook in modules:
        if name not in named:
            raise KeyError(f"module {name!r} not found in {type(model).__name__}")
        if hook == "output":
            fn = (lambda key: lambda mod, inp, out: store.__setitem__(key, out))((name, hook))
            handles.append(named[name].register_forward_hook(fn))
        elif hook == "input":
            fn = (lambda key: lambda mod, inp: store.__setitem__(key, inp[0]))((name, hook))
            handles.append(named[name].register_forward_pre_hook(fn))
        else:
            raise ValueError(f"hook must be 'output' or 'input', got {hook!r}")
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class GroupMoments:
    """float64 moments of z = [z_A, z_B] at one observation site (see the module docstring)."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.count = n, 0
        self.s = torch.zeros(2 * n, dtype=torch.float64, device=device)
        self.ss = torch.zeros(2 * n, 2 * n, dtype=torch.float64, device=device)

    def update(self, za: torch.Tensor, zb: torch.Tensor) -> None:
        z = torch.cat([za.to(self.s.device), zb.to(self.s.device)], dim=1).double()
        self.count += z.shape[0]
        self.s += z.sum(0)
        self.ss += z.T @ z

    def mean(self) -> torch.Tensor:
        return self.s / self.count

    def second_moment(self) -> torch.Tensor:
        return self.ss / self.count

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        return self.second_moment() - torch.outer(mu, mu)

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        cov = self.covariance()
        std = cov.diagonal().clamp_min(0).sqrt().clamp_min(eps)
        return cov / torch.outer(std, std)


@torch.no_grad()
def collect_moments(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data: Iterable[Any],
                    groups: Sequence[str] | None = None, num_batches: int | None = None,
                    sites: Sequence[str] | None = None) -> dict[str, list[GroupMoments]]:
    """Run both models (in eval mode, restored afterwards) over ``data`` and accumulate the moments
    of every observation of ``groups`` (default: all). ``sites``: only use observations whose module
    is in this list (partial zipping). Returns group -> list of :class:`GroupMoments`."""
    groups = list(spec.groups) if groups is None else list(groups)
    obs = [(g, o) for g in groups for o in spec.groups[g].observations if sites is None or o.module in sites]
    for g in groups:
        if not any(og == g for og, _ in obs):
            raise ValueError(f"group {g!r} has no observation site to collect features from")
    dev_a, dev_b = model_device(model_a), model_device(model_b)
    moments = {g: [] for g in groups}
    stats = [GroupMoments(spec.groups[g].size, dev_a) for g, _ in obs]
    for (g, _), m in zip(obs, stats):
        moments[g].append(m)
    mods = sorted({(o.module, o.hook) for _, o in obs})
    modes = [(m, m.training) for model in (model_a, model_b) for m in model.modules()]
    model_a.eval(), model_b.eval()
    try:
        with record_sites(model_a, mods) as rec_a, record_sites(model_b, mods) as rec_b:
            for x in iter_inputs(data, num_batches):
                model_a(x.to(dev_a))
                model_b(x.to(dev_b))
                for (g, o), m in zip(obs, stats):
                    m.update(site_features(rec_a[o.module, o.hook], o), site_features(rec_b[o.module, o.hook], o))
    finally:
        for m, t in modes:
            m.train(t)
    if not stats or stats[0].count == 0:
        raise ValueError("collect_moments: data yielded no batches")
    return moments


def similarity_matrix(moments: Sequence[GroupMoments], method: str = "pearson") -> torch.Tensor:
    """(2n, 2n) float64 CPU similarity of [units of A, units of B], averaged over sites.

    ``method``: ``"pearson"`` (correlation) or ``"cross"`` (second moment E[z z^T])."""
    if method == "pearson":
        mats = [m.correlation() for m in moments]
    elif method == "cross":
        mats = [m.second_moment() for m in moments]
    else:
        raise ValueError(f"method must be 'pearson' or 'cross', got {method!r}")
    return (sum(mats) / len(mats)).cpu()
