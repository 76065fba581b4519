"""The model zoo: a load-or-train cache of checkpoints, and the recipes that fill it.

Every checkpoint is a pair of files under ``<zoo root>/<profile>/``::

    <name>-<hash>.safetensors   the tensors
    <name>-<hash>.json          its record: configuration, metrics, training history, versions,
                                device, training time, and the SHA-256 of the .safetensors file

``<hash>`` is a hash of the configuration (and of :data:`ZOO_FORMAT`), so a changed configuration
never loads a stale model. Writes are atomic: both files are written to temporary names and renamed
into place, the record last; a checkpoint counts only when its record exists and the checksum
matches, so an interrupted run never leaves something that loads as valid. A damaged file (checksum
mismatch, truncated, unreadable) raises :class:`CorruptCheckpointError` naming the file, unless
``on_corrupt="retrain"`` is passed.

The zoo root is ``$MERGELIB_ZOO`` if set, else ``<checkout>/data/zoo``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from . import data as mdata
from .data import PROJECT_ROOT, TaskData
from .models import Classifier, ViT
from .training import evaluate, extract_features, train_classifier, train_linear_probe, train_multitask
from .utils import atomic_files, cache_lock, resolve_device, resolve_profile, sweep_stale_temporaries, versions

ZOO_ENV = "MERGELIB_ZOO"
ZOO_FORMAT = 1

__all__ = ["CorruptCheckpointError", "config_hash", "zoo_dir", "save_checkpoint", "load_checkpoint",
           "load_or_train", "store_by_product", "VIT_PROFILES", "EARLY_PRETRAIN_FRACTIONS",
           "BACKBONE_VARIANT_FRACTIONS", "ViTZoo", "vit_zoo", "vit_backbone_variants"]


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but is damaged (checksum mismatch, truncated or unreadable)."""


# ------------------------------------------------------------------------------------------------
# generic load-or-train cache
# ------------------------------------------------------------------------------------------------
def config_hash(config: Mapping) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of ``config`` (plus the zoo format)."""
    blob = json.dumps({"config": config, "format": ZOO_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def zoo_dir(profile: str, root: str | os.PathLike | None = None) -> Path:
    base = Path(root or os.environ.get(ZOO_ENV) or PROJECT_ROOT / "data" / "zoo").expanduser()
    return base.resolve() / profile


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], record: Mapping) -> dict:
    """Atomically write ``path`` (.safetensors) and its ``.json`` record; returns the record written."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
    # tensors first, the record last: only once the record is in place does the checkpoint count
    with atomic_files(path, path.with_suffix(".json")) as (tmp, tmp_json):
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"name": path.stem, "format": str(ZOO_FORMAT)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        rec = dict(record)
        rec["sha256"] = _sha256(Path(tmp))
        rec["file"] = path.name
        with open(tmp_json, "w") as f:
            json.dump(rec, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
    return rec


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`, verifying its checksum.

    Raises ``FileNotFoundError`` when the checkpoint (record or tensors) does not exist, and
    :class:`CorruptCheckpointError` when it exists but is damaged.
    """
    from safetensors.torch import load_file

    path = Path(path)
    rec_path = path.with_suffix(".json")
    if not rec_path.exists():
        raise FileNotFoundError(f"no checkpoint record {rec_path}")
    try:
        with open(rec_path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"checkpoint record {rec_path} is unreadable: {exc}") from exc
    if not isinstance(record, dict):
        raise CorruptCheckpointError(f"checkpoint record {rec_path} is not a JSON object "
                                     f"(got {type(record).__name__})")
    if not path.exists():
        raise CorruptCheckpointError(f"checkpoint record {rec_path.name} exists but its tensors {path} are missing")
    digest = _sha256(path)
    if digest != record.get("sha256"):
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: SHA-256 {digest[:12]}... does not match its record "
            f"({str(record.get('sha256'))[:12]}...). Delete both files ({path.name}, {rec_path.name}) "
            "or pass on_corrupt='retrain' to train it again.")
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:
        raise CorruptCheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    return tensors, record


def load_or_train(name: str, config: Mapping, train_fn: Callable[[], tuple[dict, dict]], profile: str,
                  root: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  retrain: bool = False, on_corrupt: str = "raise", verbose: bool = True) -> tuple[dict, dict]:
    """Return ``(tensors, record)`` for ``name`` under ``config``: loaded if cached, else trained.

    ``train_fn()`` must return ``(tensors, info)``; ``info`` (metrics, history, ...) is stored in the
    record together with the configuration, versions, device and wall time of training.
    """
    if on_corrupt not in ("raise", "retrain"):
        raise ValueError(f"on_corrupt must be 'raise' or 'retrain', got {on_corrupt!r}")
    h = config_hash(config)
    path = _entry_path(name, config, profile, root)
    if path.parent.is_dir():
        sweep_stale_temporaries(path.parent)  # left by saves that were killed (no `finally` ran)
    with cache_lock(path):  # another process building the same entry: wait for it, then load
        if not retrain:
            try:
                tensors, record = load_checkpoint(path, device)
                if verbose:
                    print(f"[zoo] loaded {name} ({h}) trained in {record.get('train_time_s', 0):.0f}s "
                          f"on {record.get('device')}")
                return tensors, record
            except FileNotFoundError:
                pass
            except CorruptCheckpointError:
                if on_corrupt == "raise":
                    raise
                if verbose:
                    print(f"[zoo] {path.name} is damaged; training it again")
        if verbose:
            print(f"[zoo] training {name} ({h}) ...")
        t0 = time.perf_counter()
        tensors, info = train_fn()
        record = save_checkpoint(path, tensors, _record(name, config, profile, device, time.perf_counter() - t0, info))
    return {k: v.to(device) for k, v in tensors.items()}, record


def _entry_path(name: str, config: Mapping, profile: str, root) -> Path:
    return zoo_dir(profile, root) / f"{name}-{config_hash(config)}.safetensors"


def _record(name: str, config: Mapping, profile: str, device, elapsed: float, info: Mapping) -> dict:
    return {"name": name, "config_hash": config_hash(config), "config": dict(config), "profile": profile,
            "train_time_s": round(elapsed, 2), "device": _device_name(device), "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}


def store_by_product(name: str, config: Mapping, tensors: Mapping[str, torch.Tensor], info: Mapping, profile: str,
                     root: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                     elapsed: float = 0.0) -> bool:
    """Cache ``tensors`` as the entry ``load_or_train(name, config, ...)`` would train, when another run
    produced them on its way (e.g. an early checkpoint of a pretraining run, which equals a run stopped
    there). Returns False, writing nothing, if the entry is already cached."""
    path = _entry_path(name, config, profile, root)
    with cache_lock(path):
        if path.with_suffix(".json").exists():
            return False
        save_checkpoint(path, tensors, _record(name, config, profile, device, elapsed, info))
    return True


def _device_name(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------
# the ViT zoo of the task-vector notebooks
# ------------------------------------------------------------------------------------------------
VIT_PROFILES: dict[str, dict] = {
    # One recipe, two sizes. Profiles differ in sizes only (width, depth, patch, steps, subset sizes);
    # learning rates, schedules and procedure are the same.
    #
    # Recipe (the papers' regime, in miniature): the backbone is pretrained on two labelled sources at
    # once, six CIFAR-10 classes and rendered letters (mergelib.glyphs), one head each; per task a linear
    # probe is fit on the frozen backbone, then the backbone is fine-tuned with that head *frozen*
    # (as CLIP fine-tunes keep the zero-shot head), briefly and at a small learning rate, so that the
    # fine-tunes stay close to theta_0 and each task is read through the head it was trained with.
    # CPU, 2 cores: the whole zoo in about ten minutes. Patch 8 gives 16 tokens + class token.
    "quick": {
        "model": dict(image_size=32, patch_size=8, dim=128, depth=4, heads=4, mlp_ratio=4),
        "pretrain": dict(tasks=("cifar_pretrain", "glyphs"), steps=2500, batch_size=64, lr=2e-3, weight_decay=0.05,
                         augment={"cifar_pretrain": {"pad": 4, "flip": True}}, label_smoothing=0.1,
                         max_samples=None),
        "probe": dict(steps=300, lr=0.1, weight_decay=1e-4, max_samples=3000),
        "finetune": dict(steps=400, batch_size=64, lr=2e-4, weight_decay=0.0, max_samples=6000, freeze_head=True),
        "eval": dict(val_samples=500, test_samples=1000),
    },
    # one GPU: real sizes (patch 4: 64 tokens + class token, ViT-Tiny-like width).
    "full": {
        "model": dict(image_size=32, patch_size=4, dim=192, depth=6, heads=3, mlp_ratio=4),
        "pretrain": dict(tasks=("cifar_pretrain", "glyphs"), steps=10000, batch_size=128, lr=2e-3, weight_decay=0.05,
                         augment={"cifar_pretrain": {"pad": 4, "flip": True}}, label_smoothing=0.1,
                         max_samples=None),
        "probe": dict(steps=300, lr=0.1, weight_decay=1e-4, max_samples=None),
        "finetune": dict(steps=1500, batch_size=128, lr=2e-4, weight_decay=0.0, max_samples=None, freeze_head=True),
        "eval": dict(val_samples=None, test_samples=None),
    },
}


# The zoo's pretraining run also caches its backbone after 1/10 and 1/3 of its steps (same schedule,
# stopped early): weaker backbones of the same recipe, for notebook 01's backbone-strength experiment.
EARLY_PRETRAIN_FRACTIONS = (10, 3)
# Which of them notebook 01 compares with the whole run, per profile (a size: each one costs a probe and a
# fine-tune per task). On the CPU only the earliest: the one whose lower gap recovery held on every zoo we
# ran; the 1/3 checkpoint's place between the two did not (notebook 01, section 6).
BACKBONE_VARIANT_FRACTIONS: dict[str, tuple[int, ...]] = {"quick": (10,), "full": (10, 3)}


def vit_backbone_variants(profile: str, fractions: Sequence[int] | None = None) -> dict[str, dict]:
    """Zoo configurations that differ from the profile's only in how long the backbone was pretrained,
    from weakest to strongest: the zoo's own pretraining run stopped after ``1/f`` of its steps for each
    ``f`` in ``fractions`` (``pretrain["stop_at"]``: the same schedule, stopped early; default
    :data:`BACKBONE_VARIANT_FRACTIONS` of the profile), and the whole run (the zoo). Probes and fine-tunes
    follow the same recipe, so merging results compare backbones alone (notebook 01: merging works
    better as the pretrained model gets stronger). The zoo's pretraining caches the backbones of
    :data:`EARLY_PRETRAIN_FRACTIONS` on its way; without them (or for other fractions), a run stopped
    early trains only up to its ``stop_at``."""
    import copy

    base = VIT_PROFILES[profile]
    fractions = BACKBONE_VARIANT_FRACTIONS[profile] if fractions is None else tuple(fractions)
    bad = [f for f in fractions if not (isinstance(f, int) and not isinstance(f, bool) and f > 1)]
    if bad:
        raise ValueError(f"backbone variant fractions must be integers > 1 (1/f of the pretraining), got {bad}")
    variants = {}
    for frac in sorted(set(fractions), reverse=True):
        cfg = copy.deepcopy(base)
        cfg["pretrain"]["stop_at"] = base["pretrain"]["steps"] // frac
        variants[f"1/{frac} of the pretraining"] = cfg
    variants["whole pretraining (the zoo)"] = copy.deepcopy(base)
    return variants


@dataclass
class ViTZoo:
    """A pretrained ViT backbone, one fine-tuned copy per task, and the task heads.

    * ``pretrained``: backbone state dict (theta_0).
    * ``finetuned[task]``: backbone state dict after full fine-tuning on ``task`` (theta_i).
    * ``heads[task]``: the fine-tuned head (``{"weight", "bias"}``) used with any backbone of ``task``.
    * ``probe_heads[task]``: the linear probe on the frozen pretrained backbone.
    * ``data[task]``: ``{"train", "val", "test"}`` :class:`~mergelib.data.TaskData` on ``device``.
    """

    profile: str
    tasks: tuple[str, ...]
    device: torch.device
    model_config: dict
    pretrained: dict
    finetuned: dict
    heads: dict
    probe_heads: dict
    data: dict
    records: dict = field(default_factory=dict)

    def backbone(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> ViT:
        """A ViT module on the zoo's device, loaded with ``state_dict`` (default: the pretrained one)."""
        m = ViT(**self.model_config).to(self.device)
        m.load_state_dict(self.pretrained if state_dict is None else state_dict)
        return m.eval()

    def head(self, task: str, probe: bool = False) -> nn.Linear:
        sd = (self.probe_heads if probe else self.heads)[task]
        h = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0]).to(self.device)
        h.load_state_dict(sd)
        return h.eval()

    def classifier(self, task: str, state_dict: Mapping[str, torch.Tensor] | None = None,
                   probe: bool = False) -> Classifier:
        return Classifier(self.backbone(state_dict), self.head(task, probe)).eval()

    @torch.no_grad()
    def evaluate(self, state_dict: Mapping[str, torch.Tensor] | None = None, tasks: Sequence[str] | None = None,
                 split: str = "test", probe: bool = False, per_task_state: Mapping[str, Mapping] | None = None
                 ) -> dict[str, float]:
        """Accuracy per task of a backbone (one state dict for all tasks, or one per task) with each
        task's own head. Returns ``{task: accuracy in [0, 1]}``."""
        tasks = self.tasks if tasks is None else tasks
        backbone = ViT(**self.model_config).to(self.device).eval()
        out = {}
        for t in tasks:
            sd = per_task_state[t] if per_task_state is not None else (
                self.pretrained if state_dict is None else state_dict)
            backbone.load_state_dict(sd)
            out[t] = evaluate(Classifier(backbone, self.head(t, probe)), self.data[t][split])["acc"]
        return out


def _vit_pretrain_fn(cfg: dict, data: dict, test: dict, device: torch.device, seed: int, progress: bool,
                     keep: Mapping[int, Callable[[dict, dict], None]] | None = None):
    """The pretraining run of ``cfg`` (stopped at ``pretrain["stop_at"]`` if given). ``keep[n](tensors,
    info)`` receives the run's checkpoint after step ``n``, as a run stopped there would return it."""
    import copy

    keep = dict(keep or {})

    def train():
        torch.manual_seed(seed)
        backbone = ViT(**cfg["model"]).to(device)
        heads = {k: nn.Linear(backbone.dim, d.num_classes).to(device) for k, d in data.items()}

        def checkpoint(hist, copy_tensors: bool):  # copies while training goes on, the live tensors at the end
            accs = {k: evaluate(Classifier(backbone, heads[k]), d)["acc"] for k, d in test.items()}
            own = (lambda v: v.clone()) if copy_tensors else (lambda v: v)  # noqa: E731
            tensors = {f"backbone.{k}": own(v) for k, v in backbone.state_dict().items()}
            for name, h in heads.items():
                tensors.update({f"head.{name}.{k}": own(v) for k, v in h.state_dict().items()})
            return tensors, {"metrics": {"test_acc": accs}, "history": hist}

        def on_step(n, hist):
            if n in keep:
                keep[n](*checkpoint(copy.deepcopy(hist), copy_tensors=True))

        p = cfg["pretrain"]
        hist = train_multitask(backbone, heads, data, steps=p["steps"], lr=p["lr"], weight_decay=p["weight_decay"],
                               batch_size=p["batch_size"], seed=seed, augment=p["augment"],
                               label_smoothing=p["label_smoothing"], eval_data=test,
                               eval_every=max(1, p["steps"] // 10), progress=progress, desc="pretrain",
                               stop_at=p.get("stop_at"), on_step=on_step if keep else None)
        return checkpoint(hist, copy_tensors=False)
    return train


def _split_prefixed(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    bb = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    hd = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    return bb, hd


def vit_zoo(profile: str = "auto", tasks: Sequence[str] = mdata.DOWNSTREAM_TASKS, device: str = "auto",
            data_root: str | None = None, seed: int = 0, zoo_root: str | None = None, progress: bool = True,
            on_corrupt: str = "raise", verbose: bool = True, config: Mapping | None = None) -> ViTZoo:
    """Load or train the ViT zoo of :data:`VIT_PROFILES` (see the recipe there).

    1. pretrain the backbone on the sources ``config["pretrain"]["tasks"]`` (one head each);
    2. per task, a linear probe on the frozen backbone;
    3. per task, fine-tune the backbone starting from the probe head, which stays frozen when
       ``finetune["freeze_head"]`` (else it is trained too: LP-FT).

    ``config`` replaces the profile's configuration (e.g. a narrower backbone for a comparison of
    backbone strength); every checkpoint is cached under a hash of its configuration.
    """
    dev = resolve_device(device)
    profile = resolve_profile(profile, dev)
    cfg = VIT_PROFILES[profile] if config is None else config
    unknown = [t for t in tasks if t not in mdata.TASKS or t in mdata.PRETRAIN_TASKS]
    if unknown:
        raise KeyError(f"unknown downstream tasks {unknown}; choose from {list(mdata.DOWNSTREAM_TASKS)}")
    ev = cfg["eval"]
    sources = tuple(cfg["pretrain"]["tasks"])

    # -- pretraining ------------------------------------------------------------------------------
    pre_cfg = {"kind": "vit-pretrain", "tasks": sources, "model": cfg["model"], "train": cfg["pretrain"],
               "seed": seed}

    def train_pre():
        tr = {k: mdata.load_task(k, "train", data_root, max_samples=cfg["pretrain"]["max_samples"], seed=seed,
                                 device=dev, verbose=verbose) for k in sources}
        te = {k: mdata.load_task(k, "test", data_root, max_samples=ev["test_samples"], seed=seed, device=dev,
                                 verbose=False) for k in sources}
        t0 = time.perf_counter()

        def cache_early(stop_at):  # the entry a run with pretrain["stop_at"] = stop_at would train
            early_cfg = {**pre_cfg, "train": {**pre_cfg["train"], "stop_at": stop_at}}
            return lambda tensors, info: store_by_product(
                "vit-pretrained", early_cfg, tensors, {**info, "early_checkpoint_of": config_hash(pre_cfg)},
                profile, zoo_root, dev, time.perf_counter() - t0)

        keep = {}
        if "stop_at" not in cfg["pretrain"]:  # a whole run: cache its early checkpoints on the way
            keep = {cfg["pretrain"]["steps"] // f: cache_early(cfg["pretrain"]["steps"] // f)
                    for f in EARLY_PRETRAIN_FRACTIONS}
        return _vit_pretrain_fn(cfg, tr, te, dev, seed, progress, keep)()

    tensors, pre_rec = load_or_train("vit-pretrained", pre_cfg, train_pre, profile, zoo_root, dev,
                                     on_corrupt=on_corrupt, verbose=verbose)
    pretrained, _ = _split_prefixed(tensors)
    records = {"pretrained": pre_rec}
    f = cfg["finetune"]

    finetuned, heads, probe_heads, datasets = {}, {}, {}, {}
    for t in tasks:
        d = {"train": mdata.load_task(t, "train", data_root, max_samples=f["max_samples"], seed=seed, device=dev,
                                      verbose=verbose),
             "val": mdata.load_task(t, "val", data_root, max_samples=ev["val_samples"], seed=seed, device=dev,
                                    verbose=False),
             "test": mdata.load_task(t, "test", data_root, max_samples=ev["test_samples"], seed=seed, device=dev,
                                     verbose=False)}
        datasets[t] = d

        # -- linear probe on the frozen pretrained backbone --------------------------------------
        probe_cfg = {"kind": "vit-probe", "task": t, "pretrained": pre_rec["config_hash"], "train": cfg["probe"],
                     "seed": seed}

        def train_probe(t=t, d=d):
            bb = ViT(**cfg["model"]).to(dev)
            bb.load_state_dict(pretrained)
            train_sub = d["train"].subset(cfg["probe"]["max_samples"], seed)
            feats = extract_features(bb, train_sub.x)
            head = train_linear_probe(feats, train_sub.y, d["train"].num_classes, steps=cfg["probe"]["steps"],
                                      lr=cfg["probe"]["lr"], weight_decay=cfg["probe"]["weight_decay"], seed=seed)
            acc = evaluate(Classifier(bb, head), d["test"])["acc"]
            return {f"head.{k}": v for k, v in head.state_dict().items()}, {"metrics": {"test_acc": acc}}

        tensors, prec = load_or_train(f"vit-probe-{t}", probe_cfg, train_probe, profile, zoo_root, dev,
                                      on_corrupt=on_corrupt, verbose=verbose)
        probe_heads[t] = _split_prefixed(tensors)[1]

        # -- fine-tuning, started from the probe head (frozen or not) ----------------------------
        ft_cfg = {"kind": "vit-finetune", "task": t, "pretrained": pre_rec["config_hash"],
                  "probe": prec["config_hash"], "train": f, "seed": seed}

        def train_ft(t=t, d=d):
            torch.manual_seed(seed)
            bb = ViT(**cfg["model"]).to(dev)
            bb.load_state_dict(pretrained)
            head = nn.Linear(bb.dim, d["train"].num_classes).to(dev)
            head.load_state_dict(probe_heads[t])
            model = Classifier(bb, head)
            params = list(bb.parameters()) if f.get("freeze_head", False) else None
            hist = train_classifier(model, d["train"], steps=f["steps"], lr=f["lr"], weight_decay=f["weight_decay"],
                                    batch_size=f["batch_size"], seed=seed, params=params, eval_data=d["val"],
                                    eval_every=max(1, f["steps"] // 6), progress=progress, desc=f"finetune {t}")
            acc = evaluate(model, d["test"])["acc"]
            tensors = {**{f"backbone.{k}": v for k, v in bb.state_dict().items()},
                       **{f"head.{k}": v for k, v in head.state_dict().items()}}
            return tensors, {"metrics": {"test_acc": acc}, "history": hist}

        tensors, frec = load_or_train(f"vit-finetuned-{t}", ft_cfg, train_ft, profile, zoo_root, dev,
                                      on_corrupt=on_corrupt, verbose=verbose)
        finetuned[t], heads[t] = _split_prefixed(tensors)
        records[t] = {"probe": prec, "finetune": frec}

    return ViTZoo(profile=profile, tasks=tuple(tasks), device=dev, model_config=dict(cfg["model"]),
                  pretrained=pretrained, finetuned=finetuned, heads=heads, probe_heads=probe_heads,
                  data=datasets, records=records)


# ------------------------------------------------------------------------------------------------
# independently trained classifiers (the alignment notebook's ResNet-20s and MLPs)
# ------------------------------------------------------------------------------------------------
ARCHS: dict[str, Callable[..., nn.Module]] = {}


def _register_archs() -> None:
    from .models import MLP, ResNet20

    ARCHS.update({"resnet20": ResNet20, "mlp": MLP})


def classifier(name: str, arch: str, arch_kwargs: Mapping, task: str, train: Mapping, seed: int,
               profile: str = "auto", device: str = "auto", data_root: str | None = None,
               zoo_root: str | None = None, progress: bool = True, on_corrupt: str = "raise",
               verbose: bool = True) -> tuple[nn.Module, dict]:
    """Load or train one classifier from scratch (seeded), e.g. one of a pair of ResNet-20s.

    ``train`` holds ``steps, batch_size, lr, weight_decay, augment_pad, flip, label_smoothing,
    max_samples, image_size, channels``; the model is trained on ``task``'s train split and its
    test accuracy (on at most ``train["test_samples"]`` images) is recorded. Returns the model in
    eval mode on ``device`` and its record.
    """
    if not ARCHS:
        _register_archs()
    if arch not in ARCHS:
        raise KeyError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    dev = resolve_device(device)
    profile = resolve_profile(profile, dev)
    cfg = {"kind": "classifier", "arch": arch, "arch_kwargs": dict(arch_kwargs), "task": task,
           "train": dict(train), "seed": seed}
    img = dict(image_size=train.get("image_size", 32), channels=train.get("channels", 3))
    num_classes = len(mdata.TASKS[task].classes)

    def build() -> nn.Module:
        return ARCHS[arch](**arch_kwargs, num_classes=num_classes)

    def fit():
        tr = mdata.load_task(task, "train", data_root, max_samples=train.get("max_samples"), seed=seed,
                             device=dev, verbose=verbose, **img)
        te = mdata.load_task(task, "test", data_root, max_samples=train.get("test_samples"), seed=0,
                             device=dev, verbose=False, **img)
        torch.manual_seed(seed)
        model = build().to(dev)
        hist = train_classifier(model, tr, steps=train["steps"], lr=train["lr"], weight_decay=train["weight_decay"],
                                batch_size=train["batch_size"], seed=seed, augment_pad=train.get("augment_pad", 0),
                                flip=train.get("flip", False), label_smoothing=train.get("label_smoothing", 0.0),
                                progress=progress, desc=name)
        return model.state_dict(), {"metrics": evaluate(model, te), "history": hist}

    tensors, record = load_or_train(name, cfg, fit, profile, zoo_root, dev, on_corrupt=on_corrupt, verbose=verbose)
    model = build().to(dev)
    model.load_state_dict(tensors)
    return model.eval(), record
