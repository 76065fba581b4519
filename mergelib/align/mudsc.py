"""MuDSC: merging under dual-space constraints (Xu et al., CVPR 2024; METHODS.md §13).

Weight-space and activation-space unit similarities disagree; MuDSC matches units on a mix

    S[p] = alpha * S_w[p] + (1 - alpha) * S_a[p]            (alpha = the code's ``fix_rate``)

per group p, both (2n x 2n) over [units of A, units of B]:

* ``S_a``: Pearson correlation of hooked features (as in ZipIt!, ``features.collect_moments``);
* ``S_w``: Pearson correlation of unit *weight vectors*: a unit's vector concatenates its slice of
  every member tensor of p (output rows, biases, norm parameters and the next layer's input
  columns), with every other grouped axis mapped into merged coordinates by the neighbouring groups'
  current matches (0/1 membership, i.e. the current permutation for the align variant).

Algorithm (``WeightFusion.transform`` in ``zju-vipa/training_free_model_merging``):

1. initialise every group from ``S_a`` alone (Hungarian for ``variant="align"``, ZipIt! greedy with
   ``zip_alpha=0.5, zip_beta=1`` for ``variant="zip"``);
2. coordinate descent: visit the solve units (groups; tied attention groups together) in a seeded
   random order, recompute ``S_w`` from the current neighbours, re-solve on ``S``; the iteration's
   score is the mean over groups of the mean matched similarity (recorded when each group is
   solved); keep the best set; stop after ``patience`` (5) iterations without improvement or
   ``max_iter`` (100) in total. ``alpha = 0`` needs no descent (``S = S_a``).
3. merge (average of aligned models, or ZipIt! merge/unmerge) and reset BatchNorm.

Attention heads (``variant="align"``): *group align* -- within-head LAPs for all head pairs, a LAP
on the H x H matrix of their matched similarities, composed (``spec.solve_units``). Group zip is not
implemented (head-aware groups raise with ``variant="zip"``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .bn import has_batchnorm, reset_bn_stats
from .features import collect_moments, similarity_matrix
from .interpolation import merge_aligned
from .spec import Perm, PermutationSpec, permutation_spec, permute_tensor, solve_units, to_rows
from .zipit import ZipMatch, transform_tensor, zip_features, zip_merge_state_dicts

__all__ = ["mudsc", "MuDSCResult", "weight_similarity"]


def _unit_vectors(v: torch.Tensor, measure: str) -> torch.Tensor:
    if measure == "pearson":
        v = v - v.mean(dim=1, keepdim=True)
    elif measure != "cosine":
        raise ValueError(f"weight similarity must be 'pearson' or 'cosine', got {measure!r}")
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def weight_similarity(spec: PermutationSpec, group: str, sd_a: Mapping[str, torch.Tensor],
                      sd_b: Mapping[str, torch.Tensor], matches: Mapping[str, ZipMatch], measure: str = "pearson",
                      cross_only: bool = False, axis_members=None) -> torch.Tensor:
    """S_w of one group: (2n, 2n) float64 CPU similarity of unit weight vectors of [A; B], or only the
    (n, n) cross block A x B with ``cross_only``. ``matches`` gives the neighbours' current matches
    (the group itself is ignored). ``measure``: "pearson" (centred) or "cosine"."""
    am = axis_members if axis_members is not None else spec.axis_members()
    g = spec.groups[group]
    is_perm = all(torch.is_tensor(v) for v in matches.values())
    others = {k: v for k, v in matches.items() if k != group}
    vecs = []
    for i, sd in enumerate((sd_a, sd_b)):
        parts = []
        for m in g.members:
            t = sd[m.key].float()
            if is_perm:  # align: A is the reference, B's other axes are permuted (cheap gathers)
                t = permute_tensor(spec, m.key, t, matches, skip_axis=m.axis, axis_members=am) if i else t
            else:
                t, _ = transform_tensor(spec, m.key, t, others, i, am, skip_axis=m.axis, membership=True)
            t = t.index_select(m.axis, spec.member_index(m).to(t.device))
            parts.append(to_rows(t, m.axis))
        vecs.append(_unit_vectors(torch.cat(parts, dim=1), measure))
    va, vb = vecs[0], vecs[1].to(vecs[0].device)
    if cross_only:
        return (va @ vb.T).double().cpu()
    v = torch.cat([va, vb])
    return (v @ v.T).double().cpu()


@dataclass
class MuDSCResult:
    """``perm``: group -> LongTensor (align variant; None for zip); ``matches``: group -> ZipMatch
    (both variants); ``state_dict``/``model``: the merged model (BN reset on ``data``);
    ``score``: best iteration score; ``history``: score per iteration."""

    perm: Perm | None
    matches: dict[str, ZipMatch]
    state_dict: dict[str, torch.Tensor]
    model: nn.Module
    score: float
    history: list[float] = field(default_factory=list)


def mudsc(model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], alpha: float = 0.5, variant: str = "align",
          spec: PermutationSpec | None = None, zip_alpha: float = 0.5, zip_beta: float = 1.0,
          weight_measure: str = "pearson", max_iter: int = 100, patience: int = 5, seed: int = 0,
          num_batches: int | None = None, reset_bn: bool = True,
          moments: Mapping[str, list] | None = None) -> MuDSCResult:
    """Match and merge two models with MuDSC.

    ``alpha`` in [0, 1] weighs weight-space similarity (1: weight-only, 0: activation-only).
    ``variant``: "align" (permutations, Hungarian) or "zip" (ZipIt! greedy with ``zip_alpha``,
    ``zip_beta``). ``data``: iterable of batches or (x, y) tuples, used for the activations and for
    resetting BN. ``seed`` fixes the group order (a ``torch.Generator``). ``moments``: this pair's
    activation moments on ``data``, ``collect_moments(model_a, model_b, spec, data, num_batches=...)``,
    when several ``alpha`` are tried on the same pair (collecting them is most of a call's time);
    the result is the same as without.
    """
    if variant not in ("align", "zip"):
        raise ValueError(f"variant must be 'align' or 'zip', got {variant!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    spec = spec or permutation_spec(model_a)
    if variant == "zip":
        heads = [g.name for g in spec.groups.values() if g.heads > 1]
        if heads:
            raise NotImplementedError(f"MuDSC group zip for head-aware groups is not implemented: {heads[:3]}; "
                                      "use variant='align'")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    if moments is None:
        moments = collect_moments(model_a, model_b, spec, data, num_batches=num_batches)
    elif set(moments) != set(spec.groups):
        raise ValueError(f"moments cover groups {sorted(moments)[:4]}..., not the spec's {sorted(spec.groups)[:4]}...: "
                         "pass collect_moments(model_a, model_b, spec, data) of this pair")
    s_act = {g: similarity_matrix(ms) for g, ms in moments.items()}
    if variant == "align":  # only the A x B block matters for permutations
        s_act = {g: s[:spec.groups[g].size, spec.groups[g].size:] for g, s in s_act.items()}
    am = spec.axis_members()
    units = spec.units()

    def solve(unit: list[str], sims: Mapping[str, torch.Tensor]) -> tuple[dict[str, ZipMatch], dict[str, float]]:
        # sims: (2n, 2n) for zip, the (n, n) A x B block for align
        if variant == "zip":
            out = {g: zip_features(sims[g], zip_alpha, zip_beta) for g in unit}
            return {g: m for g, (m, _) in out.items()}, {g: s for g, (_, s) in out.items()}
        n = spec.groups[unit[0]].size
        perms = solve_units(spec, unit, sims)
        scores = {g: float(sims[g][torch.arange(n), perms[g]].mean()) for g in unit}
        return {g: ZipMatch.from_permutation(p) for g, p in perms.items()}, scores

    def perm_of(ms: Mapping[str, ZipMatch]) -> Perm:  # align matches -> B unit matched to A unit j
        return {g: m.unmerge[spec.groups[g].size:].argmax(0) for g, m in ms.items()}

    matches: dict[str, ZipMatch] = {}
    scores: dict[str, float] = {}
    for unit in units:
        m, s = solve(unit, s_act)
        matches.update(m)
        scores.update(s)
    best, best_score, history = dict(matches), sum(scores.values()) / len(scores), []
    if alpha > 0:
        gen = torch.Generator().manual_seed(seed)
        stale = 0
        for _ in range(max_iter):
            for u in torch.randperm(len(units), generator=gen).tolist():
                sims = {}
                current = perm_of(matches) if variant == "align" else matches
                for g in units[u]:
                    s_w = weight_similarity(spec, g, sd_a, sd_b, current, weight_measure,
                                            cross_only=variant == "align", axis_members=am)
                    sims[g] = alpha * s_w + (1 - alpha) * s_act[g]
                m, s = solve(units[u], sims)
                matches.update(m)
                scores.update(s)
            score = sum(scores.values()) / len(scores)
            history.append(score)
            if len(history) == 1 or score > best_score + 1e-12:
                best, best_score, stale = dict(matches), score, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    perm = None
    if variant == "align":
        perm = perm_of(best)
        merged_sd = merge_aligned(spec, sd_a, sd_b, perm, 0.5)
    else:
        merged_sd = zip_merge_state_dicts(spec, sd_a, sd_b, best)
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(merged_sd)
    if reset_bn and has_batchnorm(merged):
        reset_bn_stats(merged, data, num_batches)
        merged_sd = {k: v.clone() for k, v in merged.state_dict().items()}
    return MuDSCResult(perm, best, merged_sd, merged, best_score, history)
