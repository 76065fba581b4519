"""Training and evaluation loops over tensor-resident data.

Data stays on the device as uint8 tensors (see :mod:`mergelib.data`); each step gathers a batch by
index, normalises it, optionally augments it, and runs forward/backward. On CUDA the forward pass
runs under bf16 autocast (mixed precision); on the CPU in float32. Runs are seeded through explicit
generators, so one device and one configuration give the same numbers every time.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import TaskData, normalize
from .data import augment as augment_images
from .utils import minibatch_indices, progress_bar

__all__ = ["train_classifier", "train_multitask", "evaluate", "extract_features", "train_linear_probe",
           "predict_logits", "cosine_lr"]


def cosine_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _fit(params: list, batch_loss, steps: int, lr: float, weight_decay: float, warmup: int | None,
         grad_clip: float | None, progress: bool, desc: str, on_eval=None, eval_every: int | None = None,
         stop_at: int | None = None, on_step=None) -> dict:
    """The optimisation loop shared by every trainer: AdamW (no decay on vectors), linear warm-up +
    cosine schedule, gradient clipping, loss logging over windows, an optional periodic ``on_eval()``.

    ``batch_loss(step)`` draws the step's batch and returns the loss to minimise. ``stop_at`` ends the
    run after that many steps of the ``steps``-step schedule: an early checkpoint of the same run, equal
    to the state a whole run has after ``stop_at`` steps. ``on_step(n, hist)`` is called after step
    ``n`` (1-based) with the history so far.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    run = steps if stop_at is None else stop_at
    if not 0 < run <= steps:
        raise ValueError(f"stop_at must be in 1..steps={steps}, got {stop_at}")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20) if warmup is None else warmup
    hist: dict = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_acc": []}
    log_every = max(1, steps // 50)
    running, count = 0.0, 0
    t0 = time.perf_counter()
    bar = progress_bar(range(run), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        running += float(loss.detach())
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == run:
            hist["step"].append(step + 1)
            hist["loss"].append(running / count)
            hist["lr"].append(opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{running / count:.3f}", refresh=False)
            running, count = 0.0, 0
        if on_eval is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == run):
            hist["eval_step"].append(step + 1)
            hist["eval_acc"].append(on_eval())
        if on_step is not None:
            on_step(step + 1, hist)
    hist["time_s"] = time.perf_counter() - t0
    return hist


def train_classifier(model: nn.Module, data: TaskData, steps: int, lr: float = 1e-3,
                     weight_decay: float = 0.05, batch_size: int = 128, warmup: int | None = None,
                     seed: int = 0, augment_pad: int = 0, flip: bool = False, label_smoothing: float = 0.0,
                     params: list | None = None, amp: bool = True, grad_clip: float | None = 1.0,
                     eval_data: TaskData | None = None, eval_every: int | None = None,
                     progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` (images -> logits) with AdamW and a warm-up + cosine schedule.

    Args:
        data: training split; ``data.x`` uint8 (N, C, H, W) on the model's device.
        steps: optimisation steps (batches are drawn by a seeded random permutation, epoch by epoch).
        params: parameters to optimise (default: all of ``model``'s; pass the backbone's parameters to
            keep a head frozen, as the papers' fine-tunes do).
        augment_pad, flip: random crop padding and horizontal flips (natural images only).
        eval_data, eval_every: optionally evaluate every ``eval_every`` steps (for training curves).

    Returns:
        history ``{"step": [...], "loss": [...], "lr": [...], "eval_step": [...], "eval_acc": [...],
        "time_s": float}`` with the loss averaged over logging windows.
    """
    device = next(model.parameters()).device
    if data.x.device != device:
        data = data.to(device)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters()) if params is None else list(params)
    batches = minibatch_indices(len(data), batch_size, steps, gen)

    def batch_loss(step: int) -> torch.Tensor:
        idx = next(batches).to(device)
        xb, yb = data.x[idx], data.y[idx]
        if augment_pad or flip:
            xb = augment_images(xb, gen, pad=augment_pad, flip=flip)
        with _autocast(device, amp):
            return F.cross_entropy(model(normalize(xb)), yb, label_smoothing=label_smoothing)

    def on_eval() -> float:
        acc = evaluate(model, eval_data)["acc"]
        model.train()
        return acc

    model.train()
    hist = _fit(params, batch_loss, steps, lr, weight_decay, warmup, grad_clip, progress, desc,
                on_eval if eval_data is not None else None, eval_every)
    model.eval()
    return hist


def train_multitask(backbone: nn.Module, heads: dict[str, nn.Module], data: dict[str, TaskData], steps: int,
                    lr: float = 1e-3, weight_decay: float = 0.05, batch_size: int = 128,
                    warmup: int | None = None, seed: int = 0, augment: dict[str, dict] | None = None,
                    label_smoothing: float = 0.0, amp: bool = True, grad_clip: float | None = 1.0,
                    eval_data: dict[str, TaskData] | None = None, eval_every: int | None = None,
                    progress: bool = True, desc: str = "pretrain", stop_at: int | None = None,
                    on_step=None) -> dict:
    """Train one backbone with one head per source: every step draws ``batch_size`` images from each
    source and minimises the mean of the sources' cross-entropies (multi-task pretraining).

    ``stop_at`` and ``on_step(n, hist)``: stop early on the same schedule, and a hook after every step
    (e.g. to keep early checkpoints of the run); see ``_fit``.

    ``augment[name]`` holds ``{"pad": int, "flip": bool}`` for a source (default: none). With
    ``eval_data``, ``hist["eval_acc"]`` is the mean accuracy over the sources and
    ``hist["eval_acc_per_source"]`` lists the per-source accuracies.
    """
    if set(heads) != set(data):
        raise ValueError(f"heads {sorted(heads)} and data {sorted(data)} must name the same sources")
    device = next(backbone.parameters()).device
    data = {k: (d if d.x.device == device else d.to(device)) for k, d in data.items()}
    gen = torch.Generator().manual_seed(seed)
    augment = augment or {}
    batches = {k: minibatch_indices(len(d), batch_size, steps, gen) for k, d in data.items()}
    params = list(backbone.parameters()) + [p for h in heads.values() for p in h.parameters()]

    def batch_loss(step: int) -> torch.Tensor:
        losses = []
        for k, d in data.items():
            idx = next(batches[k]).to(device)
            xb, yb = d.x[idx], d.y[idx]
            aug = augment.get(k, {})
            if aug.get("pad") or aug.get("flip"):
                xb = augment_images(xb, gen, pad=aug.get("pad", 0), flip=aug.get("flip", False))
            with _autocast(device, amp):
                losses.append(F.cross_entropy(heads[k](backbone(normalize(xb))), yb, label_smoothing=label_smoothing))
        return torch.stack(losses).mean()

    per_source: list[dict] = []

    def on_eval() -> float:
        accs = {k: evaluate(nn.Sequential(backbone, heads[k]), d)["acc"] for k, d in eval_data.items()}
        per_source.append(accs)
        backbone.train()
        return sum(accs.values()) / len(accs)

    backbone.train()
    hist = _fit(params, batch_loss, steps, lr, weight_decay, warmup, grad_clip, progress, desc,
                on_eval if eval_data else None, eval_every, stop_at, on_step)
    hist["eval_acc_per_source"] = per_source
    backbone.eval()
    return hist


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, amp: bool = True) -> torch.Tensor:
    """Logits (float32, on the model's device) of uint8 images ``x`` in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with _autocast(device, amp):
            out.append(model(normalize(x[i:i + batch_size].to(device))).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int = 512) -> dict:
    """Accuracy (in [0, 1]) and mean cross-entropy of ``model`` on ``data``."""
    logits = predict_logits(model, data.x, batch_size)
    y = data.y.to(logits.device)
    return {"acc": float((logits.argmax(1) == y).float().mean()),
            "loss": float(F.cross_entropy(logits, y))}


@torch.no_grad()
def extract_features(backbone: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Backbone features (float32) of uint8 images ``x``."""
    return predict_logits(backbone, x, batch_size)


def train_linear_probe(features: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 300,
                       lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0) -> nn.Linear:
    """Fit a linear head on frozen features by full-batch AdamW on the cross-entropy (a logistic regression).

    Features are standardised inside the fit and the scaling is folded back into the returned
    ``nn.Linear`` so that it applies to raw features.
    """
    torch.manual_seed(seed)
    mu, sd = features.mean(0), features.std(0) + 1e-6
    z = (features - mu) / sd
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, lr, max(1, steps // 20))
            loss = F.cross_entropy(head(z), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():  # fold the standardisation: W z + b = (W/sd) f + (b - W mu/sd)
        w = head.weight / sd
        head.bias.sub_((w * mu).sum(1))
        head.weight.copy_(w)
    return head

