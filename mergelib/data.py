"""Named tasks on real datasets, loaded once as tensors.

Where the data lives
--------------------
The data root is, in order: the ``root`` argument (a notebook's ``DATA_ROOT`` parameter), the
environment variable ``MERGELIB_DATA_ROOT``, else ``<checkout>/data``. The root uses torchvision's
layout (``MNIST/raw/...``, ``FashionMNIST/raw/...``, ``KMNIST/raw/...``, ``USPS/usps*.bz2``, and for
CIFAR-10 either torchvision's ``cifar-10-batches-py/`` or an ImageFolder of JPEGs ``CIFAR10-jpg/``).

Downloads happen only when asked for: ``download=True`` or ``MERGELIB_DOWNLOAD=1``. Otherwise a
missing dataset raises :class:`DatasetNotFoundError`, which lists the files that are missing, where
they were looked for, and how to provide them. Tests and CI never download.

The tasks
---------
Pretraining data is disjoint from every downstream task: the backbone is pretrained on six CIFAR-10
classes (airplane, automobile, bird, cat, deer, dog) and on rendered letters (``glyphs``, no digits;
:mod:`mergelib.glyphs`), and the remaining four CIFAR-10 classes (frog, horse, ship, truck) form the
downstream task ``cifar4``. The other downstream tasks come from five more
sources, each with its own label space and head:

=========  =====================  =======  ============================================
task       source                 classes  note
=========  =====================  =======  ============================================
mnist      MNIST                  10       handwritten digits
fashion    Fashion-MNIST          10       clothing
kmnist     KMNIST                 10       cursive Japanese characters
usps       USPS (LIBSVM)          10       digits scanned from envelopes, 16x16
digits     scikit-learn digits    10       8x8 digits bundled with scikit-learn
cifar4     CIFAR-10 (4 classes)   4        frog, horse, ship, truck
=========  =====================  =======  ============================================

Where a split is missing (the offline copy has KMNIST's and USPS's test split only), a fixed,
seeded split is carved from what exists (:data:`CARVE_SEED`, :data:`CARVE_TEST_FRACTION`) and a
message says so. ``split="val"`` is always a fixed, seeded slice of the training split that the
``"train"`` split then excludes.

Every task is returned as uint8 images ``(N, 3, 32, 32)`` (grayscale replicated to three
channels, resized with antialiasing) plus int64 labels: small enough to keep resident on the GPU,
normalised per batch by :func:`normalize`.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from . import glyphs as _glyphs
from .utils import atomic_files

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT_ENV = "MERGELIB_DATA_ROOT"
DOWNLOAD_ENV = "MERGELIB_DOWNLOAD"
CACHE_ENV = "MERGELIB_CACHE"

# Normalisation used by every model of the course (also what the shared ResNet-20 checkpoints expect).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PRETRAIN_CLASSES = CIFAR10_CLASSES[:6]
CIFAR4_CLASSES = CIFAR10_CLASSES[6:]

CARVE_SEED = 20240901          # fixed seed of carved splits (documented; never change silently)
CARVE_TEST_FRACTION = 0.25     # fraction of a lone split kept as test when the train split is missing
VAL_SEED = 20240902
VAL_FRACTION = 0.1             # fraction of the train split held out as "val"
CACHE_VERSION = 1


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not under the data root and downloading was not allowed (or failed)."""


@dataclass
class TaskData:
    """A split of a task as tensors: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,)."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: str | torch.device) -> "TaskData":
        return TaskData(self.name, self.split, self.x.to(device), self.y.to(device), self.classes, self.notes)

    def subset(self, n: int | None, seed: int = 0) -> "TaskData":
        """A fixed, seeded random subset of ``n`` samples (all of them when n is None or too large)."""
        idx = seeded_subset_index(len(self), n, seed)
        if idx is None:
            return self
        idx = idx.to(self.y.device)
        return TaskData(self.name, self.split, self.x[idx], self.y[idx], self.classes, self.notes)


def seeded_subset_index(length: int, n: int | None, seed: int = 0) -> torch.Tensor | None:
    """Sorted indices of a fixed seeded random subset of ``n`` out of ``length`` (None: keep everything)."""
    if n is None or n >= length:
        return None
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:n].sort().values


# ------------------------------------------------------------------------------------------------
# roots and options
# ------------------------------------------------------------------------------------------------
def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: argument, else ``$MERGELIB_DATA_ROOT``, else ``<checkout>/data``."""
    if root is None or str(root) == "":
        root = os.environ.get(DATA_ROOT_ENV) or PROJECT_ROOT / "data"
    return Path(root).expanduser().resolve()


def cache_dir() -> Path:
    """Where decoded tensors are cached: ``$MERGELIB_CACHE`` or ``<checkout>/data/cache``."""
    return Path(os.environ.get(CACHE_ENV) or PROJECT_ROOT / "data" / "cache").expanduser().resolve()


def download_allowed(download: bool | None = None) -> bool:
    if download is not None:
        return bool(download)
    return os.environ.get(DOWNLOAD_ENV, "0").strip().lower() in ("1", "true", "yes")


def _missing_error(dataset: str, root: Path, missing: Sequence[str], hint: str = "") -> DatasetNotFoundError:
    lines = [
        f"{dataset} not found under the data root {root}",
        "missing: " + ", ".join(str(root / m) for m in missing),
        "to provide it, either",
        f"  * point the suite at an offline copy: set {DATA_ROOT_ENV}=/path/to/datasets "
        "(or pass DATA_ROOT / root=...), in torchvision's layout, or",
        f"  * with internet, allow torchvision to download it into {root}: set {DOWNLOAD_ENV}=1 "
        "(or pass download=True).",
    ]
    if hint:
        lines.append(hint)
    return DatasetNotFoundError("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# raw loaders: each returns {split: (images uint8 (N,H,W) or (N,H,W,3), labels int64)} for the
# splits that exist, and raises DatasetNotFoundError when none does.
# ------------------------------------------------------------------------------------------------
# the files each loader reads, per split, relative to the data root (a loader needs one split at least)
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
USPS_FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}
CIFAR10_LAYOUTS = ("cifar-10-batches-py", "CIFAR10-jpg")   # torchvision's pickles, or an ImageFolder of JPEGs


def _mnist_like(cls_name: str) -> Callable[[Path, bool], dict]:
    def load(root: Path, download: bool) -> dict:
        import torchvision.datasets as tvd

        base = getattr(tvd, cls_name)
        files = IDX_FILES
        raw = root / cls_name / "raw"
        if download and not all((raw / f).exists() for fs in files.values() for f in fs):
            try:
                base(root, train=True, download=True)
            except Exception as exc:  # network errors, blocked hosts
                warnings.warn(f"download of {cls_name} failed: {exc}")
        present = {s: fs for s, fs in files.items() if all((raw / f).exists() for f in fs)}
        if not present:
            raise _missing_error(cls_name, root, [f"{cls_name}/raw/{f}" for fs in files.values() for f in fs])

        # torchvision's _check_exists wants both splits; we checked the split we read ourselves.
        class Reader(base):  # type: ignore[misc, valid-type]
            def _check_exists(self) -> bool:
                return True

        Reader.__name__ = cls_name
        out = {}
        for split in present:
            ds = Reader(root, train=(split == "train"), download=False)
            out[split] = (ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64))
        return out

    return load


def _load_usps(root: Path, download: bool) -> dict:
    import torchvision.datasets as tvd

    folder = root / "USPS"
    names = USPS_FILES
    if download:
        for split in names:
            if not (folder / names[split]).exists():
                try:
                    tvd.USPS(folder, train=(split == "train"), download=True)
                except Exception as exc:
                    warnings.warn(f"download of USPS ({split}) failed: {exc}")
    out = {}
    for split, name in names.items():
        if (folder / name).exists():
            ds = tvd.USPS(folder, train=(split == "train"), download=False)
            out[split] = (np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64))
    if not out:
        raise _missing_error("USPS", root, [f"USPS/{n}" for n in names.values()])
    return out


def _load_cifar10(root: Path, download: bool) -> dict:
    """CIFAR-10 in torchvision's pickle format, else as an ImageFolder of JPEGs (``CIFAR10-jpg``)."""
    import torchvision.datasets as tvd

    pickles, jpg = (root / d for d in CIFAR10_LAYOUTS)
    if download and not pickles.exists() and not jpg.exists():
        try:
            tvd.CIFAR10(root, train=True, download=True)
        except Exception as exc:
            warnings.warn(f"download of CIFAR-10 failed: {exc}")
    out = {}
    if pickles.exists():
        for split in ("train", "test"):
            ds = tvd.CIFAR10(root, train=(split == "train"), download=False)
            out[split] = (np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64))
        return out
    if jpg.exists():
        from PIL import Image

        for split in ("train", "test"):
            if not (jpg / split).is_dir():
                continue
            ds = tvd.ImageFolder(str(jpg / split))
            if tuple(ds.classes) != CIFAR10_CLASSES:
                raise ValueError(f"{jpg / split}: class folders {ds.classes} are not CIFAR-10's {CIFAR10_CLASSES}")
            imgs = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p, _ in ds.samples])
            out[split] = (imgs, np.asarray(ds.targets, dtype=np.int64))
        if out:
            return out
    raise _missing_error("CIFAR-10", root, ["cifar-10-batches-py/data_batch_1..5, test_batch",
                                            "CIFAR10-jpg/{train,test}/<class>/*.jpg"],
                         hint="either layout works: torchvision's pickles or an ImageFolder of JPEGs.")


def _load_sklearn_digits(root: Path, download: bool) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return {"all": (imgs, d.target.astype(np.int64))}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    classes: tuple[str, ...]
    loader: Callable[[Path, bool], dict]
    keep_labels: tuple[int, ...] | None = None   # subset of the source's labels, relabelled 0..k-1
    description: str = ""
    modality: str = "image"                      # "text" tasks load with mergelib.text.load_text_task


DIGIT_CLASSES = tuple(str(i) for i in range(10))
TASKS: dict[str, TaskSpec] = {
    "cifar_pretrain": TaskSpec("cifar_pretrain", "CIFAR-10", PRETRAIN_CLASSES, _load_cifar10,
                               keep_labels=tuple(range(6)),
                               description="pretraining data: CIFAR-10 classes 0-5"),
    "mnist": TaskSpec("mnist", "MNIST", DIGIT_CLASSES, _mnist_like("MNIST"), description="handwritten digits"),
    "fashion": TaskSpec("fashion", "Fashion-MNIST",
                        ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Boot"), _mnist_like("FashionMNIST"), description="clothing"),
    "kmnist": TaskSpec("kmnist", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
                       _mnist_like("KMNIST"), description="cursive Japanese (Kuzushiji) characters"),
    "usps": TaskSpec("usps", "USPS", DIGIT_CLASSES, _load_usps, description="postal digits, 16x16"),
    "digits": TaskSpec("digits", "scikit-learn digits", DIGIT_CLASSES, _load_sklearn_digits,
                       description="8x8 digits bundled with scikit-learn"),
    "cifar4": TaskSpec("cifar4", "CIFAR-10", CIFAR4_CLASSES, _load_cifar10, keep_labels=(6, 7, 8, 9),
                       description="CIFAR-10 classes frog, horse, ship, truck (held out of pretraining)"),
}
# CIFAR-10 as a whole and in two disjoint halves: the alignment notebook's "same task" and
# "different tasks" settings (ResNet-20s trained from scratch; no pretrained backbone involved).
# The second pretraining source: rendered letters (no digits, no downstream image; see mergelib.glyphs).
TASKS["glyphs"] = TaskSpec("glyphs", "synthetic glyphs", _glyphs.CHARACTERS, _glyphs.load_glyphs,
                           description="85 Latin and Greek letters rendered in 16 fonts (pretraining only)")
TASKS["cifar10"] = TaskSpec("cifar10", "CIFAR-10", CIFAR10_CLASSES, _load_cifar10,
                            description="CIFAR-10, all ten classes (alignment notebook)")
TASKS["cifar10_a"] = TaskSpec("cifar10_a", "CIFAR-10", CIFAR10_CLASSES[:5], _load_cifar10, keep_labels=(0, 1, 2, 3, 4),
                              description="CIFAR-10 classes 0-4 (alignment: different tasks)")
TASKS["cifar10_b"] = TaskSpec("cifar10_b", "CIFAR-10", CIFAR10_CLASSES[5:], _load_cifar10, keep_labels=(5, 6, 7, 8, 9),
                              description="CIFAR-10 classes 5-9 (alignment: different tasks)")
DOWNSTREAM_TASKS: tuple[str, ...] = ("mnist", "fashion", "kmnist", "usps", "digits", "cifar4")
PRETRAIN_TASK = "cifar_pretrain"
# The backbone's pretraining sources (one head each): natural images and rendered letters.
PRETRAIN_TASKS: tuple[str, ...] = ("cifar_pretrain", "glyphs")


# ------------------------------------------------------------------------------------------------
# splitting, resizing, caching
# ------------------------------------------------------------------------------------------------
def _fixed_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held) of a fixed seeded split holding out ``round(n * fraction)`` samples."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


def _to_tensor_images(imgs: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(imgs))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = v2.Grayscale(num_output_channels=1)(x)
        else:
            raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = v2.Resize((image_size, image_size), antialias=True)(x)
    return x.contiguous()


def _raw_splits(spec: TaskSpec, root: Path, download: bool, use_cache: bool = True) -> tuple[dict, list[str]]:
    """Source splits as numpy arrays, with a train/test split carved where one is missing."""
    raw = _load_source_cached(spec, root, download) if use_cache else spec.loader(root, download)
    notes = []
    if spec.keep_labels is not None:
        lut = np.full(max(spec.keep_labels) + 1, -1, dtype=np.int64)
        lut[list(spec.keep_labels)] = np.arange(len(spec.keep_labels))
        for s, (xi, yi) in list(raw.items()):
            keep = np.isin(yi, spec.keep_labels)
            raw[s] = (xi[keep], lut[yi[keep]])
    if "train" not in raw or "test" not in raw:
        (have,) = raw.keys()
        xi, yi = raw[have]
        tr, te = _fixed_split(len(yi), CARVE_TEST_FRACTION, CARVE_SEED)
        raw = {"train": (xi[tr], yi[tr]), "test": (xi[te], yi[te])}
        what = "no official split" if have == "all" else f"only its {have} split was found"
        notes.append(f"{spec.name}: {what}; carved a fixed split of its {len(yi)} samples: "
                     f"{len(tr)} train / {len(te)} test (seed {CARVE_SEED}, test fraction {CARVE_TEST_FRACTION})")
    return raw, notes


def _load_source_cached(spec: TaskSpec, root: Path, download: bool) -> dict:
    """The source's splits as decoded arrays, cached on disk once per source (CIFAR-10's JPEGs take
    seconds to decode and feed four tasks)."""
    from safetensors.numpy import load_file, save_file

    path = cache_dir() / f"source-{spec.source.replace(' ', '_')}-{_source_fingerprint(spec, root)}.safetensors"
    if path.exists():
        try:
            arrays = load_file(str(path))
            return {s[:-2]: (arrays[s], arrays[s[:-2] + "_y"]) for s in arrays if s.endswith("_x")}
        except Exception as exc:
            warnings.warn(f"ignoring damaged cache file {path}: {exc}")
    raw = spec.loader(root, download)
    with atomic_files(path) as (tmp,):
        save_file({f"{s}_{c}": np.ascontiguousarray(a) for s, (x, y) in raw.items() for c, a in (("x", x), ("y", y))},
                  tmp)
    return raw


# the folder of each image source's files under the data root (CIFAR-10: one of CIFAR10_LAYOUTS)
SOURCE_FOLDERS = {"MNIST": "MNIST/raw", "Fashion-MNIST": "FashionMNIST/raw", "KMNIST": "KMNIST/raw",
                  "USPS": "USPS", "CIFAR-10": None, "scikit-learn digits": None, "synthetic glyphs": None}
FILELESS_SOURCES = ("scikit-learn digits", "synthetic glyphs")   # bundled with scikit-learn; rendered


def source_present(source: str, root: str | os.PathLike | None = None) -> bool:
    """Whether the files of an image source (a :class:`TaskSpec`'s ``source``) are under the data root,
    checked without reading them: one complete split, as the loaders need (scikit-learn's digits and the
    rendered letters need no files)."""
    root_p = data_root(root)
    if source not in SOURCE_FOLDERS:
        raise KeyError(f"unknown image source {source!r}; known: {sorted(SOURCE_FOLDERS)}")
    if source == "USPS":
        return any((root_p / SOURCE_FOLDERS[source] / f).is_file() for f in USPS_FILES.values())
    if source == "CIFAR-10":
        return any((root_p / d).is_dir() for d in CIFAR10_LAYOUTS)
    if source in FILELESS_SOURCES:
        return True
    raw = root_p / SOURCE_FOLDERS[source]
    return any(all((raw / f).is_file() for f in files) for files in IDX_FILES.values())


def _source_fingerprint(spec: TaskSpec, root: Path) -> str:
    """Cheap fingerprint of the source files (names, sizes, mtimes) so a changed root invalidates the cache."""
    folder = SOURCE_FOLDERS.get(spec.source)
    parts = [str(root), spec.source, str(CACHE_VERSION)]
    if folder:
        d = root / folder
        if d.is_dir():
            parts += [f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in sorted(d.iterdir()) if p.is_file()]
    elif spec.source == "synthetic glyphs":
        import matplotlib

        parts += [f"glyphs-v{_glyphs.GLYPHS_VERSION}", f"matplotlib-{matplotlib.__version__}"]
    elif spec.source == "CIFAR-10":
        for sub in ("cifar-10-batches-py", "CIFAR10-jpg"):
            if (root / sub).exists():
                parts.append(f"{sub}:{int((root / sub).stat().st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_task(name: str, split: str = "train", root: str | os.PathLike | None = None,
              download: bool | None = None, image_size: int = 32, channels: int = 3,
              max_samples: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
              use_cache: bool = True, verbose: bool = True) -> TaskData:
    """Load one split of a named task as tensors.

    Args:
        name: a key of :data:`TASKS` (e.g. ``"mnist"``).
        split: ``"train"`` (the training split minus the validation slice), ``"val"`` or ``"test"``.
        root: the data root (see :func:`data_root`).
        download: allow torchvision to download a missing dataset (default: ``$MERGELIB_DOWNLOAD``).
        image_size, channels: output resolution; grayscale is replicated to 3 channels.
        max_samples: keep a fixed seeded random subset of this size (the quick profile's subsets).
        device: where the tensors are placed (keep them on the GPU to avoid loader overhead).

    Returns:
        :class:`TaskData` with ``x`` uint8 ``(N, channels, image_size, image_size)`` and ``y`` int64.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    spec, root_p = TASKS[name], data_root(root)
    if spec.modality != "image":
        raise ValueError(f"{name!r} is a {spec.modality} task: load it with mergelib.text.load_text_task")
    key = hashlib.sha256(json.dumps([name, image_size, channels, _source_fingerprint(spec, root_p)]).encode())
    cache_file = cache_dir() / f"{name}-{image_size}px-{channels}ch-{key.hexdigest()[:12]}.safetensors"
    tensors, notes = None, []
    if use_cache and cache_file.exists():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(cache_file))
            with open(cache_file.with_suffix(".json")) as f:
                notes = json.load(f)["notes"]
        except Exception as exc:  # a damaged cache entry is rebuilt, not used
            warnings.warn(f"ignoring damaged cache file {cache_file}: {exc}")
            tensors = None
    if tensors is None:
        raw, notes = _raw_splits(spec, root_p, download_allowed(download), use_cache)
        tensors = {}
        for s, (xi, yi) in raw.items():
            tensors[f"{s}_x"] = _to_tensor_images(xi, image_size, channels)
            tensors[f"{s}_y"] = torch.from_numpy(np.ascontiguousarray(yi)).long()
        if use_cache:
            _atomic_save_tensors(tensors, cache_file, {"notes": notes, "task": name})
    if verbose:
        for n in notes:
            print(f"[mergelib.data] {n}")
    if split == "test":
        x, y = tensors["test_x"], tensors["test_y"]
    else:
        rest, held = _fixed_split(len(tensors["train_y"]), VAL_FRACTION, VAL_SEED)
        idx = torch.from_numpy(held if split == "val" else rest)
        x, y = tensors["train_x"][idx], tensors["train_y"][idx]
    data = TaskData(name, split, x, y, spec.classes, list(notes)).subset(max_samples, seed)
    return data.to(device)


def _atomic_save_tensors(tensors: dict, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    # the record first, the tensors last: a cache entry counts once its tensors file exists
    with atomic_files(path.with_suffix(".json"), path) as (tmp_json, tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp_json, "w") as f:
            json.dump(meta, f)


def normalize(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float32 normalised with per-channel ``mean``/``std``."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x.dtype}")
    c = x.shape[1]
    m = torch.tensor(mean[:c] if c > 1 else mean[:1], device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std[:c] if c > 1 else std[:1], device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Batched random crop (with ``pad`` pixels of zero padding) and horizontal flip, on any device.

    ``generator`` must live on the CPU; the random offsets are moved to ``x``'s device.
    """
    b, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * pad)
        xp = torch.gather(xp, 2, rows)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
        x = torch.gather(xp, 3, cols)
    if flip:
        m = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def describe_tasks(tasks: Sequence[str] = DOWNSTREAM_TASKS) -> list[dict]:
    """Rows for a table of tasks: name, source, number of classes, description."""
    return [dict(task=t, source=TASKS[t].source, classes=len(TASKS[t].classes), description=TASKS[t].description)
            for t in tasks]
