"""Small shared helpers: devices, seeding, profiles, tolerant comparisons.

Everything device- or profile-dependent in the suite goes through these functions, so a notebook
runs unchanged on a GPU and on a CPU: only the *sizes* chosen by the profile differ.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .hparams import did_you_mean

PROFILES = ("quick", "full")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a torch.device: "auto"/None picks CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine")
    return dev


def resolve_profile(profile: str = "auto", device: str | torch.device | None = "auto") -> str:
    """"auto" -> "full" on a GPU, "quick" on the CPU. Any other value must be a known profile."""
    if profile == "auto":
        return "full" if resolve_device(device).type == "cuda" else "quick"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}{did_you_mean(profile, PROFILES)}; expected 'auto' or one of "
                         f"{PROFILES}")
    return profile


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels.

    Returns a CPU ``torch.Generator`` seeded with ``seed`` for callers that want explicit randomness.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def versions() -> dict[str, str]:
    """Versions of the pieces that determine numerical results (recorded with every checkpoint)."""
    import platform

    import torchvision

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def check_close(mine: Any, ref: Any, name: str = "result", rtol: float = 1e-5, atol: float = 1e-6,
                verbose: bool = True) -> float:
    """Compare a hand-built result with the library's (tensors or state dicts), karpathy-style.

    Prints ``exact / approx / max-diff`` and raises ``AssertionError`` when not allclose.
    Returns the maximal absolute difference.
    """
    if isinstance(mine, Mapping):
        if set(mine) != set(ref):
            raise AssertionError(f"{name}: keys differ: only mine {sorted(set(mine) - set(ref))}, "
                                 f"only ref {sorted(set(ref) - set(mine))}")
        diffs = [check_close(mine[k], ref[k], f"{name}[{k}]", rtol, atol, verbose=False) for k in mine]
        maxdiff = max(diffs, default=0.0)
        if verbose:
            print(f"{name:30s} | {len(mine)} tensors all close | max-diff: {maxdiff:.2e}")
        return maxdiff
    a, b = torch.as_tensor(mine), torch.as_tensor(ref)
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    exact = bool(torch.equal(a64, b64))
    approx = bool(torch.allclose(a64, b64, rtol=rtol, atol=atol))
    maxdiff = float((a64 - b64).abs().max()) if a.numel() else 0.0
    if verbose:
        print(f"{name:30s} | exact: {exact!s:5} | approx: {approx!s:5} | max-diff: {maxdiff:.2e}")
    if not approx:
        raise AssertionError(f"{name}: not close (max-diff {maxdiff:.3e}, rtol={rtol}, atol={atol})")
    return maxdiff


STALE_TMP_AGE_S = 3600.0


def sweep_stale_temporaries(folder: str | os.PathLike, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Remove the hidden temporaries ``.<name>.*.tmp`` that :func:`atomic_files` leaves behind when a
    save is killed (SIGKILL, power loss: no ``finally`` runs), if older than ``max_age_s`` seconds.

    Younger ones are kept (another process may be writing them). Returns the removed paths.
    """
    removed = []
    now = time.time()
    for p in Path(folder).glob(".*.tmp"):
        try:
            if p.is_file() and now - p.stat().st_mtime > max_age_s:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # removed concurrently
            pass
    return removed


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_files(*targets: str | os.PathLike) -> Iterator[list[str]]:
    """Write files so that each appears complete or not at all.

    Yields one temporary path per target, in the target's folder (stale temporaries of killed saves
    in that folder are swept first, :func:`sweep_stale_temporaries`). When the block ends without an
    exception, each temporary file is flushed to disk (``fsync``), gets ordinary permissions
    (``mkstemp`` creates 0600) and is renamed onto its target *in the order given*, so the file that
    marks a set as complete goes last; then the folder is synced. On any exception (an interrupt
    included) the temporary files are removed and the targets are untouched.
    """
    paths = [Path(t) for t in targets]
    tmps: list[str] = []
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale_temporaries(p.parent)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
            os.close(fd)
            tmps.append(tmp)
        yield tmps
        umask = os.umask(0)
        os.umask(umask)
        for tmp, p in zip(tmps, paths):
            _fsync_path(tmp)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, p)
        for folder in {p.parent for p in paths}:
            if os.name == "posix":
                _fsync_path(folder, directory=True)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


PROGRESS_MININTERVAL = 2.0


@contextmanager
def cache_lock(target: str | os.PathLike, timeout_s: float = -1) -> Iterator[None]:
    """Hold an inter-process lock for building the cache entry ``target`` (``.<name>.lock`` beside it).

    Two processes that need the same model or result (e.g. two notebooks executed in parallel by
    ``make test``) would otherwise both compute it: with the lock, the second waits and then loads what
    the first saved. Callers check the cache again after acquiring the lock. Locks are advisory
    (``filelock``, which torch already depends on); ``timeout_s < 0`` waits forever.
    """
    from filelock import FileLock

    p = Path(target)
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p.parent / f".{p.name}.lock"), timeout=timeout_s):
        yield


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A ``tqdm.auto`` bar that redraws at most every ``PROGRESS_MININTERVAL`` seconds.

    In Jupyter every redraw is a widget message on the kernel's IOPub channel. ZeroMQ queues about
    1000 messages per socket and drops the rest, and nbval reads IOPub only after a cell has finished:
    a long cell whose bars redraw many times per second loses messages, the final "idle" status among
    them, and nbval fails with "Timeout of 5 seconds exceeded waiting for output". Callers pass
    ``refresh=False`` to ``set_postfix`` so that postfix changes ride on the next timed redraw.
    """
    kwargs.setdefault("mininterval", PROGRESS_MININTERVAL)
    return tqdm(iterable, **kwargs)


def minibatch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index tensors of ``min(batch_size, n)`` samples, drawn without replacement per epoch.

    A fresh ``torch.randperm(n, generator=generator)`` starts each epoch, and an epoch ends when fewer
    than a full batch is left (the remainder is skipped), so every batch has the same size.
    """
    if n < 1 or batch_size < 1 or steps < 0:
        raise ValueError(f"need n >= 1, batch_size >= 1 and steps >= 0, got {n}, {batch_size}, {steps}")
    bs = min(batch_size, n)
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos:pos + bs]
        pos += bs
