"""Permutation alignment and merging of independently trained networks (METHODS.md §8-§13).

One module per method, readable next to its paper:

* ``spec``                -- :func:`permutation_spec`, :func:`apply_permutation`, random/identity/inverse
  permutations (MLP, ResNet20 with option-A shortcuts, ViT with head-aware attention groups);
* ``weight_matching``     -- Git Re-Basin weight matching (§9);
* ``activation_matching`` -- Git Re-Basin / REPAIR activation matching (§10);
* ``zipit``               -- ZipIt! greedy zip, full and partial zipping (§11);
* ``mudsc``               -- MuDSC dual-space matching, align and zip variants (§13);
* ``bn``, ``repair``      -- BatchNorm reset and REPAIR (§12);
* ``interpolation``       -- interpolation, merging aligned models, loss/accuracy barriers;
* ``features``, ``lap``   -- hooked activation moments and the linear assignment solver.

Typical use::

    spec = ml.align.permutation_spec(model_a)
    perm = ml.align.weight_matching(spec, model_a.state_dict(), model_b.state_dict())
    merged.load_state_dict(ml.align.merge_aligned(spec, sd_a, sd_b, perm))
    ml.align.reset_bn_stats(merged, train_loader)
"""
from .activation_matching import activation_matching
from .bn import reset_bn_stats
from .features import collect_moments, similarity_matrix
from .interpolation import barrier, interpolate, merge_aligned
from .lap import solve_lap
from .mudsc import MuDSCResult, mudsc, weight_similarity
from .repair import channel_stats, repair
from .spec import (Member, Observation, PermGroup, PermutationSpec, apply_permutation, check_permutation,
                   identity_permutation, invert_permutation, permutation_spec, random_permutation)
from .weight_matching import weight_matching
from .zipit import PartialZipModel, ZipMatch, ZipResult, zip_features, zip_merge_state_dicts, zipit

__all__ = [
    "Member", "Observation", "PermGroup", "PermutationSpec", "permutation_spec", "apply_permutation",
    "check_permutation", "identity_permutation", "invert_permutation", "random_permutation",
    "weight_matching", "activation_matching", "collect_moments", "similarity_matrix", "solve_lap",
    "zipit", "zip_features", "zip_merge_state_dicts", "ZipMatch", "ZipResult", "PartialZipModel",
    "mudsc", "MuDSCResult", "weight_similarity", "reset_bn_stats", "repair", "channel_stats",
    "interpolate", "merge_aligned", "barrier",
]
