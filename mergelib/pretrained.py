"""Checkpoints trained by other people, fetched on demand and verified (as torchvision does).

Notebook 05 merges five CIFAR-10 ResNet-20s that were trained independently, from different random
initialisations, by the authors of two public GitHub repositories (BSD-2-Clause, after the upstream
akamaster repository). Each file is pinned by its URL at a fixed commit and its SHA-256.

Where the files are looked for, in order:

1. ``directory`` (a notebook's ``PRETRAINED_DIR``), else ``$MERGELIB_PRETRAINED``, else
   ``<checkout>/data/pretrained``; in each, the files are expected under ``cifar10-resnet20/``;
2. if a file is missing there and downloads are allowed (``download=True`` or
   ``MERGELIB_DOWNLOAD=1``), it is downloaded from its pinned URL into ``<checkout>/data/pretrained``
   (or ``directory``), verified, and moved into place atomically.

A file whose SHA-256 differs is never used: :class:`ChecksumError` names it. A missing file with
downloads not allowed raises :class:`PretrainedNotFoundError`, which names the files, where they
were looked for, and both ways to provide them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .data import DOWNLOAD_ENV, PROJECT_ROOT, download_allowed
from .utils import atomic_files

__all__ = ["PRETRAINED_ENV", "Checkpoint", "RESNET20_CHECKPOINTS", "PretrainedNotFoundError", "ChecksumError",
           "pretrained_dir", "resnet20_checkpoints", "sha256_file"]

PRETRAINED_ENV = "MERGELIB_PRETRAINED"


@dataclass(frozen=True)
class Checkpoint:
    filename: str
    url: str
    sha256: str
    reported_top1: float  # as reported by its authors on the original CIFAR-10 test set


_AKA = "https://raw.githubusercontent.com/akamaster/pytorch_resnet_cifar10/d5489e8"
_DAN = "https://raw.githubusercontent.com/DanSun18/pytorch_resnet_cifar10/b3e085b"
RESNET20_CHECKPOINTS: tuple[Checkpoint, ...] = (
    Checkpoint("akamaster-resnet20.th", f"{_AKA}/pretrained_models/resnet20-12fca82f.th",
               "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 91.78),
    Checkpoint("dansun18-run1-resnet20.th", f"{_DAN}/experiments/run_1/save_resnet20/model.th",
               "037d3256b4e936ef62428c37521389fe4a7f7e414d3c8587481c3ca94e143457", 91.78),
    Checkpoint("dansun18-run2-resnet20.th", f"{_DAN}/experiments/run_2/save_resnet20/model.th",
               "9890da784ec62603d4a514b9c85b9d9276878d71fa28571f1e623e5b3ce5e6de", 91.89),
    Checkpoint("dansun18-run4-resnet20.th", f"{_DAN}/experiments/run_4/save_resnet20/model.th",
               "7810a0bfc4d2357de1eae9625e831f0fb169c0d90740dc461c54a217d3a14251", 91.62),
    Checkpoint("dansun18-run5-resnet20.th", f"{_DAN}/experiments/run_5/save_resnet20/model.th",
               "79f049a042a2ba3420f238a80bf5128bf33e4528e4edf1e1a441c042a7c85cb2", 92.57),
)
SUBDIR = "cifar10-resnet20"


class PretrainedNotFoundError(FileNotFoundError):
    """A pinned checkpoint is not on disk and downloading was not allowed (or failed)."""


class ChecksumError(RuntimeError):
    """A checkpoint file exists but its SHA-256 is not the pinned one."""


def pretrained_dir(directory: str | os.PathLike | None = None) -> Path:
    """``directory``, else ``$MERGELIB_PRETRAINED``, else ``<checkout>/data/pretrained``."""
    if directory is None or str(directory) == "":
        directory = os.environ.get(PRETRAINED_ENV) or PROJECT_ROOT / "data" / "pretrained"
    return Path(directory).expanduser().resolve()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(ck: Checkpoint, target: Path) -> None:
    with atomic_files(target) as (tmp,):
        with urllib.request.urlopen(ck.url, timeout=60) as r, open(tmp, "wb") as f:  # noqa: S310 (pinned https URL)
            shutil.copyfileobj(r, f)
        digest = sha256_file(tmp)
        if digest != ck.sha256:
            raise ChecksumError(f"downloaded {ck.url} has SHA-256 {digest}, expected {ck.sha256}; nothing was kept")


def resnet20_checkpoints(directory: str | os.PathLike | None = None, download: bool | None = None,
                         verify: bool = True) -> list[Path]:
    """Paths of the five pinned ResNet-20 checkpoints (in :data:`RESNET20_CHECKPOINTS` order), verified.

    Load one with :func:`mergelib.models.load_resnet20_checkpoint`.
    """
    root = pretrained_dir(directory)
    folder = root / SUBDIR
    paths, missing = [], []
    for ck in RESNET20_CHECKPOINTS:
        p = folder / ck.filename
        if not p.is_file() and download_allowed(download):
            try:
                _download(ck, p)
            except ChecksumError:
                raise
            except Exception as exc:  # no network, blocked host
                raise PretrainedNotFoundError(f"could not download {ck.url}: {exc}") from exc
        if not p.is_file():
            missing.append(ck)
            continue
        if verify:
            digest = sha256_file(p)
            if digest != ck.sha256:
                raise ChecksumError(f"{p} has SHA-256 {digest[:12]}..., expected {ck.sha256[:12]}... "
                                    "(a damaged or different file): delete it, or replace it with the pinned file "
                                    f"from {ck.url}")
        paths.append(p)
    if missing:
        lines = [f"{len(missing)} of {len(RESNET20_CHECKPOINTS)} pretrained ResNet-20 checkpoints are missing "
                 f"under {folder}: " + ", ".join(ck.filename for ck in missing),
                 "to provide them, either",
                 f"  * with internet, allow the download of the pinned files: set {DOWNLOAD_ENV}=1 "
                 "(or pass download=True), or",
                 f"  * point {PRETRAINED_ENV} (or PRETRAINED_DIR) at a folder holding {SUBDIR}/<file>; the files come from",
                 *[f"      {ck.url} -> {ck.filename} (sha256 {ck.sha256})" for ck in missing]]
        raise PretrainedNotFoundError("\n".join(lines))
    return paths
