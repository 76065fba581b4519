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

from .data import TaskData, augment, normalize
from .utils import progress_bar

__all__ = ["train_classifier", "evaluate", "extract_features", "train_linear_probe", "predict_logits",
           "cosine_lr"]


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
        params: parameters to optimise (default: all of ``model``'s).
        augment_pad, flip: random crop padding and horizontal flips (natural images only).
        eval_data, eval_every: optionally evaluate every ``eval_every`` steps (for training curves).

    Returns:
        history ``{"step": [...], "loss": [...], "lr": [...], "eval_step": [...], "eval_acc": [...],
        "time_s": float}`` with the loss averaged over logging windows.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    device = next(model.parameters()).device
    if data.x.device != device:
        data = data.to(device)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters()) if params is None else list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20) if warmup is None else warmup
    n = len(data)
    bs = min(batch_size, n)
    hist: dict = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_acc": []}
    log_every = max(1, steps // 50)
    running, count = 0.0, 0
    perm, pos = torch.randperm(n, generator=gen), 0
    model.train()
    t0 = time.perf_counter()
    bar = progress_bar(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs].to(device)
        pos += bs
        xb, yb = data.x[idx], data.y[idx]
        if augment_pad or flip:
            xb = augment(xb, gen, pad=augment_pad, flip=flip)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(normalize(xb)), yb, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        running += float(loss.detach())
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            hist["step"].append(step + 1)
            hist["loss"].append(running / count)
            hist["lr"].append(opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{running / count:.3f}", refresh=False)
            running, count = 0.0, 0
        if eval_data is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            hist["eval_step"].append(step + 1)
            hist["eval_acc"].append(evaluate(model, eval_data)["acc"])
            model.train()
    model.eval()
    hist["time_s"] = time.perf_counter() - t0
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

