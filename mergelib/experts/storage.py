"""Saving and loading experts: safetensors files with a verified SHA-256 checksum.

:func:`save_expert` writes the tensors of :meth:`Expert.state_dict` and the JSON of
:meth:`Expert.config` as metadata, atomically (temporary file in the same folder, ``fsync``, then
``os.replace``; :func:`mergelib.utils.atomic_files`), plus a SHA-256 over the config and every tensor's
name, dtype, shape and bytes. :func:`read_expert_file` recomputes it and raises
:class:`CorruptExpertError` on a mismatch, so a flipped byte never loads silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..utils import atomic_files

__all__ = ["CorruptExpertError", "save_expert", "load_expert", "read_expert_file", "expert_checksum"]

_META_KEY = "mergelib_expert"
_SUM_KEY = "mergelib_sha256"


class CorruptExpertError(RuntimeError):
    """An expert file exists but is damaged (checksum mismatch, no checksum, unreadable)."""


def expert_checksum(tensors: Mapping[str, Tensor], config_json: str) -> str:
    """SHA-256 (hex) of the config JSON and, in sorted key order, each tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256(config_json.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_expert(expert, path: str | os.PathLike) -> Path:
    """Write ``expert`` to ``path`` (``.safetensors``) atomically, with its checksum; returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in expert.state_dict().items()}
    config_json = json.dumps(expert.config())
    meta = {_META_KEY: config_json, _SUM_KEY: expert_checksum(tensors, config_json)}
    with atomic_files(path) as (tmp,):  # fsyncs the file and the folder
        save_file(tensors, tmp, metadata=meta)
    return path


def read_expert_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state, config)`` of an expert file, checksum verified (CPU tensors).

    Raises ``FileNotFoundError``, ``ValueError`` for a file that is not a mergelib expert, and
    :class:`CorruptExpertError` for an unreadable file, a missing checksum or a checksum mismatch.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CorruptExpertError(f"expert file {path} cannot be read: {exc}") from exc
    if _META_KEY not in meta:
        raise ValueError(f"{path}: not a mergelib expert file (no {_META_KEY!r} metadata)")
    if _SUM_KEY not in meta:
        raise CorruptExpertError(f"expert file {path} carries no checksum ({_SUM_KEY!r}); save it again")
    digest = expert_checksum(state, meta[_META_KEY])
    if digest != meta[_SUM_KEY]:
        raise CorruptExpertError(f"expert file {path} is damaged: SHA-256 {digest[:12]}... does not match "
                                 f"the stored {meta[_SUM_KEY][:12]}...; delete it and save the expert again")
    try:
        config = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:  # pragma: no cover - the checksum covers the config
        raise CorruptExpertError(f"expert file {path}: unreadable config: {exc}") from exc
    if not isinstance(config, dict):
        raise CorruptExpertError(f"expert file {path}: config is not a JSON object")
    return state, config


def load_expert(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a :class:`SparseExpert` or :class:`LowRankExpert` written by :meth:`Expert.save`."""
    from .base import Expert
    return Expert.load(path, device)
