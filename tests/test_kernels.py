"""mergelib.kernels: the fused loops give the torch code's results bit for bit, and switch off cleanly."""
import os
import subprocess
import sys

import pytest
import torch

from mergelib import kernels
from mergelib.competition import ties_merge
from mergelib.merging import _sum_per_tensor, merge
from mergelib.task_vectors import NonFiniteError, flatten

from bits import same_bytes

pytest.importorskip("numba")  # the kernels are optional; without Numba the torch code runs (tested below)


def _set(shapes, n, seed, ties=False, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    fts = []
    for i in range(n):
        ft = {}
        for k, s in shapes.items():
            d = torch.randn(s, generator=g) * scale * (i + 1)
            if ties:  # exact zeros, repeated values and -0.0 task-vector entries
                d = (d * 1e4).round() / 1e4 * (torch.rand(s, generator=g) > 0.3)
            ft[k] = pre[k] + d
        fts.append(ft)
    return pre, fts


SHAPES = {"a.weight": (300, 250), "b.weight": (64, 1100), "c.bias": (77,), "d.weight": (513, 129)}


def _both(fn):
    """fn() with the kernels and with the torch code."""
    assert kernels.enabled()
    fast = fn()
    with kernels.use(False):
        slow = fn()
    return fast, slow


def test_sum_task_vectors_hand_computed():
    base = torch.tensor([1.0, -2.0, 0.5, 0.0])
    fts = [torch.tensor([1.5, -2.0, 0.25, -0.0]), torch.tensor([0.0, -1.0, 0.5, 0.0])]
    out = kernels.sum_task_vectors(torch.full((4,), 7.0), fts, base)
    # (0 + (1.5 - 1)) + (0 - 1) = -0.5; (0 + 0) + 1 = 1; (0 - 0.25) + 0 = -0.25; (0 + -0) + 0 = +0
    assert same_bytes(out, torch.tensor([-0.5, 1.0, -0.25, 0.0]))


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9])
def test_sum_task_vectors_matches_the_torch_adds(n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(10_007, generator=g)
    fts = [base + torch.randn(10_007, generator=g) * 10.0 ** -(i % 4) for i in range(n)]
    fts[0][::5] = base[::5]  # zero task-vector entries
    ref = torch.zeros(10_007)
    for f in fts:
        ref.add_(f - base)
    assert same_bytes(kernels.sum_task_vectors(torch.empty(10_007), fts, base), ref)


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
@pytest.mark.parametrize("n", [2, 5])
def test_merge_sums_same_bits_with_and_without_kernels(method, n):
    pre, fts = _set(SHAPES, n, seed=n)
    fast, slow = _both(lambda: merge(pre, fts, method, rules=None))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)
    direct = _sum_per_tensor(pre, fts, sorted(pre), None, check=False)
    with kernels.use(False):
        assert all(same_bytes(direct[k], _sum_per_tensor(pre, fts, sorted(pre), None, check=False)[k]) for k in pre)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
@pytest.mark.parametrize("hp", [{}, {"granularity": "tensor"}, {"density": 0.5}, {"density": 1.0},
                                {"density": 0.01}])
def test_merge_ties_same_bits_with_and_without_kernels(seed, ties, hp):
    pre, fts = _set(SHAPES, 5, seed=seed, ties=ties)
    fast, slow = _both(lambda: merge(pre, fts, "ties", rules=None, **hp))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)


def _cancelling_set(majority: float):
    """Two tasks whose trimmed entries cancel in some columns (sum exactly 0, both signs present), with
    the other columns' votes set by ``majority`` (+1 or -1): both branches of the zero-sum rule."""
    n_col = 70_000  # a long row: merge() takes the column path
    base = torch.zeros(n_col)
    t1 = torch.full((n_col,), 0.5 * majority)
    t2 = torch.full((n_col,), 0.25 * majority)
    t1[:100], t2[:100] = 0.75, -0.75  # cancelling columns
    t1[100:200], t2[100:200] = 0.0, 0.0  # all-zero columns
    return {"w": base}, [{"w": base + t1}, {"w": base + t2}]


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_ties_kernel_zero_sum_columns_take_the_majority_sign(majority):
    pre, fts = _cancelling_set(majority)
    fast, slow = _both(lambda: merge(pre, fts, "ties", rules=None, scale=1.0, density=1.0))
    assert same_bytes(fast["w"], slow["w"])
    w = fast["w"]
    # gamma = majority where the sum is 0: the mean of that sign's entries (+-0.75), and 0 where all are 0
    assert torch.all(w[:100] == 0.75 * majority)
    assert torch.all(w[100:200] == 0.0)
    assert torch.all(w[200:] == 0.375 * majority)  # (0.5 + 0.25) / 2


def test_ties_kernel_agrees_with_the_flat_function():
    pre, fts = _set(SHAPES, 4, seed=7)
    x, layout = flatten(fts, sorted(pre), subtract=pre)
    flat = ties_merge(x, 0.2)
    merged = merge(pre, fts, "ties", rules=None, scale=1.0)
    for k, s, e in layout.segments():
        assert same_bytes(merged[k].reshape(-1), (pre[k].reshape(-1) + flat[s:e]))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_non_finite_input_still_named(method):
    pre, fts = _set(SHAPES, 3, seed=3)
    fts[1]["b.weight"][3, 7] = float("nan")
    with pytest.raises(NonFiniteError, match="b.weight"):
        merge(pre, fts, method, rules=None)


def test_available_only_for_contiguous_float32_cpu_tensors():
    x = torch.zeros(4, 6)
    assert kernels.available(x)
    assert not kernels.available(x.t())  # not contiguous
    assert not kernels.available(x.to(torch.bfloat16))
    assert not kernels.available(x.double())
    assert not kernels.available(x.requires_grad_())
    with kernels.use(False):
        assert not kernels.available(torch.zeros(3))
    assert kernels.available(torch.zeros(3))


def test_other_dtypes_take_the_torch_code(monkeypatch):
    pre, fts = _set(SHAPES, 3, seed=4)
    pre16 = {k: v.to(torch.bfloat16) for k, v in pre.items()}
    fts16 = [{k: v.to(torch.bfloat16) for k, v in ft.items()} for ft in fts]

    def fail(*a, **k):
        raise AssertionError("a kernel ran on bf16 tensors")

    monkeypatch.setattr(kernels, "sum_task_vectors", fail)
    monkeypatch.setattr(kernels, "ties_sweep", fail)
    for method in ("task_arithmetic", "ties"):
        fast, slow = _both(lambda: merge(pre16, fts16, method, rules=None))
        assert all(same_bytes(fast[k], slow[k]) for k in pre)


def test_without_numba_the_torch_code_runs(monkeypatch):
    monkeypatch.setattr(kernels, "_numba", lambda: None)
    assert not kernels.available(torch.zeros(3))
    pre, fts = _set(SHAPES, 3, seed=5)
    out = merge(pre, fts, "ties", rules=None)
    monkeypatch.undo()
    assert all(same_bytes(out[k], merge(pre, fts, "ties", rules=None)[k]) for k in pre)


def test_environment_switch():
    code = "from mergelib import kernels; print(kernels.enabled())"
    for value, expected in (("torch", "False"), ("auto", "True")):
        env = {**os.environ, "MERGELIB_KERNELS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
