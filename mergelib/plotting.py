"""Figures shared by the notebooks (matplotlib only). Each function returns the figure."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def show_task_samples(datasets: Mapping[str, "object"], n: int = 8, seed: int = 0):
    """A grid: one row per task, ``n`` random training images with their class names."""
    fig, axes = plt.subplots(len(datasets), n, figsize=(1.2 * n, 1.35 * len(datasets)), squeeze=False)
    g = torch.Generator().manual_seed(seed)
    for r, (task, d) in enumerate(datasets.items()):
        idx = torch.randperm(len(d), generator=g)[:n]
        for c, i in enumerate(idx.tolist()):
            ax = axes[r, c]
            ax.imshow(d.x[i].permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(str(d.classes[int(d.y[i])]), fontsize=7)
            if c == 0:
                ax.set_ylabel(task, fontsize=9)
    fig.tight_layout()
    return fig


def plot_training_curves(histories: Mapping[str, Mapping], title: str = "training loss"):
    """Loss per step (left) and evaluation accuracy during training (right) of several runs."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, h in histories.items():
        a1.plot(h["step"], h["loss"], label=name)
        if h.get("eval_step"):
            a2.plot(h["eval_step"], [100 * a for a in h["eval_acc"]], marker="o", ms=3, label=name)
    a1.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    a2.set(xlabel="step", ylabel="accuracy (%)", title="held-out accuracy during training")
    a2.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def heatmap(matrix, labels: Sequence[str], title: str = "", fmt: str = "{:.2f}", cmap: str = "viridis",
            ax=None, vmin=None, vmax=None, col_labels: Sequence[str] | None = None):
    """An annotated heatmap of a (square or not) matrix."""
    m = np.asarray(torch.as_tensor(matrix).detach().cpu())
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.7 * m.shape[1] + 2, 0.6 * m.shape[0] + 1.5))
    else:
        fig = ax.figure
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(m.shape[1]), col_labels or labels, rotation=45, ha="right")
    ax.set_yticks(range(m.shape[0]), labels)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                    color="white" if im.norm(v) < 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def bar_accuracies(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str], title: str = "",
                   ylabel: str = "accuracy (%)", ax=None):
    """Grouped bars: tasks on the x axis, one bar per row (method)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks)), 3.6))
    else:
        fig = ax.figure
    w = 0.8 / len(rows)
    x = np.arange(len(tasks))
    for i, (name, acc) in enumerate(rows.items()):
        ax.bar(x + i * w - 0.4 + w / 2, [100 * acc[t] for t in tasks], w, label=name)
    ax.set_xticks(x, tasks)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 100))
    ax.legend(fontsize=8, ncol=min(4, len(rows)))
    fig.tight_layout()
    return fig
