"""FREE-Merging routing: routers and the multi-task :class:`FreeMergedModel`.

A FREE-merged model is one merged backbone (``merged_sd``), one lightweight expert per task
(:mod:`mergelib.experts`) and one head per task. For each input, a router picks the task; the input
then runs through the backbone with that task's expert applied and through that task's head.

* :class:`OracleRouter` -- the task id is given (upper bound on routing).
* :class:`MLPRouter` / :func:`train_router` -- a small MLP on the merged backbone's features
  (:func:`merged_features`), trained on a few labelled samples per task; hard top-1 or soft (softmax
  weights over experts). FREE's ViT router is an image classifier whose training data are not released
  (METHODS.md 6, [OPEN]); the RoBERTa router is an MLP on the merged model's pooled features, as here.
* :func:`routing_accuracy` -- fraction of samples routed to their true task.
* :class:`FreeMergedModel` -- ``forward(x, task=None)`` groups samples by routed task, applies each
  task's expert on the fly (no model copy per task) and returns padded logits + routed task ids.

Typical use (``tv[t]`` raw task vectors, ``fr[t]`` their FR-filtered versions, ``merged`` the FR-merged
backbone state dict, ``heads[t]`` the task heads, ``x_few[t]`` a few labelled images per task)::

    from mergelib import experts as ex, routing as rt
    experts = {t: ex.extract_expert(tv[t], k=0.01, rescale="official", filtered_tv=fr[t]) for t in tasks}
    feats = {t: rt.merged_features(vit, merged, x_few[t]) for t in tasks}
    router = rt.train_router(feats, seed=0)
    model = rt.FreeMergedModel(vit, merged, experts, heads, router, mode="add", lam_e=1.0)
    out = model(images)                    # out.logits (B, C_max), out.task_ids (B,)
    labels, task_ids = model.predict(images)
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .experts import APPLY_MODES, Expert, LowRankExpert, SparseExpert, check_state_dict
from .experts.trained import _resolve_device
from .utils import minibatch_indices, progress_bar

__all__ = [
    "Routing",
    "RoutedOutput",
    "Router",
    "OracleRouter",
    "MLPRouter",
    "train_router",
    "routing_accuracy",
    "merged_features",
    "FreeMergedModel",
]


class Routing(NamedTuple):
    """A router's decision for a batch of B samples.

    ``indices``: ``(B,)`` int64, the chosen task per sample (index into ``router.tasks``);
    ``weights``: ``(B, T)`` mixture weights over the T tasks (rows sum to 1) for soft routing, else None.
    """

    indices: Tensor
    weights: Tensor | None = None


class RoutedOutput(NamedTuple):
    """Output of :meth:`FreeMergedModel.forward` for B samples.

    ``logits``: ``(B, C_max)``; row b holds the logits of its routed task's head in columns
    ``[0, num_classes[b])`` and ``pad_value`` (default ``-inf``) after them, so ``argmax``, ``softmax``
    and ``cross_entropy`` over a row behave as over the head's own classes.
    ``task_ids``: ``(B,)`` int64 index into ``model.tasks``. ``num_classes``: ``(B,)`` int64.
    """

    logits: Tensor
    task_ids: Tensor
    num_classes: Tensor

    def per_sample(self) -> list[Tensor]:
        """The logits of each sample without padding: a list of B tensors ``(num_classes[b],)``."""
        return [row[:int(c)] for row, c in zip(self.logits, self.num_classes)]


def _task_indices(task, tasks: Sequence[str], batch: int, device: torch.device) -> Tensor:
    """A task name, a list of B names, or a (B,) integer tensor -> (B,) int64 indices into ``tasks``."""
    lookup = {t: i for i, t in enumerate(tasks)}

    def one(name) -> int:
        if name not in lookup:
            raise ValueError(f"unknown task {name!r}; known tasks: {list(tasks)}")
        return lookup[name]

    if isinstance(task, str):
        return torch.full((batch,), one(task), dtype=torch.long, device=device)
    if isinstance(task, Tensor):
        if task.is_floating_point() or task.dim() != 1 or task.shape[0] != batch:
            raise ValueError(f"task ids must be a ({batch},) integer tensor, got {task.dtype} "
                             f"{tuple(task.shape)}")
        if batch and (int(task.min()) < 0 or int(task.max()) >= len(tasks)):
            raise ValueError(f"task ids must lie in [0, {len(tasks) - 1}] (tasks: {list(tasks)})")
        return task.to(device=device, dtype=torch.long)
    names = list(task)
    if len(names) != batch:
        raise ValueError(f"got {len(names)} task names for a batch of {batch}")
    return torch.tensor([one(t) for t in names], dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Base class: ``route(features, task=None) -> Routing`` over the task names ``self.tasks``."""

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        tasks = list(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"tasks must be distinct strings, got {tasks!r}")
        self.tasks = tasks

    def route(self, features: Tensor, task=None) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class OracleRouter(Router):
    """Routes every sample to the task it is told: ``route(features, task)`` with ``task`` a name, a
    list of B names or a ``(B,)`` tensor of indices. The upper bound for any learned router."""

    def route(self, features: Tensor, task=None) -> Routing:
        if task is None:
            raise ValueError("OracleRouter needs the task of every sample (task=...)")
        return Routing(_task_indices(task, self.tasks, features.shape[0], features.device))


class MLPRouter(Router):
    """An MLP task classifier on backbone features: ``(B, D) -> logits (B, T)``.

    Features are standardised with the training mean/std (buffers), then
    ``Linear(D, hidden) -> ReLU -> Linear(hidden, T)``. ``soft=False``: hard top-1 routing;
    ``soft=True``: ``route`` also returns ``softmax(logits / temperature)`` as mixture weights.
    """

    def __init__(self, in_dim: int, tasks: Sequence[str], hidden: int = 256, soft: bool = False,
                 temperature: float = 1.0):
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.in_dim, self.soft, self.temperature = int(in_dim), bool(soft), float(temperature)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(self.tasks)))

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"router expects features (B, {self.in_dim}), got {tuple(features.shape)}")
        return self.net((features - self.mean) / self.std)

    def route(self, features: Tensor, task=None) -> Routing:
        logits = self(features)
        weights = torch.softmax(logits.float() / self.temperature, dim=1) if self.soft else None
        return Routing(logits.argmax(dim=1), weights)


def train_router(features_per_task: Mapping[str, Tensor], *, hidden: int = 256, steps: int = 300,
                 lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 1e-4, soft: bool = False,
                 temperature: float = 1.0, seed: int = 0, generator: torch.Generator | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> MLPRouter:
    """Train an :class:`MLPRouter` to predict the task from backbone features.

    Args:
        features_per_task: task name -> ``(n_t, D)`` features of a few labelled samples of that task
            (e.g. :func:`merged_features` of the merged backbone); the task order of the dict is the
            router's ``tasks``.
        steps, lr, batch_size, weight_decay: AdamW on cross-entropy; minibatches drawn without
            replacement per epoch from ``generator`` (or ``torch.Generator().manual_seed(seed)``), which
            also initialises the MLP.
        soft, temperature: see :class:`MLPRouter`.
        device: default: the device of the features.

    Returns:
        the router in eval mode on ``device``.
    """
    if not features_per_task:
        raise ValueError("features_per_task is empty")
    tasks = list(features_per_task)
    feats = [torch.as_tensor(features_per_task[t]) for t in tasks]
    dims = {f.shape[1] if f.dim() == 2 else None for f in feats}
    if len(dims) != 1 or None in dims or any(f.shape[0] == 0 for f in feats):
        raise ValueError("features_per_task must map every task to a non-empty (n_t, D) tensor, same D")
    dev = feats[0].device if device is None else _resolve_device(device, {"x": feats[0]})
    x = torch.cat([f.detach().float() for f in feats]).to(dev)
    y = torch.cat([torch.full((f.shape[0],), i, dtype=torch.long) for i, f in enumerate(feats)]).to(dev)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    router = MLPRouter(x.shape[1], tasks, hidden, soft, temperature)
    with torch.no_grad():
        for p in router.net.parameters():  # seeded init, independent of the global RNG
            if p.dim() == 2:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            else:
                p.zero_()
        router.mean.copy_(x.mean(0).cpu())
        router.std.copy_(x.std(0).clamp_min(1e-6).cpu() if x.shape[0] > 1 else torch.ones(x.shape[1]))
    router.to(dev).train()
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    for idx in progress_bar(minibatch_indices(x.shape[0], batch_size, steps, gen), total=steps,
                            desc="train router", disable=not progress, leave=False):
        idx = idx.to(dev)
        loss = F.cross_entropy(router(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return router.eval()


@torch.no_grad()
def routing_accuracy(router: Router, features: Tensor | Mapping[str, Tensor], task_ids=None) -> float:
    """Fraction of samples that ``router`` sends to their true task.

    ``features``: ``(B, D)`` with ``task_ids`` a list of B task names or a ``(B,)`` tensor of indices
    into ``router.tasks``; or a dict task -> ``(n_t, D)`` features (then ``task_ids`` is omitted).
    """
    if isinstance(features, Mapping):
        if task_ids is not None:
            raise ValueError("pass either a dict of features per task or features and task_ids")
        names = [t for t, f in features.items() for _ in range(f.shape[0])]
        return routing_accuracy(router, torch.cat(list(features.values())), names)
    if task_ids is None:
        raise ValueError("task_ids are needed with a features tensor")
    truth = _task_indices(task_ids, router.tasks, features.shape[0], features.device)
    if features.shape[0] == 0:
        return float("nan")
    pred = router.route(features, task=truth).indices
    return float((pred == truth).float().mean())


@torch.no_grad()
def merged_features(backbone_module: nn.Module, merged_sd: Mapping[str, Tensor], x: Tensor,
                    batch_size: int = 256, device: str | torch.device | None = None) -> Tensor:
    """Features ``(N, D)`` of the merged backbone on inputs ``x`` ``(N, ...)``, in eval mode, batched,
    via ``functional_call`` (the module's own weights are not used). Returned on ``device`` (default:
    the device of ``merged_sd``)."""
    check_state_dict(backbone_module, merged_sd)
    dev = _resolve_device(device, merged_sd)
    sd = {k: v.to(dev) for k, v in merged_sd.items()}
    was_training = backbone_module.training
    backbone_module.eval()
    try:
        return torch.cat([functional_call(backbone_module, sd, (x[i:i + batch_size].to(dev),))
                          for i in range(0, x.shape[0], batch_size)])
    finally:
        backbone_module.train(was_training)


# ----------------------------------------------------------------------------------------------
# The routed multi-task model
# ----------------------------------------------------------------------------------------------
class _ExpertPatches(nn.Module):
    """One task's expert, ready to apply, held as buffers (they follow ``.to()`` and are in the state dict).

    Patch ``j`` touches backbone tensor ``keys[j]``, seen as a ``grids[j] = (rows, cols)`` grid:

    * sparse: ``idx{j}`` ``(rows, kk)`` column indices and ``val{j}`` the values the parameter takes
      on that support (``param[S] := val``, precomputed: ``merged + lam_e * e`` or, for ``"replace"``,
      ``theta0 + lam_e * e``);
    * low rank: ``b{j}`` ``(rows, r)`` (``lam_e`` folded in) and ``a{j}`` ``(r, cols)``: ``param += b @ a``.
    """

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []
        self.kinds: list[str] = []
        self.grids: list[tuple[int, int]] = []

    def add(self, key: str, kind: str, grid: tuple[int, int], first: Tensor, second: Tensor) -> None:
        j = len(self.keys)
        names = ("idx", "val") if kind == "sparse" else ("b", "a")
        self.register_buffer(f"{names[0]}{j}", first)
        self.register_buffer(f"{names[1]}{j}", second)
        self.keys.append(key)
        self.kinds.append(kind)
        self.grids.append(grid)

    def patches(self) -> Iterator[tuple[str, str, tuple[int, int], Tensor, Tensor]]:
        for j, (key, kind, grid) in enumerate(zip(self.keys, self.kinds, self.grids)):
            names = ("idx", "val") if kind == "sparse" else ("b", "a")
            yield key, kind, grid, getattr(self, f"{names[0]}{j}"), getattr(self, f"{names[1]}{j}")


def _add_delta_(kind: str, first: Tensor, second: Tensor, buf2d: Tensor, merged2d: Tensor, w: float) -> None:
    """buf2d += w * (patched - merged) for one patch (sparse: on its support; low rank: b @ a)."""
    if kind == "sparse":
        idx = first.long()
        buf2d.scatter_add_(1, idx, w * (second - merged2d.gather(1, idx)))
    else:
        buf2d.addmm_(first.to(buf2d.dtype), second.to(buf2d.dtype), alpha=w)


class FreeMergedModel(nn.Module):
    """A FREE-merged multi-task model: merged backbone + one expert and one head per task + a router.

    An ordinary ``nn.Module``: it owns copies of everything it uses (the caller's backbone module,
    heads and router are never modified or moved), ``.to()`` moves all of it, and ``state_dict()``
    holds the merged backbone (``backbone.*``), the experts (``experts.<t>.*``), the heads and the
    router, so ``load_state_dict`` into a model built with the same structure restores it exactly.

    Args:
        backbone_module: the backbone (e.g. ``mergelib.models.ViT``); a copy of it is made and loaded
            with ``merged_sd`` -- one copy of the merged weights in all, never one per task.
        merged_sd: the merged backbone ``theta0 + lam_b * s`` (keys/shapes must match the module).
        experts: task -> :class:`~mergelib.experts.SparseExpert` / :class:`~mergelib.experts.LowRankExpert`.
        heads: task -> head module (``nn.Linear``); same tasks as ``experts``. Task order = ``experts``.
        router: a :class:`Router` over the same tasks (any order) or None (then ``task`` is required).
        mode: ``"add"`` (paper): params = merged + lam_e * e; ``"replace"`` (official code): on the
            expert's support params = theta0 + lam_e * e, needs ``pretrained_sd``; see
            :func:`mergelib.experts.free_params` (official: ``lam_b = c**2`` in ``merged_sd``, ``lam_e = c``).
        lam_e: expert coefficient, a float or task -> float (trained low-rank experts: 1).
        pretrained_sd: ``theta0``, only read on the experts' supports, for ``mode="replace"``.
        pad_value: fills the logits beyond a head's classes (default ``-inf``).

    How experts are applied: a sparse expert is written *in place* into the model's merged tensors on
    its support (``scatter_``; the new values are precomputed at construction) and the saved entries
    are written back after the group has run, exactly, so a task switch costs ``O(nnz)`` and no memory
    beyond the expert. A low-rank expert writes ``merged + lam_e*B@A`` into one reusable buffer per
    matrix (``O(params of those matrices)``). Soft routing builds, *per sample*, buffers holding
    ``merged + sum_t w_t * delta_t`` for every touched tensor and runs the backbone once per sample:
    cost ``B x (copy of the touched tensors + sum of the experts' sizes + a batch-1 forward)``.
    Measured on a loaded 2-core CPU, one thread, k=0.01, 8 tasks: ViT(dim=192, depth=6, 2.7M params):
    switch (patch + restore) 2.8 ms vs 0.7 s for a forward of 64 images at 32 px; ViT-B/32 shapes
    (87M params, 4.8 MB expert): switch 98 ms vs 3.0 s for a forward of 16 images at 224 px, an
    8-expert soft mix 0.47 s per sample, materialising :func:`~mergelib.experts.free_params` 0.67 s.

    ``forward`` runs under ``torch.no_grad`` (the in-place patches are not autograd-safe).
    """

    def __init__(self, backbone_module: nn.Module, merged_sd: Mapping[str, Tensor],
                 experts: Mapping[str, Expert], heads: Mapping[str, nn.Module], router: Router | None = None,
                 *, mode: str = "add", lam_e: float | Mapping[str, float] = 1.0,
                 pretrained_sd: Mapping[str, Tensor] | None = None, pad_value: float = float("-inf")):
        super().__init__()
        if mode not in APPLY_MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {APPLY_MODES}")
        if not experts:
            raise ValueError("experts is empty")
        tasks = list(experts)
        if set(heads) != set(tasks):
            raise ValueError(f"heads and experts must cover the same tasks: heads without an expert "
                             f"{sorted(set(heads) - set(tasks))}, experts without a head "
                             f"{sorted(set(tasks) - set(heads))}")
        check_state_dict(backbone_module, merged_sd)
        if mode == "replace" and pretrained_sd is None:
            raise ValueError("mode='replace' needs pretrained_sd (theta0 on the experts' supports)")
        lams = {t: float(lam_e[t] if isinstance(lam_e, Mapping) else lam_e) for t in tasks}
        feat_dim = getattr(backbone_module, "dim", None)
        for t in tasks:
            e = experts[t]
            if not isinstance(e, Expert):
                raise TypeError(f"expert for task {t!r} is a {type(e).__name__}, not an Expert")
            e.check_compatible(merged_sd, f"expert for task {t!r}")
            if mode == "replace":
                if not isinstance(e, SparseExpert):
                    raise ValueError(f"expert for task {t!r}: mode='replace' needs a SparseExpert")
                e.check_compatible(pretrained_sd, f"expert for task {t!r}", "pretrained state dict")
            in_f = getattr(heads[t], "in_features", None)
            if isinstance(feat_dim, int) and in_f is not None and in_f != feat_dim:
                raise ValueError(f"head for task {t!r} expects {in_f} features, the backbone gives {feat_dim}")
        if router is not None and set(getattr(router, "tasks", tasks)) != set(tasks):
            raise ValueError(f"router tasks {list(router.tasks)} differ from the experts' tasks {tasks}")

        self.tasks, self.mode, self.lam_e, self.pad_value = tasks, mode, lams, float(pad_value)
        device = next(iter(merged_sd.values())).device
        self.backbone = copy.deepcopy(backbone_module).to(device)
        self.backbone.load_state_dict({k: v.detach() for k, v in merged_sd.items()})
        self.backbone.requires_grad_(False)
        self.heads = nn.ModuleList([copy.deepcopy(heads[t]) for t in tasks]).to(device)
        self.router = copy.deepcopy(router).to(device) if isinstance(router, nn.Module) else copy.deepcopy(router)
        self._router_map = None if router is None else [tasks.index(t) for t in router.tasks]
        merged = self.merged
        self.experts = nn.ModuleList([self._build_patches(experts[t], lams[t], merged, pretrained_sd)
                                      for t in tasks])
        self._scratch: dict[str, Tensor] = {}

    # -- construction helpers --------------------------------------------------------------------
    @torch.no_grad()
    def _build_patches(self, expert: Expert, lam: float, merged: Mapping[str, Tensor],
                       pretrained_sd) -> _ExpertPatches:
        patches = _ExpertPatches()
        if isinstance(expert, SparseExpert):
            for key in expert.keys:
                m = merged[key]
                rows, cols = expert.grid(key)
                idx = expert.indices[key].to(m.device)
                vals = lam * expert.values[key].to(m.device).float()
                base = (pretrained_sd[key] if self.mode == "replace" else m).to(m.device).float()
                set_vals = (base.reshape(rows, cols).gather(1, idx.long()) + vals).to(m.dtype)
                patches.add(key, "sparse", (rows, cols), idx.clone(), set_vals)
        else:
            assert isinstance(expert, LowRankExpert)
            for key, (b, a) in expert.factors.items():
                m = merged[key]
                patches.add(key, "lowrank", (b.shape[0], a.shape[1]), (lam * b).to(m.device), a.to(m.device).clone())
        return patches

    @property
    def merged(self) -> dict[str, Tensor]:
        """The merged backbone tensors (parameters and persistent buffers), shared with the model."""
        return {k: v.detach() for k, v in self.backbone.state_dict(keep_vars=True).items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.merged.values())).device

    # -- applying experts ------------------------------------------------------------------------
    def _buffer(self, key: str, m: Tensor) -> Tensor:
        buf = self._scratch.get(key)
        if buf is None or buf.shape != m.shape or buf.dtype != m.dtype or buf.device != m.device:
            buf = self._scratch[key] = torch.empty_like(m)
        return buf

    @contextlib.contextmanager
    def _patched(self, weights: Mapping[int, float]) -> Iterator[dict[str, Tensor]]:
        """Yield backbone parameters for the mixture ``{task index: weight}`` (hard: ``{t: 1.0}``).

        A key touched by exactly one sparse patch with weight 1 is patched in place and restored
        exactly; every other touched key gets ``merged + sum_t w_t * delta_t`` in a reusable buffer.
        """
        by_key: dict[str, list] = {}
        for t, w in weights.items():
            if w != 0.0:
                for key, kind, grid, first, second in self.experts[t].patches():
                    by_key.setdefault(key, []).append((float(w), kind, grid, first, second))
        merged = self.merged
        params = dict(merged)
        saved: list[tuple[Tensor, Tensor, Tensor]] = []
        try:
            for key, items in by_key.items():
                m2d = merged[key].view(items[0][2])
                if len(items) == 1 and items[0][0] == 1.0 and items[0][1] == "sparse":
                    _, _, _, idx, vals = items[0]
                    idx = idx.long()
                    saved.append((m2d, idx, m2d.gather(1, idx)))
                    m2d.scatter_(1, idx, vals)
                else:
                    buf = self._buffer(key, merged[key])
                    buf2d = buf.view(m2d.shape)
                    buf2d.copy_(m2d)
                    for w, kind, _, first, second in items:
                        _add_delta_(kind, first, second, buf2d, m2d, w)
                    params[key] = buf
            yield params
        finally:
            for m2d, idx, old in reversed(saved):
                m2d.scatter_(1, idx, old)

    def task_params(self, task: str) -> dict[str, Tensor]:
        """A materialised copy of the backbone parameters of one task (equals
        :func:`~mergelib.experts.free_params` when ``merged_sd = theta0 + lam_b * s``)."""
        t = int(_task_indices(task, self.tasks, 1, torch.device("cpu"))[0])
        with torch.no_grad(), self._patched({t: 1.0}) as params:
            return {k: v.clone() for k, v in params.items()}

    def _backbone(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.backbone, dict(params), (x,))

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Features of the merged backbone without any expert (what the router sees): ``(B, D)``."""
        return self._backbone(self.merged, x.to(self.device))

    def _head(self, t: int, feats: Tensor) -> Tensor:
        head = self.heads[t]
        in_f = getattr(head, "in_features", None)
        if in_f is not None and feats.shape[-1] != in_f:
            raise ValueError(f"head for task {self.tasks[t]!r} expects {in_f} features, "
                             f"the backbone gives {feats.shape[-1]}")
        return head(feats)

    # -- public ----------------------------------------------------------------------------------
    @torch.no_grad()
    def route(self, x: Tensor, task=None) -> Routing:
        """Routing of a batch, in *model* task indices: the given ``task`` (a name, B names or a
        ``(B,)`` tensor of indices into ``self.tasks``) or the router's decision on :meth:`features`."""
        x = x.to(self.device)
        if task is not None:
            return Routing(_task_indices(task, self.tasks, x.shape[0], self.device))
        if self.router is None:
            raise ValueError("this model has no router: pass task=...")
        r = self.router.route(self.features(x))
        remap = torch.tensor(self._router_map, device=r.indices.device)
        weights = None
        if r.weights is not None:
            weights = torch.zeros_like(r.weights)
            weights[:, remap] = r.weights
        return Routing(remap[r.indices], weights)

    @torch.no_grad()
    def forward(self, x: Tensor, task=None) -> RoutedOutput:
        """Route each sample, apply its task's expert, run its task's head.

        Args:
            x: ``(B, ...)`` inputs (moved to the model's device).
            task: None (use the router), a task name for the whole batch, B names, or a ``(B,)`` tensor
                of indices into ``self.tasks``. A given task always means hard routing.

        Hard routing runs the backbone once per distinct routed task on that task's samples; soft
        routing (a router with ``soft=True`` and no ``task``) runs it once per sample with the mixed
        parameters ``merged + sum_t w_t * delta_t`` and uses the head of the top-weighted task.

        Returns:
            :class:`RoutedOutput` ``(logits (B, C_max) padded with pad_value, task_ids (B,), num_classes (B,))``.
        """
        x = x.to(self.device)
        r = self.route(x, task)
        ids, batch = r.indices, x.shape[0]
        outs: list[tuple[Tensor, Tensor]] = []  # (sample indices, logits)
        if r.weights is None:
            for t in torch.unique(ids).tolist():
                sel = (ids == t).nonzero(as_tuple=True)[0]
                with self._patched({t: 1.0}) as params:
                    outs.append((sel, self._head(t, self._backbone(params, x[sel]))))
        else:
            for b in range(batch):
                w = {t: v for t, v in enumerate(r.weights[b].tolist())}
                with self._patched(w) as params:
                    feats = self._backbone(params, x[b:b + 1])
                outs.append((torch.tensor([b], device=self.device), self._head(int(ids[b]), feats)))
        width = max((o.shape[1] for _, o in outs), default=0)
        dtype = outs[0][1].dtype if outs else torch.float32
        logits = torch.full((batch, width), self.pad_value, dtype=dtype, device=self.device)
        num_classes = torch.zeros(batch, dtype=torch.long, device=self.device)
        for sel, o in outs:
            logits[sel, :o.shape[1]] = o
            num_classes[sel] = o.shape[1]
        return RoutedOutput(logits, ids, num_classes)

    @torch.no_grad()
    def predict(self, x: Tensor, task=None) -> tuple[Tensor, Tensor]:
        """``(labels (B,), task_ids (B,))``: the argmax class within each sample's routed task."""
        out = self(x, task)
        return out.logits.argmax(dim=1), out.task_ids

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, mode={self.mode!r}"
