"""Activation matching (Ainsworth et al. 2023 §3.1; Jordan et al. 2023; METHODS.md §10).

For every group, collect post-nonlinearity features Z_A, Z_B (samples x n) of both models on the same
inputs and solve one linear assignment per group:

    "cross":   P = argmax_P <P, E[Z_A^T Z_B]>          (Git Re-Basin's default)
    "pearson": P = argmax_P <P, Corr(Z_A, Z_B)>        (REPAIR, ZipIt!, MuDSC)

Groups are solved independently from one forward pass of both *unpermuted* models (permuting
earlier layers of B does not change B's features, only their order, so the result is the same as
the sequential variant up to ties). Head-aware groups use group align (see ``spec.solve_units``).
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from .features import collect_moments, similarity_matrix
from .spec import Perm, PermutationSpec, permutation_spec, solve_units

__all__ = ["activation_matching"]


def activation_matching(model_a: nn.Module, model_b: nn.Module, data: Iterable[Any],
                        spec: PermutationSpec | None = None, method: str = "pearson",
                        num_batches: int | None = None) -> Perm:
    """Permutation aligning ``model_b`` to ``model_a`` from their activations on ``data``.

    ``data``: iterable of input batches or ``(x, y)`` tuples (moved to each model's device).
    ``method``: ``"pearson"`` or ``"cross"``. Returns group -> LongTensor (n,) (CPU), to be used with
    :func:`~mergelib.align.apply_permutation` on ``model_b``'s state dict.
    """
    spec = spec or permutation_spec(model_a)
    moments = collect_moments(model_a, model_b, spec, data, num_batches=num_batches)
    sims = {}
    for g, ms in moments.items():
        n = spec.groups[g].size
        sims[g] = similarity_matrix(ms, method)[:n, n:]
    perm: Perm = {}
    for unit in spec.units():
        perm.update(solve_units(spec, unit, sims))
    return perm
