"""Git Re-Basin weight matching (Ainsworth et al., ICLR 2023; METHODS.md §9).

Find permutations P of model B's hidden units that maximise the summed inner product of the two
models' weights, ``sum_l <W_A^l, P_l W_B^l P_{l-1}^T>``, by coordinate descent: with every other
group fixed, group p's problem is a linear assignment

    C_p = sum_{(w, axis) in p} W_A[w]_(axis) @ W~_B[w]_(axis)^T        (n_p x n_p)
    P_p = argmax_P <C_p, P>            (scipy linear_sum_assignment(C_p, maximize=True))

where ``X_(axis)`` is the tensor with ``axis`` moved first and flattened to (n_p, -1), and ``W~_B`` is
B's tensor with the current permutations applied on every *other* axis. Groups are visited in a fresh
seeded random order each iteration; the loop stops after an iteration in which no group improved its
objective by more than 1e-12, or after ``max_iter`` iterations.

Which tensors enter the cost. METHODS.md §9 sums over every member of a group, and the PyTorch
ports of Git Re-Basin list BatchNorm running statistics among them (``include_stats=True``, the
default). The paper's own ResNets use LayerNorm, so its cost holds weights only. Running statistics
are not weights: ``running_var`` is positive and often several times larger than a conv weight row's
inner product, so it can decide the assignment alone. ``include_stats=False`` leaves
``running_mean``/``running_var`` out of the cost (they are still permuted with their units).
Notebook 05 compares both on the shared ResNet-20 checkpoints.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .spec import (Perm, PermutationSpec, check_state_dict, identity_permutation, permute_tensor, solve_units,
                   to_rows)

__all__ = ["weight_matching", "group_weight_vectors"]


STAT_SUFFIXES = (".running_mean", ".running_var")


def group_weight_vectors(spec: PermutationSpec, group: str, sd: Mapping[str, torch.Tensor],
                         perm: Mapping[str, torch.Tensor] | None = None, axis_members=None,
                         include_stats: bool = True) -> torch.Tensor:
    """The (n, D) matrix whose row i concatenates every member tensor's slice for unit i (float32).

    With ``perm`` given, every *other* grouped axis of each member tensor is permuted first (the
    ``W~_B`` of the module docstring); the group's own axis is left in the model's original order.
    ``include_stats=False`` skips BatchNorm running statistics.
    """
    am = axis_members if axis_members is not None else spec.axis_members()
    g = spec.groups[group]
    parts = []
    for m in g.members:
        if not include_stats and m.key.endswith(STAT_SUFFIXES):
            continue
        t = sd[m.key].float()
        if perm is not None:
            t = permute_tensor(spec, m.key, t, perm, skip_axis=m.axis, axis_members=am)
        t = t.index_select(m.axis, spec.member_index(m).to(t.device))
        parts.append(to_rows(t, m.axis))
    return torch.cat(parts, dim=1)


def weight_matching(spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0, progress: bool = False,
                    init: Mapping[str, torch.Tensor] | None = None, include_stats: bool = True) -> Perm:
    """Permutation ``perm`` aligning model B to model A by weight matching.

    ``sd_a``, ``sd_b``: state dicts of the same architecture (any device; float tensors of any
    dtype, compared in float32). Returns ``perm`` (group -> LongTensor (n,), CPU) such that
    ``apply_permutation(spec, perm, sd_b)`` is aligned to ``sd_a``. ``seed`` fixes the group visiting
    order (a ``torch.Generator``); ``progress`` prints the objective gain per group and iteration;
    ``init``: a starting permutation (default: the identity). Head-aware groups (ViT attention) and
    the groups tied to them are solved together by group align (``spec.solve_units``).
    ``include_stats``: whether BatchNorm running statistics enter the cost (module docstring).
    """
    check_state_dict(spec, sd_a)
    check_state_dict(spec, sd_b)
    perm = {k: v.clone() for k, v in (init or identity_permutation(spec)).items()}
    am = spec.axis_members()
    units = spec.units()
    gen = torch.Generator().manual_seed(seed)
    wa = {name: group_weight_vectors(spec, name, sd_a, None, am, include_stats) for name in spec.groups}
    for it in range(max_iter):
        improved = False
        for u in torch.randperm(len(units), generator=gen).tolist():
            unit = units[u]
            sims = {}
            for name in unit:
                wb = group_weight_vectors(spec, name, sd_b, perm, am, include_stats).to(wa[name].device)
                sims[name] = (wa[name] @ wb.T).double()
            old = sum(float(sims[n].cpu()[torch.arange(len(perm[n])), perm[n]].sum()) for n in unit)
            new_perm = solve_units(spec, unit, sims)
            new = sum(float(sims[n].cpu()[torch.arange(len(perm[n])), new_perm[n]].sum()) for n in unit)
            if progress:
                print(f"iter {it} {'+'.join(unit)}: {new - old:+.6g}")
            if new > old + 1e-12:
                improved = True
                perm.update(new_perm)
        if not improved:
            break
    return perm
