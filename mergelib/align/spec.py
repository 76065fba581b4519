"""Permutation specs: which tensor axes move together when hidden units are permuted (METHODS.md §8).

A network computes the same function after its hidden units are relabelled, as long as every tensor
that *produces* a unit (output rows, bias, BatchNorm/LayerNorm parameters and running statistics) and
every tensor that *consumes* it (input columns of the next layer) is permuted consistently. A
:class:`PermGroup` lists those (tensor, axis) pairs; a :class:`PermutationSpec` holds every group of a
model plus the keys it leaves alone (e.g. the classifier bias).

Conventions used throughout ``mergelib.align``
------------------------------------------------
* A permutation ``perm`` is a ``dict[group name -> LongTensor (n,)]`` on the CPU.
* ``perm[g][i] = j`` means *unit i of the aligned model is unit j of the original*; applying ``perm``
  to a tensor takes ``new[idx[i]] = old[idx[perm[i]]]`` along the axis (``idx`` = the positions of
  the group's units in that tensor). This is Git Re-Basin's convention: for a similarity ``C`` with
  rows = units of A and columns = units of B, ``linear_sum_assignment(C, maximize=True)`` returns
  exactly the ``perm`` that aligns B to A.
* A member may cover only part of an axis (``index``): that is how ResNet-20's option-A shortcut and
  the fused ``qkv`` projection of the ViT are described.

ResNet-20 with option-A shortcuts (our choice, proved by ``test_align_spec.py``)
-------------------------------------------------------------------------------
The option-A shortcut of the first block of stage s>1 subsamples the stage-(s-1) stream and zero-pads
it: stream channels ``[pad_s, pad_s + w_{s-1})`` of stage s *are* the stage-(s-1) stream channels,
``pad_s = w_s / 4``; the other ``w_s - w_{s-1}`` channels start as zeros. For ``shortcut(P x) =
P' shortcut(x)`` to hold, the stage-s permutation ``P'`` must act as ``P`` on the embedded block and
may only shuffle the padding channels among themselves. We therefore split the residual streams by
the stage in which a channel is *born*:

* ``stream1`` (16w units): all stage-1 stream channels, their embedded copies at ``[8w, 24w)`` in
  stage 2 and at ``[24w, 40w)`` in stage 3;
* ``stream2`` (16w units): stage-2 channels ``[0, 8w) + [24w, 32w)`` and their copies at
  ``[16w, 24w) + [40w, 48w)`` in stage 3;
* ``stream3`` (32w units): stage-3 channels ``[0, 16w) + [48w, 64w)``.

Every permutation of these three groups keeps the function exactly, and every function-preserving
permutation of the streams has this form (the padding channels are zero on the shortcut, the
embedded ones are not). A stage's stream permutation is the block composition of the groups.

ViT attention heads
-------------------
``blocks.i.attn.qk`` (q and k rows of ``qkv``) and ``blocks.i.attn.v`` (v rows of ``qkv`` and the
input columns of ``attn.proj``) are head-aware groups (``heads = H``): a valid permutation moves whole
heads and permutes dimensions inside a head. Head h's q, k and v are used together, so the head-level
permutation of both groups must be the same: with ``tie_heads=True`` (default, exact) the v group
names the qk group in ``head_tie`` and solvers choose one head assignment for both. The official
MuDSC code matches the two groups' heads independently (``tie_heads=False``), which no longer keeps
the function exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ..models import MLP, Classifier, ResNet20, ViT

__all__ = [
    "Member", "Observation", "PermGroup", "PermutationSpec", "permutation_spec", "apply_permutation",
    "identity_permutation", "random_permutation", "invert_permutation", "check_permutation",
    "solve_units", "to_rows", "from_rows",
]

Perm = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Member:
    """One (tensor, axis) pair of a group.

    ``index`` (LongTensor (n,) or None = all of the axis): the positions along ``axis`` of the
    group's units, in unit order. ``role`` is ``"out"`` for tensors that produce or describe the unit
    (weights' output rows, biases, norm parameters, BN statistics, embeddings) and ``"in"`` for
    tensors that consume it (the next layer's input columns). Permutations ignore the role; ZipIt
    merges ``"out"`` axes with M and ``"in"`` axes with U.
    """

    key: str
    axis: int
    role: str = "out"
    index: torch.Tensor | None = None


@dataclass(frozen=True)
class Observation:
    """Where a group's features are seen during a forward pass (for activation-based methods).

    The hooked tensor is the ``output`` of (or the first ``input`` to) module ``module``; ``act``
    (None, "relu", "gelu") is applied to it; channels are dim 1 of 4-D maps and the last dim
    otherwise; ``index`` selects the group's units among the channels.
    """

    module: str
    hook: str = "output"
    act: str | None = None
    index: torch.Tensor | None = None


@dataclass
class PermGroup:
    """A set of (tensor, axis) pairs sharing one permutation of ``size`` units.

    ``heads > 1``: the units form ``heads`` contiguous blocks that may only move as whole blocks plus
    within-block permutations. ``head_tie``: name of another head-aware group whose head-level
    permutation this one must share (q/k and v of one attention layer).
    """

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    heads: int = 1
    head_tie: str | None = None


@dataclass
class PermutationSpec:
    """All permutation groups of a model.

    ``shapes``: every floating-point state-dict tensor the spec knows about (covered by a group or
    deliberately left alone); ``nodes``: ordered cut points (module names) for partial zipping.
    """

    groups: dict[str, PermGroup]
    shapes: dict[str, tuple[int, ...]]
    model: str = ""
    nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._validate()

    # -- helpers ------------------------------------------------------------------------------
    def axis_members(self) -> dict[tuple[str, int], list[tuple[str, Member]]]:
        """(key, axis) -> [(group name, member)], for composing groups that share an axis."""
        out: dict[tuple[str, int], list[tuple[str, Member]]] = {}
        for g in self.groups.values():
            for m in g.members:
                out.setdefault((m.key, m.axis), []).append((g.name, m))
        return out

    def member_index(self, m: Member) -> torch.Tensor:
        return m.index if m.index is not None else torch.arange(self.shapes[m.key][m.axis])

    def units(self) -> list[list[str]]:
        """Groups that must be solved together: a head-aware group with the groups tied to it."""
        units: dict[str, list[str]] = {}
        for g in self.groups.values():
            units.setdefault(g.head_tie or g.name, []).append(g.name)
        return list(units.values())

    def _validate(self) -> None:
        for (key, axis), ms in self.axis_members().items():
            if key not in self.shapes:
                raise ValueError(f"spec member {key!r} is not in the spec's shapes")
            shape = self.shapes[key]
            if axis >= len(shape):
                raise ValueError(f"spec member {key!r} axis {axis} out of range for shape {shape}")
            seen = torch.zeros(shape[axis], dtype=torch.bool)
            for gname, m in ms:
                idx = self.member_index(m)
                if len(idx) != self.groups[gname].size:
                    raise ValueError(f"group {gname!r}: member {key!r} axis {axis} covers {len(idx)} "
                                     f"positions, expected {self.groups[gname].size}")
                if seen[idx].any():
                    raise ValueError(f"{key!r} axis {axis}: positions claimed by two groups ({gname!r})")
                seen[idx] = True
        for g in self.groups.values():
            if g.size % g.heads:
                raise ValueError(f"group {g.name!r}: size {g.size} not divisible by heads={g.heads}")
            if g.head_tie is not None:
                t = self.groups.get(g.head_tie)
                if t is None or t.heads != g.heads or t.size != g.size:
                    raise ValueError(f"group {g.name!r}: head_tie {g.head_tie!r} must name a group "
                                     "with the same size and number of heads")


# ----------------------------------------------------------------------------------------------
# Building specs
# ----------------------------------------------------------------------------------------------
def permutation_spec(model: nn.Module, tie_heads: bool = True) -> PermutationSpec:
    """Return the :class:`PermutationSpec` of a supported model.

    Supported: :class:`~mergelib.models.MLP`, :class:`~mergelib.models.ResNet20` (any width),
    :class:`~mergelib.models.ViT` and :class:`~mergelib.models.Classifier` around one of them (the
    task head then reads the backbone's output group). ``tie_heads`` (ViT): share one head-level
    permutation between q/k and v (exact; see the module docstring). Any other module type raises
    ``TypeError`` naming it.
    """
    if isinstance(model, Classifier):
        spec = permutation_spec(model.backbone, tie_heads)
        return _with_head(spec, model, prefix="backbone.")
    if isinstance(model, MLP):
        return _mlp_spec(model)
    if isinstance(model, ResNet20):
        return _resnet20_spec(model)
    if isinstance(model, ViT):
        return _vit_spec(model, tie_heads)
    raise TypeError(f"permutation_spec: unsupported module type {type(model).__name__!r}; supported: "
                    "MLP, ResNet20, ViT, Classifier(<one of these>)")


def _float_shapes(model: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}


def _mlp_spec(model: MLP) -> PermutationSpec:
    groups = {}
    n_layers = len(model.layers)
    for i, layer in enumerate(model.layers):
        name = f"layers.{i}"
        nxt = f"layers.{i + 1}" if i + 1 < n_layers else "head"
        groups[name] = PermGroup(
            name, layer.out_features,
            members=[Member(f"{name}.weight", 0), Member(f"{name}.bias", 0),
                     Member(f"{nxt}.weight", 1, "in")],
            observations=[Observation(name, act="relu")])
    return PermutationSpec(groups, _float_shapes(model), "MLP", nodes=[f"layers.{i}" for i in range(n_layers)])


def _bn(prefix: str, index: torch.Tensor | None = None) -> list[Member]:
    return [Member(f"{prefix}.{p}", 0, "out", index) for p in ("weight", "bias", "running_mean", "running_var")]


def _resnet20_spec(model: ResNet20) -> PermutationSpec:
    w1, w2, w3 = model.widths
    widths = {1: w1, 2: w2, 3: w3}
    # idx[g][s]: positions of the units of stream group g (born in stage g) in the stage-s stream.
    idx: dict[int, dict[int, torch.Tensor]] = {1: {1: torch.arange(w1)}, 2: {}, 3: {}}
    for s in (2, 3):
        pad = widths[s] // 4
        for g in range(1, s):
            idx[g][s] = idx[g][s - 1] + pad
        idx[s][s] = torch.cat([torch.arange(pad), torch.arange(pad + widths[s - 1], widths[s])])

    groups: dict[str, PermGroup] = {}
    streams = {g: PermGroup(f"stream{g}", len(idx[g][g])) for g in (1, 2, 3)}

    def stream_members(stage: int, make) -> None:
        for g in range(1, stage + 1):
            streams[g].members.extend(make(idx[g][stage]))

    def stream_obs(stage: int, module: str, act: str | None) -> None:
        for g in range(1, stage + 1):
            streams[g].observations.append(Observation(module, act=act, index=idx[g][stage]))

    stream_members(1, lambda ix: [Member("conv1.weight", 0, "out", ix), *_bn("bn1", ix)])
    stream_obs(1, "bn1", "relu")
    nodes = ["bn1"]
    for s in (1, 2, 3):
        for b in range(3):
            blk = f"layer{s}.{b}"
            in_stage = s - 1 if (b == 0 and s > 1) else s
            stream_members(in_stage, lambda ix: [Member(f"{blk}.conv1.weight", 1, "in", ix)])
            groups[f"{blk}.conv1"] = PermGroup(
                f"{blk}.conv1", widths[s],
                members=[Member(f"{blk}.conv1.weight", 0), *_bn(f"{blk}.bn1"),
                         Member(f"{blk}.conv2.weight", 1, "in")],
                observations=[Observation(f"{blk}.bn1", act="relu")])
            stream_members(s, lambda ix: [Member(f"{blk}.conv2.weight", 0, "out", ix), *_bn(f"{blk}.bn2", ix)])
            stream_obs(s, blk, None)  # the block output is already post-ReLU
            nodes.append(blk)
    stream_members(3, lambda ix: [Member("linear.weight", 1, "in", ix)])
    groups = {**{g.name: g for g in streams.values()}, **groups}
    return PermutationSpec(groups, _float_shapes(model), "ResNet20", nodes=nodes)


def _vit_spec(model: ViT, tie_heads: bool) -> PermutationSpec:
    d, heads = model.dim, model.config["heads"]
    res = PermGroup("residual", d, members=[
        Member("patch_embed.proj.weight", 0), Member("patch_embed.proj.bias", 0),
        Member("cls_token", 2), Member("pos_embed", 2)])
    groups: dict[str, PermGroup] = {"residual": res}
    q, k, v = (torch.arange(i * d, (i + 1) * d) for i in range(3))
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        res.members += [Member(f"{p}.norm1.weight", 0), Member(f"{p}.norm1.bias", 0),
                        Member(f"{p}.attn.qkv.weight", 1, "in"),
                        Member(f"{p}.attn.proj.weight", 0), Member(f"{p}.attn.proj.bias", 0),
                        Member(f"{p}.norm2.weight", 0), Member(f"{p}.norm2.bias", 0),
                        Member(f"{p}.mlp.fc1.weight", 1, "in"),
                        Member(f"{p}.mlp.fc2.weight", 0), Member(f"{p}.mlp.fc2.bias", 0)]
        res.observations.append(Observation(p))
        qk = f"{p}.attn.qk"
        groups[qk] = PermGroup(qk, d, heads=heads, members=[
            Member(f"{p}.attn.qkv.weight", 0, "out", q), Member(f"{p}.attn.qkv.bias", 0, "out", q),
            Member(f"{p}.attn.qkv.weight", 0, "out", k), Member(f"{p}.attn.qkv.bias", 0, "out", k)],
            observations=[Observation(f"{p}.attn.qkv", index=q), Observation(f"{p}.attn.qkv", index=k)])
        groups[f"{p}.attn.v"] = PermGroup(f"{p}.attn.v", d, heads=heads, head_tie=qk if tie_heads else None,
                                          members=[Member(f"{p}.attn.qkv.weight", 0, "out", v),
                                                   Member(f"{p}.attn.qkv.bias", 0, "out", v),
                                                   Member(f"{p}.attn.proj.weight", 1, "in")],
                                          observations=[Observation(f"{p}.attn.proj", hook="input")])
        groups[f"{p}.mlp"] = PermGroup(f"{p}.mlp", blk.mlp.fc1.out_features, members=[
            Member(f"{p}.mlp.fc1.weight", 0), Member(f"{p}.mlp.fc1.bias", 0),
            Member(f"{p}.mlp.fc2.weight", 1, "in")],
            observations=[Observation(f"{p}.mlp.fc1", act="gelu")])
    res.members += [Member("norm.weight", 0), Member("norm.bias", 0)]
    res.observations.append(Observation("norm"))
    return PermutationSpec(groups, _float_shapes(model), "ViT")


def _with_head(spec: PermutationSpec, model: Classifier, prefix: str) -> PermutationSpec:
    """Prefix a backbone spec and let ``head.weight`` read the backbone's output features."""
    groups = {}
    for g in spec.groups.values():
        members = [Member(prefix + m.key, m.axis, m.role, m.index) for m in g.members]
        obs = [Observation(prefix + o.module, o.hook, o.act, o.index) for o in g.observations]
        groups[g.name] = PermGroup(g.name, g.size, members, obs, g.heads, g.head_tie)
    # A ViT backbone returns residual-stream features; MLP and ResNet20 return their own logits, so
    # a head on top of them reads no permuted units.
    if spec.model == "ViT":
        groups["residual"].members.append(Member("head.weight", 1, "in"))
    shapes = {prefix + k: v for k, v in spec.shapes.items()}
    shapes.update({k: v for k, v in _float_shapes(model).items() if k.startswith("head.")})
    return PermutationSpec(groups, shapes, spec.model, [prefix + n for n in spec.nodes])


# ----------------------------------------------------------------------------------------------
# Reshaping helpers (a 3-D transpose: multi-threaded 4-D movedim copies are slow on small CPUs)
# ----------------------------------------------------------------------------------------------
def to_rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(..., n, ...) -> (n, rest): row i holds every entry whose index along ``axis`` is i."""
    pre = math.prod(t.shape[:axis])
    return t.reshape(pre, t.shape[axis], -1).transpose(0, 1).reshape(t.shape[axis], -1)


def from_rows(rows: torch.Tensor, axis: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_rows` for a tensor of ``shape`` (with ``rows.shape[0]`` at ``axis``)."""
    shape = list(shape)
    shape[axis] = rows.shape[0]
    pre = math.prod(shape[:axis])
    return rows.reshape(rows.shape[0], pre, -1).transpose(0, 1).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Permutations
# ----------------------------------------------------------------------------------------------
def identity_permutation(spec: PermutationSpec) -> Perm:
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator) -> Perm:
    """A uniformly random valid permutation (head-aware groups move whole heads; ties share them)."""
    perm: Perm = {}
    head_perms: dict[str, torch.Tensor] = {}
    for unit in spec.units():
        anchor = spec.groups[unit[0]].head_tie or unit[0]
        for name in unit:
            g = spec.groups[name]
            if g.heads == 1:
                perm[name] = torch.randperm(g.size, generator=generator)
                continue
            hs = g.size // g.heads
            if anchor not in head_perms:
                head_perms[anchor] = torch.randperm(g.heads, generator=generator)
            within = [torch.randperm(hs, generator=generator) for _ in range(g.heads)]
            perm[name] = torch.cat([int(h) * hs + within[j] for j, h in enumerate(head_perms[anchor])])
    return perm


def invert_permutation(perm: Perm) -> Perm:
    return {k: torch.argsort(p) for k, p in perm.items()}


def check_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``perm`` is a valid permutation for ``spec`` (heads and ties too)."""
    if set(perm) != set(spec.groups):
        raise ValueError(f"permutation groups differ from the spec: missing {sorted(set(spec.groups) - set(perm))}, "
                         f"unexpected {sorted(set(perm) - set(spec.groups))}")
    for name, g in spec.groups.items():
        p = torch.as_tensor(perm[name]).cpu()
        if p.shape != (g.size,) or not torch.equal(torch.sort(p).values, torch.arange(g.size)):
            raise ValueError(f"perm[{name!r}] is not a permutation of {g.size} units")
        if g.heads > 1:
            hs = g.size // g.heads
            blocks = (p // hs).view(g.heads, hs)
            if not (blocks == blocks[:, :1]).all():
                raise ValueError(f"perm[{name!r}] splits an attention head")
            if g.head_tie is not None:
                t = (torch.as_tensor(perm[g.head_tie]).cpu() // hs).view(g.heads, hs)[:, 0]
                if not torch.equal(t, blocks[:, 0]):
                    raise ValueError(f"perm[{name!r}] moves heads differently from {g.head_tie!r}")


def _full_index(spec: PermutationSpec, ms: list[tuple[str, Member]], perm: Mapping[str, torch.Tensor],
                size: int) -> torch.Tensor:
    full = torch.arange(size)
    for gname, m in ms:
        idx = spec.member_index(m)
        full[idx] = idx[torch.as_tensor(perm[gname]).cpu()]
    return full


def permute_tensor(spec: PermutationSpec, key: str, tensor: torch.Tensor, perm: Mapping[str, torch.Tensor],
                   skip_axis: int | None = None, axis_members=None) -> torch.Tensor:
    """Apply ``perm`` to every grouped axis of state-dict tensor ``key`` (except ``skip_axis``)."""
    axis_members = axis_members if axis_members is not None else spec.axis_members()
    for axis in range(tensor.dim()):
        ms = axis_members.get((key, axis))
        if ms and axis != skip_axis:
            full = _full_index(spec, ms, perm, tensor.shape[axis]).to(tensor.device)
            tensor = tensor.index_select(axis, full)
    return tensor


def apply_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor],
                      state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute a state dict: ``new[idx[i]] = old[idx[perm[g][i]]]`` on every member of every group.

    Raises ``KeyError`` naming any floating-point tensor of ``state_dict`` the spec does not cover and
    any spec tensor missing from ``state_dict``; ``ValueError`` on a shape mismatch or an invalid
    ``perm``. Non-float tensors (``num_batches_tracked``) are passed through. Returns a new dict.
    """
    check_state_dict(spec, state_dict)
    check_permutation(spec, perm)
    am = spec.axis_members()
    return {k: permute_tensor(spec, k, v, perm, axis_members=am) if k in spec.shapes else v
            for k, v in state_dict.items()}


def check_state_dict(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    extra = sorted(k for k, v in state_dict.items() if v.is_floating_point() and k not in spec.shapes)
    if extra:
        raise KeyError(f"state dict has float tensors the permutation spec does not cover: {extra}")
    missing = sorted(set(spec.shapes) - set(state_dict))
    if missing:
        raise KeyError(f"permutation spec tensors missing from the state dict: {missing}")
    for k, shape in spec.shapes.items():
        if tuple(state_dict[k].shape) != shape:
            raise ValueError(f"tensor {k!r} has shape {tuple(state_dict[k].shape)}, spec expects {shape}")


# ----------------------------------------------------------------------------------------------
# Solving one unit (a group, or head-aware groups tied together) from similarity matrices
# ----------------------------------------------------------------------------------------------
def solve_units(spec: PermutationSpec, unit: Sequence[str], sims: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Maximise sum_g <P_g, sims[g]> over valid permutations of the groups of one unit.

    ``sims[g]``: (n, n) similarity, rows = units of A, columns = units of B. A plain group is one
    LAP. Head-aware groups use group align (METHODS.md §13.6): for every head pair (j, k) a
    within-head LAP on ``sims[g][j-block, k-block]``; the matched values, summed over the tied
    groups, fill an H x H matrix; a LAP on it picks the head assignment, composed with the
    within-head solutions.
    """
    from .lap import solve_lap

    g0 = spec.groups[unit[0]]
    if g0.heads == 1:
        assert len(unit) == 1
        return {unit[0]: solve_lap(sims[unit[0]])[0]}
    H, hs = g0.heads, g0.size // g0.heads
    head_score = torch.zeros(H, H, dtype=torch.float64)
    within: dict[tuple[str, int, int], torch.Tensor] = {}
    for name in unit:
        S = sims[name].double().cpu()
        for j in range(H):
            for k in range(H):
                p, val = solve_lap(S[j * hs:(j + 1) * hs, k * hs:(k + 1) * hs])
                within[name, j, k] = p + k * hs
                head_score[j, k] += val
    sigma, _ = solve_lap(head_score)
    return {name: torch.cat([within[name, j, int(sigma[j])] for j in range(H)]) for name in unit}

