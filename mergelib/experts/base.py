"""Expert containers: the per-task parameter deltas of FREE-Merging and their compact storage layout.

* :class:`Expert` -- the common interface (keys, shapes, exact ``nbytes``, ``to_dense``, ``to``,
  ``state_dict``/``config``/``from_state_dict``, ``save``/``load``).
* :class:`SparseExpert` -- kept entries of each tensor as values + column indices, per row
  (``(rows, kk)``) or, for a per-tensor budget, over the flattened tensor (one row of ``numel`` columns).
* :class:`LowRankExpert` -- ``delta W = B @ A`` per matrix.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Expert", "SparseExpert", "LowRankExpert", "check_state_dict", "APPLY_MODES", "SPARSE_LAYOUTS"]

APPLY_MODES = ("add", "replace")
SPARSE_LAYOUTS = ("rows", "flat")


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
        """Write a ``.safetensors`` file atomically with a SHA-256 checksum; see :func:`~mergelib.experts.storage.save_expert`."""
        from .storage import save_expert
        return save_expert(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Expert":
        """Read and verify a file written by :meth:`save`; ``Expert.load`` returns whichever kind it holds."""
        from .storage import read_expert_file
        state, config = read_expert_file(path)
        return cls.from_state_dict(state, config).to(device)

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
    """A sparse expert: the kept entries of each tensor (values and column indices) on a 2-D grid.

    Each tensor of shape ``S`` is seen as a ``rows x cols`` grid (:meth:`grid`), chosen per key by
    ``layouts[key]``:

    * ``"rows"`` (default): ``cols = S[-1]``, ``rows = prod(S[:-1])`` (1-D and 0-D tensors are a single
      row); every row keeps the same number ``kk`` of entries (the per-row budgets of
      :func:`~mergelib.experts.extract_expert`);
    * ``"flat"``: one row of ``numel`` columns (flat indices into the tensor), for a per-tensor budget
      whose entries fall unevenly on the rows.

    For every key: ``values[key]``: ``(rows, kk)`` floating point, the (already rescaled) expert values
    ``mu * tau``; ``indices[key]``: ``(rows, kk)`` column indices, sorted within a row, in the smallest
    integer dtype that fits ``cols - 1`` (uint8 for cols <= 256, int16 up to 32768, then int32, int64).

    ``nbytes = sum_key rows*kk*(value bytes + index bytes)`` exactly. ``mu``, ``k`` and ``budget`` are
    recorded for reference (``mu`` is already applied to ``values``).
    """

    kind = "sparse"

    def __init__(self, values: Mapping[str, Tensor], indices: Mapping[str, Tensor],
                 shapes: Mapping[str, Sequence[int]], *, mu: float = 1.0, k: float | None = None,
                 meta: Mapping[str, Any] | None = None, layouts: Mapping[str, str] | None = None):
        if set(values) != set(shapes) or set(indices) != set(shapes):
            raise ValueError("values, indices and shapes must have the same keys")
        self.shapes = {key: tuple(int(s) for s in shapes[key]) for key in shapes}
        self.layouts = {key: (layouts or {}).get(key, "rows") for key in self.shapes}
        self.values: dict[str, Tensor] = {}
        self.indices: dict[str, Tensor] = {}
        for key, shape in self.shapes.items():
            if self.layouts[key] not in SPARSE_LAYOUTS:
                raise ValueError(f"tensor {key!r}: layout {self.layouts[key]!r} is not one of {SPARSE_LAYOUTS}")
            v, i = values[key], indices[key]
            rows, cols = self.grid(key)
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

    def grid(self, key: str) -> tuple[int, int]:
        """``(rows, cols)`` of the grid that ``values[key]`` / ``indices[key]`` index into."""
        shape = self.shapes[key]
        return (1, math.prod(shape)) if self.layouts[key] == "flat" else _rows_cols(shape)

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
                "layouts": self.layouts, "mu": self.mu, "k": self.k, "meta": self.meta}

    @classmethod
    def _from_parts(cls, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> "SparseExpert":
        shapes = config["shapes"]
        try:
            values = {k: state[f"{k}::values"] for k in shapes}
            indices = {k: state[f"{k}::indices"] for k in shapes}
        except KeyError as e:
            raise ValueError(f"sparse expert state is missing {e.args[0]!r}") from None
        return cls(values, indices, shapes, mu=config.get("mu", 1.0), k=config.get("k"),
                   meta=config.get("meta"), layouts=config.get("layouts"))

    def _map_tensors(self, fn) -> "SparseExpert":
        return SparseExpert({k: fn(v) for k, v in self.values.items()},
                            {k: fn(i) for k, i in self.indices.items()},
                            self.shapes, mu=self.mu, k=self.k, meta=self.meta, layouts=self.layouts)

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
        """Kept entries per grid row / cols for one tensor (``"rows"`` layout: per row of the tensor)."""
        rows, cols = self.grid(key)
        return self.values[key].shape[1] / cols

    def to_dense(self) -> dict[str, Tensor]:
        """key -> dense expert tensor of the full shape (zeros off the support)."""
        out = {}
        for key, shape in self.shapes.items():
            rows, cols = self.grid(key)
            v = self.values[key]
            dense = torch.zeros(rows, cols, dtype=v.dtype, device=v.device)
            dense.scatter_(1, self.indices[key].long(), v)
            out[key] = dense.view(shape)
        return out

    def support_mask(self, key: str) -> Tensor:
        """Boolean tensor of the full shape: True where the expert stores an entry."""
        rows, cols = self.grid(key)
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
