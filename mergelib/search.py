"""Coefficient search for PCB-Merging's per-task lambdas (METHODS.md section 7, "ES variant").

The authors use nevergrad's ``NGOpt`` (budget 100, init 1.0, bounds [0.8, 1.3] for vision) to
maximise validation accuracy. mergelib ships its own small optimiser instead of a new dependency:

* ``method="cma"``: a (mu/mu_w, lambda)-CMA-ES (Hansen's "purecma" update: weighted recombination,
  cumulative step-size adaptation, rank-one + rank-mu covariance update) run in the unit box
  ``[0, 1]^n`` that is mapped affinely onto ``bounds``; samples outside the box are clipped
  (repaired) and the repaired points are used for the update. Population lambda = 4 + floor(3 ln n),
  initial step size ``sigma0`` = 0.3 of the box width.
* ``method="random"``: uniform random search in the box.

Both evaluate ``init`` first (so the result is never worse than the starting point), spend exactly
``budget`` objective calls, are deterministic given ``seed`` (``numpy.random.default_rng``) and show a
tqdm progress bar with the best score so far. Note this substitution (CMA-ES vs NGOpt) in notebooks.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .utils import progress_bar

__all__ = ["search_coefficients"]


def search_coefficients(objective: Callable[[list[float]], float], n: int, budget: int = 100,
                        bounds: tuple[float, float] | tuple[Sequence[float], Sequence[float]] = (0.8, 1.3),
                        init: float | Sequence[float] = 1.0, method: str = "cma", seed: int = 0,
                        sigma0: float = 0.3, progress: bool = True) -> tuple[list[float], float, list[dict]]:
    """Maximise ``objective(lambdas)`` over ``lambdas`` in ``bounds`` (n values) with ``budget`` calls.

    ``objective`` gets a list of n floats and returns a number (e.g. mean validation accuracy).
    ``bounds``: ``(low, high)`` scalars or per-coordinate sequences; ``init`` a float or n floats.
    Returns ``(best_lambdas, best_score, history)``; ``history[t]`` is
    ``{"eval": t, "lambdas": [...], "score": s, "best": best score so far}``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive int")
    if method not in ("cma", "random"):
        raise ValueError(f"method={method!r}; expected 'cma' or 'random'")
    lo = np.broadcast_to(np.asarray(bounds[0], dtype=float), (n,)).copy()
    hi = np.broadcast_to(np.asarray(bounds[1], dtype=float), (n,)).copy()
    if np.any(hi <= lo):
        raise ValueError(f"bounds={bounds!r}: every high must exceed its low")
    x0 = np.broadcast_to(np.asarray(init, dtype=float), (n,)).copy()
    if np.any(x0 < lo) or np.any(x0 > hi):
        raise ValueError(f"init={init!r} lies outside bounds={bounds!r}")
    if not sigma0 > 0:
        raise ValueError(f"sigma0={sigma0!r} must be > 0")
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    best = {"x": None, "score": -math.inf}
    bar = progress_bar(total=budget, desc=f"{method} search", disable=not progress)

    def evaluate(z: np.ndarray) -> float:
        lams = (lo + z * (hi - lo)).tolist()
        score = float(objective(lams))
        if math.isnan(score):
            score = -math.inf
        if score > best["score"] or best["x"] is None:
            best["x"], best["score"] = lams, score
        history.append({"eval": len(history), "lambdas": lams, "score": score, "best": best["score"]})
        bar.update(1)
        bar.set_postfix(best=f"{best['score']:.4g}", refresh=False)
        return score

    try:
        z0 = (x0 - lo) / (hi - lo)
        evaluate(z0)
        if method == "random":
            while len(history) < budget:
                evaluate(rng.uniform(0.0, 1.0, n))
        else:
            _cma(evaluate, z0, sigma0, budget, rng)
    finally:
        bar.close()
    return best["x"], best["score"], history


def _cma(evaluate: Callable[[np.ndarray], float], mean: np.ndarray, sigma: float, budget: int,
         rng: np.random.Generator) -> None:
    """(mu/mu_w, lambda)-CMA-ES maximising ``evaluate`` in [0, 1]^n until ``budget`` calls are spent."""
    n = mean.size
    lam = 4 + int(3 * math.log(n))
    mu = lam // 2
    w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    mueff = 1.0 / np.sum(w**2)
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    cs = (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))
    pc, ps = np.zeros(n), np.zeros(n)
    B, D, C = np.eye(n), np.ones(n), np.eye(n)
    gen = 0
    calls = 1  # init was evaluated by the caller
    while calls < budget:
        gen += 1
        xs, fs = [], []
        for _ in range(lam):
            if calls >= budget:
                break
            x = np.clip(mean + sigma * (B @ (D * rng.standard_normal(n))), 0.0, 1.0)
            xs.append(x)
            fs.append(evaluate(x))
            calls += 1
        if len(xs) < lam:
            break  # budget exhausted in the middle of a generation: no update needed
        order = np.argsort(-np.asarray(fs), kind="stable")[:mu]
        sel = np.asarray(xs)[order]
        old = mean
        mean = w @ sel
        y_w = (mean - old) / sigma
        inv_sqrt_c = B @ np.diag(1 / D) @ B.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * (inv_sqrt_c @ y_w)
        hsig = float(np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * gen)) / chi_n < 1.4 + 2 / (n + 1))
        pc = (1 - cc) * pc + hsig * math.sqrt(cc * (2 - cc) * mueff) * y_w
        art = (sel - old) / sigma
        C = ((1 - c1 - cmu) * C + c1 * (np.outer(pc, pc) + (1 - hsig) * cc * (2 - cc) * C)
             + cmu * (art.T * w) @ art)
        sigma *= math.exp((cs / damps) * (np.linalg.norm(ps) / chi_n - 1))
        sigma = min(sigma, 1.0)  # the box has width 1
        C = (C + C.T) / 2
        d2, B = np.linalg.eigh(C)
        D = np.sqrt(np.maximum(d2, 1e-20))
