"""Merging checkpoints on disk, tensor by tensor: :func:`merge_files` (and ``python -m mergelib.merge``).

Inputs are safetensors files, Hugging Face sharded checkpoints (``*.safetensors.index.json``) or
directories holding either. Tensors are read key by key with plain file reads (not memory-mapped:
see :class:`Checkpoint`), so the resident memory is a few tensors, not the model. The output is a
sharded safetensors checkpoint with its ``model.safetensors.index.json``; every tensor keeps its dtype
(the merge computes in float32, as :func:`mergelib.merge` does) and is written straight to its shard
as soon as it is merged. File I/O overlaps the computation: a background thread writes the merged
tensors, queued in a ring buffer (:class:`_ShardWriter`), another flushes a finished shard to disk
(``fsync``) while the next one is merged, and, for the per-tensor sums, another reads the next key's
tensors (:class:`_ReadAhead`).

**Passes.** Per-tensor methods (``average``, ``task_arithmetic``, ``dare_ta``, and ``ties``/``dare_ties``
with ``granularity="tensor"``) need one pass over the inputs. TIES's mass sign rule gives the columns
whose trimmed values sum to 0 the model-wide majority sign, known only at the end: the write pass
counts it, writes as for a negative sign and, if the sign is positive, patches the few entries that
change before the merge is moved into place (or, if there are too many of them to keep, writes the
merge again: :class:`_Deferred`). Global TIES (``granularity="global"``, the paper) also needs each
task's exact k-th |tau| over the whole model: two passes (a sample of every tensor brackets each
rank, then a count below the bracket keeps the entries inside it: the algorithm of
:func:`mergelib.selection.kth_smallest`, the same exact value; two histogram passes over the float32
bit patterns answer instead if a sample ever missed), then the write pass. The sampling pass reads
the inputs but computes the task vectors at the sampled positions only (except ``dare_ties``, whose
drop mask is drawn per tensor): it costs about a read. ``fr`` (``align="official"`` or ``"none"``)
needs one pass: each 2-D tensor is filtered, aligned and summed
on its own (:func:`mergelib.fourier.fr_tensor`, the function ``fr_merge`` runs per tensor); its shape
checks (no 2-D tensor: ``ValueError``; tensors with more than 2 dims: one ``FRFilterWarning``) run on
the headers before anything is written. ``pcb`` (``mode="official"``) needs four: two passes give
each task's clip values (two ranks of |tau|, as for TIES; the sampling pass computes the task vectors at
the sampled positions only, and keeps them), one more the drop threshold q of the signed balancing
score beta and, on the way, beta's row maximum (its sample is beta at the same positions, computed from
the kept task vectors: no pass of its own), then the write pass; everything else in PCB is elementwise
across tasks (its sum over tasks adds the rows in order, in memory as here), computed on column
chunks of each tensor. Compiled, those two passes take ``exp`` and ``tanh`` only where an upper bound of
the score reaches the floor of q's sampled bracket (the counting pass: the scores below it are only
counted) or q (the write pass: the scores at or below q weigh +0), as the in-memory merge keeps only
the scores above its floor (:class:`mergelib.kernels.ScoreCandidates`).
Two settings cannot stream and raise :class:`StreamingNotSupportedError`: ``pcb`` with
``mode="paper"`` (its softmaxes divide by a float sum over the whole model) and ``fr`` with
``align="paper"`` (its coefficients are float means over the whole model): the rounding of such a
sum depends on its order, so partial sums per tensor would not give the same bits.

**Compiled loops.** Where :mod:`mergelib.kernels` runs (Numba installed, float32 or bf16 checkpoints),
TIES's write pass with the mass sign rule (either trim rule) is :func:`mergelib.kernels.ties_sweep`
over each key's inputs read in place, with no float32 task vectors built (the per-tensor trim's
thresholds are counted from the tensor's inputs as :func:`mergelib.merge` counts them; the exact trim's
ties at the threshold are taken in flat order as the sweep goes, :class:`mergelib.kernels.ExactTrim`); the entries a
positive majority sign may change are those the sweep marks (few: where the entries cancel, or over a
base of +-0), and their values come from :func:`mergelib.kernels.ties_majority_positive` on those
entries gathered. The same
float operations as the torch code, so the same bits (``MERGELIB_KERNELS=torch`` switches them off).
The global thresholds' counting pass keeps the NumPy counter: on bf16 checkpoints it measured faster
than the compiled counting loop (``benchmarks/results_files.md``).

**Same result as in memory.** For every supported method the tensors written are bit for bit those
of ``mergelib.merge(pretrained, finetuned, method, **hparams)`` on the loaded state dicts.

**Errors, nothing lost.** A missing input, mismatched keys, shapes or dtypes, truncated or corrupt
shards, an existing output directory (unless ``overwrite=True``; never one that holds a file of an input,
which replacing it would delete: :class:`OutputHoldsInputError`) and a full disk raise the named errors
below before or instead of producing output: the merge is written to a temporary directory next to
``out`` and renamed into place only when complete; on any error the temporary directory is removed and
the inputs are never opened for writing. Integer buffers (``position_ids``) missing from a fine-tune are
taken from the pretrained checkpoint (they take no part in merging) and reported; a missing
floating-point tensor is an error.

**A complete model directory.** Where the pretrained checkpoint lies in a Hugging Face model directory
(one that holds a ``config.json``), the files that describe the model rather than hold its weights
(``config.json``, the tokenizer's files, ``generation_config.json``, a sentence-transformers pipeline's
``modules.json`` and the module folders it names, licence files) are copied into the output with the
merge, so that ``transformers.AutoModel.from_pretrained(out)`` loads it (:func:`_model_files` says which;
``copy_files=False`` / ``--no-copy-files`` copies none). The base's model card (``README.md``) is not
copied: it describes the base. The merge writes its own (:func:`_model_card`): the method, lambda, every
hyperparameter, the inputs, and the ``python -m mergelib.merge`` command that merges them again (also in
the index's metadata, with the hyperparameters and lambda).

**Safetensors only.** A PyTorch ``.bin`` pickle (or ``.pt``, ``.ckpt``, GGUF...) raises
:class:`UnsupportedCheckpointError`, which says how to convert it.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sys
from collections import deque
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Container, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import competition as _comp
from . import kernels
from . import selection as _sel
from .fourier import _fr_options, fr_check_selection, fr_tensor
from .hparams import did_you_mean, did_you_mean_each
from .merging import METHODS, REGISTRY, _selected_keys, _sum, _sum_per_tensor, method_spec
from .task_vectors import (DEFAULT_RULES, FlatLayout, NonFiniteError, Scratch, StateDictDtypeError,
                           StateDictKeyError, StateDictShapeError, TaskVectorColumns, _sub_into, empty_matrix)

__all__ = ["merge_files", "Checkpoint", "CheckpointError", "CheckpointKeyError", "CheckpointShapeError",
           "CheckpointDtypeError", "CheckpointNotFoundError", "CorruptCheckpointError", "UnsupportedCheckpointError",
           "OutputExistsError", "OutputHoldsInputError", "DiskFullError", "StreamingNotSupportedError",
           "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 2 * 1024**3

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(Exception):
    """Base class of the errors of :func:`merge_files`."""


class CheckpointKeyError(CheckpointError, StateDictKeyError):
    """A floating-point tensor is missing from a checkpoint, or a checkpoint has extra tensors."""


class CheckpointShapeError(CheckpointError, StateDictShapeError):
    """A tensor has different shapes in two checkpoints."""


class CheckpointDtypeError(CheckpointError, StateDictDtypeError):
    """A tensor has different dtypes in two checkpoints."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """An input path (a checkpoint file, index or directory) does not exist."""


class CorruptCheckpointError(CheckpointError):
    """A shard is truncated, unreadable, or its index names files or tensors that are not there."""


class UnsupportedCheckpointError(CheckpointError, ValueError):
    """An input is a checkpoint in another format than safetensors (a PyTorch ``.bin`` pickle, ``.pt``,
    ``.ckpt``, GGUF...): :func:`merge_files` reads safetensors only."""


class OutputExistsError(CheckpointError, FileExistsError):
    """The output directory exists (pass ``overwrite=True`` / ``--overwrite``)."""


class OutputHoldsInputError(CheckpointError, ValueError):
    """The output directory holds one of the input checkpoints' files: replacing it (``overwrite=True``) would
    delete that input."""


class DiskFullError(CheckpointError, OSError):
    """The disk filled up while writing; no partial output is left behind."""


class StreamingNotSupportedError(CheckpointError, NotImplementedError):
    """This setting of a method cannot be computed tensor by tensor with the bits of
    :func:`mergelib.merge` (``pcb`` with ``mode="paper"``, ``fr`` with ``align="paper"``)."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _read_header(f: Path) -> tuple[dict[str, tuple], int]:
    """``{key: (shape, dtype, start, end)}`` (absolute byte offsets) of one safetensors file, checked
    against the file's size: a truncated or corrupt file raises :class:`CorruptCheckpointError`."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out, ends = {}, []
        for k, v in header.items():
            if k == "__metadata__":
                continue
            dt = _DTYPES.get(v["dtype"])
            if dt is None:
                raise ValueError(f"tensor {k!r} has unsupported dtype {v['dtype']}")
            shape = tuple(int(d) for d in v["shape"])
            s0, s1 = (int(o) for o in v["data_offsets"])
            if s1 - s0 != math.prod(shape) * torch.empty((), dtype=dt).element_size() or s0 < 0:
                raise ValueError(f"tensor {k!r}: data_offsets {v['data_offsets']} do not match its shape")
            out[k] = (shape, dt, 8 + n + s0, 8 + n + s1)
            ends.append(s1)
        if 8 + n + max(ends, default=0) > size:
            raise ValueError(f"the tensors need {8 + n + max(ends)} bytes but the file has {size} (truncated)")
        return out, size
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{f}: unreadable or truncated safetensors file ({e})") from e


# checkpoint formats that merge_files does not read (safetensors only), named in its error
_OTHER_FORMATS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
_CONVERT = ("mergelib.merge_files reads safetensors files (*.safetensors, or a *.safetensors.index.json with its "
            "shards) only. Convert a PyTorch state dict first, e.g. safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'model.safetensors') (transformers: model.save_pretrained(directory), which writes "
            "safetensors), or load the state dicts and call mergelib.merge()")


class Checkpoint(Mapping):
    """Lazy ``key -> Tensor`` view of a safetensors file, a sharded checkpoint's index, or a directory.

    ``ckpt[key]`` reads one tensor into fresh memory with plain file reads; :meth:`shape` and
    :meth:`dtype` read only the header. Plain reads, not a memory map (``safetensors.safe_open``): the
    pages of a memory-mapped file stay in the process's resident set for as long as the file is open,
    so a merge that maps its inputs shows a peak RSS of the whole checkpoint set, although the kernel
    could reclaim those pages. Raises :class:`CorruptCheckpointError` for unreadable or truncated shards.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if p.is_dir():
            idx = sorted(p.glob("*.safetensors.index.json"))
            files = sorted(p.glob("*.safetensors"))
            if idx:
                p = idx[0]
            elif len(files) == 1:
                p = files[0]
            else:
                others = sorted(f.name for f in p.iterdir() if f.name.endswith(_OTHER_FORMATS))
                if not files and others:
                    raise UnsupportedCheckpointError(f"{path} holds {', '.join(others[:4])} but no safetensors "
                                                     f"checkpoint. {_CONVERT}")
                raise CorruptCheckpointError(f"{path}: no *.safetensors.index.json and not exactly one "
                                             f"*.safetensors file ({len(files)} found)")
        if not p.exists():
            raise CheckpointNotFoundError(f"{p}: no such file or directory")
        if p.name.endswith(_OTHER_FORMATS) or p.name.endswith(".bin.index.json"):
            raise UnsupportedCheckpointError(f"{p} is not a safetensors checkpoint. {_CONVERT}")
        self.path = p
        if p.name.endswith(".json"):
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{p}: not a safetensors index ({e})") from e
            shard_of = {k: p.parent / v for k, v in weight_map.items()}
        else:
            shard_of = None
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple] = {}
        self._sizes: dict[Path, int] = {}
        shards = sorted(set(shard_of.values())) if shard_of is not None else [p]
        for f in shards:
            if not f.exists():
                raise CorruptCheckpointError(f"{p}: shard {f.name} is missing")
            meta, self._sizes[f] = _read_header(f)
            for k, m in meta.items():
                self._file_of[k] = f
                self._meta[k] = m
        if shard_of is not None:
            for k, f in shard_of.items():
                if self._file_of.get(k) != f:
                    raise CorruptCheckpointError(f"{p}: index puts {k!r} in {f.name}, which does not hold it")

    def __getitem__(self, key: str) -> Tensor:
        return self.read_into(key, self.empty(key))

    def empty(self, key: str) -> Tensor:
        """An uninitialised tensor of ``key``'s shape and dtype (for :meth:`read_into`)."""
        shape, dt = self._meta[key][:2]
        return torch.empty(shape, dtype=dt)

    def read_into(self, key: str, t: Tensor) -> Tensor:
        """Read tensor ``key`` into ``t`` (from :meth:`empty`) and return it."""
        f = self._file_of[key]
        shape, dt, s0, s1 = self._meta[key]
        if tuple(t.shape) != shape or t.dtype != dt or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"read_into({key!r}): needs a contiguous CPU tensor of shape {shape} and dtype "
                             f"{dt}, got {tuple(t.shape)} {t.dtype} on {t.device}")
        try:
            if f.stat().st_size != self._sizes[f]:
                raise ValueError("the file changed size since it was opened")
            with open(f, "rb", buffering=0) as fh:
                fh.seek(s0)
                view = memoryview(t.view(-1).view(torch.uint8).numpy()) if s1 > s0 else memoryview(b"")
                got = 0
                while got < s1 - s0:
                    r = fh.readinto(view[got:])
                    if not r:
                        raise ValueError(f"end of file after {got} of {s1 - s0} bytes")
                    got += r
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{f}: cannot read {key!r} ({e})") from e
        return t

    def __iter__(self):
        return iter(self._file_of)

    def __contains__(self, key) -> bool:  # Mapping's default would read the tensor
        return key in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)

    @property
    def files(self) -> list[Path]:
        """The safetensors files that hold the tensors (one, or the index's shards)."""
        return list(self._sizes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def meta_state_dict(self) -> dict[str, Tensor]:
        """``key -> empty tensor on the meta device`` with the right shape and dtype (for key rules)."""
        return {k: torch.empty(m[0], dtype=m[1], device="meta") for k, m in self._meta.items()}


class _ReadAhead:
    """The inputs of a merge (``ckpts[0]`` the base, then the fine-tunes), read one key ahead.

    A pass iterates ``over(keys)``: while key ``i`` is merged, a background thread reads every
    checkpoint's tensor of key ``i + 1``; :meth:`get` hands those tensors out (or reads now what was
    not read ahead). File reads release the GIL, as torch's kernels do, so reading and computing
    overlap on two cores. Memory: one key's input tensors more than reading on demand.

    ``enabled=False`` reads on demand. :func:`merge_files` reads ahead only for the per-tensor sums
    (``average``, ``task_arithmetic``): they hold nothing but the inputs and spend a large part of
    their time reading. Every other method builds the ``N x numel`` float32 task vectors of each
    tensor and computes on them far longer than it reads; reading ahead saved little there and raised
    the peak resident memory of a 5 GB merge above a quarter of the checkpoint bytes (global TIES:
    24.7 % -> 26.5 %). Measured again with the reused buffers (benchmarks/results_files.md, seventh
    session): no gain beyond the noise on any of them, peaks 1-4 % of the checkpoint bytes higher.
    """

    def __init__(self, ckpts: Sequence[Checkpoint], enabled: bool = True):
        self.ckpts = list(ckpts)
        self.enabled = enabled
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mergelib-read")
        self.ahead: dict[str, Future] = {}

    def _read_ahead(self, key: str, base_only: bool) -> Future:
        # the tensors are allocated here, in the calling thread: memory the thread allocated would sit in
        # a malloc arena of its own (per-thread arenas fragment apart and raise the peak resident set)
        ckpts = self.ckpts[:1] if base_only else self.ckpts
        bufs = [c.empty(key) if key in c else None for c in ckpts]
        return self.pool.submit(lambda: [None if b is None else c.read_into(key, b) for c, b in zip(ckpts, bufs)])

    def over(self, keys: Sequence[str], base_only: Container[str] = ()):
        """Yield ``keys`` in order, reading each next key's tensors while the current one is used (only
        the base's for the keys in ``base_only``: tensors that are not merged)."""
        keys = list(keys)
        self.ahead.clear()  # a new pass: what an earlier one (stopped early) read ahead is not needed
        for i, k in enumerate(keys):
            if self.enabled and i + 1 < len(keys):
                self.ahead[keys[i + 1]] = self._read_ahead(keys[i + 1], keys[i + 1] in base_only)
            yield k
            self.ahead.pop(k, None)  # drop what this key did not use

    def get(self, j: int, key: str) -> Tensor:
        """Tensor ``key`` of ``ckpts[j]``: the one read ahead (an error of that read is raised here) or a
        fresh read. A fine-tune's tensor is handed out once (a merge converts it to float32 once per
        pass) and no longer held here, so it is freed as soon as the caller is done with it; the base's
        stays (the merge uses it twice)."""
        fut = self.ahead.get(key)
        got = fut.result() if fut is not None else []
        t = got[j] if j < len(got) else None
        if j > 0 and t is not None:
            got[j] = None
        return self.ckpts[j][key] if t is None else t

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.ahead.clear()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _plan_shards(keys: Sequence[str], meta: Mapping[str, tuple], shard_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for k in keys:
        shape, dt = meta[k]
        nb = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    if cur:
        shards.append(cur)
    return shards


class _ShardWriter:
    """Writes one safetensors file tensor by tensor: the header (all shapes and dtypes are known in
    advance) first, then each tensor's bytes as soon as it is computed.

    A background thread writes the tensors' bytes, in order, while the merge computes the next ones
    (file writes release the GIL); an error of a write (a full disk) is raised by a later :meth:`add` or
    by :meth:`close`, and :meth:`abort` ends the writer on an error path. Each tensor is converted to its
    dtype into a ring buffer of the writer's own, twice the largest tensor of the shard in bytes, and
    handed to the thread from there: the caller may reuse its tensor at once, no fresh memory is
    faulted in per tensor, and several small tensors can wait in the ring while a large one is written
    (with one buffer per write in flight, the merge waited for the writer 0.7-0.8 s of a 9-10 s merge of
    the 5 GB benchmark set, where writing a fresh file costs 2.5 s per GB: benchmarks/results_files.md).
    """

    def __init__(self, path: Path, keys: Sequence[str], meta: Mapping[str, tuple]):
        header, off, largest = {}, 0, 0
        for k in keys:
            shape, dt = meta[k]
            nb = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            header[k] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            largest = max(largest, nb)
        header["__metadata__"] = {"format": "pt", "merged_by": "mergelib"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.starts = {k: 8 + len(raw) + h["data_offsets"][0] for k, h in header.items() if k != "__metadata__"}
        self.nbytes = {k: h["data_offsets"][1] - h["data_offsets"][0] for k, h in header.items() if k != "__metadata__"}
        self.expected = list(keys)
        self.meta = meta
        self.f = open(path, "wb")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mergelib-write")
        self.ring = empty_matrix((2 * largest,), dtype=torch.uint8)  # huge pages if large
        self.pending: deque[tuple[Future, int, int]] = deque()  # writes in flight: (future, start, end) in the ring
        self.head = 0  # where the next tensor goes in the ring, unless it must wrap to 0
        try:
            self._write(len(raw).to_bytes(8, "little") + raw)
        except BaseException:
            self.abort()
            raise

    def _write(self, data) -> None:
        self.f.write(data)

    def _wait(self) -> None:
        """Wait for every write in flight; the first error is raised here."""
        while self.pending:
            self.pending.popleft()[0].result()

    def _room(self, nb: int) -> int:
        """Where ``nb`` bytes go in the ring: after the last tensor, or at its start if they do not fit
        there; waits for the oldest writes (in order) until no write in flight overlaps them."""
        at = -(-self.head // 64) * 64  # aligned for any dtype (and a cache line)
        at = at if at + nb <= self.ring.numel() else 0
        while self.pending and any(s < at + nb and at < e for _, s, e in self.pending):
            self.pending.popleft()[0].result()
        return at

    def add(self, key: str, t: Tensor) -> None:
        if not self.expected or self.expected[0] != key:
            raise RuntimeError(f"internal error: tensor {key!r} written out of order")
        self.expected.pop(0)
        dt, nb = self.meta[key][1], self.nbytes[key]
        if nb == 0:
            return
        at = self._room(nb)
        self.head = at + nb
        buf = self.ring[at:at + nb].view(dt)
        buf.copy_(t.detach().reshape(-1))  # converted as t.to("cpu", dt) would
        fut = self.pool.submit(self._write, memoryview(self.ring[at:at + nb].numpy()))
        self.pending.append((fut, at, at + nb))

    def close(self, syncer: ThreadPoolExecutor | None = None) -> Future | None:
        """Finish the file: wait for the last write, free the buffers, then ``fsync`` and close it. With
        ``syncer``, the ``fsync`` runs on that executor, overlapping whatever the caller does next (the
        next shard's merge); the returned future raises its error. On an error here (the last write's),
        call :meth:`abort`; once the ``fsync`` is submitted, the file belongs to it."""
        self._wait()
        self.f.flush()
        self.ring = None
        self.pool.shutdown(wait=True)
        if syncer is None:
            self._sync()
            return None
        return syncer.submit(self._sync)

    def _sync(self) -> None:
        try:
            os.fsync(self.f.fileno())
        finally:
            self.f.close()

    def abort(self) -> None:
        """Let the write in flight finish (its error is not raised: an error is already being handled),
        then close the file. Safe to call more than once."""
        try:
            self._wait()
        except Exception:
            pass
        finally:
            self.pool.shutdown(wait=True)
            self.f.close()


# ----------------------------------------------------------------------------------------------
# The merge
# ----------------------------------------------------------------------------------------------
def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"mergelib.merge_files: {msg}", file=sys.stderr)


# weights (merged, or not mergeable here) and their indices: never copied by _model_files
_WEIGHT_SUFFIXES = (".safetensors", *_OTHER_FORMATS, ".ot", ".tflite", ".npy", ".joblib")
_NOT_COPIED = ("README.md",)  # the base's model card describes the base (the merge writes its own)


def _model_files(folder: Path) -> list[str]:
    """The files that :func:`merge_files` copies from the pretrained checkpoint's directory ``folder``, as paths
    relative to it: none unless it is a Hugging Face model directory (it holds a ``config.json``); else its
    top-level files (symbolic links followed, as in the Hub's cache) and the files of the module folders that a
    sentence-transformers ``modules.json`` names (``1_Pooling``...), except weights and their indices
    (:data:`_WEIGHT_SUFFIXES`, ``*.index.json``), hidden files and the model card (``README.md``)."""
    if not (folder / "config.json").is_file():
        return []

    def wanted(f: Path) -> bool:
        name = f.name
        return (f.is_file() and not name.startswith(".") and name not in _NOT_COPIED
                and not name.endswith(_WEIGHT_SUFFIXES) and not name.endswith(".index.json"))

    files = [f.name for f in sorted(folder.iterdir()) if wanted(f)]
    try:
        modules = json.loads((folder / "modules.json").read_text()) if "modules.json" in files else []
        sub = sorted({m["path"] for m in modules if isinstance(m, dict) and isinstance(m.get("path"), str)})
    except ValueError:
        sub = []  # not a sentence-transformers pipeline's modules.json: copied as it is, no folders
    root = folder.resolve()
    for d in sub:
        path = (folder / d)
        if not d or not path.is_dir() or root not in path.resolve().parents:  # "" is the model itself
            continue
        files += [f.relative_to(folder).as_posix() for f in sorted(path.rglob("*"))
                  if wanted(f) and not any(part.startswith(".") for part in f.relative_to(folder).parts)]
    return files


def _command_line(pretrained, finetuned, out, method: str, scale, rules, include, exclude, hp: Mapping,
                  shard_bytes: int) -> str:
    """``python -m mergelib.merge ...`` that merges the same inputs the same way (every hyperparameter written
    out, defaults too), for the model card; ``scale``: None (the method's) or the checked lambda(s) (a float, or
    a list of per-task floats); ``rules`` given as a dict has no command-line form (noted)."""
    import shlex

    words = ["python", "-m", "mergelib.merge", str(pretrained), *map(str, finetuned), "--out", str(out),
             "--method", method]
    if scale is not None:
        words += ["--scale", ",".join(map(_cli_text, scale)) if isinstance(scale, (list, tuple)) else _cli_text(scale)]
    if rules is None or isinstance(rules, str) and rules != "auto":
        words += ["--rules", "none" if rules is None else rules]
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in [patterns] if isinstance(patterns, (str, re.Pattern)) else (patterns or []):
            words += [flag, getattr(pattern, "pattern", pattern)]  # a compiled regex: its text
    for name, v in hp.items():
        words += [_option(name), _cli_text(v)]
    if shard_bytes != DEFAULT_SHARD_BYTES:
        words += ["--shard-size-gb", repr(shard_bytes / 1024**3)]  # exact: int(GB * 1024**3) is shard_bytes
    line = " ".join(shlex.quote(w) for w in words)
    return line + ("\n# (rules given as a dict, which the command line does not take: " + repr(rules) + ")"
                   if isinstance(rules, Mapping) else "")


def _model_card(spec, pretrained, finetuned, command: str, lam, lams, hp: Mapping, selected: int, total: int,
                borrowed: Mapping, copied: Sequence[str]) -> str:
    """The merge's ``README.md``: what was merged, how, and the command that merges it again."""
    from . import __version__
    scale = "1/N (fixed)" if spec.default_scale is None else (f"{lam:g}" if lams is None else
                                                                ", ".join(f"{v:g}" for v in lams) + " (per task)")
    lines = ["---", "tags:", "- merge", "- mergelib", "---", "", "# A merged checkpoint", "",
             f"Merged with mergelib {__version__} (`mergelib.merge_files`), tensor by tensor; the same bits as "
             f"`mergelib.merge()` on the loaded state dicts.", "",
             f"* **Method**: `{spec.name}` ({spec.paper}): {spec.doc}",
             f"* **Scale (lambda)**: {scale}",
             "* **Hyperparameters**: " + (", ".join(f"`{k}={v!r}`" for k, v in hp.items()) or "none"),
             f"* **Merged tensors**: {selected} of {total}; the others are the pretrained checkpoint's",
             f"* **Pretrained**: `{pretrained}`",
             "* **Fine-tuned**: " + ", ".join(f"`{f}`" for f in finetuned)]
    if borrowed:
        lines.append("* **Integer buffers taken from the pretrained checkpoint**: " +
                     "; ".join(f"{name}: {', '.join(keys)}" for name, keys in borrowed.items()))
    if copied:
        lines.append("* **Copied from the pretrained checkpoint's directory**: " + ", ".join(copied))
    lines += ["", "To merge again:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def _check_out_holds_no_input(out: Path, inputs: Sequence[tuple[str, Checkpoint]]) -> None:
    """Raise :class:`OutputHoldsInputError` where the existing directory ``out`` holds a file of an input (its
    index or a shard, as named or behind a symbolic link): ``overwrite`` would delete it with the old output."""
    root = out.resolve()
    for name, ckpt in inputs:
        for f in (ckpt.path, *ckpt.files):
            if any(root == g or root in g.parents for g in (Path(os.path.abspath(f)), f.resolve())):
                raise OutputHoldsInputError(f"{out} holds {f.name}, a file of the {name} checkpoint: replacing "
                                            f"{out} with the merge would delete that input. Write the merge to "
                                            f"another directory")


def _check_inputs(base: Checkpoint, fts: list[Checkpoint], names: list[str], quiet: bool) -> dict[str, list[str]]:
    """Key/shape/dtype checks; returns ``{ft_name: [integer buffers taken from the base]}``."""
    borrowed = {}
    for name, ft in zip(names, fts):
        missing = [k for k in base if k not in ft]
        extra = [k for k in ft if k not in base]
        bad = [k for k in missing if base.dtype(k).is_floating_point]
        if bad or extra:
            msg = [f"keys of {name} ({ft.path}) do not match the pretrained checkpoint:"]
            if bad:
                msg.append(f"missing floating-point tensors {bad[:8]}")
            if extra:
                msg.append(f"extra tensors {extra[:8]}")
            raise CheckpointKeyError(" ".join(msg))
        if missing:
            borrowed[name] = missing
            _say(f"{name} lacks the integer buffer(s) {missing}; taking them from the pretrained checkpoint",
                 quiet)
        for k in base:
            if k not in ft:
                continue
            if ft.shape(k) != base.shape(k):
                raise CheckpointShapeError(f"tensor {k!r}: shape {ft.shape(k)} in {name} but "
                                           f"{base.shape(k)} in pretrained")
            if ft.dtype(k) != base.dtype(k):
                raise CheckpointDtypeError(f"tensor {k!r}: dtype {ft.dtype(k)} in {name} but "
                                           f"{base.dtype(k)} in pretrained")
    return borrowed


def _progress(it, total: int, desc: str, quiet: bool):
    if quiet:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, desc=desc, unit="tensor", file=sys.stderr)


def _order_keys(x: Tensor, absolute: bool) -> Tensor:
    """int32 keys whose integer order is the float order of ``x`` (of ``|x|`` if ``absolute``):
    the float32 bit pattern, with the magnitude bits of negative numbers flipped (so -0.0 sorts just
    below +0.0; both are the same value). An involution on int32 bit patterns."""
    return _flip(x.abs().view(torch.int32) if absolute else x.view(torch.int32))


def _flip(bits: Tensor) -> Tensor:
    """Flip the magnitude bits of the negative int32 patterns: float order to integer order, and back."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _hist_pass(blocks: Iterable[Tensor], n: int, sel: Tensor | None = None) -> Tensor:
    """One histogram pass over the order keys (``N x numel`` int32 blocks, :func:`_order_keys`).

    Without ``sel``: counts of the high 16 bits (offset by 2**15, so bins follow the signed order),
    ``N x 65536``. With ``sel`` (``N x m`` high bins): for every row r and column j, the counts of
    the low 16 bits of the entries whose high bin is ``sel[r, j]``, ``N * m x 65536``. Each block is
    counted in column chunks (``index_add_`` into the histogram), so the temporaries are a chunk's.
    """
    m = 1 if sel is None else sel.shape[1]
    hist = torch.zeros((n * m) << 16, dtype=torch.int64)
    rows = (torch.arange(n * m, dtype=torch.int32) << 16).view(n, m)
    width = max(1, _sel.CHUNK // n)
    one = torch.ones(1, dtype=torch.int64)
    for key in blocks:  # row r counts into [r * 65536, (r + 1) * 65536)
        for c0 in range(0, key.shape[1], width):
            kc = key[:, c0:c0 + width]
            high = (kc >> 16) + (1 << 15)
            if sel is None:
                idx = high.add_(rows)
            else:
                idx = torch.cat([((kc & 0xFFFF) + rows[:, j:j + 1])[high == sel[:, j:j + 1]] for j in range(m)])
            idx = idx.reshape(-1)
            hist.index_add_(0, idx, one.expand(idx.numel()))
    return hist.view(n * m, 1 << 16)


_SAMPLE_RATE = 1 / 256  # the fraction of every block sampled on the first pass of _stream_kth


def _stream_kth(blocks_fn, n: int, ks: Sequence[Sequence[int]], absolute: bool = True, samples_fn=None,
                count_above: bool = False, on_brackets=None):
    """Exact k-th smallest values of every row over all blocks (of |x| if ``absolute``): ``ks[r]``
    holds the 1-based ranks wanted in row r (the same number for every row); returns ``N x m``
    float32, the values :func:`mergelib.selection.kth_smallest` gives on the concatenated rows.

    The algorithm of :mod:`mergelib.selection` fed from two passes over the blocks (``N x numel``
    float32): a sample of every block (1/256 of its entries at fixed pseudo-random positions) gives
    each rank a bracket; the second pass counts the entries below it and keeps those inside it, block
    by block (compiled, :func:`mergelib.kernels.count_brackets`, else NumPy in cache-sized chunks), so
    memory stays a few chunks plus the candidates (about
    2 % of the entries; a value that fills much of the sample, such as the exact zeros of weights a
    fine-tune left unchanged, is counted instead of kept: :data:`mergelib.selection.TIE_SHARE`). If a
    sample missed (never seen in practice) or a bracket still holds more than 1/16 of a row (rows of a
    few distinct values), the exact histogram passes of :func:`_stream_kth_hist` answer instead
    (bounded memory).

    ``samples_fn()``: optional, yields ``(numel, take)`` per block in the order of ``blocks_fn()``,
    ``take(positions)`` giving the ``N x len(positions)`` entries of the block there, computed from
    the inputs at those positions only (the first pass then skips building the float32 blocks). The
    sample only brackets the ranks and the counting pass finds the exact values, so a sample that
    differed from the blocks in some bits would cost time (a fallback), never correctness.

    ``on_brackets``: optional, called with the brackets (per row, per rank ``(lo, hi, tie)``, as
    :func:`mergelib.selection._brackets` gives them) before the counting pass, and with None before the
    histogram fallback: blocks of the counting pass may then hold any value below ``lo`` in place of
    an entry below it (the count is the same), those of the fallback must hold every entry.

    ``count_above``: also return, as ``(values, above)``, the number of entries of each row greater
    than each value (``N x m`` int64; of |x| if ``absolute``), from the same counts: the entries below
    the bracket, and the candidates inside it up to the value. ``above`` is None where the histogram
    fallback answered (the caller counts in a pass of its own).
    """
    if samples_fn is None:
        samples_fn = lambda: ((x.shape[1], lambda pos, x=x: x[:, pos]) for x in blocks_fn())  # noqa: E731
    # the sample in one growing buffer: many small tensors kept alive between the blocks' large ones
    # would fragment the heap, which then cannot shrink (the resident set grew by 1.3 GB on a 5 GB set)
    store, used, D = torch.empty(n, 1 << 16), 0, 0
    for numel, take in samples_fn():
        g = torch.Generator().manual_seed(0x5A11 ^ (numel * 1000003 + D))
        pos = torch.randint(0, numel, (max(1, math.ceil(numel * _SAMPLE_RATE)),), generator=g).sort().values
        store = _with_room(store, used, pos.numel())
        part = store[:, used:used + pos.numel()]
        part.copy_(take(pos))
        if absolute:
            part.abs_()
        used += pos.numel()
        D += numel
    brackets = [_sel._brackets(store[r, :used], D, ks[r]) for r in range(n)]
    if on_brackets is not None:
        on_brackets(brackets)
    dtype = store.numpy().dtype
    del store  # the sample is not needed on the counting pass (the brackets hold values, not views)
    limit = max(D // 16, 1 << 16)  # a bracket holds ~2 % of a row, unless the row is mostly ties
    if dtype == np.float32 and kernels.available(torch.empty(0)) and _sel.kernel_brackets(brackets):
        # compiled (kernels.count_brackets), over each block's rows (float32, contiguous)
        counted = kernels.count_brackets(((0.0 if absolute else None, list(x)) for x in blocks_fn()), brackets,
                                         limit=limit)
        results = None if counted is None else _sel.kernel_counts(counted, brackets)
    else:
        counters = _sel._count_blocks((x.numpy() for x in blocks_fn()), brackets, dtype,
                                      _sel.NUMPY_CHUNK, absolute, limit)
        results = None if any(ctr.overflow for ctr in counters) else [ctr.result() for ctr in counters]
    out, above = [], []
    try:
        if results is None:
            raise _Missed()
        for r, (below, cands) in enumerate(results):
            vals = _sel._finish(ks[r], below, cands, True, _missed)
            out.append(torch.stack(vals))
            if count_above:  # D - #(x < lo) - #(lo <= x <= value)
                above.append([D - below[j] - _count_upto(c, v) for j, (v, (c,)) in enumerate(zip(vals, cands))])
    except _Missed:
        if on_brackets is not None:
            on_brackets(None)
        vals = _stream_kth_hist(blocks_fn, n, ks, absolute)
        return (vals, None) if count_above else vals
    vals = torch.stack(out).to(torch.float32)
    return (vals, torch.tensor(above, dtype=torch.int64)) if count_above else vals


def _with_room(buf: Tensor, used: int, more: int) -> Tensor:
    """``buf`` (``... x capacity``) if ``more`` columns fit after its first ``used``, else a buffer at least twice as
    wide holding those: the samples of :func:`_stream_kth` and :class:`_KeptSample` grow in one buffer each, by
    doubling (many small tensors kept alive between the blocks' large ones would fragment the heap)."""
    if used + more <= buf.shape[-1]:
        return buf
    grown = buf.new_empty((*buf.shape[:-1], max(2 * buf.shape[-1], used + more)))
    grown[..., :used] = buf[..., :used]
    return grown


def _count_upto(cands, v: Tensor) -> int:
    """How many of a bracket's candidates (a tensor, or :class:`mergelib.selection._Tied`) are <= v."""
    if isinstance(cands, _sel._Tied):
        return int((cands.rest <= v).sum()) + (cands.count if bool(cands.value <= v) else 0)
    return int((cands <= v).sum())


class _Missed(Exception):
    """A sampled bracket of :func:`_stream_kth` missed its rank."""


def _missed():
    raise _Missed()


def _stream_kth_hist(blocks_fn, n: int, ks: Sequence[Sequence[int]], absolute: bool = True) -> Tensor:
    """:func:`_stream_kth` by two histogram passes: counts of the high 16 bits of the order keys,
    then of the low 16 bits inside the one high bin that holds each rank (the exact value; a zero may
    come back as -0.0 where the rows hold both zeros). Slower; the fallback of :func:`_stream_kth`."""
    m = len(ks[0])
    want = torch.tensor([list(k) for k in ks], dtype=torch.int64)  # N x m
    keys = lambda: (_order_keys(x, absolute) for x in blocks_fn())  # noqa: E731
    cum = _hist_pass(keys(), n).cumsum(1)  # N x 65536
    bins = torch.searchsorted(cum, want, right=False)  # the first bin whose count reaches k
    before = torch.where(bins > 0, cum.gather(1, (bins - 1).clamp_min(0)), 0)
    low = _hist_pass(keys(), n, sel=bins.to(torch.int32)).cumsum(1)  # N * m x 65536
    lo16 = torch.searchsorted(low, (want - before).view(-1, 1)).view(n, m)
    key = ((bins - (1 << 15)) << 16) | lo16  # the signed int32 key, in int64
    return _flip(key.to(torch.int32)).view(torch.float32)


def _stream_thresholds(blocks_fn, n: int, ks: list[int], samples_fn=None, count_above: bool = False):
    """Exact k-th smallest |tau| of every row (``ks[r]``, 1-based) over all blocks: ``N x 1``, two passes
    (with ``count_above``: and #(|tau| > it) per row, see :func:`_stream_kth`)."""
    return _stream_kth(blocks_fn, n, [[k] for k in ks], absolute=True, samples_fn=samples_fn,
                       count_above=count_above)


class _KeptSample:
    """The ``N x m`` task vectors at one pass's sampled positions (:func:`_stream_kth`'s sample), key by key,
    with the positions, for a later pass's sample at the same positions without reading the inputs again:
    streamed PCB's sample of beta, at the positions of its sample of |tau| (the positions depend only on
    each tensor's size and offset). In two growing buffers: many small tensors kept alive between the
    blocks' large ones would fragment the heap (see :func:`_stream_kth`)."""

    def __init__(self, n: int):
        self.x = torch.empty(n, 1 << 16)
        self.pos = torch.empty(1 << 16, dtype=torch.int64)
        self.used = 0
        self.parts: dict[str, tuple[int, int]] = {}

    def add(self, key: str, pos: Tensor, x: Tensor) -> None:
        m = pos.numel()
        self.x, self.pos = _with_room(self.x, self.used, m), _with_room(self.pos, self.used, m)
        self.x[:, self.used:self.used + m] = x
        self.pos[self.used:self.used + m] = pos
        self.parts[key] = (self.used, self.used + m)
        self.used += m

    def samples(self, keys: Sequence[str], numel, fn, compute):
        """A sampler of :func:`_stream_kth` over ``keys``: ``(numel(k), take)`` with ``take(pos)`` giving
        ``fn`` of the kept task vectors of key k where ``pos`` are the kept positions, else ``fn(compute(k,
        pos))`` (from the inputs)."""
        def take(k: str, pos: Tensor) -> Tensor:
            a, b = self.parts.get(k, (0, -1))
            if b - a == pos.numel() and torch.equal(self.pos[a:b], pos):
                return fn(self.x[:, a:b].contiguous())
            return fn(compute(k, pos))
        return ((numel(k), lambda pos, k=k: take(k, pos)) for k in keys)


class _Deferred:
    """The model-wide majority sign of TIES's mass sign rule, counted on the write pass.

    Where the trimmed values of a column sum to exactly 0, TIES elects the majority sign of the whole
    model's columns (:func:`mergelib.competition._ties_fused`), known only once every tensor is merged.
    The write pass writes each tensor as for a negative majority and :meth:`note` keeps the entries
    whose written bits a positive majority would change: the zero-sum columns whose entries cancel,
    and the zero-sum columns of trimmed zeros where the base is +-0 (base + lam * (+-0) leaves any other
    base value as it is). Every other entry has the same bits under either sign. If the majority is
    positive, :meth:`patch` writes the kept entries into the shards before the merge is moved into
    place. Past ``limit`` entries (the largest tensor's size: memory of a few tensors) it stops
    keeping them, and a positive majority then writes the merge again (one pass more, the sign known).
    """

    _INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # the bits of bf16/fp16, fp32, fp64

    def __init__(self, limit: int):
        self.limit = max(limit, 1 << 16)
        self.votes = 0.0  # #(column sum > 0) - #(column sum < 0) over the model
        self.count = 0
        self.overflow = False
        self.entries: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (flat positions, bits to write)

    def note(self, key: str, pre_f: Tensor, delta: Tensor, lam: float, d: dict, dtype: torch.dtype) -> None:
        """Count tensor ``key``'s votes and keep its entries that a positive majority changes. ``delta``:
        its merged task vector for a negative majority, ``d`` what ``_ties_fused(defer=d)`` collected;
        the written tensor is ``torch.add(pre_f, delta, alpha=lam)`` in ``dtype``.

        Only the candidates are computed, gathered: over a base of +-0, a trimmed zero gives
        ``+-0 + lam * (+-0)``, exact whichever way the kernel evaluates it; where entries cancel, the
        mean is not 0, and ``base + lam * mean`` gathered has the bits of the whole tensor's kernel
        only for ``lam == 1`` (fused multiply-add or not, the result is the rounded sum): for any
        other ``lam`` the whole tensor is added as the write does (two more passes over it)."""
        self.votes += float(d["votes"])
        if self.overflow:
            return
        zero, cancel = d["zero"], d["cancel"]
        base, flat = pre_f.reshape(-1), delta.reshape(-1)
        at = (zero & (base == 0)).nonzero().squeeze(1)  # trimmed zeros (or cancelling entries) over +-0
        cols = torch.cat([c for c, _ in cancel]) if cancel else at[:0]
        vals = torch.cat([v for _, v in cancel]) if cancel else flat[:0]
        at = torch.cat([at[~torch.isin(at, cols)], cols])  # the patch's value at each position: +0.0 or the mean
        alt = torch.cat([torch.zeros(at.numel() - cols.numel()), vals])
        if not at.numel():
            return
        if lam == 1.0 or not cancel:
            now, then = torch.add(base[at], flat[at], alpha=lam), torch.add(base[at], alt, alpha=lam)
        else:
            full = flat.clone()
            full[at] = alt
            now, then = torch.add(base, flat, alpha=lam)[at], torch.add(base, full, alpha=lam)[at]
        self._keep(key, at, now, then, dtype)

    def note_merged(self, key: str, at: Tensor, written: Tensor, positive: Tensor, votes: int,
                    dtype: torch.dtype) -> None:
        """:meth:`note` for the compiled sweep (:func:`mergelib.kernels.ties_sweep`), which gives the merged
        tensor itself: at the flat positions ``at`` that the sweep marked, ``written`` (float32, for a
        negative majority sign) and ``positive`` (the same for a positive one,
        :func:`mergelib.kernels.ties_majority_positive`); keeps the entries whose bits in ``dtype``
        differ (every other entry has the same bits under either sign)."""
        self.votes += float(votes)
        if self.overflow:
            return
        self._keep(key, at, written, positive, dtype)

    def _keep(self, key: str, at: Tensor, now: Tensor, then: Tensor, dtype: torch.dtype) -> None:
        """Keep the positions ``at`` where ``now`` and ``then`` (float32) differ in ``dtype``, with the
        bits of ``then``; past ``limit`` kept entries, none (``overflow``)."""
        ints = self._INT[torch.empty((), dtype=dtype).element_size()]
        now_bits, alt_bits = now.to(dtype).view(ints), then.to(dtype).view(ints)
        differ = now_bits != alt_bits
        n = int(differ.sum())
        if not n:
            return
        self.count += n
        if self.count > self.limit:
            self.overflow = True
            self.entries.clear()
            return
        self.entries[key] = (at[differ], alt_bits[differ])

    def patch(self, tmp: Path, where: Mapping[str, tuple[str, int]], meta: Mapping[str, tuple]) -> None:
        """Write the kept entries into the shards in ``tmp`` (``where``: key -> (file, offset of its bytes))."""
        for key, (pos, bits) in self.entries.items():
            fname, start = where[key]
            with open(tmp / fname, "r+b") as f:
                mm = np.memmap(f, dtype=bits.numpy().dtype, mode="r+", offset=start,
                               shape=(math.prod(meta[key][0]),))
                mm[pos.numpy()] = bits.numpy()
                mm.flush()
                del mm
                os.fsync(f.fileno())


_STREAMING = "average, task_arithmetic, dare_ta, ties, dare_ties, pcb (mode='official'), fr (align='official' or 'none')"


def _check_streamable(method: str, hp: Mapping) -> None:
    """Raise :class:`StreamingNotSupportedError` for the settings whose model-wide float sums cannot be
    reproduced bit for bit tensor by tensor."""
    why = None
    if method == "pcb" and hp["mode"] == "paper":
        why = ("pcb with mode='paper' does not stream: its softmaxes divide by a float sum over all D "
               "entries of each task pair, and the rounding of that sum depends on its order, so a merge "
               "tensor by tensor would not give the bits of mergelib.merge(). Use mode='official' (streams)")
    elif method == "fr" and hp["align"] == "paper":
        why = ("fr with align='paper' does not stream: its coefficients lambda_i = E(v_i) / sum_j E(v_j) "
               "are float means over all D entries of each task, whose rounding depends on the summation "
               "order, so a merge tensor by tensor would not give the bits of mergelib.merge(). Use "
               "align='official' or align='none' (both stream)")
    if why:
        raise StreamingNotSupportedError(f"{why}, or load the state dicts and call mergelib.merge(). "
                                         f"Streaming methods: {_STREAMING}.")


def merge_files(pretrained: str | os.PathLike, finetuned: Sequence[str | os.PathLike], out: str | os.PathLike,
                method: str, scale=None, include=None, exclude=None, rules="auto", overwrite: bool = False,
                shard_bytes: int = DEFAULT_SHARD_BYTES, quiet: bool = False, copy_files: bool = True,
                **hparams) -> Path:
    """Merge checkpoints on disk into ``out`` (a directory), tensor by tensor.

    Same arguments and result as :func:`mergelib.merge` (``scale``, ``include``, ``exclude``,
    ``rules``, the method's ``hparams``), with paths instead of state dicts: ``pretrained`` and each of
    ``finetuned`` is a ``.safetensors`` file, a ``*.safetensors.index.json`` or a directory holding
    one. Writes ``out/model-0000i-of-0000n.safetensors`` (at most ``shard_bytes`` each, one tensor
    may exceed it), ``out/model.safetensors.index.json`` and a model card ``out/README.md`` (with the command
    that merges again), with ``copy_files`` the pretrained directory's ``config.json``, tokenizer files and the
    like (see the module docstring: :func:`_model_files`); returns ``out``. Memory: a few tensors
    (the N fine-tuned copies of the tensor being merged, in float32). See the module docstring for
    the passes (one for per-tensor methods and ``fr``; three for the global ``ties``; four for ``pcb``),
    the errors and what is taken from the base. Raises :class:`StreamingNotSupportedError` for
    ``pcb`` with ``mode="paper"`` and ``fr`` with ``align="paper"``, before reading any tensor.
    """
    spec = method_spec(method)
    hp = spec.check_hparams(hparams)
    if not finetuned:
        raise ValueError("finetuned is empty: need at least one fine-tuned checkpoint")
    lam, lams = spec.check_scale(scale, len(finetuned))
    is_ties = method in ("ties", "dare_ties")
    glob_ties = is_ties and hp.get("granularity") == "global"
    _check_streamable(method, hp)
    if method == "fr":
        _fr_options(**hp)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")

    base = Checkpoint(pretrained)
    fts = [Checkpoint(f) for f in finetuned]
    names = [f"finetuned[{i}]" for i in range(len(fts))]
    if out.exists():
        _check_out_holds_no_input(out, [("pretrained", base), *zip(names, fts)])
    borrowed = _check_inputs(base, fts, names, quiet)
    model_files = _model_files(base.path.parent) if copy_files else []
    # the per-tensor sums read one key ahead (see _ReadAhead), the other methods on demand
    with closing(_ReadAhead([base, *fts], enabled=spec.fn is _sum)) as src:
        scratch = Scratch()  # float32 buffers reused from tensor to tensor
        keys = _selected_keys(spec, base.meta_state_dict(), rules, include, exclude)
        layout = FlatLayout.from_shapes({k: base.shape(k) for k in keys})
        selected = set(keys)
        seg_of = {k: (o, e) for k, o, e in layout.segments()}

        def block(k: str, pre: Tensor | None = None) -> Tensor:
            """N x numel float32 task vectors of tensor k (DARE applied for dare_ties; dare_ta's own
            function applies it); checked finite here for pcb and fr (TIES checks it in its sweep,
            dare_ta in its function). Computed as :func:`~mergelib.task_vectors.flatten` does (the
            same bits), into one buffer reused from tensor to tensor: valid until the next call
            (fresh memory for every block would be faulted in page by page, on every pass). ``pre``:
            the base's tensor k when the caller has read it already (read once per pass, not twice)."""
            pre = (src.get(0, k) if pre is None else pre).reshape(-1)
            if pre.dtype in (torch.bfloat16, torch.float16):  # converted once, not once per task (exact)
                pre = scratch.get("block base", pre.numel()).copy_(pre)
            x = scratch.get("block", len(fts) * pre.numel()).view(len(fts), -1)
            for i in range(len(fts)):
                _sub_into(src.get(i + 1, k).reshape(-1), pre, x[i])
            if method == "dare_ties":
                lay = FlatLayout.from_shapes({k: base.shape(k)})
                _comp.dare_flat(x, hp["p"], lay, hp["seed"], tasks=names, inplace=True)
            elif method in ("pcb", "fr") and not _comp.all_finite(x):
                raise NonFiniteError(f"task vectors of {k!r} are not finite")
            return x

        def blocks(desc: str, fn=lambda k, x: x):
            """fn(k, block(k)) for every selected key, in order (one pass over the inputs)."""
            return (fn(k, block(k)) for k in _progress(src.over(keys), len(keys), desc, quiet))

        def sample_at(k: str, pos: Tensor) -> Tensor:
            """The ``N x len(pos)`` task vectors of tensor k at the flat positions ``pos``, computed as
            :func:`block` computes them."""
            pre = src.get(0, k).reshape(-1)[pos]
            x = torch.empty(len(fts), pos.numel())
            for i in range(len(fts)):
                _sub_into(src.get(i + 1, k).reshape(-1)[pos], pre, x[i])
            return x

        def samples(desc: str, fn=lambda x: x, keep: _KeptSample | None = None):
            """The sampler of :func:`_stream_kth` for ``blocks(desc, lambda k, x: fn(x))``, with ``fn``
            elementwise over the columns: the task vectors at the sampled positions only, computed
            as :func:`block` computes them (not for dare_ties, whose drop mask is drawn for the whole
            block). ``keep``: where the task vectors at the sampled positions are also kept, for a later
            sample at the same positions (:meth:`_KeptSample.samples`)."""
            def take(k: str, pos: Tensor) -> Tensor:
                x = sample_at(k, pos)
                if keep is not None:
                    keep.add(k, pos, x)
                return fn(x)
            return ((math.prod(base.shape(k)), lambda pos, k=k: take(k, pos))
                    for k in _progress(src.over(keys), len(keys), desc + " (sample)", quiet))

        # inputs the compiled loops of mergelib.kernels read in place (float32 or bf16): no float32 blocks
        compiled = all(kernels.available(torch.empty(0, dtype=base.dtype(k))) for k in keys)

        # TIES's write pass by the compiled loop of mergelib.kernels, each key's inputs read in place (no
        # float32 blocks), for the mass sign rule where torch's last step rounds once
        # (kernels.fused_add_matches_torch)
        sweep_kernel = method == "ties" and hp["sign_rule"] == "mass" and compiled and kernels.fused_add_matches_torch()

        if method == "fr":
            fr_check_selection(layout, stacklevel=2)
        pcb = None
        # PCB's sweeps by the compiled loops of mergelib.kernels, each key's inputs read in place (no float32
        # blocks; exp and tanh torch's on the same N x C chunks as the torch code, so the same bits)
        pcb_kernel = method == "pcb" and compiled
        if method == "pcb":  # the row statistics of pcb_merge (official): clip values, then q and max of beta
            n = len(fts)
            signed = _KeptSample(n)  # the task vectors at the sampled positions: beta's sample, without a pass
            clip = _stream_kth(lambda: blocks("statistics |tau|"), n, [_comp._pcb_official_ks(layout.D)] * n,
                               samples_fn=lambda: samples("statistics |tau|", keep=signed))
            clip_np = [kernels.f32(clip[:, 0]), kernels.f32(clip[:, 1]),  # lo, hi, hi - lo (inf where 0)
                       kernels.f32(_comp._safe_den(clip[:, 1] - clip[:, 0]))]

            beta_max = torch.full((n,), -math.inf)
            # compiled: exp and tanh only where a bound of the score reaches the row's threshold, all above 0
            # (kernels.ScoreCandidates): on the counting pass, the floor of q's bracket (the scores below it
            # are only counted: -inf stands for them), on the write pass q (the scores at or below it weigh +0)
            bounded = pcb_kernel and n <= kernels.ScoreCandidates.BOUNDED_TASKS
            candidates = kernels.ScoreCandidates() if bounded else None
            floors = {}  # "floors": the counting pass's thresholds, while the bracket's floors are all above 0

            def on_brackets(brackets) -> None:  # _stream_kth's brackets of q (None: its exact fallback)
                floors.clear()
                lows = None if brackets is None else [b[0][0] for b in brackets]
                if candidates is not None and lows is not None and all(v is not None and v > 0 for v in lows):
                    floors["floors"] = np.array([float(v) for v in lows], dtype=np.float32)

            def betas(k: str, x: Tensor | None) -> Tensor:  # also the row max of beta (the same on both passes)
                b = scratch.get("pcb beta", n * math.prod(base.shape(k))).view(n, -1)  # counted before the next
                total = _comp._row_sum(x, out=scratch.get("pcb column sums", x.shape[1]))  # tensor comes
                for c0, c1 in _comp._column_chunks(n, x.shape[1], x.device):  # temporaries of a chunk, not the
                    _comp._pcb_official_beta(x[:, c0:c1], total[c0:c1], n, clip[:, 0:1], clip[:, 1:2],  # tensor
                                             out=b[:, c0:c1], scratch=scratch)
                torch.maximum(beta_max, b.amax(1), out=beta_max)
                return b

            def fused_betas():
                """beta of every selected tensor by column chunks (compiled), each an ``N x w`` block counted
                before the next comes; below the floors (when set), -inf instead of the score."""
                low = floors.get("floors")
                fill = None if low is None else np.full(n, -np.inf, dtype=np.float32)
                for k in _progress(src.over(keys), len(keys), "statistics beta", quiet):
                    pre, fts_k = src.get(0, k).reshape(-1), [src.get(i, k).reshape(-1) for i in range(1, n + 1)]
                    for c0, c1 in _comp._column_chunks(n, pre.numel(), pre.device):
                        b = scratch.get("pcb beta", n * (c1 - c0)).view(n, c1 - c0)
                        fused_beta(k, pre, fts_k, c0, c1, b, low, fill)
                        torch.maximum(beta_max, b.amax(1), out=beta_max)  # the largest score is above the floor
                        yield b

            def fused_beta(k: str, pre: Tensor, fts_k: list[Tensor], c0: int, c1: int, out: Tensor,
                           thresholds: np.ndarray | None = None, fill: np.ndarray | None = None) -> Tensor:
                """beta of columns [c0, c1) of tensor k (flat inputs ``pre``, ``fts_k``) into ``out`` (N x
                (c1 - c0), contiguous), compiled (competition._pcb_official_beta_compiled); with ``thresholds``,
                ``fill`` instead of the scores whose bound is below them (competition._pcb_official_beta_bounded)."""
                pieces = [(0, pre[c0:c1], [f[c0:c1] for f in fts_k])]
                if thresholds is None:
                    bad = _comp._pcb_official_beta_compiled(pieces, n, c1 - c0, *clip_np, out, scratch)
                else:
                    bad = _comp._pcb_official_beta_bounded(pieces, n, c1 - c0, *clip_np, out, scratch, candidates,
                                                           thresholds, fill)
                if bad:
                    block(k)  # raises NonFiniteError where an input is not finite (else a column sum overflowed)
                return out

            def sampled_betas(x: Tensor) -> Tensor:  # beta of the sampled columns (their max is not needed)
                return _comp._pcb_official_beta(x, _comp._row_sum(x), n, clip[:, 0:1], clip[:, 1:2])

            beta_blocks = fused_betas if pcb_kernel else lambda: blocks("statistics beta", betas)
            q = _stream_kth(beta_blocks, n, [[_comp._pcb_q_k(layout.D, hp["density"])]] * n, absolute=False,
                            samples_fn=lambda: signed.samples(keys, lambda k: math.prod(base.shape(k)), sampled_betas,
                                                              sample_at),
                            on_brackets=on_brackets)
            signed = None  # the kept sample (N x D/256 task vectors and positions) is not needed any more
            pcb = {"clip": clip, "q": q[:, 0], "max": beta_max, "lams": [1.0] * n if lams is None else lams}

        # global statistics of TIES: the global trim's thresholds and tie budgets, the majority sign
        state = {}
        if is_ties:
            D, n = layout.D, len(fts)
            density, trim_rule = hp["density"], hp["trim_rule"]
            keep = int(D * density)
            thr, budget = None, None
            if glob_ties:
                kth = _comp._trim_kth(D, density) if trim_rule == "official" else (
                    None if keep <= 0 or keep >= D else D - keep + 1)
                gt = None  # exact rule: #(|tau| > thr) per row, counted on the threshold's pass
                if kth is not None:
                    got = _stream_thresholds(lambda: blocks("statistics"), n, [kth] * n,
                                             None if method == "dare_ties" else lambda: samples("statistics"),
                                             count_above=trim_rule == "exact")
                    thr, gt = got if trim_rule == "exact" else (got, None)
                if trim_rule == "exact" and thr is not None:
                    if gt is None:  # the histogram fallback answered: one more pass counts
                        gt = torch.zeros(n, 1, dtype=torch.int64)
                        for k in src.over(keys):
                            gt += (block(k).abs() > thr).sum(1, keepdim=True)
                    budget = torch.cat([torch.zeros_like(gt), keep - gt], 1)

            def plan(k: str, x: Tensor, budget_now):
                """The trim plan and tie budgets of tensor k (the exact rule's budgets count down as
                ties are taken)."""
                if glob_ties:
                    return [(0, x.shape[1], thr, keep)], [budget_now]
                p_ = _comp._trim_plan(x, density, "tensor", FlatLayout.from_shapes({k: base.shape(k)}), trim_rule)
                return p_, (_comp._exact_tie_budget(x, p_) if trim_rule == "exact" else [None] * len(p_))

            # the mass sign rule's model-wide majority sign is counted on the write pass (see _Deferred)
            state = {"plan": plan, "budget": budget, "budget0": None if budget is None else budget.clone(),
                     "majority": None if hp["sign_rule"] == "mass" else 1, "trim_rule": trim_rule}
            if sweep_kernel and glob_ties and trim_rule == "exact":  # the compiled sweep's thresholds and ties
                state["exact"] = (kernels.exact_trim(None, keep, D, n, ()) if thr is None
                                  else kernels.ExactTrim(thr, budget[:, 1]))
        deferred = _Deferred(max([math.prod(base.shape(k)) for k in keys], default=0)) \
            if is_ties and state["majority"] is None else None

        def ties_swept(k: str, pre: Tensor) -> Tensor:
            """Tensor k of TIES (mass sign rule) with :func:`mergelib.kernels.ties_sweep` from the inputs in
            place: ``theta_0 + lam * tau_m`` in float32, the bits of the block path of :func:`merged_tensor`
            (and of :func:`mergelib.merge`). A negative majority sign is written and a positive one's
            entries are kept for the patch (:meth:`_Deferred.note_merged`), as there: only the entries the
            sweep marks can differ, so only they are gathered and computed again."""
            fts_k = [src.get(i, k) for i in range(1, len(fts) + 1)]
            exact = hp["trim_rule"] == "exact"
            if glob_ties:
                t_k = state["exact"] if exact else kernels.ties_thresholds(thr, len(fts))
            else:  # the tensor's own thresholds, counted from its inputs (kernels.count_brackets)
                cols = TaskVectorColumns([{k: f} for f in fts_k], {k: pre}, [k])
                _, _, t_k, keep_k = _comp._trim_plan(cols, hp["density"], "tensor", cols.layout, hp["trim_rule"])[0]
                t_k = (kernels.exact_trim(t_k, keep_k, pre.numel(), len(fts), [(pre, fts_k)]) if exact
                       else kernels.ties_thresholds(t_k, len(fts)))
            offset = t_k.offset if exact else 0  # the flat position of the tensor in its trim segment
            out = scratch.get("ties merged", pre.numel()).view(pre.shape)
            zero = scratch.get("ties zero", pre.numel(), torch.bool)
            votes, bad, marked = kernels.ties_sweep(out, zero, fts_k, pre, t_k, lam)
            if bad and not _comp.all_finite(block(k, pre)):  # (else base + lam * tau_m overflowed, as torch's)
                raise NonFiniteError(f"task vectors of {k!r} are not finite")
            if state["majority"] is not None:  # the sign is known (+: the pass after an overflow)
                if state["majority"] > 0 and marked:
                    kernels.ties_majority_positive(out, zero, fts_k, pre, t_k, lam, at=offset)
                return out
            # the marked positions (NumPy's flatnonzero: about ten times torch's nonzero on a CPU thread)
            at = torch.from_numpy(np.flatnonzero(zero.numpy())) if marked else zero.new_empty(0, dtype=torch.long)
            now = out.reshape(-1)[at]
            then = kernels.ties_majority_positive(now.clone(), torch.ones(at.numel(), dtype=torch.bool),
                                                  [f.reshape(-1)[at] for f in fts_k], pre.reshape(-1)[at], t_k, lam,
                                                  at=at + offset)
            deferred.note_merged(k, at, now, then, votes, pre.dtype)
            return out

        def merged_tensor(k: str) -> Tensor:
            pre, votes = src.get(0, k), None
            if k not in selected:
                return pre
            if sweep_kernel:
                return ties_swept(k, pre)
            if spec.fn is _sum:
                ftk = [{k: src.get(i, k)} for i in range(1, len(fts) + 1)]
                extra = {}
                o, e = seg_of[k]
                tail = (layout.D // 1024) * 1024 if lams is None else layout.D
                if e > tail:  # the last partial block of the flat sum spans the last keys: load them
                    for k2, (o2, e2) in seg_of.items():
                        if e2 > tail and k2 != k:
                            extra[k2] = src.get(0, k2)
                            for i, d in enumerate(ftk, 1):
                                d[k2] = src.get(i, k2)
                pre_d = {k: pre, **extra}
                delta = _sum_per_tensor(pre_d, ftk, [k], lams, check=True, layout=layout,
                                        into={k: scratch.get("sum", pre.numel())})[k]
            elif method == "fr":
                delta = fr_tensor(block(k, pre), k, tuple(pre.shape), **hp, scratch=scratch).view(pre.shape)
            elif method == "pcb" and pcb_kernel:  # beta again by chunks, then the weighted sums (compiled)
                n, numel = len(fts), pre.numel()
                flat, fts_k = pre.reshape(-1), [src.get(i, k).reshape(-1) for i in range(1, n + 1)]
                num, den = torch.zeros(numel), torch.zeros(numel)
                q_np, span, lam_np = _comp._pcb_weighted_sum_args(pcb["q"], pcb["max"], pcb["lams"])
                above = candidates is not None and bool((q_np > 0).all())  # the scores at or below q weigh +0
                for c0, c1 in _comp._column_chunks(n, numel, pre.device):
                    b = fused_beta(k, flat, fts_k, c0, c1, scratch.get("pcb beta", n * (c1 - c0)).view(n, c1 - c0),
                                   *((q_np, q_np) if above else ()))
                    kernels.pcb_weighted_sum(num[c0:c1], den[c0:c1], b, [f[c0:c1] for f in fts_k], flat[c0:c1],
                                             clip_np[0], clip_np[1], q_np, span, lam_np)
                delta = num.div_(den.clamp_min_(1e-12)).view(pre.shape)
            elif method == "pcb":
                x = block(k, pre)
                n = x.shape[0]
                total = _comp._row_sum(x)
                num, den = torch.zeros_like(total), torch.zeros_like(total)
                lo, hi = pcb["clip"][:, 0:1], pcb["clip"][:, 1:2]
                lam_col = _comp._pcb_lambdas(pcb["lams"], x.dtype, x.device)
                for c0, c1 in _comp._column_chunks(n, x.shape[1], x.device):  # temporaries of a chunk
                    xc = x[:, c0:c1]
                    _comp._pcb_official_add(num[c0:c1], den[c0:c1], _comp._pcb_official_tprime(xc, lo, hi, scratch),
                                            _comp._pcb_official_beta(xc, total[c0:c1], n, lo, hi, scratch=scratch),
                                            pcb["q"][:, None],
                                            pcb["max"][:, None], lam_col)
                delta = num.div_(den.clamp_min_(1e-12)).view(pre.shape)
            else:
                x = block(k, pre)
                lay = FlatLayout.from_shapes({k: tuple(pre.shape)})
                if is_ties:
                    if not _comp.all_finite(x):
                        raise NonFiniteError(f"task vectors of {k!r} are not finite")
                    pl, bu = state["plan"](k, x, state["budget"])
                    votes = None if state["majority"] is not None else {}  # the majority sign: deferred
                    delta = _comp._ties_fused(x, pl, bu, state["trim_rule"], hp["sign_rule"],
                                              majority=state["majority"], defer=votes)
                else:
                    delta = spec.fn(x, layout=lay, lambdas=lams, tasks=names, **hp)
                delta = delta.view(pre.shape)
            pre_f = pre if pre.dtype == torch.float32 else scratch.get("base", pre.numel()).view(pre.shape).copy_(pre)
            if votes is not None:
                deferred.note(k, pre_f, delta, lam, votes, pre.dtype)
            return torch.add(pre_f, delta, alpha=lam, out=delta)  # float32; the writer converts it to pre's dtype

        all_keys = sorted(base)
        meta = {k: (base.shape(k), base.dtype(k)) for k in all_keys}
        shards = _plan_shards(all_keys, meta, shard_bytes)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        def write_all(desc: str) -> dict[str, tuple[str, int]]:
            """The write pass: every shard into ``tmp``; returns key -> (shard file, offset of its bytes)."""
            where = {}
            it = iter(_progress(src.over(all_keys, base_only=set(all_keys) - selected), len(all_keys), desc, quiet))
            # a finished shard is flushed to disk (fsync) in the background while the next one is merged;
            # leaving the `with` waits for every fsync, also on an error, before tmp is patched or removed
            with ThreadPoolExecutor(1, thread_name_prefix="mergelib-sync") as syncer:
                synced = []
                for i, shard_keys in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    w = _ShardWriter(tmp / fname, shard_keys, meta)
                    try:
                        for k in shard_keys:
                            next(it)
                            w.add(k, merged_tensor(k))
                            where[k] = (fname, w.starts[k])
                        synced.append(w.close(syncer))
                    except BaseException:
                        w.abort()
                        raise
            for fut in synced:
                fut.result()  # a failed fsync (a full disk) is the merge's error
            return where

        try:
            where = write_all(f"merging ({method})")
            if deferred is not None and deferred.votes > 0:  # positive majority sign: not the one written
                if deferred.overflow:  # too many entries to patch: the write pass again, the sign known
                    state.update(majority=1, budget=state["budget0"])
                    if "exact" in state:  # the ties counted again, from the first tensor
                        state["exact"] = state["exact"].fresh()
                    where = write_all(f"merging ({method}), majority sign +")
                else:
                    deferred.patch(tmp, where, meta)
            weight_map = {k: f for k, (f, _) in where.items()}
            total = sum(math.prod(meta[k][0]) * torch.empty((), dtype=meta[k][1]).element_size() for k in all_keys)
            command = _command_line(pretrained, finetuned, out, method, None if scale is None else lams or lam,
                                    rules, include, exclude, hp, shard_bytes)
            index = {"metadata": {"total_size": total, "merged_by": "mergelib", "method": method,
                                  "scale": lam if lams is None else lams, "hyperparameters": dict(hp),
                                  "borrowed_from_pretrained": borrowed, "copied_from_pretrained": model_files,
                                  "command": command},
                     "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            (tmp / "README.md").write_text(_model_card(spec, pretrained, finetuned, command, lam, lams, hp,
                                                       len(keys), len(all_keys), borrowed, model_files))
            for name in model_files:  # config.json, the tokenizer's files...: a complete model directory
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(base.path.parent / name, tmp / name)
            if model_files:
                _say(f"copied {', '.join(model_files)} from the pretrained checkpoint's directory "
                     f"(copy_files=False / --no-copy-files: none)", quiet)
            if out.exists():  # overwrite: swap in the complete result, then drop the old one
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(e.errno, f"disk full while writing the merge to {tmp}; nothing was "
                                             f"written to {out} and the inputs are untouched") from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


# ----------------------------------------------------------------------------------------------
# Command line: python -m mergelib.merge PRETRAINED FINETUNED... --out DIR --method NAME [--HPARAM V]
# ----------------------------------------------------------------------------------------------
def _parse_value(v: str):
    """A --NAME VALUE of the command line: true/false (any case), int, float, else the text. Not
    :func:`mergelib.sweep.parse_value`, which must read values exactly as papermill's ``-p`` does
    (only ``True``/``False``) because it passes them on to notebooks."""
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _cli_text(v) -> str:
    """A value as the command line takes it (:func:`_parse_value` reads it back): ``true``/``false``, else ``str``."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def _option(name: str) -> str:
    """A hyperparameter's option on the command line (``sign_rule`` -> ``--sign-rule``; :func:`main` reads it
    back): for ``--help``, the model card's command and the errors that name options."""
    return "--" + name.replace("_", "-")


def _choice_arg(choices: Sequence[str]):
    """An argparse ``type`` for ``--method`` and ``--rules``: the name if it is one of ``choices``, else an
    argument error naming the closest choice (argparse's ``choices=`` gives no hint before Python 3.14)."""
    import argparse

    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r}{did_you_mean(text, choices)} "
                                             f"(choose from {', '.join(choices)})")
        return text
    return check


def _scale_arg(text: str):
    """``--scale``: one number, or comma-separated numbers (one per fine-tuned checkpoint)."""
    import argparse
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers (one per fine-tuned "
                                         f"checkpoint), got {text!r}") from None
    return parts[0] if len(parts) == 1 else parts


def _methods_help(width: int = 100) -> str:
    """The methods and their hyperparameters for ``--help``, from :data:`mergelib.merging.REGISTRY`, as they are
    typed on the command line (``--sign-rule count``, ``--compat-official true``)."""
    import textwrap

    def wrap(text: str, indent: str, hanging: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=hanging)

    lines = ["methods (--method NAME) and their hyperparameters (--NAME VALUE or --NAME=VALUE, after the paths):"]
    for m in REGISTRY.values():
        lam = "lambda fixed to 1/N" if m.default_scale is None else \
            f"default --scale {m.default_scale:g}" + (", or one per task" if m.per_task_scale else "")
        lines += wrap(f"{m.name}: {m.doc} ({m.paper}; {m.scope}; {lam})", "  ", "      ")
        for h in m.hparams:
            allowed = "true/false" if h.kind == "flag" else h.allowed.replace("`", "")
            lines += wrap(f"{_option(h.name)} {_cli_text(h.default)} ({allowed}): {h.doc.replace('`', '')}",
                          "      ", "          ")
    lines += [""] + wrap(f"Streaming methods: {_STREAMING}.", "", "") + [
        "Example:",
        "  python -m mergelib.merge base.safetensors ft1/ ft2/model.safetensors.index.json \\",
        "      --out merged/ --method ties --density 0.2 --granularity global"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mergelib.merge``: exit status 0 (the output directory printed), 2 for bad arguments or a
    named error of :func:`merge_files` (printed, nothing written)."""
    import argparse
    ap = argparse.ArgumentParser(
        prog="python -m mergelib.merge", allow_abbrev=False,  # --s... stays a hyperparameter, not --scale
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge safetensors checkpoints on disk, tensor by tensor (mergelib.merge_files): the "
                    "same bits as\nmergelib.merge() on the loaded state dicts, in the memory of a few tensors.",
        epilog=_methods_help())
    ap.add_argument("pretrained", help="the base model: a .safetensors file, a *.safetensors.index.json or a "
                                       "directory holding one")
    ap.add_argument("finetuned", nargs="+", help="the fine-tuned models, each as the base")
    ap.add_argument("--out", required=True, help="directory for the merged sharded checkpoint and its index "
                                                 "(written atomically; must not exist unless --overwrite)")
    ap.add_argument("--method", required=True, type=_choice_arg(METHODS), metavar="NAME",
                    help="one of " + ", ".join(METHODS) + " (below)")
    ap.add_argument("--scale", type=_scale_arg, default=None, metavar="LAMBDA",
                    help="lambda: one number, or comma-separated per-task values (default: the method's)")
    ap.add_argument("--rules", default="auto", type=_choice_arg(["auto", "none", *DEFAULT_RULES]),
                    metavar="RULES",
                    help="which tensors take part: auto (by the detected model family), none (every float "
                         "tensor) or one of " + ", ".join(DEFAULT_RULES) + " (default: auto)")
    ap.add_argument("--include", action="append", metavar="REGEX",
                    help="merge only the keys that match one of these regexes (re.search; repeatable; replaces "
                         "the rule's includes)")
    ap.add_argument("--exclude", action="append", metavar="REGEX",
                    help="leave the keys that match this regex at the base (repeatable; added to the rule's)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the merge "
                                                             "is complete)")
    ap.add_argument("--shard-size-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3, metavar="GB",
                    help="largest output shard (default: %(default)g; one tensor may exceed it)")
    ap.add_argument("--no-copy-files", action="store_true",
                    help="do not copy config.json, the tokenizer's files and the like from the pretrained "
                         "checkpoint's directory (copied by default where it holds a config.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    args, rest = ap.parse_known_args(argv)
    hparams = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or len(tok) < 3:
            ap.error(f"hyperparameters must be given as --NAME VALUE or --NAME=VALUE, got {tok!r}")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                ap.error(f"hyperparameter --{name} needs a value (--{name} VALUE)")
            value, i = rest[i + 1], i + 1
        hparams[name.replace("-", "_")] = _parse_value(value)
        i += 1
    allowed = [h.name for h in REGISTRY[args.method].hparams]
    unknown = [n for n in hparams if n not in allowed]
    if unknown:  # named as options, with the closest option to a mistyped one
        ap.error(f"unknown hyperparameter(s) {', '.join(map(_option, unknown))} for method {args.method}"
                 f"{did_you_mean_each(unknown, allowed, _option)}; allowed: "
                 f"{', '.join(map(_option, allowed)) or 'none'} (python -m mergelib.merge --help)")
    try:
        out = merge_files(args.pretrained, args.finetuned, args.out, args.method, scale=args.scale,
                          include=args.include, exclude=args.exclude,
                          rules=None if args.rules == "none" else args.rules, overwrite=args.overwrite,
                          shard_bytes=int(args.shard_size_gb * 1024**3), quiet=args.quiet,
                          copy_files=not args.no_copy_files, **hparams)
    except (CheckpointError, ValueError, TypeError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
