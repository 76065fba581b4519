"""Aggregate a sweep folder into ``results.csv``, ``summary.md`` and ``summary.png``.

* ``results.csv`` (tidy): one row per run and metric with ``run_id, notebook, status``, one column per
  parameter, ``metric, value, error``. A run without metrics (a failure before its first ``record``)
  has one row with an empty metric.
* ``summary.md``: one row per configuration (notebook and all parameters except ``SEED``) of the
  successful runs, mean ± sample standard deviation (ddof = 1) over its seeds per numeric metric,
  ``n`` = the number of seeds; then the failed and the unfinished runs with their errors.
* ``summary.png``: one panel per numeric metric, mean ± std per configuration, the seeds as dots.

Standard library, NumPy and Matplotlib only (no pandas).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_files
from . import ERROR_FILE, METRICS_FILE, PARAMS_FILE, SEED, STATUS_FILE, SweepError


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every run folder of ``out`` (those with a ``params.json``), sorted by run id."""
    if not out.is_dir():
        raise SweepError(f"sweep folder not found: {out}")
    runs = []
    for d in sorted(p for p in out.iterdir() if (p / PARAMS_FILE).is_file()):
        spec = json.loads((d / PARAMS_FILE).read_text(encoding="utf-8"))
        status = json.loads((d / STATUS_FILE).read_text(encoding="utf-8")).get("status") \
            if (d / STATUS_FILE).is_file() else "incomplete"
        metrics = json.loads((d / METRICS_FILE).read_text(encoding="utf-8")) if (d / METRICS_FILE).is_file() else {}
        error = ""
        if status == "failed" and (d / ERROR_FILE).is_file():
            error = (d / ERROR_FILE).read_text(encoding="utf-8").splitlines()[0]
        runs.append({"run_id": d.name, "path": d, "notebook": Path(spec["notebook"]).stem,
                     "params": spec["parameters"], "status": status, "metrics": metrics, "error": error})
    if not runs:
        raise SweepError(f"no runs in {out} (no */{PARAMS_FILE})")
    return runs


def _ordered(keys_lists) -> list[str]:
    seen: dict[str, None] = {}
    for keys in keys_lists:
        seen.update(dict.fromkeys(keys))
    return list(seen)


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, str)


def _csv_text(runs: list[dict], param_names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run_id", "notebook", "status", *param_names, "metric", "value", "error"])
    for r in runs:
        head = [r["run_id"], r["notebook"], r["status"], *[r["params"].get(k, "") for k in param_names]]
        items = list(r["metrics"].items()) or [("", "")]
        for name, value in items:
            w.writerow([*head, name, value, r["error"]])
    return buf.getvalue()


def summarize(runs: list[dict]) -> tuple[list[str], list[str], list[dict]]:
    """(varying parameter names, numeric metric names, one dict per configuration of the ``ok`` runs).

    A configuration dict holds ``notebook``, ``params`` (all but SEED), ``n`` (its ok runs) and per
    metric ``values`` (list), ``mean`` and ``std`` (sample, ddof=1; NaN where n < 2).
    """
    names = [k for k in _ordered(r["params"] for r in runs) if k != SEED]
    varying = [k for k in names if len({json.dumps(r["params"].get(k)) for r in runs}) > 1]
    ok = [r for r in runs if r["status"] == "ok"]
    metrics = [m for m in _ordered(r["metrics"] for r in ok) if any(_numeric(r["metrics"].get(m)) for r in ok)]
    groups: dict[str, dict] = {}
    for r in ok:
        cfg = {k: v for k, v in r["params"].items() if k != SEED}
        key = json.dumps([r["notebook"], cfg], sort_keys=True)
        g = groups.setdefault(key, {"notebook": r["notebook"], "params": cfg, "n": 0, "values": {}})
        g["n"] += 1
        for m in metrics:
            if _numeric(r["metrics"].get(m)):
                g["values"].setdefault(m, []).append(float(r["metrics"][m]))
    def order(g: dict) -> tuple:  # numbers numerically (2 before 10), then strings
        return (g["notebook"], *((0, v, "") if _numeric(v) else (1, 0, str(v)) for v in
                                 (g["params"].get(k) for k in varying)))

    for g in groups.values():
        g["mean"] = {m: float(np.mean(v)) for m, v in g["values"].items()}
        g["std"] = {m: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for m, v in g["values"].items()}
    return varying, metrics, sorted(groups.values(), key=order)


def _label(g: dict, varying: list[str], many_notebooks: bool) -> str:
    parts = ([g["notebook"]] if many_notebooks else []) + [f"{k}={str(g['params'].get(k, ''))}" for k in varying]
    return ", ".join(parts) or "all"


def _markdown(out: Path, runs: list[dict], varying: list[str], metrics: list[str], groups: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in runs) for s in ("ok", "failed", "incomplete")}
    lines = [f"# Sweep summary: `{out.name}`", "",
             f"{len(runs)} runs: {counts['ok']} ok, {counts['failed']} failed, {counts['incomplete']} unfinished. "
             "Mean ± sample standard deviation (ddof = 1) over seeds; n = number of seeds (successful runs).", ""]
    fixed = {k: v for k, v in runs[0]["params"].items() if k != SEED and k not in varying}
    if fixed:
        lines += ["Fixed parameters: " + ", ".join(f"`{k}={str(v)}`" for k, v in fixed.items()), ""]
    if groups:
        lines += ["| notebook | " + " | ".join([*varying, "n", *metrics]) + " |",
                  "|---|" + "---|" * len(varying) + "---:|" + "---:|" * len(metrics)]
        for g in groups:
            cells = [g["notebook"], *[str(g["params"].get(k, "")) for k in varying], str(g["n"])]
            for m in metrics:
                vals = g["values"].get(m, [])
                if not vals:
                    cells.append("")
                    continue
                std = g["std"][m]
                cell = f"{g['mean'][m]:.4g} ± " + ("–" if np.isnan(std) else f"{std:.2g}")
                cells.append(cell + (f" (n={len(vals)})" if len(vals) != g["n"] else ""))
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No successful runs.")
    for status, title in (("failed", "Failed runs"), ("incomplete", "Unfinished runs (interrupted or running)")):
        bad = [r for r in runs if r["status"] == status]
        if bad:
            lines += ["", f"## {title}", "", "| run | parameters | error |", "|---|---|---|"]
            for r in bad:
                params = ", ".join(f"{k}={str(v)}" for k, v in r["params"].items())
                err = r["error"].replace("|", "\\|") + (f" (`{r['run_id']}/{ERROR_FILE}`)" if r["error"] else "")
                lines.append(f"| `{r['run_id']}` | {params} | {err} |")
    return "\n".join(lines) + "\n"


def _figure(path: Path, varying: list[str], metrics: list[str], groups: list[dict]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or state

    many_notebooks = len({g["notebook"] for g in groups}) > 1
    labels = [_label(g, varying, many_notebooks) for g in groups]
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    width = max(4.0, 0.6 * len(groups) + 1.5)
    fig = Figure(figsize=(width * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    x = np.arange(len(groups))
    for ax, m in zip(axes, metrics):
        mean = np.array([g["mean"].get(m, np.nan) for g in groups])
        std = np.nan_to_num(np.array([g["std"].get(m, np.nan) for g in groups]))
        for i, g in enumerate(groups):
            vals = g["values"].get(m, [])
            ax.plot(np.full(len(vals), x[i]), vals, ".", color="0.6", zorder=1)
        ax.errorbar(x, mean, yerr=std, fmt="o", capsize=4, zorder=2)
        ax.set_title(m)
        ax.set_xticks(x, labels, rotation=30 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("mean ± std over seeds (dots: seeds)")
    with atomic_files(path) as (tmp,):
        fig.savefig(tmp, format="png", dpi=100)


def write_report(out: Path) -> dict[str, Path]:
    """Write the three files into ``out``; returns their paths (no ``figure`` without numeric metrics)."""
    runs = load_runs(out)
    param_names = _ordered(r["params"] for r in runs)
    varying, metrics, groups = summarize(runs)
    paths = {"csv": out / "results.csv", "markdown": out / "summary.md"}
    with atomic_files(paths["csv"], paths["markdown"]) as (tcsv, tmd):
        Path(tcsv).write_text(_csv_text(runs, param_names), encoding="utf-8")
        Path(tmd).write_text(_markdown(out, runs, varying, metrics, groups), encoding="utf-8")
    if metrics and groups:
        paths["figure"] = out / "summary.png"
        _figure(paths["figure"], varying, metrics, groups)
    return paths
