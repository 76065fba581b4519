"""PCB coefficient search (mergelib.search)."""
import numpy as np
import pytest

from mergelib.search import search_coefficients

TARGET = np.array([0.9, 1.1, 1.25, 1.0])


def quadratic(lams):
    return -float(np.sum((np.asarray(lams) - TARGET) ** 2))


def test_cma_finds_quadratic_optimum_within_budget():
    best, score, hist = search_coefficients(quadratic, 4, budget=200, progress=False)
    assert len(hist) == 200
    np.testing.assert_allclose(best, TARGET, atol=0.02)
    assert score > -1e-3 and score == max(h["score"] for h in hist)


def test_search_is_deterministic_and_records_history():
    a = search_coefficients(quadratic, 4, budget=30, seed=3, progress=False)
    b = search_coefficients(quadratic, 4, budget=30, seed=3, progress=False)
    c = search_coefficients(quadratic, 4, budget=30, seed=4, progress=False)
    assert a[2] == b[2] and a[2] != c[2]
    hist = a[2]
    assert hist[0]["lambdas"] == [1.0] * 4  # init is evaluated first
    assert all(0.8 <= x <= 1.3 for h in hist for x in h["lambdas"])
    bests = [h["best"] for h in hist]
    assert bests == sorted(bests) and a[1] >= hist[0]["score"]


def test_random_search_improves_and_respects_bounds():
    best, score, hist = search_coefficients(quadratic, 4, budget=60, method="random", bounds=(0.5, 1.5),
                                            init=[1.4, 0.6, 1.4, 0.6], progress=False)
    assert score > hist[0]["score"] and len(hist) == 60
    assert all(0.5 <= x <= 1.5 for x in best)


def test_progress_bar_and_errors(capsys):
    best, _, _ = search_coefficients(quadratic, 4, budget=5, progress=True)
    assert "cma search" in capsys.readouterr().err
    with pytest.raises(ValueError, match="init=2.0 lies outside bounds"):
        search_coefficients(quadratic, 2, init=2.0)
    with pytest.raises(ValueError, match="method='nevergrad'"):
        search_coefficients(quadratic, 2, method="nevergrad")
    with pytest.raises(ValueError, match="budget=0"):
        search_coefficients(quadratic, 2, budget=0)
    with pytest.raises(ValueError, match="bounds="):
        search_coefficients(quadratic, 2, bounds=(1.3, 0.8))
