"""Task vectors, parameter-selection rules and flattening (METHODS.md section 0 and 2).

A *task vector* is the difference between a fine-tuned and the pretrained weights,
tau_i = theta_i - theta_0 (Ilharco et al., ICLR 2023). Everything here works on plain state dicts
(``dict[str, Tensor]``) and keeps tensors on the device they live on.

* :func:`select_keys` decides which tensors take part (regex ``include``/``exclude`` plus flags for
  matrices, norms, embeddings and biases); :data:`DEFAULT_RULES` holds the named per-family defaults.
* :func:`validate_state_dicts` checks a pretrained / fine-tuned set for missing or extra keys,
  shapes, dtypes and non-finite values, naming the offending tensor.
* :class:`TaskVector` is an immutable mapping ``name -> float32 tensor`` with the arithmetic of the
  paper (``+``, ``-``, scalar ``*`` and ``/``, norms, cosine similarity).
* :func:`flatten` / :func:`unflatten` turn N task vectors into one ``N x D`` float32 matrix in the
  fixed sorted key order and back; :class:`FlatLayout` records keys, shapes and segment offsets so
  per-tensor operations on the flat matrix can use the segment boundaries.
"""
from __future__ import annotations

import bisect
import math
import mmap
import numbers
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .hparams import did_you_mean

__all__ = [
    "DEFAULT_RULES", "StateDictKeyError", "StateDictShapeError", "StateDictDtypeError",
    "NonFiniteError", "select_keys", "resolve_rules", "detect_family", "validate_state_dicts",
    "TaskVector", "task_vector", "apply_task_vector", "FlatLayout", "flatten", "unflatten",
    "cosine_similarity_matrix", "as_named_list",
]

StateDict = Mapping[str, Tensor]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class StateDictKeyError(KeyError):
    """Keys of two state dicts / task vectors differ. ``str()`` is the plain message (not its repr)."""

    def __str__(self) -> str:  # KeyError would print repr(message)
        return str(self.args[0]) if self.args else ""


class StateDictShapeError(ValueError):
    """A tensor has a different shape in two state dicts / task vectors."""


class StateDictDtypeError(ValueError):
    """A tensor has a different dtype in the pretrained and a fine-tuned state dict."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or +-inf values."""


# ----------------------------------------------------------------------------------------------
# Selection rules
# ----------------------------------------------------------------------------------------------
_NORM_MODULE = re.compile(r"(norm|^bn\d*$|^ln(_\w+)?\d*$|^ln_|batchnorm|layernorm)", re.IGNORECASE)
_EMBED_KEY = re.compile(r"(embed|cls_token|class_embedding|positional_embedding|position|token_type"
                        r"|(^|\.)(wte|wpe|shared)(\.|$))", re.IGNORECASE)
_BIAS_KEY = re.compile(r"(^|[._])bias$")
_HEAD_KEY = r"(^|\.)(head|heads|classifier|fc|linear|lm_head)\.[^.]*$"

DEFAULT_RULES: dict[str, dict] = {
    # The course ViT backbone: every floating-point tensor (PCB's ViT code, remove_keys=[]). Heads
    # are not part of the backbone state dict, so nothing needs to be excluded.
    "vit": {},
    # FREE/FR-Merging ViT code: only keys containing "attn" or "mlp" (weights and biases).
    "vit_attn_mlp": {"include": [r"(^|\.)(attn|mlp)\."]},
    # CIFAR ResNet: the conv/BN parameters. The head ("linear"/"fc") is task specific and BN running
    # statistics are buffers that must be reset on data after a merge (METHODS.md section 12).
    "resnet": {"exclude": [_HEAD_KEY, r"running_(mean|var)$"]},
    # Anything else: every floating-point tensor except obvious task heads.
    "generic": {"exclude": [r"(^|\.)(head|heads|classifier|lm_head)(\.|$)"]},
    # FREE's NLP code: classifiers and biases excluded.
    "nlp_free": {"exclude": [r".*classifier.*", r".*bias.*"]},
}


def detect_family(state_dict: StateDict) -> str:
    """Guess the model family of a state dict: ``"vit"``, ``"resnet"`` or ``"generic"``.

    ViT: timm-style ``blocks.{i}.attn.qkv.weight`` keys; ResNet: ``layer{j}.`` keys with BatchNorm.
    """
    keys = list(state_dict)
    if any(re.search(r"blocks\.\d+\.attn\.", k) for k in keys):
        return "vit"
    if any(re.match(r"layer\d+\.", k) for k in keys) and any("running_mean" in k for k in keys):
        return "resnet"
    return "generic"


def resolve_rules(rules: str | Mapping | None, state_dict: StateDict) -> dict:
    """Turn ``rules`` (a name of :data:`DEFAULT_RULES`, ``"auto"``, ``None`` or a dict of
    :func:`select_keys` keyword arguments) into a dict of keyword arguments."""
    if rules is None:
        return {}
    if isinstance(rules, Mapping):
        return dict(rules)
    if rules == "auto":
        rules = detect_family(state_dict)
    if rules not in DEFAULT_RULES:
        raise ValueError(f"unknown rules {rules!r}{did_you_mean(rules, list(DEFAULT_RULES))}; expected 'auto', a "
                         f"dict or one of {sorted(DEFAULT_RULES)}")
    return dict(DEFAULT_RULES[rules])


def _as_patterns(p: str | Iterable[str] | None) -> list[re.Pattern]:
    if p is None:
        return []
    if isinstance(p, (str, re.Pattern)):
        p = [p]
    return [re.compile(x) for x in p]


def select_keys(state_dict: StateDict, include: str | Iterable[str] | None = None,
                exclude: str | Iterable[str] | None = None, matrices_only: bool = False,
                skip_norm: bool = False, skip_embed: bool = False, skip_bias: bool = False) -> list[str]:
    """Names of the tensors that take part in a merge, **sorted** (the fixed flattening order).

    Rules (METHODS.md section 0), applied in this order:

    * only floating-point tensors; integer/bool buffers (``num_batches_tracked``, ``position_ids``)
      are always skipped;
    * ``include``: regex or list of regexes; if given a key must match one (``re.search``);
    * ``exclude``: regex or list; a key matching any is dropped;
    * ``matrices_only``: keep tensors with at least two dimensions of size > 1 (linear and conv
      weights, ``pos_embed``; not biases, norms or a ``(1, 1, d)`` class token);
    * ``skip_norm``: drop parameters/buffers of norm layers (module name containing ``norm``, or
      ``bn``/``ln`` modules);
    * ``skip_embed``: drop embeddings (``*embed*``, ``cls_token``, ``position*``, ``wte``/``wpe``...);
    * ``skip_bias``: drop keys ending in ``bias`` (``.bias``, ``in_proj_bias``).
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    out = []
    for key, t in state_dict.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            continue
        if inc and not any(p.search(key) for p in inc):
            continue
        if any(p.search(key) for p in exc):
            continue
        if matrices_only and sum(s > 1 for s in t.shape) < 2:
            continue
        module = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
        if skip_norm and _NORM_MODULE.search(module):
            continue
        if skip_embed and _EMBED_KEY.search(key):
            continue
        if skip_bias and _BIAS_KEY.search(key):
            continue
        out.append(key)
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def as_named_list(models: Sequence[StateDict] | Mapping[str, StateDict]) -> list[tuple[str, StateDict]]:
    """``[(name, state_dict), ...]`` from a list (names ``finetuned[i]``) or a name->state dict map."""
    if isinstance(models, Mapping):
        if models and all(isinstance(v, Tensor) for v in models.values()):
            raise TypeError("expected a list or a name->state_dict mapping of fine-tuned models, got a "
                            "single state dict; wrap it in a list")
        return [(str(k), v) for k, v in models.items()]
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence):
        raise TypeError(f"expected a list or mapping of state dicts, got {type(models).__name__}")
    return [(f"finetuned[{i}]", m) for i, m in enumerate(models)]


def _fmt_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    s = ", ".join(repr(k) for k in keys[:limit])
    return s + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_finite(named: Iterable[tuple[str, str, Tensor]]) -> None:
    """Raise NonFiniteError naming the first (model, key) with NaN/inf; one host sync in the common case."""
    named = [(m, k, t) for m, k, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return
    by_dev: dict[torch.device, list[Tensor]] = {}
    for _, _, t in named:  # aminmax: one read, no boolean copy; NaN propagates, inf is an extreme
        by_dev.setdefault(t.device, []).extend(torch.aminmax(t))
    if all(bool(torch.isfinite(torch.stack([v.float() for v in flags])).all()) for flags in by_dev.values()):
        return
    for model, key, t in named:  # slow path only on failure
        if not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise NonFiniteError(f"tensor {key!r} of {model} has non-finite values "
                                 f"({n_nan} NaN, {n_inf} inf)")


def validate_state_dicts(pretrained: StateDict, finetuned: Sequence[StateDict] | Mapping[str, StateDict],
                         keys: Iterable[str] | None = None, check_finite: bool = True) -> list[str]:
    """Check that fine-tuned models can be merged with ``pretrained``; return the sorted common keys.

    Raises (each message names the model and the tensor):

    * :class:`StateDictKeyError` (a ``KeyError``): a fine-tuned model lacks keys of the pretrained one
      or has extra keys (both lists are given);
    * :class:`StateDictShapeError` / :class:`StateDictDtypeError` (``ValueError``): shape or dtype of a
      tensor differs from the pretrained one;
    * :class:`NonFiniteError` (``ValueError``): NaN or inf in any floating-point tensor.

    ``keys`` restricts the shape/dtype/finiteness checks to those keys (key-set equality is still
    checked in full). ``finetuned`` is a list or a ``name -> state_dict`` mapping.
    """
    named = as_named_list(finetuned)
    if not named:
        raise ValueError("finetuned is empty: need at least one fine-tuned state dict")
    ref = set(pretrained)
    for name, sd in named:
        have = set(sd)
        if have != ref:
            missing, extra = ref - have, have - ref
            msg = [f"keys of {name} do not match the pretrained state dict:"]
            if missing:
                msg.append(f"missing in {name}: {_fmt_keys(missing)}")
            if extra:
                msg.append(f"extra in {name} (not in pretrained): {_fmt_keys(extra)}")
            raise StateDictKeyError(" ".join(msg))
    check = sorted(ref) if keys is None else sorted(keys)
    unknown = set(check) - ref
    if unknown:
        raise StateDictKeyError(f"selected keys not in the pretrained state dict: {_fmt_keys(unknown)}")
    for key in check:
        p = pretrained[key]
        for name, sd in named:
            t = sd[key]
            if t.shape != p.shape:
                raise StateDictShapeError(f"tensor {key!r}: shape {tuple(t.shape)} in {name} but "
                                          f"{tuple(p.shape)} in pretrained")
            if t.dtype != p.dtype:
                raise StateDictDtypeError(f"tensor {key!r}: dtype {t.dtype} in {name} but {p.dtype} "
                                          f"in pretrained")
    if check_finite:
        _check_finite([("pretrained", k, pretrained[k]) for k in check]
                      + [(name, k, sd[k]) for name, sd in named for k in check])
    return check


# ----------------------------------------------------------------------------------------------
# TaskVector
# ----------------------------------------------------------------------------------------------
def _is_scalar(x) -> bool:
    return isinstance(x, numbers.Real) or (isinstance(x, Tensor) and x.ndim == 0)


class TaskVector(Mapping[str, Tensor]):
    """An immutable mapping ``name -> float32 tensor`` tau = theta_ft - theta_0 (keys kept sorted).

    Arithmetic (Ilharco et al.): ``tv1 + tv2``, ``tv1 - tv2``, ``-tv``, ``lam * tv``, ``tv * lam``,
    ``tv / lam``; ``sum([tv1, tv2])`` works (``0 + tv``). Binary operations require identical key sets
    (:class:`StateDictKeyError` naming the differing keys) and shapes (:class:`StateDictShapeError`).
    Results are new task vectors; operands are never mutated.
    """

    __slots__ = ("_t",)

    def __init__(self, tensors: Mapping[str, Tensor]):
        self._t = {k: tensors[k] for k in sorted(tensors)}

    # mapping protocol
    def __getitem__(self, key: str) -> Tensor:
        return self._t[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self._t.values())
        dev = next(iter(self._t.values())).device if self._t else "-"
        return f"TaskVector({len(self)} tensors, {n} parameters, device={dev})"

    # arithmetic
    def _check_compatible(self, other: "TaskVector", op: str) -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"TaskVector {op} {type(other).__name__} is not defined")
        if self._t.keys() != other._t.keys():
            a, b = set(self._t), set(other._t)
            raise StateDictKeyError(f"task vectors have different keys for {op!r}: only in left "
                                    f"{_fmt_keys(a - b)}; only in right {_fmt_keys(b - a)}")
        for k, t in self._t.items():
            if t.shape != other._t[k].shape:
                raise StateDictShapeError(f"tensor {k!r}: shapes {tuple(t.shape)} and "
                                          f"{tuple(other._t[k].shape)} differ in {op!r}")

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # sum() starts from 0
            return self
        self._check_compatible(other, "+")
        return TaskVector({k: t + other._t[k] for k, t in self._t.items()})

    __radd__ = __add__

    def __sub__(self, other):
        self._check_compatible(other, "-")
        return TaskVector({k: t - other._t[k] for k, t in self._t.items()})

    def __neg__(self):
        return TaskVector({k: -t for k, t in self._t.items()})

    def __mul__(self, scalar):
        if not _is_scalar(scalar):
            return NotImplemented
        return TaskVector({k: t * scalar for k, t in self._t.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        if not _is_scalar(scalar):
            return NotImplemented
        return TaskVector({k: t / scalar for k, t in self._t.items()})

    # reductions (float64 accumulation over tensors; 0-d tensors, no host sync)
    def dot(self, other: "TaskVector") -> Tensor:
        """<tau_a, tau_b> = sum_k sum(tau_a[k] * tau_b[k]); a 0-d float64 tensor."""
        self._check_compatible(other, "dot")
        parts = [torch.vdot(t.reshape(-1).float(), other._t[k].reshape(-1).float()).double()
                 for k, t in self._t.items()]
        return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)

    def norm(self) -> Tensor:
        """||tau||_2 over all tensors; a 0-d float64 tensor (``float(tv.norm())`` for a number)."""
        return self.dot(self).sqrt()

    def cosine_similarity(self, other: "TaskVector", eps: float = 1e-12) -> Tensor:
        """<a, b> / (||a|| ||b||) over the concatenation of all tensors; 0-d float64 tensor."""
        return self.dot(other) / (self.norm() * other.norm()).clamp_min(eps)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TaskVector":
        """Move (and optionally cast) every tensor."""
        return TaskVector({k: t.to(device=device, dtype=dtype) for k, t in self._t.items()})

    def apply_to(self, pretrained: StateDict, scale: float = 1.0) -> dict[str, Tensor]:
        """theta_0 + scale * tau; see :func:`apply_task_vector`."""
        return apply_task_vector(pretrained, self, scale)


def task_vector(pretrained: StateDict, finetuned: StateDict, include=None, exclude=None,
                rules: str | Mapping | None = None, validate: bool = True, **flags) -> TaskVector:
    """tau = theta_ft - theta_0 over the selected keys, computed and stored in float32.

    ``include``/``exclude``/``flags`` (``matrices_only``, ``skip_norm``, ``skip_embed``, ``skip_bias``)
    go to :func:`select_keys`, on top of the named ``rules`` (``None``: every float tensor; "auto"
    picks from :data:`DEFAULT_RULES`). Shapes: each tau[k] has the shape of theta_0[k]; dtype float32.
    """
    kw = resolve_rules(rules, pretrained)
    kw.update({k: v for k, v in dict(include=include, exclude=exclude).items() if v is not None})
    kw.update(flags)
    keys = select_keys(pretrained, **kw)
    if validate:
        validate_state_dicts(pretrained, [finetuned], keys=keys)
    return TaskVector({k: finetuned[k].float() - pretrained[k].float() for k in keys})


def apply_task_vector(pretrained: StateDict, tv: Mapping[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    """theta = theta_0 + scale * tau (Ilharco et al., eq. 1); returns a new state dict.

    Keys of ``pretrained`` not in ``tv`` keep their pretrained tensors (the same objects, not copied).
    Arithmetic is in float32; the result is cast back to each pretrained tensor's dtype and device.
    Inputs are never mutated. Raises :class:`StateDictKeyError` for keys of ``tv`` not in
    ``pretrained`` and :class:`StateDictShapeError` for shape mismatches.
    """
    extra = set(tv) - set(pretrained)
    if extra:
        raise StateDictKeyError(f"task vector has keys not in the pretrained state dict: {_fmt_keys(extra)}")
    out = dict(pretrained)
    for k, d in tv.items():
        p = pretrained[k]
        if d.shape != p.shape:
            raise StateDictShapeError(f"tensor {k!r}: task vector shape {tuple(d.shape)} != pretrained "
                                      f"{tuple(p.shape)}")
        merged = p.float().add(d.to(device=p.device, dtype=torch.float32), alpha=scale)
        out[k] = merged.to(p.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Flattening
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlatLayout:
    """Where each tensor lives in a flat vector: ``vec[offsets[i]:offsets[i] + numels[i]]`` holds
    ``keys[i]`` (row-major, reshaped to ``shapes[i]``). ``D`` is the total length."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "FlatLayout":
        keys = tuple(sorted(shapes))
        shp = tuple(tuple(int(s) for s in shapes[k]) for k in keys)
        numels, offsets, off = [], [], 0
        for s in shp:
            n = 1
            for x in s:
                n *= x
            offsets.append(off)
            numels.append(n)
            off += n
        return cls(keys, shp, tuple(offsets), tuple(numels))

    @property
    def D(self) -> int:
        return (self.offsets[-1] + self.numels[-1]) if self.keys else 0

    def segments(self) -> list[tuple[str, int, int]]:
        """``[(key, start, end), ...]`` in flattening order."""
        return [(k, o, o + n) for k, o, n in zip(self.keys, self.offsets, self.numels)]

    def index(self, key: str) -> int:
        return self.keys.index(key)

    def segment(self, key: str) -> slice:
        i = self.index(key)
        return slice(self.offsets[i], self.offsets[i] + self.numels[i])

    def view(self, vec: Tensor, key: str) -> Tensor:
        """The view of ``key`` in ``vec`` (shape ``(*lead, *shape)`` for ``vec`` of shape ``(*lead, D)``)."""
        i = self.index(key)
        return vec[..., self.segment(key)].reshape(*vec.shape[:-1], *self.shapes[i])


# CPU buffers from this size on are allocated with huge pages. glibc's malloc maps every block of 32 MiB or
# more (its largest mmap threshold on 64-bit) freshly and returns it to the kernel when freed, so such a
# buffer is faulted in 4 KiB at a time on every allocation anyway: a merged D-vector of the benchmark's
# task set (57 MB) cost 13.8 K page faults, about 20 ms, against a 45 ms read of the whole N x D input.
HUGE_PAGE_BYTES = 32 << 20


def empty_matrix(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
    """``torch.empty(shape)``; on the CPU from :data:`HUGE_PAGE_BYTES` on, backed by an anonymous
    mapping advised for transparent huge pages (``madvise(MADV_HUGEPAGE)``).

    Why: the first write to a fresh ``N x D`` matrix faults in its pages one 4 KiB page at a time,
    which costs about as much as the write itself (a fill of 0.45 GB: 177 ms with 4 KiB pages, 77 ms
    with 2 MiB pages on the course's CPU; benchmarks/results_cpu.md). The memory is returned to the
    system when the tensor is freed. Where huge pages are unavailable this is an ordinary mapping.
    """
    out = _mapped(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if out is None else out


def zeros_matrix(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
    """``torch.zeros(shape)`` with :func:`empty_matrix`'s memory (an accumulator). A fresh anonymous
    mapping is zero-filled by the kernel as it is faulted in, so a large CPU buffer is not written a
    first time with zeros; a small or GPU one is ``torch.zeros``."""
    out = _mapped(shape, dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device) if out is None else out


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor | None:
    """A tensor on a fresh anonymous mapping advised for huge pages (its memory reads as zeros), or
    None below :data:`HUGE_PAGE_BYTES` and off the CPU."""
    device = torch.device(device)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < HUGE_PAGE_BYTES:
        return None
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: ordinary pages
            pass
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)  # the tensor keeps buf alive


class Scratch:
    """Named flat buffers reused from tensor to tensor by one merge (grown to the largest request).
    Fresh memory for every tensor is faulted in page by page (4 kB at a time) on its first write, and
    glibc returns freed blocks of a few MB to the kernel, so a loop that allocates a block per tensor
    pays the faults again on every tensor: a third of a streamed task arithmetic's time, and 0.2-0.4 s
    of an in-memory FR merge's 1.0-1.5 s on the benchmark's task set (benchmarks/results_cpu.md)."""

    def __init__(self):
        self.bufs: dict[str, Tensor] = {}
        self.layouts: dict[str, object] = {}  # what a buffer from zeroed() holds outside its written part

    def get(self, name: str, numel: int, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Tensor:
        """A flat ``dtype`` tensor of ``numel`` entries on ``device``, valid until the next ``get`` of ``name``."""
        b = self.bufs.get(name)
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != torch.device(device):
            b = self.bufs[name] = empty_matrix((numel,), dtype=dtype, device=device)  # huge pages if large
        self.layouts.pop(name, None)
        return b[:numel]

    def zeroed(self, name: str, numel: int, layout: object, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Tensor:
        """:meth:`get`, zero-filled the first time it is handed out for ``layout`` (any hashable that names
        the part a caller writes, e.g. a shape and a band of columns), and handed out as it was left after
        that: a caller that always overwrites the same part for the same ``layout`` finds zeros everywhere
        else without writing them again."""
        known = self.layouts.get(name) == layout
        b = self.get(name, numel, dtype, device)
        if not known:
            b.zero_()
        self.layouts[name] = layout
        return b

    def reserve(self, numel: int, names: Sequence[str], dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> None:
        """Allocate the named buffers at ``numel`` entries now (the largest tensor's), so that they are
        not allocated again, and faulted in again, each time a larger tensor comes."""
        for name in names:
            self.get(name, numel, dtype, device)


def flatten(tvs: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor], keys: Sequence[str] | None = None,
            dtype: torch.dtype = torch.float32, subtract: Mapping[str, Tensor] | None = None,
            device: torch.device | str | None = None, out: Tensor | None = None) -> tuple[Tensor, FlatLayout]:
    """Stack N task vectors into one matrix: ``X[i] = concat_k (tvs[i][k] - subtract[k]).reshape(-1)``.

    ``keys`` defaults to the (sorted) keys of the first task vector; they are used in sorted order.
    With ``subtract=pretrained`` the inputs are fine-tuned state dicts and ``X`` holds their task
    vectors, computed in ``dtype`` without materialising per-model task-vector dicts.
    Returns ``(X, layout)`` with ``X`` of shape ``N x D`` (``D = sum_k numel_k``), dtype ``dtype``
    (float32), on ``device`` (default: the device of ``subtract``, else of the first tensor). One
    preallocated output; per tensor one subtraction kernel writing into it (inputs already ``dtype``
    on ``device``) or one copy and one subtraction (the same bits); no host round trips. On CUDA, one
    Triton launch for all tensors (:func:`_stacked_on_gpu`). A single
    mapping gives ``N = 1``. ``out``: a flat buffer of ``N * D`` entries of ``dtype`` on ``device`` to
    write into (:class:`Scratch`, for callers that flatten one tensor at a time).
    """
    if isinstance(tvs, Mapping):
        tvs = [tvs]
    if not tvs:
        raise ValueError("flatten needs at least one task vector")
    keys = sorted(tvs[0] if keys is None else keys)
    for i, tv in enumerate(tvs):
        missing = [k for k in keys if k not in tv]
        if missing:
            raise StateDictKeyError(f"task vector {i} lacks keys {_fmt_keys(missing)}")
    layout = FlatLayout.from_shapes({k: tuple(tvs[0][k].shape) for k in keys})
    if device is None:
        src = subtract if subtract is not None else tvs[0]
        device = src[keys[0]].device if keys else torch.device("cpu")
    if out is None:
        out = empty_matrix((len(tvs), layout.D), dtype=dtype, device=device)
    elif out.numel() != len(tvs) * layout.D or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(f"out must hold {len(tvs)} x {layout.D} {dtype} entries on {device}, got "
                         f"{out.numel()} {out.dtype} on {out.device}")
    else:
        out = out.view(len(tvs), layout.D)
    for i, tv in enumerate(tvs):
        for k, shape in zip(layout.keys, layout.shapes):
            if tuple(tv[k].shape) != shape:
                raise StateDictShapeError(f"tensor {k!r}: shape {tuple(tv[k].shape)} in task vector {i} "
                                          f"but {shape} in task vector 0")
    if _stacked_on_gpu(tvs, layout, subtract, out):
        return out, layout
    for i, tv in enumerate(tvs):
        for k, off, n in zip(layout.keys, layout.offsets, layout.numels):
            _sub_into(tv[k].reshape(-1), None if subtract is None else subtract[k].reshape(-1), out[i, off:off + n])
    return out, layout


def _stacked_on_gpu(tvs, layout: FlatLayout, subtract, out: Tensor) -> bool:
    """:func:`flatten`'s task vectors into the float32 ``out`` by :func:`mergelib.gpu_kernels.stack_task_vectors`
    (Triton, CUDA: one launch for all tensors, the same bits) where every tensor is on ``out``'s device,
    contiguous and of its key's dtype; False (nothing written) otherwise."""
    from . import gpu_kernels as _gpu
    if out.dtype != torch.float32 or not out.is_contiguous() or not layout.keys or not _gpu.available(out):
        return False
    rows = [[tv[k] for tv in tvs] for k in layout.keys]
    bases = None if subtract is None else [subtract[k] for k in layout.keys]
    dev = out.device
    for j, ms in enumerate(rows):
        group = ms if bases is None else [bases[j], *ms]
        dt = group[0].dtype
        if not all(t.device == dev and t.dtype == dt and t.is_contiguous() and not t.requires_grad for t in group):
            return False
        if dt not in (torch.float32, torch.bfloat16, torch.float16):
            return False
    _gpu.stack_task_vectors(rows, bases, out.view(len(tvs), layout.D), list(layout.offsets))
    return True


def _sub_into(t: Tensor, base: Tensor | None, out: Tensor) -> None:
    """``out = t - base`` (``out = t`` without a base) in ``out``'s dtype and on its device.

    One subtraction kernel when ``t`` and ``base`` already have ``out``'s dtype and device; otherwise a
    copy (cast, move) then a subtraction, which gives the same bits. :func:`flatten` and
    :class:`TaskVectorColumns` both compute task vectors here, so they agree bit for bit.
    """
    if base is not None and t.dtype == base.dtype == out.dtype and t.device == base.device == out.device:
        torch.sub(t, base, out=out)
        return
    out.copy_(t)
    if base is not None:
        out.sub_(base.to(out.device, non_blocking=True))


class TaskVectorColumns:
    """The ``N x D`` float32 task-vector matrix of ``flatten(models, keys, subtract=pretrained)``,
    never materialised: its column blocks are computed on demand from the state dicts.

    ``block(c0, c1, out)`` writes columns ``[c0, c1)`` into ``out`` (``N x (c1 - c0)``) with the same
    float operations, so the same bits, as :func:`flatten`; ``gather(positions)`` returns the entries
    at some positions of every row. :func:`mergelib.merge` reads the task vectors of TIES and PCB this
    way on the CPU: no ``N x D`` copy, so no extra memory the size of the task vectors and no pass
    writing it. Inputs must already be validated (same keys and shapes).
    """

    def __init__(self, models: Sequence[Mapping[str, Tensor]], pretrained: Mapping[str, Tensor],
                 keys: Sequence[str], dtype: torch.dtype = torch.float32):
        keys = sorted(keys)
        self.layout = FlatLayout.from_shapes({k: tuple(pretrained[k].shape) for k in keys})
        self.models = list(models)
        self.pretrained = pretrained
        self.dtype = dtype
        self.device = pretrained[keys[0]].device
        self.shape = (len(self.models), self.layout.D)
        self._offsets = list(self.layout.offsets)
        self._bases = [pretrained[k].reshape(-1) for k in self.layout.keys]
        self._rows = [[m[k].reshape(-1) for k in self.layout.keys] for m in self.models]

    def tensors(self) -> list[Tensor]:
        """The state-dict tensors the columns are computed from: the base's, then each model's."""
        return [self.pretrained[k] for k in self.layout.keys] + [m[k] for m in self.models for k in self.layout.keys]

    def block(self, c0: int, c1: int, out: Tensor, rows: Sequence[int] | None = None) -> Tensor:
        """Columns ``[c0, c1)`` of every row (or of ``rows``) written into ``out``
        (``len(rows) x (c1 - c0)``), which is returned."""
        rows = range(self.shape[0]) if rows is None else rows
        for col, base, pieces in self.pieces(c0, c1):
            for r, i in enumerate(rows):
                _sub_into(pieces[i], base, out[r, col:col + base.shape[0]])
        return out

    def flat(self, convert) -> tuple[list, list[list]]:
        """``convert`` applied once to every flat tensor: ``(bases, rows)`` as :meth:`pieces` takes them
        (``bases[j]``: tensor ``j`` of the base, ``rows[i][j]``: of model ``i``), e.g. NumPy views for the
        compiled loops (:func:`mergelib.kernels._np`), whose slices cost a fraction of a tensor's."""
        return [convert(b) for b in self._bases], [[convert(t) for t in row] for row in self._rows]

    def pieces(self, c0: int, c1: int,
               flat: tuple[list, list[list]] | None = None) -> list[tuple[int, Tensor, list[Tensor]]]:
        """Columns ``[c0, c1)`` as the state-dict tensors hold them: per tensor they span, ``(col, base,
        finetuned)``, its flat slices (views) of the base and of every model, starting at column ``c0 + col``
        (slices of ``flat``'s arrays where given: :meth:`flat`)."""
        bases, rows = flat if flat is not None else (self._bases, self._rows)
        out = []
        j = bisect.bisect_right(self._offsets, c0) - 1
        a0 = c0
        while a0 < c1:
            off = self._offsets[j]
            a1 = min(c1, off + self.layout.numels[j])
            if a1 > a0:
                out.append((a0 - c0, bases[j][a0 - off:a1 - off], [row[j][a0 - off:a1 - off] for row in rows]))
                a0 = a1
            j += 1
        return out

    def columns_of(self, key: str) -> "TaskVectorColumns":
        """The columns of one tensor (``key``), as a :class:`TaskVectorColumns` of their own."""
        return TaskVectorColumns(self.models, self.pretrained, [key], self.dtype)

    def row(self, i: int) -> Tensor:
        """Row ``i`` (``D`` entries, a new tensor)."""
        out = torch.empty(1, self.shape[1], dtype=self.dtype, device=self.device)
        return self.block(0, self.shape[1], out, rows=[i])[0]

    def gather(self, positions: Tensor) -> Tensor:
        """Entries at the sorted flat ``positions`` (a 1-D int64 tensor) of every row: ``N x len(positions)``
        in ``dtype`` (sorted positions read each tensor once, in order)."""
        out = torch.empty(self.shape[0], positions.shape[0], dtype=self.dtype, device=self.device)
        offs = torch.tensor(self._offsets, dtype=torch.int64, device=positions.device)
        bounds = torch.searchsorted(positions, offs).tolist() + [positions.shape[0]]
        for j, off in enumerate(self._offsets):
            a, b = bounds[j], bounds[j + 1]
            if a == b:
                continue
            local = (positions[a:b] - off).to(self.device)
            base = torch.index_select(self._bases[j], 0, local)
            for i, row in enumerate(self._rows):
                _sub_into(torch.index_select(row[j], 0, local), base, out[i, a:b])
        return out


def unflatten(vec: Tensor, layout: FlatLayout) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`: ``{key: vec[..., segment].reshape(*lead, *shape)}``.

    ``vec`` has shape ``(D,)`` or ``(*lead, D)``; the results are **views** of ``vec`` (no copy) when
    ``vec`` is contiguous. Raises ``ValueError`` when the last dim is not ``layout.D``.
    """
    if vec.shape[-1] != layout.D:
        raise ValueError(f"vector has last dimension {vec.shape[-1]}, layout expects D={layout.D}")
    return {k: layout.view(vec, k) for k in layout.keys}


def cosine_similarity_matrix(tvs: Sequence[Mapping[str, Tensor]] | Tensor, eps: float = 1e-12) -> Tensor:
    """``C[i, j] = <tau_i, tau_j> / (||tau_i|| ||tau_j||)``, an ``N x N`` float64 tensor.

    ``tvs`` is an ``N x D`` matrix or N task vectors with the same keys. For task vectors the Gram
    matrix is accumulated per key (``X_k X_k^T``), so no ``N x D`` copy is materialised.
    """
    if isinstance(tvs, Tensor):
        x = tvs.float()
        gram = (x @ x.T).double()
    else:
        if not tvs:
            raise ValueError("need at least one task vector")
        keys = sorted(tvs[0])
        for i, tv in enumerate(tvs[1:], 1):
            if set(tv) != set(keys):
                raise StateDictKeyError(f"task vector {i} has different keys than task vector 0: "
                                        f"{_fmt_keys(set(tv) ^ set(keys))}")
        dev = tvs[0][keys[0]].device
        gram = torch.zeros(len(tvs), len(tvs), dtype=torch.float64, device=dev)
        for k in keys:
            xk = torch.stack([tv[k].reshape(-1).float() for tv in tvs])
            gram += (xk @ xk.T).double()
    nrm = gram.diagonal().clamp_min(0).sqrt()
    return gram / (nrm[:, None] * nrm[None, :]).clamp_min(eps)
