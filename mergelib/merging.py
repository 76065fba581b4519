"""``merge(pretrained, finetuned, method, **hparams)``: every task-vector merge over state dicts.

One flatten of the selected tensors into an ``N x D`` float32 task-vector matrix (on the pretrained
tensors' device), one flat operation from :mod:`mergelib.competition` / :mod:`mergelib.fourier`,
one pass writing ``theta_0 + lambda * tau_m`` back per tensor in the original dtype.

Defaults (METHODS.md; lambda "fixed, no validation data" unless you tune it):

* ``average``: lambda = 1/N (fixed); no hyperparameters.
* ``task_arithmetic``: lambda = 0.3, or a per-task list.
* ``ties``: lambda = 1.0; ``density=0.2``, ``trim="global"|"tensor"``, ``sign_rule="mass"|"count"``.
* ``dare_ta``: lambda = 0.3, or a per-task list; ``p=0.9``, ``seed=0``.
* ``dare_ties``: lambda = 1.0; ``p=0.9``, ``seed=0``, ``density=1.0`` (DARE replaces the trim, as
  in mergekit; set density < 1 to trim as well, as MergeLM does), ``trim``, ``sign_rule``.
* ``pcb``: lambda = 1.2, or a per-task list; ``ratio=0.05`` (fraction kept, in (0, 1]),
  ``mode="official"|"paper"``.
* ``fr``: c = 0.7; ``ratio=0.7`` (radius R = ratio * base(H, W), any value >= 0),
  ``mode="official"|"paper"``, ``base="min"|"max"``, ``align="official"|"paper"|"none"``,
  ``compat_official=False``, ``compat_double_ring=False``.

For ``pcb`` a per-task list is PCB's lambda_i inside the weighted average (global lambda 1).
With ``rules="auto"`` the model family is detected; FR on a ViT uses the FREE rule (only keys
containing ``attn`` or ``mlp``), every other method the family default of :data:`DEFAULT_RULES`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .competition import check_fraction, dare_flat, pcb_merge, ties_merge
from .fourier import fr_merge
from .task_vectors import (as_named_list, detect_family, flatten, resolve_rules, select_keys,
                           unflatten, validate_state_dicts)

__all__ = ["merge", "METHODS", "METHOD_DEFAULTS"]

METHOD_DEFAULTS: dict[str, dict] = {
    "average": {},
    "task_arithmetic": {},
    "ties": {"density": 0.2, "trim": "global", "sign_rule": "mass"},
    "dare_ta": {"p": 0.9, "seed": 0},
    "dare_ties": {"p": 0.9, "seed": 0, "density": 1.0, "trim": "global", "sign_rule": "mass"},
    "pcb": {"ratio": 0.05, "mode": "official"},
    "fr": {"ratio": 0.7, "mode": "official", "base": "min", "align": "official", "compat_official": False,
           "compat_double_ring": False},
}
DEFAULT_SCALE = {"average": None, "task_arithmetic": 0.3, "ties": 1.0, "dare_ta": 0.3, "dare_ties": 1.0,
                 "pcb": 1.2, "fr": 0.7}
PER_TASK_SCALE = ("task_arithmetic", "dare_ta", "pcb")
METHODS = tuple(METHOD_DEFAULTS)
_CHOICES = {"trim": ("global", "tensor"), "sign_rule": ("mass", "count"), "mode": ("official", "paper"),
            "base": ("min", "max"), "align": ("official", "paper", "none")}


def _check_hparams(method: str, hparams: dict) -> dict:
    allowed = METHOD_DEFAULTS[method]
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {unknown} for method {method!r}; "
                        f"allowed: {sorted(allowed) or 'none'}")
    hp = {**allowed, **hparams}
    if "density" in hp:
        hp["density"] = check_fraction("density", hp["density"])
    if method == "pcb":
        hp["ratio"] = check_fraction("ratio", hp["ratio"])
    elif "ratio" in hp:  # FR: R = ratio * min(H, W) is a radius, not a fraction; > 1 is meaningful
        r = float(hp["ratio"])
        if not (r >= 0 and r < float("inf")):
            raise ValueError(f"ratio={hp['ratio']!r} for method {method!r} must be a finite number >= 0")
        hp["ratio"] = r
    if "p" in hp:
        hp["p"] = check_fraction("p", hp["p"], closed_low=True, closed_high=False)
    for name, choices in _CHOICES.items():
        if name in hp and hp[name] not in choices:
            raise ValueError(f"{name}={hp[name]!r} for method {method!r}; expected one of {choices}")
    if "seed" in hp and (not isinstance(hp["seed"], int) or hp["seed"] < 0):
        raise ValueError(f"seed={hp['seed']!r} must be a non-negative int")
    return hp


def _resolve_scale(method: str, scale, n: int) -> tuple[float, list[float] | None]:
    """(global lambda, per-task lambdas or None)."""
    if method == "average":
        if scale is not None:
            raise ValueError("scale must be None for method 'average' (it is fixed to 1/N)")
        return 1.0 / n, None
    if scale is None:
        return DEFAULT_SCALE[method], None
    if isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.ndim == 0):
        return float(scale), None
    if method not in PER_TASK_SCALE:
        raise ValueError(f"scale for method {method!r} must be a single float, got {scale!r}")
    lams = [float(x) for x in scale]
    if len(lams) != n:
        raise ValueError(f"scale has {len(lams)} per-task values for {n} fine-tuned models")
    return 1.0, lams


def _weighted_sum(x: Tensor, lams: list[float] | None) -> Tensor:
    """sum_i lam_i x_i over the N rows (one read of x when all lam_i are equal)."""
    if lams is None:
        return x.sum(0)
    out = torch.zeros_like(x[0])
    for row, lam in zip(x, lams):
        out.add_(row, alpha=lam)
    return out


def merge(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping],
          method: str, scale: float | Sequence[float] | None = None, include=None, exclude=None,
          rules: str | Mapping | None = "auto", validate: bool = True, **hparams) -> dict[str, Tensor]:
    """Merge fine-tuned state dicts into the pretrained one with a task-vector method.

    ``finetuned``: list of state dicts or ``name -> state_dict`` (names seed DARE per task).
    ``method``: one of :data:`METHODS`; ``scale``: the papers' lambda (see the module table for
    defaults; a per-task list for task_arithmetic, dare_ta and pcb). ``rules``: ``"auto"``, a
    ``DEFAULT_RULES`` name, a dict of :func:`select_keys` arguments, or None (every float tensor);
    ``include`` replaces the rule's include regexes, ``exclude`` is added to its excludes. ``hparams``: per-method hyperparameters (module table).

    Equation: theta = theta_0 + lambda * tau_m with tau_m = method(tau_1..tau_N), tau_i = theta_i -
    theta_0 over the selected keys, computed in float32 on the pretrained tensors' device.
    Returns a new state dict: selected tensors are new tensors in their original dtype and device;
    the other entries are the pretrained tensors themselves (not copies). Inputs are not mutated.

    Raises ``ValueError`` for an unknown method, out-of-range hyperparameters (density and PCB's
    ratio outside (0, 1], p outside [0, 1), FR's radius ratio negative) and bad scales, ``TypeError`` for unknown hyperparameter names, and the
    :func:`validate_state_dicts` errors for mismatched keys, shapes, dtypes or non-finite values.
    """
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    hp = _check_hparams(method, hparams)
    named = as_named_list(finetuned)
    if not named:
        raise ValueError("finetuned is empty: need at least one fine-tuned state dict")
    if rules == "auto" and method == "fr" and detect_family(pretrained) == "vit":
        rules = "vit_attn_mlp"
    kw = resolve_rules(rules, pretrained)
    if include is not None:
        kw["include"] = include
    if exclude is not None:
        prev = kw.get("exclude") or []
        kw["exclude"] = ([prev] if isinstance(prev, str) else list(prev)) + (
            [exclude] if isinstance(exclude, str) else list(exclude))
    keys = select_keys(pretrained, **kw)
    if not keys:
        raise ValueError(f"no tensor selected for merging (rules={rules!r}, include={include!r}, "
                         f"exclude={exclude!r})")
    if validate:
        validate_state_dicts(pretrained, dict(named), keys=keys)
    n = len(named)
    lam, lams = _resolve_scale(method, scale, n)

    x, layout = flatten([sd for _, sd in named], keys, subtract=pretrained)  # N x D task vectors
    if method in ("dare_ta", "dare_ties"):
        dare_flat(x, hp["p"], layout, hp["seed"], tasks=[name for name, _ in named], inplace=True)
    if method in ("average", "task_arithmetic", "dare_ta"):
        merged = _weighted_sum(x, lams)
    elif method in ("ties", "dare_ties"):
        merged = ties_merge(x, hp["density"], trim=hp["trim"], layout=layout, sign_rule=hp["sign_rule"],
                            inplace=True)
    elif method == "pcb":
        merged = pcb_merge(x, hp["ratio"], mode=hp["mode"], lambdas=lams)
    else:  # fr
        merged = fr_merge(x, layout, ratio=hp["ratio"], mode=hp["mode"], base=hp["base"], align=hp["align"],
                          compat_official=hp["compat_official"], compat_double_ring=hp["compat_double_ring"],
                          inplace=True)
    del x

    out = dict(pretrained)
    for k, delta in unflatten(merged, layout).items():
        p = pretrained[k]
        out[k] = torch.add(p.float(), delta, alpha=lam).to(p.dtype)
    return out

