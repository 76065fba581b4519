"""One benchmark protocol for every results table of the course.

Rankings of merging methods are easily decided by their tuning instead of their ideas: a method
whose grid happens to contain its optimum beats one whose optimum lies outside its grid. The course
therefore compares methods under one protocol, the same in every notebook:

1. **Same split, same budget.** Every method's hyperparameters are tuned on the validation split of
   every task (mean accuracy over tasks, each task read through its own head), with exactly
   ``budget`` evaluated configurations per method (default :data:`DEFAULT_BUDGET`).
2. **Log-spaced grids whose optimum is inside.** A search space is a set of :class:`LogRange` /
   :class:`Choice` dimensions. :func:`tune` spends about half of the budget (three quarters with
   several dimensions) on a log-spaced grid; while the best value sits on the edge of a dimension it **extends** that
   dimension beyond the edge (one grid step, doubling in log space while it keeps moving the same
   way); the remaining evaluations **refine** around the best
   value (log midpoints). A best value that is still on an edge when the budget is spent, or that
   sits on a hard bound of the parameter (a density of 1, say), is **reported** as such
   (:attr:`TuneResult.on_edge`), never silently accepted.
3. **Baselines in every table.** :meth:`Benchmark.table` always has the rows *fine-tuned
   (individual)* and *θ₀ + heads* (the pretrained backbone with each task's head: what a merge with
   coefficient 0 gives) and reports absolute test accuracy per task, the average, the normalised
   accuracy (merged / fine-tuned, per task, averaged), the gain over θ₀ + heads and the share of the
   θ₀ + heads → fine-tuned gap that the merge recovers.
4. **One number per method and zoo.** Results are cached on disk under the zoo's folder, keyed by the
   zoo's checkpoint hashes, the method, its search space, the budget and :data:`PROTOCOL_VERSION`:
   every notebook that asks for the same method on the same zoo gets the same number.

Gap recovery = (merged − floor) / (fine-tuned − floor), averaged accuracies, floor = θ₀ + heads.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .utils import atomic_files, cache_lock, progress_bar

__all__ = ["PROTOCOL_VERSION", "DEFAULT_BUDGET", "LogRange", "Choice", "TuneResult", "tune", "log_grid",
           "MethodResult", "Benchmark", "gap_recovery", "METHOD_SPACES"]

PROTOCOL_VERSION = 3  # 3: the refinement bisects both sides of the best value (2 refined only below it)
DEFAULT_BUDGET = 16


# ------------------------------------------------------------------------------------------------
# search spaces
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogRange:
    """A positive hyperparameter searched on a log scale, initially over ``[low, high]``.

    ``min_value`` / ``max_value`` are hard bounds of the parameter itself (a density cannot exceed
    1): the search never extends past them, and a best value on a hard bound is reported as an edge.
    """

    low: float
    high: float
    min_value: float = 0.0
    max_value: float = math.inf

    def __post_init__(self):
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"LogRange {name}={v!r} must be a finite number > 0")
        if not self.low < self.high:
            raise ValueError(f"LogRange needs low < high, got [{self.low}, {self.high}]")
        if not (self.min_value <= self.low and self.high <= self.max_value):
            raise ValueError(f"LogRange [{self.low}, {self.high}] lies outside its hard bounds "
                             f"[{self.min_value}, {self.max_value}]")


@dataclass(frozen=True)
class Choice:
    """A categorical hyperparameter: every option is evaluated (options are never "edges")."""

    options: tuple

    def __post_init__(self):
        if not self.options:
            raise ValueError("Choice needs at least one option")
        object.__setattr__(self, "options", tuple(self.options))


Space = Mapping[str, "LogRange | Choice"]


def log_grid(low: float, high: float, n: int) -> list[float]:
    """``n`` log-spaced values from ``low`` to ``high`` (inclusive), rounded to 4 significant digits."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return [_round(math.sqrt(low * high))]
    r = (high / low) ** (1 / (n - 1))
    return [_round(low * r**i) for i in range(n)]


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _grid_sizes(space: Space, budget: int) -> dict[str, int]:
    """Points per LogRange dimension of the initial grid: about half of the budget for one dimension
    (the rest extends or refines it), about three quarters for several (at least 3 points each when
    the budget allows: 2 points per dimension cannot place an optimum inside)."""
    n_choice = math.prod(len(d.options) for d in space.values() if isinstance(d, Choice))
    cont = [k for k, d in space.items() if isinstance(d, LogRange)]
    if n_choice > budget:
        raise ValueError(f"budget={budget} is smaller than the {n_choice} categorical combinations")
    if not cont:
        return {}
    frac = 0.5 if len(cont) == 1 else 0.75
    avail = max(len(cont) * 2, int(frac * budget) // n_choice)
    per = max(2, math.floor(avail ** (1 / len(cont)) + 1e-9))
    sizes = {k: per for k in cont}
    while math.prod(sizes.values()) * n_choice > max(frac * budget, 2 ** len(cont) * n_choice):  # trim
        k = max(sizes, key=sizes.get)
        if sizes[k] <= 2:
            break
        sizes[k] -= 1
    return sizes


# ------------------------------------------------------------------------------------------------
# tuning
# ------------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """Outcome of :func:`tune`.

    ``best``: the chosen configuration; ``score``: its objective; ``history``: every evaluated
    ``{"config", "score"}`` in order; ``on_edge``: per LogRange dimension, ``None`` when the chosen
    value is inside the evaluated range, else ``"low"``/``"high"`` (and ``"bound"`` appended when
    the edge is a hard bound of the parameter); ``evaluations`` = len(history) = the budget.
    """

    best: dict
    score: float
    history: list[dict]
    on_edge: dict[str, str | None]
    evaluations: int

    @property
    def any_edge(self) -> bool:
        return any(v is not None for v in self.on_edge.values())

    def describe(self) -> str:
        cfg = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best.items())
        edges = [f"{k} on {v} edge" for k, v in self.on_edge.items() if v]
        return cfg + (f"  [{'; '.join(edges)}]" if edges else "")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _key(cfg: Mapping) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


def tune(objective: Callable[[dict], float], space: Space, budget: int = DEFAULT_BUDGET,
         fixed: Mapping | None = None, progress: bool = False, desc: str = "tune") -> TuneResult:
    """Maximise ``objective(config)`` over ``space`` with exactly ``budget`` evaluations.

    Grid, extension and refinement are described in the module docstring; ties go to the
    configuration evaluated first. ``fixed`` entries are passed unchanged in every config.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    for k, d in space.items():
        if not isinstance(d, (LogRange, Choice)):
            raise TypeError(f"search dimension {k!r} must be a LogRange or a Choice, got {type(d).__name__}")
    fixed = dict(fixed or {})
    seen: dict[str, float] = {}
    history: list[dict] = []
    bar = progress_bar(total=budget, desc=desc, disable=not progress, leave=False)

    def evaluate(cfg: dict) -> float | None:
        k = _key(cfg)
        if k in seen or len(history) >= budget:
            return seen.get(k)
        score = float(objective({**fixed, **cfg}))
        if math.isnan(score):
            score = -math.inf
        seen[k] = score
        history.append({"config": dict(cfg), "score": score})
        bar.update(1)
        return score

    def best() -> dict:
        return max(history, key=lambda h: h["score"])["config"]  # max keeps the first of equal scores

    sizes = _grid_sizes(space, budget)
    axes = {k: (log_grid(d.low, d.high, sizes[k]) if isinstance(d, LogRange) else list(d.options))
            for k, d in space.items()}
    names = list(space)
    for values in product(*(axes[k] for k in names)):
        evaluate(dict(zip(names, values)))
    cont = [k for k in names if isinstance(space[k], LogRange)]
    stalled = 0
    steps = {k: (axes[k][-1] / axes[k][0]) ** (1 / max(1, len(axes[k]) - 1)) if len(axes[k]) > 1 else 2.0
             for k in cont}
    while len(history) < budget and cont and stalled < 4 * len(cont):
        b = best()
        progressed = False
        # 1. extend a dimension whose best value is on the edge of what was evaluated
        for k in cont:
            d, vals = space[k], sorted({h["config"][k] for h in history})
            if b[k] == vals[0] and b[k] > d.min_value:
                new = max(_round(b[k] / steps[k]), d.min_value)
            elif b[k] == vals[-1] and b[k] < d.max_value:
                new = min(_round(b[k] * steps[k]), d.max_value)
            else:
                continue
            steps[k] = steps[k] ** 2  # keep moving the same way: double the step in log space
            if new > 0 and evaluate({**b, k: new}) is not None:
                progressed = True
                break
        if progressed:
            stalled = 0
            continue
        # 2. refine: log midpoints between the best value and its evaluated neighbours, one dimension
        #    at a time (neighbours along the line through the best configuration, else anywhere)
        k = cont[len(history) % len(cont)]
        vals = sorted({h["config"][k] for h in history if all(h["config"][j] == b[j] for j in names if j != k)})
        if len(vals) < 2:
            vals = sorted({h["config"][k] for h in history})
        i = vals.index(b[k])
        # both neighbours, the wider log gap first: always trying the lower one first bisected the gap
        # below the best value again and again and never looked above it
        nbrs = sorted((j for j in (i - 1, i + 1) if 0 <= j < len(vals)),
                      key=lambda j: -abs(math.log(vals[j] / b[k])))
        cands = [math.sqrt(b[k] * vals[j]) for j in nbrs]
        did = False
        for c in cands:
            c = _round(c)
            if _key({**b, k: c}) not in seen:
                evaluate({**b, k: c})
                did = True
                break
        stalled = 0 if did else stalled + 1
    bar.close()
    b = best()
    on_edge: dict[str, str | None] = {}
    for k in cont:
        d = space[k]
        vals = sorted({h["config"][k] for h in history})
        edge = "low" if b[k] == vals[0] else "high" if b[k] == vals[-1] else None
        if edge and len(vals) > 1:
            bound = (edge == "low" and b[k] <= d.min_value) or (edge == "high" and b[k] >= d.max_value)
            on_edge[k] = edge + (" bound" if bound else "")
        else:
            on_edge[k] = edge
    return TuneResult(best={**fixed, **b}, score=max(h["score"] for h in history), history=history,
                      on_edge=on_edge, evaluations=len(history))


def gap_recovery(merged: float, floor: float, finetuned: float) -> float:
    """(merged − floor) / (finetuned − floor): 0 = no better than θ₀ + heads, 1 = as good as fine-tuning."""
    if not finetuned > floor:
        raise ValueError(f"fine-tuned accuracy {finetuned:.4f} must exceed the floor {floor:.4f}")
    return (merged - floor) / (finetuned - floor)


# ------------------------------------------------------------------------------------------------
# the search spaces of the course's methods (one table: every notebook uses these)
# ------------------------------------------------------------------------------------------------
# Initial ranges are centred on the papers' usual values (TA lambda 0.3; TIES lambda 1 and density 0.2;
# PCB lambda 1.2 and r 0.05; FR c 0.7 and ratio 0.7; DARE p 0.5-0.9) and span about a decade; the
# search extends them when an optimum lands on an edge.
DENSITY = LogRange(0.05, 0.5, min_value=1e-4, max_value=1.0)
DROP = LogRange(0.1, 0.9, min_value=1e-3, max_value=0.99)
METHOD_SPACES: dict[str, dict[str, LogRange | Choice]] = {
    "task_arithmetic": {"scale": LogRange(0.05, 1.0)},
    "ties": {"scale": LogRange(0.3, 3.0), "density": DENSITY},
    "dare_ta": {"scale": LogRange(0.05, 1.0), "p": DROP},
    "dare_ties": {"scale": LogRange(0.3, 3.0), "p": DROP},
    "pcb": {"scale": LogRange(0.3, 3.0), "density": LogRange(0.02, 0.5, min_value=1e-4, max_value=1.0)},
    "fr": {"scale": LogRange(0.1, 2.0), "ratio": LogRange(0.2, 1.0, min_value=1e-3, max_value=2.0)},
}


# ------------------------------------------------------------------------------------------------
# the benchmark over a zoo
# ------------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """One row of a results table: test accuracy per task of one tuned method."""

    name: str
    test: dict[str, float]
    val_score: float | None = None
    config: dict = field(default_factory=dict)
    on_edge: dict[str, str | None] = field(default_factory=dict)
    evaluations: int = 0
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.test.values()) / len(self.test)

    @property
    def any_edge(self) -> bool:
        """True when a tuned value was left on the edge of what was evaluated (or on a hard bound)."""
        return any(v is not None for v in self.on_edge.values())


Build = Callable[[dict], "Mapping | dict"]


class Benchmark:
    """The protocol over one :class:`~mergelib.zoo.ViTZoo`.

    ``build(config)`` returns either one backbone state dict for every task or a mapping
    ``task -> state dict`` (per-task models, e.g. FREE's experts). ``run`` tunes it on the validation
    split with ``budget`` evaluations, evaluates the best configuration on the test split and caches
    the result; ``table`` renders rows with the baselines.
    """

    def __init__(self, zoo, budget: int = DEFAULT_BUDGET, cache: bool = True, progress: bool = True):
        self.zoo, self.budget, self.cache, self.progress = zoo, budget, cache, progress
        self.tasks = list(zoo.tasks)
        self._baselines: dict[str, MethodResult] | None = None

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, model: Mapping, split: str) -> dict[str, float]:
        """Accuracy per task of a built model (one state dict, or ``task -> state dict``)."""
        if model and all(t in model for t in self.tasks) and all(isinstance(model[t], Mapping) for t in self.tasks):
            return self.zoo.evaluate(tasks=self.tasks, split=split, per_task_state=model)
        return self.zoo.evaluate(model, self.tasks, split=split)

    def val_score(self, model: Mapping) -> float:
        acc = self.evaluate(model, "val")
        return sum(acc.values()) / len(acc)

    # -- cache ---------------------------------------------------------------------------------
    def _zoo_key(self) -> dict:
        recs = self.zoo.records
        return {"pretrained": recs["pretrained"]["config_hash"],
                "finetuned": {t: recs[t]["finetune"]["config_hash"] for t in self.tasks}}

    def _cache_path(self, name: str, key: Mapping) -> Path:
        from .zoo import zoo_dir

        blob = json.dumps({"zoo": self._zoo_key(), "protocol": PROTOCOL_VERSION, **key}, sort_keys=True, default=str)
        h = hashlib.sha256(blob.encode()).hexdigest()[:12]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return zoo_dir(self.zoo.profile) / "results" / f"{safe}-{h}.json"

    def _load(self, path: Path) -> MethodResult | None:
        if not (self.cache and path.is_file()):
            return None
        try:
            return MethodResult(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None  # a damaged or outdated entry is recomputed (and overwritten atomically)

    def _save(self, path: Path, res: MethodResult) -> None:
        if self.cache:
            with atomic_files(path) as (tmp,):
                Path(tmp).write_text(json.dumps(asdict(res), indent=1, default=str))

    # -- running methods -----------------------------------------------------------------------
    def baselines(self) -> dict[str, MethodResult]:
        """``fine-tuned (individual)``: each task's own model; ``θ₀ + heads``: the pretrained backbone."""
        if self._baselines is None:
            z = self.zoo
            ft = {t: z.evaluate(z.finetuned[t], [t])[t] for t in self.tasks}
            self._baselines = {"fine-tuned (individual)": MethodResult("fine-tuned (individual)", ft),
                               "θ₀ + heads": MethodResult("θ₀ + heads", z.evaluate(z.pretrained, self.tasks))}
        return self._baselines

    def run(self, name: str, build: Build, space: Space | None = None, fixed: Mapping | None = None,
            key: Mapping | None = None, budget: int | None = None) -> MethodResult:
        """Tune ``build`` over ``space`` (None: nothing to tune, one evaluation) and test the best.

        ``key`` must identify what ``build`` does beyond ``name``/``space``/``fixed`` (it enters the
        cache key); the result is cached under the zoo folder.
        """
        budget = self.budget if budget is None else budget
        space = dict(space or {})
        path = self._cache_path(name, {"space": {k: asdict(v) for k, v in space.items()}, "fixed": fixed or {},
                                       "budget": budget, "key": key or {}})
        with cache_lock(path):  # a parallel process tuning the same entry: wait, then load its result
            cached = self._load(path)
            if cached is not None:
                return cached
            if space:
                tr = tune(lambda cfg: self.val_score(build(cfg)), space, budget, fixed=fixed, progress=self.progress,
                          desc=f"tune {name}")
                cfg, val, edges, hist, n = tr.best, tr.score, tr.on_edge, tr.history, tr.evaluations
            else:
                cfg, edges, hist, n = dict(fixed or {}), {}, [], 1
                val = None
            test = self.evaluate(build(cfg), "test")
            if val is None:
                val = self.val_score(build(cfg))
            res = MethodResult(name, test, val, cfg, edges, n, hist)
            self._save(path, res)
            return res

    def run_method(self, method: str, name: str | None = None, space: Space | None = None,
                   fixed: Mapping | None = None, budget: int | None = None, **merge_kwargs) -> MethodResult:
        """Tune one method of :func:`mergelib.merge` over :data:`METHOD_SPACES` (or ``space``)."""
        from .merging import merge

        z = self.zoo
        space = METHOD_SPACES.get(method, {}) if space is None else space
        build = lambda cfg: merge(z.pretrained, z.finetuned, method, **merge_kwargs, **cfg)  # noqa: E731
        return self.run(name or method, build, space, fixed=fixed, budget=budget,
                        key={"method": method, "merge_kwargs": merge_kwargs})

    # -- tables --------------------------------------------------------------------------------
    def rows(self, results: Sequence[MethodResult] | Mapping[str, MethodResult]) -> list[dict]:
        """Table rows (baselines first): per-task test accuracy, average, normalised accuracy, gain
        over θ₀ + heads, gap recovered, chosen configuration and edge flags."""
        base = self.baselines()
        ft, floor = base["fine-tuned (individual)"], base["θ₀ + heads"]
        items = list(results.values()) if isinstance(results, Mapping) else list(results)
        out = []
        for r in [ft, floor, *items]:
            norm = sum(r.test[t] / ft.test[t] for t in self.tasks) / len(self.tasks)
            out.append({"method": r.name, **{t: r.test[t] for t in self.tasks}, "avg": r.average,
                        "normalised": norm, "gain": r.average - floor.average,
                        "gap": (gap_recovery(r.average, floor.average, ft.average) if ft.average > floor.average
                                else math.nan),  # undefined when the fine-tunes do not beat θ₀ + heads
                        "config": r.config, "on_edge": r.on_edge, "evaluations": r.evaluations})
        return out

    def table(self, results: Sequence[MethodResult] | Mapping[str, MethodResult], title: str | None = None,
              show_config: bool = True) -> str:
        """A fixed-width text table of :meth:`rows` (accuracies in %, gain in points, gap in %)."""
        rows = self.rows(results)
        name_w = max(24, *(len(r["method"]) for r in rows))
        cols = self.tasks + ["avg", "norm", "gain", "gap"]
        col_w = max(7, *(len(t) for t in self.tasks))
        head = f"{'method':<{name_w}} " + " ".join(f"{c:>{col_w}}" for c in cols)
        lines = ([title] if title else []) + [head, "-" * len(head)]
        for r in rows:
            cells = [100 * r[t] for t in self.tasks] + [100 * r["avg"], 100 * r["normalised"], 100 * r["gain"],
                                                          100 * r["gap"]]
            line = f"{r['method']:<{name_w}} " + " ".join(f"{c:>{col_w}.1f}" for c in cells)
            if show_config and r["config"]:
                line += "  " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["config"].items())
                edges = [f"{k}: {v} edge" for k, v in r["on_edge"].items() if v]
                if edges:
                    line += "  [" + "; ".join(edges) + "]"
            lines.append(line)
        lines.append(f"(test accuracy %; norm = merged/fine-tuned per task; gain over θ₀ + heads in points; "
                     f"gap = share of the θ₀ + heads → fine-tuned gap recovered; tuned on val with "
                     f"{self.budget} evaluations per method)")
        return "\n".join(lines)
