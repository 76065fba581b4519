"""FREE-Merging lightweight experts: extraction, trained experts, storage, application.

FREE-Merging (Zheng & Wang, ICCV 2025; METHODS.md section 6) adds to an FR-merged backbone one small
per-task *expert* that restores what the merge lost, plus a router that picks the expert per input
(the router lives in :mod:`mergelib.routing`). This module holds the experts:

* :func:`extract_expert` -- the paper's training-free expert: per row of every tensor, the top
  ``int(cols * k)`` entries of ``|tau|`` of the *raw* task vector, rescaled by a factor ``mu``.
  Stored sparsely as a :class:`SparseExpert` (values + compact row indices).
* :func:`train_expert` -- going beyond the paper: a LoRA-style :class:`LowRankExpert`
  (``delta W = B @ A`` per matrix) trained on a task's data on top of the *frozen* merged backbone and
  the task's frozen head, with ranks chosen so that its bytes fit a budget (e.g. an extracted
  expert's :attr:`SparseExpert.nbytes`).
* :func:`free_params` -- the per-task parameters, in the paper's additive form (``mode="add"``) or the
  official code's replacing form (``mode="replace"``).

Everything works on plain ``dict[str, Tensor]`` state dicts: a task vector is
``finetuned[k] - pretrained[k]``; the FR-filtered task vector and the merged backbone come from
whatever produced them (``mergelib.fourier`` / ``mergelib.merging``). Tensors stay on their device.

Saving uses safetensors: :meth:`Expert.save` writes the tensors of :meth:`Expert.state_dict` and the
JSON of :meth:`Expert.config` (shapes, ``mu``, ``k``...) as metadata, atomically (temporary file in the
same folder, then ``os.replace``); :meth:`Expert.load` / :func:`load_expert` read either kind back.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .utils import atomic_files, progress_bar

__all__ = [
    "Expert",
    "SparseExpert",
    "LowRankExpert",
    "extract_expert",
    "expert_scale",
    "train_expert",
    "allocate_ranks",
    "free_params",
    "load_expert",
    "check_state_dict",
]

RESCALE_MODES = ("official", "paper")
APPLY_MODES = ("add", "replace")
_META_KEY = "mergelib_expert"


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """How a tensor is seen as rows: (prod(shape[:-1]), shape[-1]); 0-D and 1-D tensors are one row."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    return math.prod(shape[:-1]), cols


def _index_dtype(cols: int) -> torch.dtype:
    """The smallest integer dtype that holds a column index in [0, cols - 1]."""
    for dt in (torch.uint8, torch.int16, torch.int32):
        if cols - 1 <= torch.iinfo(dt).max:
            return dt
    return torch.int64


def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not (0.0 < float(k) <= 1.0):
        raise ValueError(f"k must be in (0, 1] (the kept fraction per row), got {k!r}")
    return float(k)


def _shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def check_state_dict(module: nn.Module, sd: Mapping[str, Tensor], what: str = "merged state dict") -> None:
    """Raise ``ValueError`` naming the first tensor where ``sd`` does not fit ``module.state_dict()``.

    Keys must be exactly the module's (parameters and persistent buffers), shapes equal.
    """
    expected = module.state_dict()
    missing, unexpected = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{what} does not fit the backbone {type(module).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{what}: tensor {k!r} has shape {_shape_str(sd[k].shape)}, "
                             f"the backbone expects {_shape_str(v.shape)}")


def _select_keys(sd: Mapping[str, Tensor], keys: Sequence[str] | None, what: str) -> list[str]:
    """Floating-point, non-empty tensors of ``sd`` (all of them, or ``keys`` checked to exist)."""
    if keys is None:
        return [k for k, v in sd.items() if v.is_floating_point() and v.numel() > 0]
    out = []
    for k in keys:
        if k not in sd:
            raise ValueError(f"key {k!r} is not in the {what}")
        if not sd[k].is_floating_point():
            raise ValueError(f"tensor {k!r} of the {what} is not floating point ({sd[k].dtype})")
        out.append(k)
    return out


def _mean_over_keys(per_key: list[Tensor]) -> float:
    return float(torch.stack([t.double() for t in per_key]).mean()) if per_key else float("nan")


# ----------------------------------------------------------------------------------------------
# Expert containers
# ----------------------------------------------------------------------------------------------
class Expert:
    """Base class of per-task experts: a parameter *delta* on some tensors of a backbone.

    Subclasses store their tensors compactly; all of them offer
    ``keys`` (tuple of state-dict keys touched), ``shapes`` (key -> full tensor shape),
    ``nbytes`` (exact bytes of the stored tensors, i.e. ``sum(t.nbytes for t in state_dict().values())``),
    :meth:`to_dense` (key -> dense delta of the full shape), :meth:`to`, :meth:`state_dict` /
    :meth:`config` / :meth:`from_state_dict`, :meth:`save` / :meth:`load`.
    """

    kind: str = ""
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any]

    # -- interface ---------------------------------------------------------------------------
    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def state_dict(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _from_parts(cls, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> "Expert":  # pragma: no cover
        raise NotImplementedError

    def to_dense(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _map_tensors(self, fn) -> "Expert":  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared behaviour --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Exact storage in bytes: the sum of the stored tensors' bytes (shapes and scalars excluded)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def device(self) -> torch.device:
        for t in self.state_dict().values():
            return t.device
        return torch.device("cpu")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Expert":
        """A copy on ``device``; ``dtype`` casts the floating-point tensors only (indices stay integer)."""
        def fn(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return self._map_tensors(fn)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> "Expert":
        """Rebuild from :meth:`state_dict` and :meth:`config`; ``Expert.from_state_dict`` dispatches on
        ``config["kind"]``, a subclass checks that the kind is its own."""
        kind = config.get("kind")
        klass = _KINDS.get(kind)
        if klass is None:
            raise ValueError(f"unknown expert kind {kind!r}; known: {sorted(_KINDS)}")
        if cls is not Expert and klass is not cls:
            raise ValueError(f"this is a {kind!r} expert, not a {cls.kind!r} one; use Expert.load")
        return klass._from_parts(state, config)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file atomically (temporary file in the same folder, then ``os.replace``)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_files(path) as (tmp,):
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(self.config())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Expert":
        """Read a file written by :meth:`save`; ``Expert.load`` returns whichever kind it holds."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expert file not found: {path}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if _META_KEY not in meta:
                raise ValueError(f"{path}: not a mergelib expert file (no {_META_KEY!r} metadata)")
            state = {k: f.get_tensor(k) for k in f.keys()}
        expert = cls.from_state_dict(state, json.loads(meta[_META_KEY]))
        return expert.to(device)

    def check_compatible(self, sd: Mapping[str, Tensor], what: str = "expert",
                         sd_name: str = "merged state dict") -> None:
        """Raise ``ValueError`` naming the tensor if a key is missing from ``sd`` or its shape differs."""
        for key, shape in self.shapes.items():
            if key not in sd:
                raise ValueError(f"{what}: tensor {key!r} is not in the {sd_name} "
                                 "(was it built for another backbone?)")
            if tuple(sd[key].shape) != tuple(shape):
                raise ValueError(f"{what}: tensor {key!r} has shape {_shape_str(shape)} but the {sd_name} "
                                 f"has {_shape_str(sd[key].shape)} (was it built for another backbone?)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.shapes)} tensors, {self.nbytes:,} bytes"
                f"{self._repr_extra()})")

    def _repr_extra(self) -> str:
        return ""


class SparseExpert(Expert):
    """A sparse expert: per row of each tensor, ``kk`` kept entries (values and column indices).

    Each tensor of shape ``S`` is seen as ``rows x cols`` with ``cols = S[-1]`` and
    ``rows = prod(S[:-1])`` (1-D and 0-D tensors are a single row). For every key:

    * ``values[key]``: ``(rows, kk)`` floating point, the (already rescaled) expert values ``mu * tau``;
    * ``indices[key]``: ``(rows, kk)`` column indices, sorted within a row, in the smallest integer
      dtype that fits ``cols - 1`` (uint8 for cols <= 256, int16 up to 32768, then int32, int64).

    ``nbytes = sum_key rows*kk*(value bytes + index bytes)`` exactly. ``mu`` and ``k`` are recorded
    for reference (``mu`` is already applied to ``values``).
    """

    kind = "sparse"

    def __init__(self, values: Mapping[str, Tensor], indices: Mapping[str, Tensor],
                 shapes: Mapping[str, Sequence[int]], *, mu: float = 1.0, k: float | None = None,
                 meta: Mapping[str, Any] | None = None):
        if set(values) != set(shapes) or set(indices) != set(shapes):
            raise ValueError("values, indices and shapes must have the same keys")
        self.shapes = {key: tuple(int(s) for s in shapes[key]) for key in shapes}
        self.values: dict[str, Tensor] = {}
        self.indices: dict[str, Tensor] = {}
        for key, shape in self.shapes.items():
            v, i = values[key], indices[key]
            rows, cols = _rows_cols(shape)
            if v.dim() != 2 or v.shape[0] != rows or tuple(i.shape) != tuple(v.shape):
                raise ValueError(f"tensor {key!r}: values {_shape_str(v.shape)} and indices "
                                 f"{_shape_str(i.shape)} must both be (rows={rows}, kk)")
            if not v.is_floating_point() or i.is_floating_point() or i.dtype == torch.bool:
                raise ValueError(f"tensor {key!r}: values must be floating point and indices integer")
            if i.numel() and (int(i.min()) < 0 or int(i.max()) >= cols):
                raise ValueError(f"tensor {key!r}: column indices must lie in [0, {cols - 1}]")
            self.values[key], self.indices[key] = v, i
        self.mu = float(mu)
        self.k = None if k is None else float(k)
        self.meta = dict(meta or {})

    # -- storage ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """``{"<key>::values": (rows, kk), "<key>::indices": (rows, kk)}`` for every key."""
        out: dict[str, Tensor] = {}
        for key in self.shapes:
            out[f"{key}::values"] = self.values[key]
            out[f"{key}::indices"] = self.indices[key]
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "shapes": {k: list(s) for k, s in self.shapes.items()},
                "mu": self.mu, "k": self.k, "meta": self.meta}

    @classmethod
    def _from_parts(cls, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> "SparseExpert":
        shapes = config["shapes"]
        try:
            values = {k: state[f"{k}::values"] for k in shapes}
            indices = {k: state[f"{k}::indices"] for k in shapes}
        except KeyError as e:
            raise ValueError(f"sparse expert state is missing {e.args[0]!r}") from None
        return cls(values, indices, shapes, mu=config.get("mu", 1.0), k=config.get("k"),
                   meta=config.get("meta"))

    def _map_tensors(self, fn) -> "SparseExpert":
        return SparseExpert({k: fn(v) for k, v in self.values.items()},
                            {k: fn(i) for k, i in self.indices.items()},
                            self.shapes, mu=self.mu, k=self.k, meta=self.meta)

    # -- views -----------------------------------------------------------------------------------
    @property
    def num_stored(self) -> int:
        """Number of kept entries over all tensors."""
        return sum(v.numel() for v in self.values.values())

    def density(self, key: str | None = None) -> float:
        """Kept entries / all entries, over all tensors or for one ``key``."""
        keys = self.shapes if key is None else [key]
        total = sum(math.prod(self.shapes[k]) for k in keys)
        kept = sum(self.values[k].numel() for k in keys)
        return kept / total if total else 0.0

    def row_density(self, key: str) -> float:
        """Kept entries per row / cols for one tensor: exactly ``int(cols * k) / cols``."""
        rows, cols = _rows_cols(self.shapes[key])
        return self.values[key].shape[1] / cols

    def to_dense(self) -> dict[str, Tensor]:
        """key -> dense expert tensor of the full shape (zeros off the support)."""
        out = {}
        for key, shape in self.shapes.items():
            rows, cols = _rows_cols(shape)
            v = self.values[key]
            dense = torch.zeros(rows, cols, dtype=v.dtype, device=v.device)
            dense.scatter_(1, self.indices[key].long(), v)
            out[key] = dense.view(shape)
        return out

    def support_mask(self, key: str) -> Tensor:
        """Boolean tensor of the full shape: True where the expert stores an entry."""
        rows, cols = _rows_cols(self.shapes[key])
        idx = self.indices[key].long()
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=idx.device)
        mask.scatter_(1, idx, True)
        return mask.view(self.shapes[key])

    def _repr_extra(self) -> str:
        k = "" if self.k is None else f", k={self.k:g}"
        return f", density={self.density():.4f}{k}, mu={self.mu:.4g}"


class LowRankExpert(Expert):
    """A LoRA-style expert: per matrix, ``delta W = (B @ A).view(shape)``.

    A tensor of shape ``S`` (ndim >= 2) is seen as ``rows x cols`` with ``rows = S[0]`` and
    ``cols = prod(S[1:])`` (for ``nn.Linear`` weights: ``out x in``). For every key:
    ``B``: ``(rows, r)``, ``A``: ``(r, cols)``, rank ``r`` per key (see :func:`allocate_ranks`).
    ``nbytes = sum_key r*(rows+cols)*value bytes``. ``meta`` carries training information
    (``loss_history``, ``ranks``, ``budget_bytes``...), saved as JSON.
    """

    kind = "lowrank"

    def __init__(self, factors: Mapping[str, tuple[Tensor, Tensor]], shapes: Mapping[str, Sequence[int]],
                 *, meta: Mapping[str, Any] | None = None):
        if set(factors) != set(shapes):
            raise ValueError("factors and shapes must have the same keys")
        self.shapes = {key: tuple(int(s) for s in shapes[key]) for key in shapes}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        for key, shape in self.shapes.items():
            b, a = factors[key]
            if len(shape) < 2:
                raise ValueError(f"tensor {key!r}: low-rank experts need tensors with ndim >= 2")
            rows, cols = shape[0], math.prod(shape[1:])
            if b.dim() != 2 or a.dim() != 2 or b.shape[0] != rows or a.shape[1] != cols \
                    or b.shape[1] != a.shape[0]:
                raise ValueError(f"tensor {key!r}: B {_shape_str(b.shape)} and A {_shape_str(a.shape)} "
                                 f"must be (rows={rows}, r) and (r, cols={cols})")
            self.factors[key] = (b, a)
        self.meta = dict(meta or {})

    @property
    def ranks(self) -> dict[str, int]:
        return {k: int(b.shape[1]) for k, (b, _) in self.factors.items()}

    def state_dict(self) -> dict[str, Tensor]:
        """``{"<key>::lora_B": (rows, r), "<key>::lora_A": (r, cols)}`` for every key."""
        out: dict[str, Tensor] = {}
        for key, (b, a) in self.factors.items():
            out[f"{key}::lora_B"], out[f"{key}::lora_A"] = b, a
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "shapes": {k: list(s) for k, s in self.shapes.items()},
                "meta": self.meta}

    @classmethod
    def _from_parts(cls, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> "LowRankExpert":
        shapes = config["shapes"]
        try:
            factors = {k: (state[f"{k}::lora_B"], state[f"{k}::lora_A"]) for k in shapes}
        except KeyError as e:
            raise ValueError(f"low-rank expert state is missing {e.args[0]!r}") from None
        return cls(factors, shapes, meta=config.get("meta"))

    def _map_tensors(self, fn) -> "LowRankExpert":
        return LowRankExpert({k: (fn(b), fn(a)) for k, (b, a) in self.factors.items()}, self.shapes,
                             meta=self.meta)

    def to_dense(self) -> dict[str, Tensor]:
        """key -> dense ``B @ A`` of the full shape."""
        return {k: (b @ a).view(self.shapes[k]) for k, (b, a) in self.factors.items()}

    def _repr_extra(self) -> str:
        return f", ranks={sorted(set(self.ranks.values()))}"


_KINDS: dict[str, type[Expert]] = {"sparse": SparseExpert, "lowrank": LowRankExpert}


def load_expert(path: str | os.PathLike, device: str | torch.device = "cpu") -> Expert:
    """Load a :class:`SparseExpert` or :class:`LowRankExpert` written by :meth:`Expert.save`."""
    return Expert.load(path, device)


# ----------------------------------------------------------------------------------------------
# Training-free expert extraction (FREE-Merging)
# ----------------------------------------------------------------------------------------------
def expert_scale(kept_mean_abs: Sequence[Tensor] | Sequence[float], ref_mean_abs: Sequence[Tensor] | Sequence[float],
                 k: float, rescale: str = "official", lam: float = 1.0) -> float:
    """The rescale factor ``mu`` of a FREE expert from per-key statistics.

    Args:
        kept_mean_abs: per key, ``mean|M|`` -- the mean absolute value of the *dense* masked task
            vector (zeros included), i.e. ``sum|kept values| / numel``.
        ref_mean_abs: per key, ``mean|v|`` of the reference vector (the FR-filtered task vector
            for ``"official"``; see :func:`extract_expert` for ``"paper"``).
        k: kept fraction per row, in (0, 1].
        rescale: ``"official"`` -- ``utils.cal_rescaling`` of the official code:
            ``mu = -log10(k) * m_top / E`` with ``m_top = mean_keys(mean|M|) / k`` (the mean magnitude
            of the kept entries) and ``E = mean_keys(mean|FR(tau)|)``;
            ``"paper"`` -- ``mu = -E(M) * ln(k) / (lam * E(v))`` with ``E(M) = mean_keys(mean|M|)`` and
            ``E(v) = mean_keys(mean|v|)``.
        lam: the task's merge coefficient lambda_i (paper form only).

    Both vanish at ``k = 1`` (log 1 = 0). **[OPEN]** (METHODS.md 6, 15.3): the paper's log base is
    unstated, it divides by ``lam * E(v)`` and has no ``1/k``; the code uses log10, divides by ``E``
    alone and applies ``1/k``. For k=0.01 the official ``mu`` is ``2 * m_top / E`` (4.9 and 6.8 measured
    on Gaussian task vectors of ViT(dim=192, depth=6) and ViT-B/32 shapes) while the paper form, with
    ``lam = 1`` and the same ``E``, is smaller by the factor ``1 / (k ln 10)`` (43 at k=0.01; about 0.16
    there), which is why both are kept as named modes.
    """
    k = _check_k(k)
    m = _mean_over_keys([torch.as_tensor(x) for x in kept_mean_abs])
    e = _mean_over_keys([torch.as_tensor(x) for x in ref_mean_abs])
    if not math.isfinite(e) or e <= 0:
        raise ValueError(f"the reference mean magnitude E must be positive, got {e} "
                         "(an all-zero task vector has no expert scale)")
    if rescale == "official":
        return -math.log10(k) * (m / k) / e
    if rescale == "paper":
        if lam <= 0:
            raise ValueError(f"lam must be positive for rescale='paper', got {lam!r}")
        return -m * math.log(k) / (lam * e)
    raise ValueError(f"unknown rescale {rescale!r}; expected one of {RESCALE_MODES}, None or a number")


def extract_expert(tv: Mapping[str, Tensor], k: float, rescale: str | float | None = "official",
                   filtered_tv: Mapping[str, Tensor] | None = None, lam: float = 1.0,
                   keys: Sequence[str] | None = None) -> SparseExpert:
    """FREE-Merging's training-free expert ``e = mu * M(tau, k)`` of one task, stored sparsely.

    Args:
        tv: the task's *raw* (unfiltered) task vector, key -> tensor (``finetuned - pretrained``).
        k: kept fraction per row, in (0, 1]. FREE: 0.01 (ViT-B/32, 8 tasks), 0.02 (30 tasks).
        rescale: how ``mu`` is chosen (see :func:`expert_scale`):
            ``"official"`` (default; the official code, needs ``filtered_tv``):
            ``mu = -log10(k) * m_top / E``, ``m_top = mean_keys(mean|M|)/k``, ``E = mean_keys(mean|FR(tau)|)``;
            ``"paper"``: ``mu = -E(M) ln(k) / (lam E(v))`` with ``v = filtered_tv`` when given, else the
            raw ``tv`` (**[OPEN]**: which vector the paper's E(v) averages is not stated);
            ``None``: ``mu = 1`` (plain top-k mask); a number: that ``mu``.
        filtered_tv: the FR-filtered task vector ``FR(tau)`` (key -> tensor of the same shapes). It must
            hold every expert key; for keys the filter skips (biases) pass the raw ``tau``.
        lam: the task's merge coefficient (``"paper"`` only).
        keys: the tensors to take part (default: every floating-point, non-empty tensor of ``tv``;
            FREE's ViT code uses keys containing ``attn`` or ``mlp``).

    Mask (``TaskVectorMiddleKeep``): each tensor is seen as ``rows x cols`` (``cols`` = last dim,
    1-D tensors one row); per row, ``torch.topk(|tau|, int(cols * k))`` on the last dim keeps exactly
    ``int(cols*k)`` entries (k=0.01, cols=768: 7 per row, density 0.91%; rows with ``cols*k < 1``
    keep nothing). Ties among equal magnitudes are broken by ``torch.topk`` (may differ by device).

    Returns:
        :class:`SparseExpert` with values ``mu * tau`` on the kept entries, in ``tv``'s dtype and device.
    """
    k = _check_k(k)
    keys = _select_keys(tv, keys, "task vector")
    if not keys:
        raise ValueError("no floating-point tensors to build an expert from")
    values, indices, shapes, kept_mean_abs = {}, {}, {}, []
    for key in keys:
        t = tv[key].detach()
        rows, cols = _rows_cols(t.shape)
        t2 = t.reshape(rows, cols)
        kk = int(cols * k)
        idx = torch.topk(t2.abs().float(), kk, dim=1, sorted=False).indices.sort(dim=1).values
        vals = t2.gather(1, idx)
        kept_mean_abs.append(vals.abs().float().sum() / max(t.numel(), 1))
        values[key], indices[key], shapes[key] = vals, idx.to(_index_dtype(cols)), tuple(t.shape)

    if rescale is None:
        mu = 1.0
    elif isinstance(rescale, numbers.Real) and not isinstance(rescale, bool):
        mu = float(rescale)
    elif rescale in RESCALE_MODES:
        if rescale == "official" and filtered_tv is None:
            raise ValueError("rescale='official' needs filtered_tv (the FR-filtered task vector): "
                             "E = mean over keys of mean|FR(tau)|")
        ref = filtered_tv if filtered_tv is not None else tv
        ref_mean_abs = []
        for key in keys:
            if key not in ref:
                raise ValueError(f"filtered_tv has no tensor {key!r} (pass the raw tau for unfiltered keys)")
            if tuple(ref[key].shape) != shapes[key]:
                raise ValueError(f"filtered_tv tensor {key!r} has shape {_shape_str(ref[key].shape)}, "
                                 f"the task vector has {_shape_str(shapes[key])}")
            ref_mean_abs.append(ref[key].detach().abs().float().mean())
        mu = expert_scale(kept_mean_abs, ref_mean_abs, k, rescale, lam)
    else:
        raise ValueError(f"unknown rescale {rescale!r}; expected one of {RESCALE_MODES}, None or a number")

    values = {key: (v.float() * mu).to(v.dtype) for key, v in values.items()}
    meta = {"rescale": rescale if not isinstance(rescale, numbers.Real) else float(rescale)}
    return SparseExpert(values, indices, shapes, mu=mu, k=k, meta=meta)


# ----------------------------------------------------------------------------------------------
# Per-task parameters
# ----------------------------------------------------------------------------------------------
def _check_expert_against(expert: Expert, sd: Mapping[str, Tensor], sd_name: str) -> None:
    if not isinstance(expert, Expert):
        raise TypeError(f"expert must be a SparseExpert or LowRankExpert, got {type(expert).__name__}")
    expert.check_compatible(sd, "expert", sd_name)


def free_params(theta0: Mapping[str, Tensor], backbone_tv: Mapping[str, Tensor], lam_b: float,
                expert: Expert, lam_e: float, mode: str = "add") -> dict[str, Tensor]:
    """The parameters that FREE-Merging uses for one task (materialised: a full state dict).

    Args:
        theta0: pretrained state dict ``theta_0``.
        backbone_tv: the backbone's task vector ``s`` (e.g. ``sum_j FR(tau_j)``), a subset of
            ``theta0``'s keys; missing keys count as zero.
        lam_b: backbone coefficient.
        expert: the task's :class:`SparseExpert` (values ``e = mu*M``) or :class:`LowRankExpert`.
        lam_e: expert coefficient.
        mode: ``"add"`` (paper, default): ``theta = theta0 + lam_b*s + lam_e*e`` on every entry.
            ``"replace"`` (official ``eval_single_dataset_with_router`` / ``sum_two``): the expert
            *replaces* the backbone on its support ``S``:
            ``theta = theta0 + lam_e*e`` on ``S`` and ``theta0 + lam_b*s`` elsewhere.
            The official code writes ``theta = theta0 + c*z`` with ``z = e`` on ``S`` and ``z = c*s``
            elsewhere, i.e. ``lam_b = c**2``, ``lam_e = c`` (ViT-B/32 FREE: ``c = 0.5``). A low-rank
            expert has no sparse support and was trained additively: ``"replace"`` rejects it.

    The two modes agree off ``S`` exactly and differ on ``S`` by ``lam_b*s``.

    Returns:
        key -> tensor for every key of ``theta0``, computed in float32 and cast to ``theta0``'s dtype.
        Integer tensors, and float tensors touched by neither ``backbone_tv`` nor the expert, are the
        very tensors of ``theta0`` (shared, not copied). For on-the-fly application without a copy
        per task use :class:`mergelib.routing.FreeMergedModel`.
    """
    if mode not in APPLY_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {APPLY_MODES}")
    _check_expert_against(expert, theta0, "pretrained state dict")
    for key, v in backbone_tv.items():
        if key not in theta0:
            raise ValueError(f"backbone_tv tensor {key!r} is not in the pretrained state dict")
        if v.shape != theta0[key].shape:
            raise ValueError(f"backbone_tv tensor {key!r} has shape {_shape_str(v.shape)}, the pretrained "
                             f"state dict has {_shape_str(theta0[key].shape)}")
    if mode == "replace" and not isinstance(expert, SparseExpert):
        raise ValueError("mode='replace' needs a SparseExpert (a support to replace); low-rank experts "
                         "are trained on top of the merged backbone and apply with mode='add'")
    dense_delta = expert.to_dense() if isinstance(expert, LowRankExpert) else {}
    out: dict[str, Tensor] = {}
    for key, t0 in theta0.items():
        if not t0.is_floating_point():
            out[key] = t0
            continue
        base = t0.float()
        if key in backbone_tv:
            base = base + lam_b * backbone_tv[key].to(base.device).float()
        if key in expert.shapes:
            if isinstance(expert, SparseExpert):
                rows, cols = _rows_cols(t0.shape)
                idx = expert.indices[key].to(base.device).long()
                vals = lam_e * expert.values[key].to(base.device).float()
                base = base.reshape(rows, cols).clone()
                if mode == "add":
                    base.scatter_add_(1, idx, vals)
                else:
                    base.scatter_(1, idx, t0.float().reshape(rows, cols).gather(1, idx) + vals)
                base = base.view(t0.shape)
            else:
                base = base + lam_e * dense_delta[key].to(base.device).float()
        out[key] = base.to(t0.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Trained experts (beyond the paper): low-rank, at a byte budget
# ----------------------------------------------------------------------------------------------
def allocate_ranks(shapes: Mapping[str, Sequence[int]], budget_bytes: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Ranks per matrix so that a :class:`LowRankExpert` stores at most ``budget_bytes``.

    A key of shape ``S`` costs ``r * (S[0] + prod(S[1:])) * itemsize`` bytes at rank ``r`` (capped at
    ``min(S[0], prod(S[1:]))``). All keys first get the same rank ``floor(budget / sum of rank-1
    costs)``; the remainder is handed out one rank at a time, round-robin in key order, while it fits.
    Keys left at rank 0 are omitted from the result. Raises ``ValueError`` if nothing fits.
    """
    item = torch.empty((), dtype=dtype).element_size()
    cost, cap = {}, {}
    for key, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"tensor {key!r} has shape {_shape_str(shape)}: low-rank needs ndim >= 2")
        rows, cols = int(shape[0]), math.prod(int(s) for s in shape[1:])
        cost[key], cap[key] = (rows + cols) * item, min(rows, cols)
    if not cost:
        raise ValueError("no tensors to allocate ranks to")
    budget = int(budget_bytes)
    uniform = budget // sum(cost.values())
    ranks = {key: min(uniform, cap[key]) for key in cost}
    left = budget - sum(ranks[key] * cost[key] for key in cost)
    changed = True
    while changed:
        changed = False
        for key in cost:
            if ranks[key] < cap[key] and cost[key] <= left:
                ranks[key] += 1
                left -= cost[key]
                changed = True
    ranks = {key: r for key, r in ranks.items() if r > 0}
    if not ranks:
        raise ValueError(f"budget of {budget} bytes is too small: rank 1 on the smallest matrix needs "
                         f"{min(cost.values())} bytes")
    return ranks


def _default_matrix_keys(sd: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and v.dim() == 2]


def _resolve_device(device, sd: Mapping[str, Tensor]) -> torch.device:
    if device is None:
        return next(iter(sd.values())).device
    from .utils import resolve_device
    return resolve_device(device)


def train_expert(backbone_module: nn.Module, merged_sd: Mapping[str, Tensor], head: nn.Module,
                 x: Tensor, y: Tensor, budget_bytes: int, *, steps: int = 200, lr: float = 1e-3,
                 batch_size: int = 64, seed: int = 0, generator: torch.Generator | None = None,
                 device: str | torch.device | None = None, keys: Sequence[str] | None = None,
                 weight_decay: float = 0.0, init_std: float | None = None,
                 progress: bool = True) -> LowRankExpert:
    """Train a LoRA-style expert for one task at a byte budget, on a frozen merged backbone.

    The forward pass is ``head(functional_call(backbone_module, merged + {key: merged[key] + B@A}, x))``:
    the merged tensors, the backbone module's own weights and the head stay frozen, only the factors
    ``A, B`` are learned, and no copy of the model is made. The backbone runs in eval mode (BatchNorm
    statistics are not updated). Cross-entropy loss, Adam(W), ``steps`` minibatches drawn without
    replacement per epoch from ``generator`` (or ``torch.Generator().manual_seed(seed)``).

    Args:
        backbone_module: the backbone whose structure is used (e.g. ``mergelib.models.ViT``).
        merged_sd: the merged backbone's state dict; keys and shapes must match the module.
        head: the task's head (``nn.Linear``), frozen.
        x: training inputs ``(N, ...)``; y: integer labels ``(N,)``. Any device; batches are moved.
        budget_bytes: storage budget, e.g. ``extract_expert(...).nbytes``; ranks via :func:`allocate_ranks`.
        keys: matrices to adapt (default: every 2-D floating tensor of ``merged_sd``; tensors with
            ndim > 2 are seen as ``S[0] x prod(S[1:])`` when listed explicitly).
        init_std: std of the initial ``A`` (default ``1/sqrt(cols)``); ``B`` starts at 0, so training
            starts exactly at the merged model.
        device: where to train (default: the device of ``merged_sd``; ``"auto"`` picks CUDA if present).

    Returns:
        :class:`LowRankExpert` (factors in float32 on ``device``), applied with ``lam_e = 1`` in mode
        ``"add"``; ``expert.meta`` holds ``loss_history`` (per step), ``ranks``, ``budget_bytes``.
    """
    check_state_dict(backbone_module, merged_sd)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same positive number of samples, got {x.shape[0]} and {y.shape[0]}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    dev = _resolve_device(device, merged_sd)
    keys = _default_matrix_keys(merged_sd) if keys is None else _select_keys(merged_sd, keys, "merged state dict")
    shapes = {key: tuple(merged_sd[key].shape) for key in keys}
    ranks = allocate_ranks(shapes, budget_bytes, torch.float32)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    merged = {k: v.detach().to(dev) for k, v in merged_sd.items()}
    head_state = {k: v.detach().to(dev) for k, v in head.state_dict().items()}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for key, r in ranks.items():
        rows, cols = shapes[key][0], math.prod(shapes[key][1:])
        std = init_std if init_std is not None else 1.0 / math.sqrt(cols)
        a = (torch.randn(r, cols, generator=gen) * std).to(dev).requires_grad_()
        b = torch.zeros(rows, r, device=dev, requires_grad=True)
        factors[key] = (b, a)
    opt = torch.optim.AdamW([t for pair in factors.values() for t in pair], lr=lr, weight_decay=weight_decay)

    def loss_on(xb: Tensor, yb: Tensor) -> Tensor:
        params = dict(merged)
        for key, (b, a) in factors.items():
            params[key] = merged[key] + (b @ a).view(shapes[key]).to(merged[key].dtype)
        feats = functional_call(backbone_module, params, (xb,))
        return F.cross_entropy(functional_call(head, head_state, (feats,)), yb)

    n = x.shape[0]
    order, pos, history = torch.randperm(n, generator=gen), 0, []
    was_training = backbone_module.training
    backbone_module.eval()
    try:
        bar = progress_bar(range(steps), desc="train expert", disable=not progress, leave=False)
        for _ in bar:
            if pos + min(batch_size, n) > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += len(idx)
            loss = loss_on(x[idx.to(x.device)].to(dev), y[idx.to(y.device)].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
    finally:
        backbone_module.train(was_training)
    done = {key: (b.detach(), a.detach()) for key, (b, a) in factors.items()}
    meta = {"loss_history": history, "ranks": ranks, "budget_bytes": int(budget_bytes),
            "steps": steps, "lr": lr, "batch_size": batch_size}
    return LowRankExpert(done, {key: shapes[key] for key in done}, meta=meta)
