"""``merge(pretrained, finetuned, method, **hparams)``: every task-vector merge over state dicts.

One flatten of the selected tensors into an ``N x D`` float32 task-vector matrix (on the pretrained
tensors' device), one flat operation from :mod:`mergelib.competition` / :mod:`mergelib.fourier`,
one pass writing ``theta_0 + lambda * tau_m`` back per tensor in the original dtype.

**The method registry.** Every method is declared once, in :data:`REGISTRY`, as a :class:`MergeMethod`:
its flat function, its hyperparameters (:class:`~mergelib.hparams.HParam`: kind, range or choices,
default, which value is the paper's and which the official code's), its default lambda, whether a
per-task lambda list is accepted, and whether it works per tensor or globally. :func:`merge` validates
and dispatches from that declaration, :data:`METHODS` lists its names and :func:`method_table`
renders the README's method table from it (a test keeps the README in sync).

lambda is "fixed, no validation data" at its default unless you tune it (METHODS.md). For ``pcb`` a
per-task list is PCB's lambda_i inside the weighted average (global lambda 1). With ``rules="auto"``
the model family is detected; FR on a ViT uses the FREE rule (only keys containing ``attn`` or
``mlp``), every other method the family default of :data:`~mergelib.task_vectors.DEFAULT_RULES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .competition import _pcb_official, _ties_fused, _trim_plan, all_finite as _all_finite, dare_flat, pcb_merge, ties_merge
from .fourier import _TaskRows as _FRTaskRows, _fr_options, _one_task_at_a_time as _fr_one_task_at_a_time
from .fourier import fr_check_selection, fr_merge, fr_tensor
from . import gpu_kernels as _gpu
from . import kernels
from .hparams import HParam, HyperparameterError, check_number, did_you_mean, did_you_mean_each
from .task_vectors import (FlatLayout, NonFiniteError, Scratch, TaskVectorColumns, _check_finite, _sub_into, as_named_list,
                           detect_family, empty_matrix, flatten, resolve_rules, select_keys, unflatten,
                           validate_state_dicts)

__all__ = ["merge", "METHODS", "REGISTRY", "MergeMethod", "method_spec", "method_table"]


@dataclass(frozen=True)
class MergeMethod:
    """The one declaration of a merge method.

    ``fn(tvs, layout=..., lambdas=..., tasks=..., **hparams)`` maps the ``N x D`` float32 task-vector
    matrix (it may overwrite it) to the merged ``D`` task vector before the global lambda.
    ``default_scale``: lambda when ``scale=None`` (``None``: fixed to 1/N, no scale accepted).
    ``per_task_scale``: a list of N lambdas is accepted (passed to ``fn`` as ``lambdas``).
    ``scope``: ``"per-tensor"`` (each tensor on its own) or ``"global"`` (over the concatenation of
    all selected tensors of a model). ``paper``: the citation; ``doc``: one line on the equation.
    ``family_rules``: selection rule per detected model family when ``rules="auto"``.
    """

    name: str
    fn: Callable[..., Tensor]
    hparams: tuple[HParam, ...]
    default_scale: float | None
    per_task_scale: bool
    scope: str
    paper: str
    doc: str
    family_rules: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.scope not in ("global", "per-tensor"):
            raise ValueError(f"MergeMethod {self.name!r}: scope must be 'global' or 'per-tensor'")

    @property
    def defaults(self) -> dict:
        return {h.name: h.default for h in self.hparams}

    def check_hparams(self, hparams: Mapping) -> dict:
        """Defaults filled in and every value validated; ``TypeError`` for unknown names,
        :class:`~mergelib.hparams.HyperparameterError` for bad values."""
        allowed = {h.name: h for h in self.hparams}
        unknown = sorted(set(hparams) - set(allowed))
        if unknown:
            raise TypeError(f"unknown hyperparameter(s) {unknown} for method {self.name!r}"
                            f"{did_you_mean_each(unknown, list(allowed))}; "
                            f"allowed: {sorted(allowed) or 'none'}")
        return {name: h.check(hparams.get(name, h.default), self.name) for name, h in allowed.items()}

    def check_scale(self, scale, n: int) -> tuple[float, list[float] | None]:
        """(global lambda, per-task lambdas or None) from ``scale`` (None, a number or N numbers)."""
        if self.default_scale is None:
            if scale is not None:
                raise HyperparameterError(f"scale must be None for method {self.name!r} (it is fixed to 1/N)")
            return 1.0 / n, None
        if scale is None:
            return self.default_scale, None
        if isinstance(scale, (str, bytes, bool)) or isinstance(scale, Tensor) and scale.ndim == 0 \
                or not isinstance(scale, (Sequence, Tensor)):
            return check_number(scale, "scale", method=self.name), None
        if not self.per_task_scale:
            raise HyperparameterError(f"scale for method {self.name!r} must be a single float, got {scale!r}")
        lams = [check_number(x, f"scale[{i}]", method=self.name) for i, x in enumerate(scale)]
        if len(lams) != n:
            raise HyperparameterError(f"scale has {len(lams)} per-task values for {n} fine-tuned models")
        return 1.0, lams


# ----------------------------------------------------------------------------------------------
# The flat functions behind the methods (N x D task vectors -> D merged task vector)
# ----------------------------------------------------------------------------------------------
def _weighted_sum(x: Tensor, lams: list[float] | None) -> Tensor:
    """sum_i lam_i x_i over the N rows (one read of x when all lam_i are equal)."""
    out = empty_matrix((x.shape[1],), dtype=x.dtype, device=x.device)  # huge pages (HUGE_PAGE_BYTES)
    if lams is None:
        return torch.sum(x, 0, out=out)
    out.zero_()
    for row, lam in zip(x, lams):
        out.add_(row, alpha=lam)
    return out


def _sum(x: Tensor, *, layout: FlatLayout, lambdas, tasks) -> Tensor:
    return _weighted_sum(x, lambdas)


def _dare_ta(x: Tensor, *, layout: FlatLayout, lambdas, tasks, p: float, seed: int) -> Tensor:
    dare_flat(x, p, layout, seed, tasks=tasks, inplace=True)
    return _weighted_sum(x, lambdas)


def _ties(x: Tensor, *, layout: FlatLayout, lambdas, tasks, density: float, granularity: str,
          sign_rule: str, trim_rule: str = "official") -> Tensor:
    return ties_merge(x, density, granularity=granularity, layout=layout, sign_rule=sign_rule,
                      trim_rule=trim_rule)


def _dare_ties(x: Tensor, *, layout: FlatLayout, lambdas, tasks, p: float, seed: int, **ties) -> Tensor:
    dare_flat(x, p, layout, seed, tasks=tasks, inplace=True)
    return _ties(x, layout=layout, lambdas=lambdas, tasks=tasks, **ties)


def _pcb(x: Tensor, *, layout: FlatLayout, lambdas, tasks, density: float, mode: str) -> Tensor:
    return pcb_merge(x, density, mode=mode, lambdas=lambdas)


def _fr(x: Tensor, *, layout: FlatLayout, lambdas, tasks, **hp) -> Tensor:
    return fr_merge(x, layout, inplace=True, **hp)


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------
_P = HParam("p", "float", 0.9, "drop rate; kept entries are rescaled by 1/(1-p) (paper)",
            low=0.0, high=1.0, high_open=True)
_SEED = HParam("seed", "int", 0, "seeds the mask of task t, tensor k via `dare_seed(seed, t, k)` (CPU generator)",
               low=0)
_GRANULARITY = HParam("granularity", "choice", "global", "`global`: top-k over the whole model (paper); "
                      "`tensor`: per tensor (mergekit)", choices=("global", "tensor"))
_TRIM_RULE = HParam("trim_rule", "choice", "official", "`official`: keep every tie at the threshold "
                    "(official code); `exact`: keep exactly int(d * density) entries (peft, mergekit)",
                    choices=("official", "exact"))
_SIGN_RULE = HParam("sign_rule", "choice", "mass", "`mass`: sign of the sum (paper, official); `count`: "
                    "majority of signs, ties +1 (mergekit/peft)", choices=("mass", "count"))


def _density(default: float, doc: str) -> HParam:
    return HParam("density", "float", default, doc, low=0.0, high=1.0, low_open=True)


REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("average", _sum, (), None, False, "per-tensor", "weight averaging",
                "theta_0 + (1/N) sum_i tau_i"),
    MergeMethod("task_arithmetic", _sum, (), 0.3, True, "per-tensor", "Ilharco et al., ICLR 2023",
                "theta_0 + lambda sum_i tau_i"),
    MergeMethod("ties", _ties, (_density(0.2, "fraction of each task vector kept by magnitude (top-20%, paper)"),
                                _GRANULARITY, _SIGN_RULE, _TRIM_RULE),
                1.0, False, "global", "Yadav et al., NeurIPS 2023",
                "trim, elect sign, disjoint mean; theta_0 + lambda tau_m"),
    MergeMethod("dare_ta", _dare_ta, (_P, _SEED), 0.3, True, "per-tensor", "Yu et al., ICML 2024",
                "drop and rescale each tau_i, then task arithmetic"),
    MergeMethod("dare_ties", _dare_ties,
                (_P, _SEED, _density(1.0, "TIES trim after DARE (1: DARE replaces the trim, as in mergekit)"),
                 _GRANULARITY, _SIGN_RULE, _TRIM_RULE),
                1.0, False, "global", "Yu et al., ICML 2024",
                "drop and rescale each tau_i, then TIES"),
    MergeMethod("pcb", _pcb, (_density(0.05, "fraction of balanced scores kept (the papers' `ratio` r)"),
                              HParam("mode", "choice", "official", "`official`: `pcb-merging.py`; `paper`: "
                                     "softmax scores of the paper", choices=("official", "paper"))),
                1.2, True, "global", "Du et al., NeurIPS 2024",
                "intra/inter balancing, drop, weighted average; theta_0 + lambda tau_m"),
    MergeMethod("fr", _fr, (
        HParam("ratio", "float", 0.7, "radius factor R = ratio * base(H, W) (official `filter_ratio`)", low=0.0),
        HParam("mode", "choice", "official", "`official`: unshifted index disc; `paper`: centred ideal high-pass",
               choices=("official", "paper")),
        HParam("base", "choice", "min", "R relative to min(H, W) (ViT code) or max (RoBERTa code)",
               choices=("min", "max")),
        HParam("align", "choice", "official", "`official`: per-layer magnitude alignment; `paper`: "
               "lambda_i = E(v_i)/sum E(v_j); `none`", choices=("official", "paper", "none")),
        HParam("compat_official", "flag", False, "non-weight keys take task 1's delta (official quirk)"),
        HParam("compat_double_ring", "flag", False, "count the ring d = min/10 twice (official quirk)")),
        0.7, False, "per-tensor", "Zheng & Wang, ICCV 2025",
        "high-pass filter each 2-D tau_i in the 2-D spectrum, align, sum; theta_0 + c sum",
        family_rules={"vit": "vit_attn_mlp"}),
)}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def method_spec(method: str) -> MergeMethod:
    """The registry's entry for the name ``method``; ``ValueError`` naming the methods (and the closest to
    a mistyped name: ``"tie"``, ``"TIES"``, ``"task-arithmetic"``) for any other value."""
    spec = REGISTRY.get(method) if isinstance(method, str) else None
    if spec is None:
        raise ValueError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; expected one of {METHODS}")
    return spec


def method_table() -> str:
    """The README's method table (Markdown), rendered from :data:`REGISTRY`."""
    lines = ["| method | paper | scope | default λ | per-task λ | hyperparameters (default; allowed) |",
             "|---|---|---|---|---|---|"]
    for m in REGISTRY.values():
        hps = "<br>".join(f"`{h.name}={h.default!r}` ({h.allowed}): {h.doc}" for h in m.hparams) or "none"
        hps = hps.replace("|", "\\|")  # a literal | would end the table cell
        lam = "1/N (fixed)" if m.default_scale is None else f"{m.default_scale:g}"
        lines.append(f"| `{m.name}` | {m.paper} | {m.scope} | {lam} | {'yes' if m.per_task_scale else 'no'} "
                     f"| {hps} |")
    return "\n".join(lines)


def merge(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping],
          method: str, scale: float | Sequence[float] | None = None, include=None, exclude=None,
          rules: str | Mapping | None = "auto", validate: bool = True, **hparams) -> dict[str, Tensor]:
    """Merge fine-tuned state dicts into the pretrained one with a task-vector method.

    ``finetuned``: list of state dicts or ``name -> state_dict`` (names seed DARE per task).
    ``method``: one of :data:`METHODS`; ``scale``: the papers' lambda (default per method in
    :data:`REGISTRY`; a per-task list where the method accepts one). ``rules``: ``"auto"``, a
    ``DEFAULT_RULES`` name, a dict of :func:`select_keys` arguments, or None (every float tensor);
    ``include`` replaces the rule's include regexes, ``exclude`` is added to its excludes.
    ``hparams``: the method's hyperparameters (:func:`method_table`).

    Equation: theta = theta_0 + lambda * tau_m with tau_m = method(tau_1..tau_N), tau_i = theta_i -
    theta_0 over the selected keys, computed in float32 on the pretrained tensors' device.
    Returns a new state dict: selected tensors are new tensors in their original dtype and device;
    the other entries are the pretrained tensors themselves (not copies). Inputs are not mutated.

    Raises ``ValueError`` for an unknown method, :class:`~mergelib.hparams.HyperparameterError` (a
    ``ValueError``) for a hyperparameter or scale of the wrong kind (bool, string), NaN/inf or out of
    range, ``TypeError`` for unknown hyperparameter names, and the :func:`validate_state_dicts`
    errors for mismatched keys, shapes, dtypes or non-finite values.
    """
    spec = method_spec(method)
    hp = spec.check_hparams(hparams)
    named = as_named_list(finetuned)
    if not named:
        raise ValueError("finetuned is empty: need at least one fine-tuned state dict")
    lam, lams = spec.check_scale(scale, len(named))
    keys = _selected_keys(spec, pretrained, rules, include, exclude)
    if validate:  # keys, shapes, dtypes here; finiteness on the computed task vectors (below)
        validate_state_dicts(pretrained, dict(named), keys=keys, check_finite=False)
    models = [sd for _, sd in named]
    try:
        if spec.fn is _sum:  # average, task arithmetic: per tensor, no N x D matrix
            # the sums go into views of one D vector on huge pages: allocated per tensor, they were mapped
            # and faulted in afresh whenever glibc had returned their memory to the kernel (13.8 K page
            # faults per call on the benchmark's set, 75-79 ms against 63 ms)
            layout = FlatLayout.from_shapes({k: tuple(pretrained[k].shape) for k in keys})
            flat = empty_matrix((layout.D,), device=pretrained[keys[0]].device)
            merged = _sum_per_tensor(pretrained, models, keys, lams, check=validate, layout=layout,
                                     into={k: flat[s:e] for k, s, e in layout.segments()}, scale=lam)
            return _with_merged(pretrained, merged)
        elif spec.fn is _fr and hp["align"] != "paper":  # per tensor, no N x D matrix
            deltas = _fr_per_tensor(pretrained, models, keys, hp)
        elif spec.fn is _ties and _ties_by_columns(pretrained, models, keys, hp):
            # column blocks, no N x D matrix; theta_0 + lambda * tau_m
            return _with_merged(pretrained, _ties_columns(pretrained, models, keys, hp, lam))
        elif spec.fn is _pcb and hp["mode"] == "official" and pretrained[keys[0]].device.type == "cpu":
            cols = TaskVectorColumns(models, pretrained, keys)  # column blocks: no N x D task-vector copy
            deltas = unflatten(_pcb_official(cols, hp["density"], lams or [1.0] * len(models)), cols.layout)
        else:
            x, layout = flatten(models, keys, subtract=pretrained)  # N x D task vectors
            merged = spec.fn(x, layout=layout, lambdas=lams, tasks=[name for name, _ in named], **hp)
            del x
            deltas = unflatten(merged, layout)
    except NonFiniteError:
        if validate:  # name the offending input tensor
            _check_finite([("pretrained", k, pretrained[k]) for k in keys]
                          + [(name, k, sd[k]) for name, sd in named for k in keys])
        raise

    out = dict(pretrained)
    for k, delta in deltas.items():  # the deltas are this call's own float32 tensors: written in place
        p = pretrained[k]
        out[k] = torch.add(p.float(), delta, alpha=lam, out=delta).to(p.dtype)
    return out


def _with_merged(pretrained: Mapping[str, Tensor], merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``pretrained`` with the ``merged`` float32 tensors (``theta_0 + lambda * tau_m``, computed by the
    caller) in place of theirs, each converted back to the pretrained tensor's dtype."""
    out = dict(pretrained)
    out.update((k, v.to(pretrained[k].dtype)) for k, v in merged.items())
    return out


def _selected_keys(spec: MergeMethod, pretrained: Mapping[str, Tensor], rules, include, exclude) -> list[str]:
    """The sorted keys that take part (``rules``/``include``/``exclude`` as in :func:`merge`)."""
    if rules == "auto":
        rules = spec.family_rules.get(detect_family(pretrained), "auto")
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
    return keys


def _ties_by_columns(pretrained, models, keys: list[str], hp: Mapping) -> bool:
    """Whether :func:`merge` runs TIES by :func:`_ties_columns`: on the CPU with the official trim, or
    with the exact trim where the compiled sweep runs it (``"mass"`` sign rule, :mod:`mergelib.kernels`
    available); otherwise from the ``N x D`` matrix."""
    if pretrained[keys[0]].device.type != "cpu":
        return False
    if hp["trim_rule"] == "official":
        return True
    return hp["sign_rule"] == "mass" and kernels.available(*[pretrained[k] for k in keys],
                                                           *[m[k] for m in models for k in keys])


def _ties_columns(pretrained, models, keys: list[str], hp: Mapping, scale: float) -> dict[str, Tensor]:
    """TIES on the CPU (:func:`_ties_by_columns`), read as column blocks of the task vectors
    (:class:`~mergelib.task_vectors.TaskVectorColumns`): one counting pass for the thresholds (and for
    the exact trim one count of the entries above them), one fused trim-elect-average pass, no ``N x D``
    matrix. The same bits as ``flatten`` + ``ties_merge``.
    Finiteness is checked on the merged vector: a NaN or inf in any task vector reaches it (the trim
    multiplies every entry by 0 or 1, and NaN * 0 is NaN). Raises :class:`NonFiniteError`.

    Returns ``theta_0 + scale * tau_m`` per tensor in float32, with the bits of ``torch.add(theta_0.float(),
    tau_m, alpha=scale)`` (:func:`merge`'s last step; fused into the sweep where :mod:`mergelib.kernels`
    runs it and :func:`~mergelib.kernels.fused_add_matches_torch`)."""
    cols = TaskVectorColumns(models, pretrained, keys)
    plan = _trim_plan(cols, hp["density"], hp["granularity"], cols.layout, hp["trim_rule"])
    fused = False
    if hp["sign_rule"] == "mass" and kernels.available(*cols.tensors()):
        fused = kernels.fused_add_matches_torch()
        merged, finite = _ties_kernel(pretrained, models, cols.layout, plan, scale if fused else None,
                                      hp["trim_rule"])
    else:  # (the official trim: _ties_by_columns)
        merged = _ties_fused(cols, plan, [None] * len(plan), "official", hp["sign_rule"])
        finite = _all_finite(merged)
    if not finite:
        raise NonFiniteError("the TIES-merged task vector is not finite")
    out = unflatten(merged, cols.layout)
    if not fused:
        for k, t in out.items():
            torch.add(pretrained[k].float(), t, alpha=scale, out=t)
    return out


def _ties_kernel(pretrained, models, layout: FlatLayout, plan, scale: float | None,
                 trim_rule: str = "official") -> tuple[Tensor, bool]:
    """:func:`_ties_columns`'s sweep with :func:`mergelib.kernels.ties_sweep`, tensor by tensor from the
    state dicts: the float operations of :func:`_ties_fused` (``"mass"`` rule), each entry read once.
    ``plan``: :func:`_trim_plan`'s segments (the whole vector, or one per tensor of ``layout``); with the
    exact trim, each segment's thresholds and tie budget are a :class:`~mergelib.kernels.ExactTrim`
    (:func:`mergelib.kernels.exact_trim`: one more count over the segment). Returns the merged task vector
    (``theta_0 + scale * tau_m`` with ``scale``, fused) and whether it is finite (counted by the sweep)."""
    out = empty_matrix((layout.D,), device=pretrained[layout.keys[0]].device)
    zero = torch.empty(layout.D, dtype=torch.bool)
    n = len(models)
    trims = [kernels.ties_thresholds(thr, n) if trim_rule == "official" else  # per plan segment
             kernels.exact_trim(thr, keep, e - s, n, ((pretrained[k], [m[k] for m in models])
                                                       for k, a, b in layout.segments() if s <= a and b <= e))
             for s, e, thr, keep in plan]
    segments = []  # (key, [start, end), the trim of the tensor's segment, the tensor's offset in it)
    for k, s, e in layout.segments():
        i = next(i for i, (a, b, _, _) in enumerate(plan) if a <= s and e <= b)
        segments.append((k, s, e, trims[i], s - plan[i][0]))
    votes = bad = 0
    marked = []  # the segments with entries that a positive majority sign may change
    for k, s, e, thr, at in segments:
        v, b, n_marked = kernels.ties_sweep(out[s:e], zero[s:e], [m[k] for m in models], pretrained[k], thr, scale)
        votes, bad = votes + v, bad + b
        if n_marked:
            marked.append((k, s, e, thr, at))
    if votes > 0:  # where the trimmed sum is 0, gamma takes the majority sign (+): the positive entries' mean
        for k, s, e, thr, at in marked:
            kernels.ties_majority_positive(out[s:e], zero[s:e], [m[k] for m in models], pretrained[k], thr, scale, at)
    # the columns that change there have a trimmed sum of exactly 0, so finite entries: still finite
    return out, bad == 0


def _fr_per_tensor(pretrained, models, keys: list[str], hp: Mapping) -> dict[str, Tensor]:
    """FR-Merging with a per-tensor alignment (``"official"``, ``"none"``): :func:`fr_tensor` on each
    tensor's ``N x numel`` task vectors, built on their own (as :func:`mergelib.merge_files` does), so
    no ``N x D`` matrix is flattened and copied again per segment. The same bits as :func:`fr_merge`.
    Raises :class:`NonFiniteError` for non-finite task vectors."""
    _fr_options(**hp)
    layout = FlatLayout.from_shapes({k: tuple(pretrained[k].shape) for k in keys})
    fr_check_selection(layout, stacklevel=3)
    # the merged tensors are views of one vector on huge pages: allocated per tensor, their pages were
    # faulted in 4 KiB at a time whenever glibc handed out fresh memory (up to 31 K page faults in a call
    # on the benchmark's set, a few dozen in others)
    merged = empty_matrix((layout.D,), device=pretrained[keys[0]].device)
    views = {k: merged[s:e] for k, s, e in layout.segments()}
    out = {}
    scratch = Scratch()  # the N x numel block, the spectrum and |.| buffers, reused from tensor to tensor
    scratch.reserve(len(models) * max(pretrained[k].numel() for k in keys), ("block", "abs"),
                    device=pretrained[keys[0]].device)
    # the tensors' row sums are checked together at the end, and fr_tensor reads a filtered tensor's sums
    # off its forward transform (on the CPU, of the matrices it filters one task at a time): on a GPU, a
    # host round trip per tensor stalled the launches (merge() took 37 ms against 24 ms for the flat FR on
    # the benchmark's 48 tensors); on the CPU, a check per tensor was a pass over its task vectors
    sums = torch.empty(len(keys), len(models), device=pretrained[keys[0]].device)

    def task_vectors(k: str) -> Tensor:
        base = pretrained[k]
        x, _ = flatten([{k: m[k]} for m in models], [k], subtract={k: base},
                       out=scratch.get("block", len(models) * base.numel(), device=base.device))
        return x

    for i, k in enumerate(keys):
        base = pretrained[k]
        keep = _fr_one_task_at_a_time(tuple(base.shape), base.device)  # each task's vector computed as it is read
        x = (_FRTaskRows([m[k] for m in models], base, scratch.get("task", base.numel(), device=base.device))
             if keep else task_vectors(k))
        out[k] = fr_tensor(x, k, tuple(base.shape), **hp, scratch=scratch, out=views[k], row_sums=sums[i],
                           keep_input=keep).view(base.shape)
    for k, ok in zip(keys, torch.isfinite(sums).all(1).tolist()):  # a non-finite sum (NaN, inf, or finite
        if not ok and not _all_finite(task_vectors(k)):  # entries overflowing): the exact check
            raise NonFiniteError(f"task vectors of {k!r} are not finite")
    return out


# Elements per step of the per-tensor sums (a step's temporaries, 3 MB of float32, stay in L2/L3). Each
# step costs two torch calls per task, so short steps are dominated by the calls: task arithmetic on
# the benchmark's 8 x 14.2M set took 135 / 88 / 71 / 68 / 77 ms with steps of 2**14 / 2**16 / 2**17 /
# 2**18 / 2**20 entries (one thread; tvs.sum(0) into a fresh D vector: 41 ms, of which
# about half is faulting that output in).
_SUM_CHUNK = 1 << 18
_SUM_ALIGN = 1024


def _sum_foreach(pretrained, models, keys: list[str], lams, check: bool, into: Mapping[str, Tensor] | None,
                 scale: float | None) -> dict[str, Tensor]:
    """:func:`_sum_per_tensor` on CUDA. The sums add the tasks in order, ``0 + t_1 + t_2 + ...`` with
    ``t_i = theta_i - theta_0`` in float32: the float operations of the CPU code (which reproduces
    ``x.sum(0)``'s order in the last partial vector block), though CUDA's ``x.sum(0)`` (the flat path's)
    may round differently. Without per-task scales, :func:`mergelib.gpu_kernels.sum_task_vectors` reads
    every input entry once (Triton); otherwise every tensor at once with multi-tensor kernels
    (``torch._foreach_*``: a few launches per task, not two per tensor and task). One host round trip
    for the finiteness check (an L1 norm per tensor: NaN and inf propagate into it; an overflowing one
    is checked again exactly)."""
    acc = ([into[k] for k in keys] if into is not None
           else [torch.empty(pretrained[k].numel(), dtype=torch.float32, device=pretrained[k].device) for k in keys])
    if lams is None:  # every entry read once and the sums written once (Triton): the same float operations
        bases = [pretrained[k] for k in keys]
        rows = [[m[k] for m in models] for k in keys]
        inputs = [*bases, *(t for r in rows for t in r)]  # read by address: no reshapes (Python's time)
        if _gpu.available(*inputs, *acc) and all(t.is_contiguous() for t in (*inputs, *acc)):
            bad = _gpu.sum_task_vectors(bases, rows, acc, scale)
            for k, n_bad in zip(keys, bad):
                if n_bad and check:
                    raise NonFiniteError(f"the task-vector sum of {k!r} is not finite")
            return {k: a.view(pretrained[k].shape) for k, a in zip(keys, acc)}
    flat = [pretrained[k].reshape(-1) for k in keys]
    base = [t.float() for t in flat]  # no copy for float32
    torch._foreach_zero_(acc)
    for i, m in enumerate(models):
        t = torch._foreach_sub([m[k].reshape(-1).float() for k in keys], base)
        if lams is None:
            torch._foreach_add_(acc, t)
        else:
            torch._foreach_add_(acc, t, alpha=lams[i])
        del t
    if check:
        norms = torch.stack(torch._foreach_norm(acc, 1))
        if not bool(torch.isfinite(norms).all()):
            for k, a in zip(keys, acc):
                if not _all_finite(a):
                    raise NonFiniteError(f"the task-vector sum of {k!r} is not finite")
    if scale is not None:  # theta_0 + scale * sum, as torch.add(theta_0.float(), sum, alpha=scale)
        acc = torch._foreach_add(base, acc, alpha=scale)
    return {k: a.view(pretrained[k].shape) for k, a in zip(keys, acc)}


def _sum_per_tensor(pretrained, models, keys: list[str], lams, check: bool,
                    layout: FlatLayout | None = None, into: Mapping[str, Tensor] | None = None,
                    scale: float | None = None) -> dict[str, Tensor]:
    """sum_i lam_i (theta_i - theta_0) per tensor in float32, chunk by chunk in cache: the same float
    operations (and bits) as ``flatten`` + :func:`_weighted_sum` on the ``N x D`` matrix, without it.

    ``x.sum(0)`` of the flat matrix adds the rows in order except in its last partial vector block, so
    the columns from the last multiple of 1024 on are summed with ``sum(0)`` on that small block.
    Verified bit for bit for a few tasks (2-8) only: with many tasks (e.g. 32) or some narrow tail
    blocks, ``x.sum(0)``'s vectorised reduction can differ in the last bit. :func:`merge` and
    :func:`mergelib.merge_files` both call this function, so they always agree with each other.
    ``into``: a flat float32 tensor per key to accumulate in (the streaming merge reuses one buffer;
    fresh memory costs a page fault per 4 kB). ``scale``: return ``theta_0 + scale * sum`` in float32
    instead, with the bits of ``torch.add(theta_0.float(), sum, alpha=scale)`` (:func:`merge`'s last
    step), fused into the sum where :mod:`mergelib.kernels` can (no second pass over the sums).
    Raises :class:`NonFiniteError` when a sum is NaN or inf (every non-finite input makes it so).
    """
    if pretrained[keys[0]].device.type == "cuda":
        return _sum_foreach(pretrained, models, keys, lams, check, into, scale)
    if layout is None:  # else: the layout of the whole merge (keys may be a subset of it)
        layout = FlatLayout.from_shapes({k: tuple(pretrained[k].shape) for k in keys})
    D = layout.D
    wanted = set(keys)
    tail = (D // _SUM_ALIGN) * _SUM_ALIGN if lams is None else D
    out = {}
    checked = {}  # key -> the number of leading entries whose sums the kernel counted finite
    fused = {}  # key -> the number of leading entries that already hold theta_0 + scale * sum
    for k, off, numel in zip(layout.keys, layout.offsets, layout.numels):
        if k not in wanted:
            continue
        p0 = pretrained[k].reshape(-1)
        dev = p0.device
        head = min(numel, max(tail - off, 0))  # the entries before the last partial block
        rows = [m[k] for m in models]
        if lams is None and kernels.available(p0, *rows):  # the same adds in one pass per entry
            fuse = scale is not None and kernels.fused_add_matches_torch()
            acc = torch.empty(numel, dtype=torch.float32) if into is None else into[k]
            bad = kernels.sum_task_vectors(acc[:head], [r.reshape(-1)[:head] for r in rows], p0[:head],
                                           scale=scale if fuse else None)
            if bad and check:
                raise NonFiniteError(f"the task-vector sum of {k!r} is not finite")
            checked[k] = head  # (the last partial block, if the tensor reaches it, is checked below)
            fused[k] = head if fuse else 0
            acc[head:] = 0.0
            out[k] = acc
            continue
        acc = torch.zeros(numel, dtype=torch.float32, device=dev) if into is None else into[k].zero_()
        step = _SUM_CHUNK if dev.type == "cpu" else max(numel, 1)
        tmp = torch.empty(2, min(numel, step), dtype=torch.float32, device=dev)  # t, base in float32
        for a0 in range(0, head, step):
            a1 = min(a0 + step, numel, tail - off)
            t, base = tmp[:, : a1 - a0]
            base = p0[a0:a1] if p0.dtype == torch.float32 else base.copy_(p0[a0:a1])  # exact (as .float())
            for i, m in enumerate(models):
                _sub_into(m[k].reshape(-1)[a0:a1], base, t)  # bf16/fp16: converted into t, then subtracted
                if lams is None:
                    acc[a0:a1].add_(t)
                else:
                    acc[a0:a1].add_(t, alpha=lams[i])
        out[k] = acc
    if any(off + numel > tail and k in wanted for k, off, numel in zip(layout.keys, layout.offsets, layout.numels)):
        # the last partial block: sum(0) of an N x (D - tail) matrix, as x.sum(0) does
        dev = pretrained[keys[0]].device
        xb = torch.empty(len(models), D - tail, dtype=torch.float32, device=dev)
        for k, off, numel in zip(layout.keys, layout.offsets, layout.numels):
            s, e = max(off, tail), off + numel
            if s < e:
                base = pretrained[k].reshape(-1)[s - off:].float()
                for i, m in enumerate(models):
                    torch.sub(m[k].reshape(-1)[s - off:].to(device=dev, dtype=torch.float32), base,
                              out=xb[i, s - tail:e - tail])
        block = xb.sum(0)
        for k, off, numel in zip(layout.keys, layout.offsets, layout.numels):
            s, e = max(off, tail), off + numel
            if s < e and k in wanted:
                out[k][s - off:] = block[s - tail:e - tail]
    if check:
        for k, acc in out.items():
            if not _all_finite(acc[checked.get(k, 0):]):
                raise NonFiniteError(f"the task-vector sum of {k!r} is not finite")
    if scale is not None:  # theta_0 + scale * sum where the kernel has not written it yet
        for k, acc in out.items():
            rest = acc[fused.get(k, 0):]
            torch.add(pretrained[k].reshape(-1)[fused.get(k, 0):].float(), rest, alpha=scale, out=rest)
    return {k: v.view(pretrained[k].shape) for k, v in out.items()}
