"""The benchmark protocol (mergelib.benchmark): tuning on toy objectives with known optima."""
import math

import pytest
import torch

from mergelib import benchmark as bm


def peak(at: float, width: float = 1.0):
    """A smooth objective with its maximum at ``at`` on a log scale."""
    return lambda cfg: -((math.log(cfg["scale"]) - math.log(at)) / width) ** 2


def test_log_grid_is_log_spaced_and_inclusive():
    g = bm.log_grid(0.01, 1.0, 3)
    assert g == [0.01, 0.1, 1.0]
    assert bm.log_grid(0.05, 1.0, 1) == [pytest.approx(math.sqrt(0.05), rel=1e-3)]


def test_optimum_inside_the_grid_is_found_and_not_flagged():
    res = bm.tune(peak(0.3), {"scale": bm.LogRange(0.05, 1.0)}, budget=12)
    assert res.evaluations == 12 == len(res.history)
    assert res.best["scale"] == pytest.approx(0.3, rel=0.15)
    assert res.on_edge == {"scale": None} and not res.any_edge


def test_optimum_beyond_the_grid_extends_it():
    res = bm.tune(peak(4.0), {"scale": bm.LogRange(0.05, 1.0)}, budget=12)
    assert res.best["scale"] > 1.0, "the grid was not extended past its initial high end"
    assert res.best["scale"] == pytest.approx(4.0, rel=0.35)
    assert res.on_edge["scale"] is None
    assert max(h["config"]["scale"] for h in res.history) > res.best["scale"]  # the optimum is bracketed


def test_optimum_out_of_reach_is_reported_on_the_edge():
    res = bm.tune(peak(1e6), {"scale": bm.LogRange(0.05, 1.0)}, budget=8)
    assert res.on_edge["scale"] == "high"
    assert res.any_edge and "edge" in res.describe()


def test_hard_bound_is_never_crossed_and_is_reported():
    # accuracy grows with density up to its hard bound 1: the best is density = 1, flagged as a bound
    res = bm.tune(lambda c: c["density"], {"density": bm.LogRange(0.05, 0.5, max_value=1.0)}, budget=10)
    assert max(h["config"]["density"] for h in res.history) <= 1.0
    assert res.best["density"] == 1.0
    assert res.on_edge["density"] == "high bound"


def test_two_dimensions_and_choices_share_the_budget():
    def f(c):
        bonus = 0.5 if c["mode"] == "b" else 0.0
        return peak(0.3)(c) - (math.log(c["density"]) - math.log(0.2)) ** 2 + bonus

    space = {"scale": bm.LogRange(0.05, 1.0), "density": bm.LogRange(0.02, 0.8, max_value=1.0),
             "mode": bm.Choice(("a", "b"))}
    res = bm.tune(f, space, budget=24, fixed={"seed": 0})
    assert res.evaluations == 24
    assert res.best["mode"] == "b" and res.best["seed"] == 0
    assert {h["config"]["mode"] for h in res.history} == {"a", "b"}
    assert res.best["scale"] == pytest.approx(0.3, rel=0.5)
    assert res.best["density"] == pytest.approx(0.2, rel=0.5)
    assert res.on_edge == {"scale": None, "density": None}


def test_refinement_looks_on_both_sides_of_the_best_grid_value():
    """An optimum between a grid value and the next one ABOVE it is found: the refinement bisects the
    wider gap first (refining only below the best value would keep a grid value here)."""
    for at in (1.6, 0.6):   # above / below the grid value 0.9487 of 0.3 .. 3 (three points)
        def f(c, at=at):
            return peak(at)(c) - (math.log(c["density"]) - math.log(0.2)) ** 2
        space = {"scale": bm.LogRange(0.3, 3.0), "density": bm.LogRange(0.05, 0.5, max_value=1.0)}
        res = bm.tune(f, space, budget=16)
        assert res.best["scale"] == pytest.approx(at, rel=0.15), (at, [h["config"] for h in res.history])
        scales = {h["config"]["scale"] for h in res.history}
        assert min(scales) < res.best["scale"] < max(scales)  # bracketed on both sides


def test_tune_is_deterministic_and_never_repeats_a_configuration():
    a = bm.tune(peak(0.3), {"scale": bm.LogRange(0.05, 1.0)}, budget=12)
    b = bm.tune(peak(0.3), {"scale": bm.LogRange(0.05, 1.0)}, budget=12)
    assert a.history == b.history
    cfgs = [h["config"]["scale"] for h in a.history]
    assert len(set(cfgs)) == len(cfgs)


def test_nan_scores_lose():
    res = bm.tune(lambda c: math.nan if c["scale"] > 0.5 else c["scale"], {"scale": bm.LogRange(0.05, 1.0)}, 8)
    assert res.best["scale"] <= 0.5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_bad_budget(bad):
    with pytest.raises(ValueError, match="budget"):
        bm.tune(peak(0.3), {"scale": bm.LogRange(0.05, 1.0)}, budget=bad)


def test_bad_spaces():
    with pytest.raises(ValueError, match="low < high"):
        bm.LogRange(1.0, 0.5)
    with pytest.raises(ValueError, match="> 0"):
        bm.LogRange(0.0, 0.5)
    with pytest.raises(ValueError, match="hard bounds"):
        bm.LogRange(0.5, 2.0, max_value=1.0)
    with pytest.raises(TypeError, match="LogRange or a Choice"):
        bm.tune(peak(0.3), {"scale": (0.1, 1.0)})
    with pytest.raises(ValueError, match="categorical"):
        bm.tune(lambda c: 0.0, {"m": bm.Choice(tuple(range(20)))}, budget=8)


def test_gap_recovery():
    assert bm.gap_recovery(0.75, 0.5, 1.0) == pytest.approx(0.5)
    assert bm.gap_recovery(0.4, 0.5, 1.0) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="must exceed"):
        bm.gap_recovery(0.5, 0.9, 0.8)


class ToyZoo:
    """A stand-in for ViTZoo: 'accuracy' of a task = 1 - |w - target_t| for a scalar weight w."""

    profile = "toytest"

    def __init__(self):
        self.tasks = ("a", "b")
        self.pretrained = {"w": torch.tensor(0.0)}
        self.finetuned = {"a": {"w": torch.tensor(0.4)}, "b": {"w": torch.tensor(0.6)}}
        self.records = {"pretrained": {"config_hash": "p"}, "a": {"finetune": {"config_hash": "fa"}},
                        "b": {"finetune": {"config_hash": "fb"}}}
        self.calls = 0

    def evaluate(self, state_dict=None, tasks=None, split="test", per_task_state=None):
        self.calls += 1
        tasks = self.tasks if tasks is None else tasks
        out = {}
        for t in tasks:
            sd = per_task_state[t] if per_task_state is not None else state_dict
            out[t] = 1.0 - abs(float(sd["w"]) - float(self.finetuned[t]["w"]))
        return out


def test_benchmark_rows_have_baselines_and_results_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELIB_ZOO", str(tmp_path))
    zoo = ToyZoo()
    bench = bm.Benchmark(zoo, budget=10, progress=False)
    build = lambda cfg: {"w": cfg["scale"] * (zoo.finetuned["a"]["w"] + zoo.finetuned["b"]["w"])}  # noqa: E731
    res = bench.run("toy ta", build, {"scale": bm.LogRange(0.05, 1.0)})
    assert res.config["scale"] == pytest.approx(0.5, rel=0.1) and res.evaluations == 10
    rows = bench.rows([res])
    assert [r["method"] for r in rows] == ["fine-tuned (individual)", "θ₀ + heads", "toy ta"]
    assert rows[0]["gap"] == pytest.approx(1.0) and rows[1]["gap"] == pytest.approx(0.0)
    assert rows[2]["normalised"] == pytest.approx(sum(res.test[t] / 1.0 for t in zoo.tasks) / 2)
    text = bench.table([res])
    assert "θ₀ + heads" in text and "fine-tuned (individual)" in text and "scale=" in text
    calls = zoo.calls
    again = bm.Benchmark(zoo, budget=10, progress=False).run("toy ta", build, {"scale": bm.LogRange(0.05, 1.0)})
    assert zoo.calls == calls, "a cached result was recomputed"
    assert again.test == res.test and again.config == res.config
    per_task = bench.run("oracle", lambda cfg: {t: zoo.finetuned[t] for t in zoo.tasks})
    assert per_task.test == {"a": 1.0, "b": 1.0} and per_task.evaluations == 1
