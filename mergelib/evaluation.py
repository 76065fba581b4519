"""Accuracy tables for merged models: absolute and normalised accuracy, averages, text tables.

Normalised accuracy (Ilharco et al.; PCB and FREE papers) is a merged model's accuracy on a task
divided by the accuracy of that task's own fine-tuned model.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def mean(values: Mapping[str, float] | Sequence[float]) -> float:
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    if not vals:
        raise ValueError("mean of an empty set of accuracies")
    return sum(vals) / len(vals)


def normalized_accuracy(acc: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """``acc[t] / reference[t]`` for every task of ``acc`` (reference: the fine-tuned accuracies)."""
    missing = [t for t in acc if t not in reference]
    if missing:
        raise KeyError(f"no reference accuracy for tasks {missing}")
    bad = [t for t in acc if reference[t] <= 0]
    if bad:
        raise ValueError(f"reference accuracy must be positive; got {[(t, reference[t]) for t in bad]}")
    return {t: acc[t] / reference[t] for t in acc}


def results_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str] | None = None,
                  reference: Mapping[str, float] | None = None, percent: bool = True, digits: int = 1,
                  title: str | None = None) -> str:
    """A fixed-width text table: one row per method, one column per task, plus the average.

    With ``reference`` (the fine-tuned accuracies), entries are normalised accuracies.
    """
    if not rows:
        raise ValueError("results_table needs at least one row")
    tasks = list(tasks or next(iter(rows.values())).keys())
    name_w = max(12, *(len(r) for r in rows))
    col_w = max(7, *(len(t) for t in tasks))
    scale = 100.0 if percent else 1.0
    head = f"{'method':<{name_w}} " + " ".join(f"{t:>{col_w}}" for t in tasks) + f" {'avg':>{col_w}}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for name, acc in rows.items():
        vals = normalized_accuracy({t: acc[t] for t in tasks}, reference) if reference else {t: acc[t] for t in tasks}
        cells = " ".join(f"{scale * vals[t]:>{col_w}.{digits}f}" for t in tasks)
        lines.append(f"{name:<{name_w}} {cells} {scale * mean(vals):>{col_w}.{digits}f}")
    return "\n".join(lines)
