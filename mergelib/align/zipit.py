"""ZipIt! (Stoica et al., ICLR 2024; METHODS.md §11): merge features *within and across* models.

Per group (n units in each of the two models):

1. z = [z_A, z_B] (2n features); C = Corr(z) (2n x 2n) from hooked activations, diagonal = -inf.
2. Budget of same-model merges per model: b = floor((n / 2) * beta).
3. Until n features remain (r = 0.5): take the argmax pair (i, j), i < j, and merge j into i. The
   merged feature's similarity to every k becomes min(C[i, k], C[j, k]) * alpha; with alpha <= 0
   the merged feature is blocked against the units of both origin models instead (each feature
   merges once). A same-model merge spends that model's budget; a model whose budget is 0 has all
   its within-model pairs blocked (from the start when beta = 0).
4. Matrices, stored as (2n, n) so that column j describes merged feature j:
   ``merge[:, j]`` = 1/|cluster j| on its constituents (columns sum to 1), ``unmerge[:, j]`` = 0/1
   on them. Merged features are ``merge.T @ z`` and unmerged ones ``unmerge @ z_merged``; the
   paper's per-model matrices are ``M^(i) = merge[i*n:(i+1)*n].T`` and ``U^(i) = unmerge[i*n:(i+1)*n]``.
5. Weights: ``W* = sum_i M_l^(i) W_l^(i) U_{l-1}^(i)``: axes with role "out" get M, axes with role
   "in" get U; tensors with no grouped output axis are averaged (weight 1/2). Then reset BN.

**Partial zipping** (``stop_node``): zip only up to a cut point (a node of the spec, e.g.
``"layer2.2"`` for ResNet-20 or ``"layers.1"`` for the MLP). The result is a :class:`PartialZipModel`:
the merged trunk, then for each model its own remaining layers fed with ``U^(i)``-unmerged features;
its forward returns ``(logits_A, logits_B)``.

Differences from the official code (``gstoica27/ZipIt`` ``match_tensors_zipit``), all deliberate:
the official code blocks "origin model" rows by index ranges of the *shrinking* matrix (which drift
after removals) -- we block by origin label; with beta = 0 it allows one same-model merge before
blocking -- we block from the start; it divides by (cluster size + 1e-5) -- we divide exactly.
Head-aware groups (ViT attention) would need "group zip" and are refused with an error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..models import MLP, ResNet20
from .bn import has_batchnorm, reset_bn_stats
from .features import collect_moments, similarity_matrix
from .spec import PermutationSpec, check_state_dict, from_rows, permutation_spec, to_rows

__all__ = ["ZipMatch", "zip_features", "zip_merge_state_dicts", "transform_tensor", "zipit", "ZipResult", "PartialZipModel"]


@dataclass
class ZipMatch:
    """Merge/unmerge matrices of one group, both (2n, n) float32 CPU (see the module docstring)."""

    merge: torch.Tensor
    unmerge: torch.Tensor

    @property
    def n(self) -> int:
        return self.merge.shape[1]

    def model_merge(self, i: int) -> torch.Tensor:
        """M^(i): (n_merged, n_i), rows average model i's constituents of each merged feature."""
        n = self.merge.shape[0] // 2
        return self.merge[i * n:(i + 1) * n].T

    def model_unmerge(self, i: int) -> torch.Tensor:
        """U^(i): (n_i, n_merged), 0/1, copies merged features back to model i's units."""
        n = self.unmerge.shape[0] // 2
        return self.unmerge[i * n:(i + 1) * n]

    @classmethod
    def from_permutation(cls, p: torch.Tensor) -> "ZipMatch":
        """The match that pairs A's unit j with B's unit p[j] (what permutation alignment does)."""
        n = len(p)
        unmerge = torch.zeros(2 * n, n)
        unmerge[torch.arange(n), torch.arange(n)] = 1.0
        unmerge[n + p.cpu(), torch.arange(n)] = 1.0
        return cls(unmerge / 2, unmerge)

    @classmethod
    def from_clusters(cls, clusters: list[list[int]], n_units: int) -> "ZipMatch":
        unmerge = torch.zeros(n_units, len(clusters))
        for j, c in enumerate(clusters):
            unmerge[c, j] = 1.0
        return cls(unmerge / unmerge.sum(0, keepdim=True), unmerge)


def zip_features(sim: torch.Tensor, alpha: float = 0.5, beta: float = 1.0) -> tuple[ZipMatch, float]:
    """Greedy ZipIt! matching on a (2n, 2n) similarity of [A units, B units] (METHODS.md §11).

    Returns the :class:`ZipMatch` (n merged features) and the mean similarity of the merged pairs
    (as recorded when each pair was merged). ``alpha``: similarity decay of merged features (<= 0:
    each feature merges once). ``beta``: fraction of the maximal within-model merge budget.
    """
    S = sim.detach().to("cpu", torch.float64).clone()
    two_n = S.shape[0]
    if S.shape != (two_n, two_n) or two_n % 2:
        raise ValueError(f"zip_features expects a (2n, 2n) matrix, got {tuple(S.shape)}")
    if not torch.isfinite(S).all():
        raise ValueError("zip_features: similarity matrix has NaN or inf entries")
    n = two_n // 2
    neg = float("-inf")
    S.fill_diagonal_(neg)
    origin = torch.arange(two_n) // n
    budget = [int((n // 2) * beta + 1e-4)] * 2
    for m in (0, 1):
        if budget[m] <= 0:
            sel = origin == m
            S[sel[:, None] & sel[None, :]] = neg
    clusters = {i: [i] for i in range(two_n)}
    alive = torch.ones(two_n, dtype=torch.bool)
    merged_sims = []
    for _ in range(n):
        flat = int(torch.argmax(S))
        i, j = divmod(flat, two_n)
        if S[i, j] == neg:
            raise RuntimeError("zip_features: ran out of mergeable pairs (all remaining pairs are blocked)")
        i, j = min(i, j), max(i, j)
        merged_sims.append(float(S[i, j]))
        oi, oj = int(origin[i]), int(origin[j])
        clusters[i] += clusters.pop(j)
        alive[j] = False
        row = torch.minimum(S[i], S[j])
        if alpha > 0:
            row = row * alpha
        else:
            row[(origin == oi) | (origin == oj)] = neg
        row[~alive] = neg
        row[i] = neg
        S[i], S[:, i] = row, row
        S[j], S[:, j] = neg, neg
        if oi == oj:
            budget[oi] -= 1
            if budget[oi] <= 0:
                sel = (origin == oi) & alive
                S[sel[:, None] & sel[None, :]] = neg
    order = sorted(clusters)
    return ZipMatch.from_clusters([clusters[k] for k in order], two_n), sum(merged_sims) / len(merged_sims)


def transform_tensor(spec: PermutationSpec, key: str, t: torch.Tensor, matches: Mapping[str, ZipMatch], i: int,
                     axis_members, skip_axis: int | None = None, membership: bool = False
                     ) -> tuple[torch.Tensor, bool]:
    """Model i's tensor ``key`` mapped into merged coordinates on every grouped axis (but
    ``skip_axis``): role "out" axes by M^(i), role "in" axes by U^(i); with ``membership=True`` every
    axis uses the 0/1 U^(i) (sums of constituents: scale-free, for weight similarities). Returns the
    tensor and whether an "out" axis was mapped."""
    has_out = False
    for axis in range(t.dim()):
        if axis == skip_axis:
            continue
        for gname, m in axis_members.get((key, axis), []):
            if gname not in matches:
                continue
            zm = matches[gname]
            use_merge = m.role == "out" and not membership
            T = zm.model_merge(i) if use_merge else zm.model_unmerge(i).T  # (n_merged, n_i)
            if T.shape[0] != T.shape[1]:
                raise ValueError("only r = 0.5 zipping (n merged features per group) is supported")
            has_out |= m.role == "out"
            idx = spec.member_index(m).to(t.device)
            rows = to_rows(t, axis)
            new = T.to(t.device, torch.float32) @ rows.index_select(0, idx).float()
            rows = rows.clone()
            rows[idx] = new.to(t.dtype)
            t = from_rows(rows, axis, t.shape)
    return t, has_out


def zip_merge_state_dicts(spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                          matches: Mapping[str, ZipMatch], keys: Iterable[str] | None = None
                          ) -> dict[str, torch.Tensor]:
    """``W* = sum_i M^(i) W^(i) U^(i)`` for every float tensor in ``keys`` (default: all of the spec);
    tensors without a grouped output axis get the plain average. Non-float tensors come from A."""
    check_state_dict(spec, sd_a)
    check_state_dict(spec, sd_b)
    am = spec.axis_members()
    keys = set(spec.shapes if keys is None else keys)
    out = {}
    for k, a in sd_a.items():
        if k not in keys or not a.is_floating_point():
            out[k] = a.clone()
            continue
        ta, out_a = transform_tensor(spec, k, a, matches, 0, am)
        tb, _ = transform_tensor(spec, k, sd_b[k].to(a.device), matches, 1, am)
        out[k] = ta + tb if out_a else (0.5 * (ta.float() + tb.float())).to(a.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Partial zipping: forward pass split at a node
# ----------------------------------------------------------------------------------------------
def _steps(model: nn.Module) -> tuple[list[tuple[str, list[str], Callable]], Callable]:
    """[(node, parameter prefixes it owns, fn)] in forward order, and the final fn (pool + head)."""
    if isinstance(model, MLP):
        steps = [(f"layers.{i}", [f"layers.{i}."], (lambda l: lambda x: F.relu(l(x.flatten(1))))(layer))
                 for i, layer in enumerate(model.layers)]
        return steps, model.head
    if isinstance(model, ResNet20):
        steps = [("bn1", ["conv1.", "bn1."], lambda x: F.relu(model.bn1(model.conv1(x))))]
        for s in (1, 2, 3):
            for b, blk in enumerate(getattr(model, f"layer{s}")):
                steps.append((f"layer{s}.{b}", [f"layer{s}.{b}."], blk))
        return steps, lambda x: model.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))
    raise TypeError(f"partial zipping supports MLP and ResNet20, not {type(model).__name__!r}")


class PartialZipModel(nn.Module):
    """A zipped trunk shared by both models, then each model's own remaining layers (multi-head).

    ``forward(x)`` returns ``(logits_A, logits_B)``: the trunk runs up to ``stop_node`` with merged
    weights; its output features z* (channels of size C) are unmerged per model, z_i = U_i z*
    (``unmerge_i``: (C, C)), and run through model i's layers after ``stop_node``. Only the trunk
    part of ``self.trunk`` and the post-stop part of each branch are used.
    """

    def __init__(self, trunk: nn.Module, branch_a: nn.Module, branch_b: nn.Module, stop_node: str,
                 unmerge_a: torch.Tensor, unmerge_b: torch.Tensor):
        super().__init__()
        self.trunk, self.branches, self.stop_node = trunk, nn.ModuleList([branch_a, branch_b]), stop_node
        self.register_buffer("unmerge_a", unmerge_a)
        self.register_buffer("unmerge_b", unmerge_b)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps, _ = _steps(self.trunk)
        cut = [s[0] for s in steps].index(self.stop_node)
        for _, _, fn in steps[:cut + 1]:
            x = fn(x)
        outs = []
        for branch, U in zip(self.branches, (self.unmerge_a, self.unmerge_b)):
            U = U.to(x.dtype)
            z = F.conv2d(x, U[:, :, None, None]) if x.dim() == 4 else x @ U.T  # z_i = U_i z* per position
            bsteps, final = _steps(branch)
            for _, _, fn in bsteps[cut + 1:]:
                z = fn(z)
            outs.append(final(z))
        return outs[0], outs[1]


@dataclass
class ZipResult:
    """``matches``: group -> :class:`ZipMatch`; ``state_dict``: merged weights (full zip: the whole
    model; partial: the trunk keys are merged, the rest are model A's, as A's branch of the partial
    model holds them: A's weights, BN statistics re-estimated there when ``reset_bn``); ``model``: the merged model (full
    zip, BN reset on ``data`` if it has BatchNorm) or a :class:`PartialZipModel`; ``scores``: group ->
    mean similarity of the merged pairs."""

    matches: dict[str, ZipMatch]
    state_dict: dict[str, torch.Tensor]
    model: nn.Module
    scores: dict[str, float]


def zipit(model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], alpha: float = 0.5, beta: float = 1.0,
          stop_node: str | None = None, spec: PermutationSpec | None = None, num_batches: int | None = None,
          reset_bn: bool = True) -> ZipResult:
    """Zip two models of the same architecture (full zip, or partial up to ``stop_node``).

    ``data``: iterable of batches or (x, y) tuples used both for the feature correlations and for
    resetting BatchNorm. Defaults alpha=0.5, beta=1 are the MuDSC/Taskonomy full-zip setting; the
    ZipIt repo's best CIFAR-50+50 ResNet-20x8 run uses ``alpha=1e-4, beta=0.075, stop_node`` partial.
    ``stop_node`` must be one of ``spec.nodes`` (MLP: ``"layers.i"``; ResNet20: ``"bn1"`` (stem) or
    ``"layer{s}.{b}"``).
    """
    spec = spec or permutation_spec(model_a)
    heads = [g.name for g in spec.groups.values() if g.heads > 1]
    if heads:
        raise NotImplementedError(f"ZipIt on head-aware groups (group zip) is not implemented: {heads[:3]}; "
                                  "use mudsc(..., variant='align') or weight_matching for attention models")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    if stop_node is None:
        groups, sites, keys = list(spec.groups), None, None
    else:
        steps, _ = _steps(model_a)
        names = [s[0] for s in steps]
        if stop_node not in names:
            raise ValueError(f"stop_node {stop_node!r} is not a node of this model; choose from {names}")
        trunk = steps[:names.index(stop_node) + 1]
        prefixes = tuple(p for _, ps, _ in trunk for p in ps)
        keys = [k for k in spec.shapes if k.startswith(prefixes)]
        sites = {o.module for g in spec.groups.values() for o in g.observations
                 if (o.module + ".").startswith(prefixes) or o.module in names[:len(trunk)]}
        groups = [g.name for g in spec.groups.values()
                  if any(m.role == "out" and m.key in keys for m in g.members)]
    moments = collect_moments(model_a, model_b, spec, data, groups, num_batches, sites=sites)
    matches, scores = {}, {}
    for g in groups:
        matches[g], scores[g] = zip_features(similarity_matrix(moments[g]), alpha, beta)
    merged_sd = zip_merge_state_dicts(spec, sd_a, sd_b, matches, keys)
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(merged_sd)
    if stop_node is None:
        model: nn.Module = merged
    else:
        # The stop node's features: its observations tell which group sits at which channels.
        node_obs = [(g, o) for g in groups for o in spec.groups[g].observations if o.module == stop_node]
        C = sum(len(o.index) if o.index is not None else spec.groups[g].size for g, o in node_obs)
        Us = []
        for i in (0, 1):
            U = torch.zeros(C, C)
            for g, o in node_obs:
                idx = o.index if o.index is not None else torch.arange(spec.groups[g].size)
                U[idx[:, None], idx[None, :]] = matches[g].model_unmerge(i)
            Us.append(U)
        dev = next(merged.parameters()).device
        model = PartialZipModel(merged, copy.deepcopy(model_a), copy.deepcopy(model_b), stop_node,
                                Us[0].to(dev), Us[1].to(dev))
    if reset_bn and has_batchnorm(model):
        reset_bn_stats(model, data, num_batches)
        merged_sd = {k: v.clone() for k, v in merged.state_dict().items()}
        if stop_node is not None:
            # Past the stop node the trunk copy never runs, so its BN statistics were only reset
            # (mean 0, var 1): those layers are model A's, i.e. A's branch of the partial model.
            branch_a = model.branches[0].state_dict()
            merged_sd.update({k: v.clone() for k, v in branch_a.items() if not k.startswith(prefixes)})
    return ZipResult(matches, merged_sd, model, scores)
