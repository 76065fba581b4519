"""mergelib.kernels: the fused loops give the torch code's results bit for bit, and switch off cleanly."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergelib import kernels
from mergelib.competition import pcb_merge, ties_merge
from mergelib.merging import _sum_per_tensor, merge
from mergelib.task_vectors import NonFiniteError, flatten

from bits import same_bytes

pytest.importorskip("numba")  # the kernels are optional; without Numba the torch code runs (tested below)


def _set(shapes, n, seed, ties=False, scale=1e-3, dtype=torch.float32):
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
    if dtype != torch.float32:
        pre = {k: v.to(dtype) for k, v in pre.items()}
        fts = [{k: v.to(dtype) for k, v in ft.items()} for ft in fts]
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
    out = torch.full((4,), 7.0)
    assert kernels.sum_task_vectors(out, fts, base) == 0  # no sum is NaN or inf
    # (0 + (1.5 - 1)) + (0 - 1) = -0.5; (0 + 0) + 1 = 1; (0 - 0.25) + 0 = -0.25; (0 + -0) + 0 = +0
    assert same_bytes(out, torch.tensor([-0.5, 1.0, -0.25, 0.0]))
    fts[1][1], fts[0][2] = float("inf"), float("nan")
    assert kernels.sum_task_vectors(out, fts, base) == 2


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9])
def test_sum_task_vectors_matches_the_torch_adds(n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(10_007, generator=g)
    fts = [base + torch.randn(10_007, generator=g) * 10.0 ** -(i % 4) for i in range(n)]
    fts[0][::5] = base[::5]  # zero task-vector entries
    ref = torch.zeros(10_007)
    for f in fts:
        ref.add_(f - base)
    out = torch.empty(10_007)
    assert kernels.sum_task_vectors(out, fts, base) == 0
    assert same_bytes(out, ref)


def test_weighted_row_sum_hand_computed_and_against_the_torch_ops():
    """FR's aligned sum: ((0 + r_0 w_0) + r_1 w_1) + ..., each product rounded, then each sum: by hand
    (the sign of a zero too), and bit for bit the torch code it replaces (rows.mul_(w), then the adds)."""
    rows = [torch.tensor([1.0, -0.0, 3.0, 1e30]), torch.tensor([2.0, -0.0, -1.5, 1e30])]
    out = torch.full((4,), 7.0)
    kernels.weighted_row_sum(out, rows, torch.tensor([0.5, 2.0]))
    # 0.5 + 4 = 4.5; (0 + -0) + -0 = +0; 1.5 - 3 = -1.5; 5e29 + 2e30 = 2.5e30
    assert same_bytes(out, torch.tensor([4.5, 0.0, -1.5, 2.5e30]))
    for n in (1, 3, 8):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 10_007, generator=g) * torch.logspace(-3, 2, n)[:, None]
        w = torch.rand(n, generator=g) * 3
        ref = torch.zeros(10_007)
        for row in x * w[:, None]:
            ref.add_(row)
        assert same_bytes(kernels.weighted_row_sum(torch.empty(10_007), list(x), w), ref)


def test_copy_l1_norm_copies_and_sums_in_float64():
    x = torch.tensor([1.0, -2.5, -0.0, 0.375, 16777216.0, 1.0])
    out = torch.full((6,), float("nan"))
    assert kernels.copy_l1_norm(out, x) == 16777220.875  # exact in float64 (float32 sums would drop the 1s)
    assert same_bytes(out, x)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_003, generator=g) * 1e-3
    out = torch.empty_like(x)
    total = kernels.copy_l1_norm(out, x)
    assert same_bytes(out, x) and abs(total - float(x.double().abs().sum())) <= 1e-12 * total
    assert np.float32(total) == np.float32(float(x.double().abs().sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
@pytest.mark.parametrize("n", [2, 5])
def test_merge_sums_same_bits_with_and_without_kernels(method, n, dtype):
    pre, fts = _set(SHAPES, n, seed=n, dtype=dtype)
    fast, slow = _both(lambda: merge(pre, fts, method, rules=None))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)
    direct = _sum_per_tensor(pre, fts, sorted(pre), None, check=False)
    with kernels.use(False):
        assert all(same_bytes(direct[k], _sum_per_tensor(pre, fts, sorted(pre), None, check=False)[k]) for k in pre)


@pytest.mark.parametrize("seed,ties,dtype", [(0, False, torch.float32), (1, True, torch.float32),
                                             (2, True, torch.float32), (3, False, torch.bfloat16),
                                             (4, True, torch.bfloat16)])
@pytest.mark.parametrize("hp", [{}, {"granularity": "tensor"}, {"density": 0.5}, {"density": 1.0},
                                {"density": 0.01}, {"trim_rule": "exact"}, {"trim_rule": "exact", "density": 0.5},
                                {"trim_rule": "exact", "granularity": "tensor"},
                                {"trim_rule": "exact", "granularity": "tensor", "density": 0.01},
                                {"trim_rule": "exact", "density": 1.0}])
def test_merge_ties_same_bits_with_and_without_kernels(seed, ties, dtype, hp):
    pre, fts = _set(SHAPES, 5, seed=seed, ties=ties, dtype=dtype)
    fast, slow = _both(lambda: merge(pre, fts, "ties", rules=None, **hp))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)


def _cancelling_set(majority: float, base_scale: float = 0.0):
    """Two tasks whose trimmed entries cancel in some columns (sum exactly 0, both signs present), with
    the other columns' votes set by ``majority`` (+1 or -1): both branches of the zero-sum rule.
    ``base_scale``: the base weights are multiples of 2**-10 up to about that (so base + t is exact)."""
    n_col = 70_000  # a long row: merge() takes the column path
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n_col, generator=g) * base_scale * 1024).round() / 1024
    t1 = torch.full((n_col,), 0.5 * majority)
    t2 = torch.full((n_col,), 0.25 * majority)
    t1[:2000], t2[:2000] = 0.75, -0.75  # cancelling columns
    t1[2000:2100], t2[2000:2100] = 0.0, 0.0  # all-zero columns
    return {"w": base}, [{"w": base + t1}, {"w": base + t2}]


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_ties_kernel_zero_sum_columns_take_the_majority_sign(majority):
    pre, fts = _cancelling_set(majority)
    fast, slow = _both(lambda: merge(pre, fts, "ties", rules=None, scale=1.0, density=1.0))
    assert same_bytes(fast["w"], slow["w"])
    w = fast["w"]
    # gamma = majority where the sum is 0: the mean of that sign's entries (+-0.75), and 0 where all are 0
    assert torch.all(w[:2000] == 0.75 * majority)
    assert torch.all(w[2000:2100] == 0.0)
    assert torch.all(w[2100:] == 0.375 * majority)  # (0.5 + 0.25) / 2


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_ties_sweep_written_as_it_is_marks_every_zero_sum_column(majority):
    """Without ``scale`` the sweep writes the task vector itself, whose zero-sum columns of trimmed zeros
    are -0.0 for a negative majority and +0.0 for a positive one over any base: the sweep marks them
    (and the cancelling ones), and sweep + majority values give ties_merge's bits. With ``scale``, a
    column of zeros over a nonzero base is written the same either way: not marked."""
    pre, fts = _cancelling_set(majority, base_scale=1.0)
    assert not bool((pre["w"][2000:2100] == 0).any())  # the all-zero columns lie over nonzero bases
    x = torch.stack([f["w"] - pre["w"] for f in fts])
    fs = [f["w"] for f in fts]
    thr = kernels.ties_thresholds(None, 2)  # density 1: keep every entry
    assert same_bytes(thr, torch.zeros(2))
    n = x.shape[1]
    for scale in (None, 1.0):
        out, zero = torch.empty(n), torch.empty(n, dtype=torch.bool)
        votes, bad, marked = kernels.ties_sweep(out, zero, fs, pre["w"], thr, scale)
        assert bad == 0 and (votes > 0) == (majority > 0) and marked == int(zero.sum())
        assert bool(zero[:2000].all()) and not bool(zero[2100:].any())
        assert bool(zero[2000:2100].all()) == (scale is None)
        if votes > 0:
            kernels.ties_majority_positive(out, zero, fs, pre["w"], thr, scale)
        want = ties_merge(x, 1.0)
        assert same_bytes(out, want if scale is None else torch.add(pre["w"], want, alpha=scale))


def test_ties_kernel_agrees_with_the_flat_function():
    pre, fts = _set(SHAPES, 4, seed=7)
    x, layout = flatten(fts, sorted(pre), subtract=pre)
    flat = ties_merge(x, 0.2)
    merged = merge(pre, fts, "ties", rules=None, scale=1.0)
    for k, s, e in layout.segments():
        assert same_bytes(merged[k].reshape(-1), (pre[k].reshape(-1) + flat[s:e]))


@pytest.mark.parametrize("method", ["task_arithmetic", "average", "ties", "pcb"])
@pytest.mark.parametrize("where", [(3, 7), (63, 1099)])  # (63, 1099): in the last partial block of 1024
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_still_named(method, where, value):
    pre, fts = _set(SHAPES, 3, seed=3)
    fts[1]["b.weight"][where] = value
    with pytest.raises(NonFiniteError, match="b.weight"):
        merge(pre, fts, method, rules=None)
    if method in ("ties", "pcb"):  # TIES and PCB check the task vectors even unvalidated (the sums do not)
        with pytest.raises(NonFiniteError, match="not finite"):
            merge(pre, fts, method, rules=None, validate=False)


@pytest.mark.parametrize("granularity,want_a,want_b", [
    # global, keep int(7 * 0.6) = 4: |x| = 3, 1, 2, 2 | 2, 2, 0.5; thr 2, one above it, so 3 of the 4 ties
    # in flat order: positions 2, 3 and 4 (the second tensor's first entry); its -2 is dropped
    ("global", [4.0, 1.0, 3.0, 3.0], [3.0, 1.0, 1.0]),
    # per tensor: a keeps int(2.4) = 2 (3 and its first 2), b keeps int(1.8) = 1 (its first 2)
    ("tensor", [4.0, 1.0, 3.0, 1.0], [3.0, 1.0, 1.0])])
def test_exact_trim_hand_computed(granularity, want_a, want_b):
    """One task: TIES returns its trimmed task vector (every entry agrees with its own sign), here over
    a base of ones. The ties at the threshold are kept lowest flat position first, across tensors."""
    pre = {"a": torch.ones(4), "b": torch.ones(3)}
    ft = {"a": torch.tensor([4.0, 2.0, 3.0, 3.0]), "b": torch.tensor([3.0, -1.0, 1.5])}
    fast, slow = _both(lambda: merge(pre, [ft], "ties", rules=None, scale=1.0, density=0.6, trim_rule="exact",
                                     granularity=granularity))
    assert same_bytes(fast["a"], torch.tensor(want_a)) and same_bytes(fast["b"], torch.tensor(want_b))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)


def _few_magnitudes(n: int, shapes, seed: int, dtype=torch.float32, zero=True):
    """Task vectors of a few magnitudes (multiples of 2**-8 up to 4 * 2**-8, with or without zeros; each
    row with its own mix), over a base of zeros: the trim threshold has ties all through every row."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}
    fts = []
    for i in range(n):
        ft = {}
        for k, s in shapes.items():
            mag = torch.randint(0 if zero else 1, 5, s, generator=g).float()
            mag = torch.where(torch.rand(s, generator=g) < 0.1 * (i + 1), mag.clamp_max(2), mag)
            sign = torch.where(torch.rand(s, generator=g) < 0.5, -1.0, 1.0)
            ft[k] = (mag * sign / 256).to(dtype)
        fts.append(ft)
    return pre, fts


_TIE_SHAPES = {"a.weight": (3, 5000), "b.weight": (40000,), "c.weight": (7, 999)}


def _record_parts(monkeypatch):
    """Spy on kernels.ExactTrim.parts: the lengths of the parts of each tensor the sweep split."""
    seen, real = [], kernels.ExactTrim.parts

    def spy(self, f, b):
        parts = real(self, f, b)
        seen.append([j1 - j0 for j0, j1, _ in parts])
        return parts
    monkeypatch.setattr(kernels.ExactTrim, "parts", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_exact_trim_ties_through_blocks_and_tensors(monkeypatch, dtype, granularity):
    """The exact trim's ties, taken by the compiled sweep block by block (kernels.ExactTrim): on rows of
    a few magnitudes each row's budget runs out at its own place, past the first blocks, and one tensor
    holds several rows' cuts (split in several parts). The bits of the torch code, and for one task the
    entries a stable sort keeps (the keep largest |x|, lowest index first among equals)."""
    pre, fts = _few_magnitudes(4, _TIE_SHAPES, seed=5, dtype=dtype)
    seen = _record_parts(monkeypatch)
    hp = dict(rules=None, density=0.3, trim_rule="exact", granularity=granularity)
    fast, slow = _both(lambda: merge(pre, fts, "ties", **hp))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)
    assert max(len(p) for p in seen) >= 3  # a tensor split by two rows' cuts or more
    cuts = [sum(p[:i + 1]) for p in seen for i in range(len(p) - 1)]  # where the parts end inside tensors
    assert max(cuts) > kernels._loops().TIE_BLOCK  # a cut past the first block
    # one task, magnitudes 1-4 (no zeros): the kept entries are the nonzero ones of base + 1 * t
    pre, fts = _few_magnitudes(1, _TIE_SHAPES, seed=6, zero=False)
    got = merge(pre, fts, "ties", scale=1.0, **hp)
    keys = sorted(pre)
    segs = [keys] if granularity == "global" else [[k] for k in keys]
    for seg in segs:
        x = torch.cat([fts[0][k].reshape(-1) for k in seg])
        keep = int(x.numel() * 0.3)
        order = torch.sort(x.abs(), descending=True, stable=True).indices
        want = torch.zeros(x.numel(), dtype=torch.bool)
        want[order[:keep]] = True
        assert torch.equal(torch.cat([got[k].reshape(-1) for k in seg]) != 0, want)


@pytest.mark.parametrize("key,where,density", [("b.weight", (63, 1099), 0.2), ("c.bias", (5,), 0.2),
                                                ("c.bias", (5,), 0.01)])  # c.bias at 0.01 keeps none of its 77
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_exact_trim_non_finite_input_named(key, where, density, value, granularity):
    """A NaN or inf reaches the compiled sweep's result whether the exact trim keeps its entry or not
    (x * 0 is NaN), also where a tensor keeps no entry at all (threshold NaN: nothing is >= it)."""
    pre, fts = _set(SHAPES, 3, seed=3)
    fts[2][key][where] = value
    hp = dict(rules=None, trim_rule="exact", granularity=granularity, density=density)
    with pytest.raises(NonFiniteError, match=key.replace(".", r"\.")):
        merge(pre, fts, "ties", **hp)
    with pytest.raises(NonFiniteError, match="not finite"):
        merge(pre, fts, "ties", validate=False, **hp)


def test_available_only_for_contiguous_float32_or_bf16_cpu_tensors_of_one_dtype():
    x = torch.zeros(4, 6)
    assert kernels.available(x) and kernels.available(x.to(torch.bfloat16))
    assert not kernels.available(x.t())  # not contiguous
    assert not kernels.available(x, x.to(torch.bfloat16))  # two dtypes
    assert not kernels.available(x.half())
    assert not kernels.available(x.double())
    assert not kernels.available(x.requires_grad_())
    with kernels.use(False):
        assert not kernels.available(torch.zeros(3))
    assert kernels.available(torch.zeros(3))


def test_bf16_widened_exactly():
    base = torch.tensor([1.0, -3.5, 2.0 ** -130, 0.0]).to(torch.bfloat16)  # 2**-130: a bf16 subnormal
    fts = [torch.tensor([1.5, -3.25, 0.0, -0.0]).to(torch.bfloat16)]
    out = torch.empty(4)
    assert kernels.sum_task_vectors(out, fts, base) == 0
    assert same_bytes(out, (fts[0].float() - base.float()) + 0.0)  # (0 + (f - b)), -0.0 included


def test_other_dtypes_take_the_torch_code(monkeypatch):
    pre, fts = _set(SHAPES, 3, seed=4)
    pre16 = {k: v.half() for k, v in pre.items()}
    fts16 = [{k: v.half() for k, v in ft.items()} for ft in fts]

    def fail(*a, **k):
        raise AssertionError("a kernel ran on float16 tensors")

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


def _columns(n_rows, shapes, seed, zeros=0.0, dup=False, dtype=torch.float32):
    from mergelib.task_vectors import TaskVectorColumns
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = []
    for i in range(n_rows):
        ft = {}
        for k, s in shapes.items():
            d = torch.randn(s, generator=g) * 1e-2
            if dup:  # few distinct magnitudes: long runs of tied values
                d = (d * 300).round() / 300
            d = d * (torch.rand(s, generator=g) >= zeros)  # exact zeros (an unchanged weight)
            ft[k] = (pre[k] + d).to(dtype)
        fts.append(ft)
    return TaskVectorColumns(fts, {k: v.to(dtype) for k, v in pre.items()}, sorted(shapes))


@pytest.mark.parametrize("zeros,dup,dtype", [(0.0, False, torch.float32), (0.45, False, torch.float32),
                                             (0.0, True, torch.float32), (0.3, True, torch.float32),
                                             (0.0, False, torch.bfloat16), (0.3, False, torch.bfloat16)])
@pytest.mark.parametrize("ks", [[1], [77_000], [140_000], [3, 70_000, 139_999]])
def test_kth_smallest_columns_same_values_with_and_without_kernel(zeros, dup, dtype, ks):
    from mergelib.selection import kth_smallest_columns
    cols = _columns(3, {"a": (300, 250), "b": (65_000,)}, seed=len(ks), zeros=zeros, dup=dup,
                    dtype=dtype)  # rows of 140,000 (float32 task vectors of bf16 weights for bf16)
    fast, slow = _both(lambda: kth_smallest_columns(cols, ks))
    x = torch.stack([cols.row(i) for i in range(3)]).abs()
    ref = torch.stack([x.kthvalue(k, dim=1).values for k in ks], 1)
    assert torch.equal(fast, ref) and torch.equal(slow, ref)  # values (the sign of a zero may differ)


def test_count_brackets_matches_the_numpy_counter():
    from mergelib.selection import _NumpyCounter, _brackets, _sample_index
    # 5 % exact zeros: the bracket of rank 8,500 straddles their end, so zero is its tied value
    cols = _columns(2, {"a": (400, 300), "b": (50_000,)}, seed=11, zeros=0.05)
    n = cols.shape[1]
    sample = cols.gather(_sample_index(n, 4096, "cpu")).abs()
    brackets = [_brackets(row, n, [8_500, 120_000]) for row in sample]
    assert all(lo is not None and hi is not None and lo < hi for row in brackets for lo, hi, _ in row)
    assert all(row[0][2] == 0 and row[1][2] is None for row in brackets)  # both branches of the kernel
    segments = [(cols.pretrained[k], [m[k] for m in cols.models]) for k in cols.layout.keys]
    got = kernels.count_brackets(segments, brackets)
    block = torch.stack([cols.row(i) for i in range(2)])
    for i in range(2):
        ctr = _NumpyCounter(brackets[i], block.numpy().dtype, n, absolute=True)
        ctr.add(block[i].numpy())
        below, cands = ctr.result()
        for r in range(2):
            b, points, c = got[i][r]
            assert b == below[r]
            ref = cands[r][0]
            if brackets[i][r][2] is None:
                assert points == 0 and torch.equal(torch.from_numpy(c), ref)
            else:  # a tied value: counted, not kept
                assert points == ref.count and torch.equal(torch.from_numpy(c), ref.rest)


@pytest.mark.parametrize("form", ["task vectors", "signed row", "magnitudes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("share", [0.0005, 0.05, 0.4])
@pytest.mark.parametrize("side", ["closed", "open below", "open above", "tie"])
def test_count_bracket_against_its_definition(form, dtype, share, side):
    """The counting loop (16 entries at a time, the kept ones packed and stored, the last few one by one) against
    NumPy's masks: #(c < lo), #(c == tie), and the c in [lo, hi] but the tie in their order, for the
    three kinds of values (|f - base|, a signed row, |row|), float32 and bf16 inputs, brackets holding a
    few entries to 40 % of them, open on either side (-inf, inf), with NaN, inf, -0.0 and a length that
    is not a multiple of 16."""
    loops = kernels._loops()
    g = torch.Generator().manual_seed(int(share * 1e4))
    m = 100_003
    base = torch.randn(m, generator=g).to(dtype)
    f = (base.float() + torch.randn(m, generator=g) * 1e-2).to(dtype)
    f[[5, 70_000]], f[[9, 99_999]], f[17], f[100_002] = float("nan"), float("inf"), -0.0, float("-inf")
    if side == "tie":  # a value repeated in the bracket
        f[::7] = base[::7] + 0.5 if form == "task vectors" else 0.5
    b = {"task vectors": kernels._np(base), "signed row": None, "magnitudes": np.float32(0.0)}[form]
    c = {"task vectors": (f.float() - base.float()).abs(), "signed row": f.float(), "magnitudes": f.float().abs()}[form]
    srt = c[torch.isfinite(c)].sort().values
    lo, hi, tie = srt[int(m * 0.3)], srt[int(m * 0.3) + int(share * m)], None
    if side == "open below":
        lo = torch.tensor(-np.inf)
    elif side == "open above":
        lo, hi = srt[-int(share * m) - 1], torch.tensor(np.inf)
    elif side == "tie":
        lo, hi, tie = torch.tensor(0.4), torch.tensor(0.6), torch.tensor(0.5)
    guarded = np.full(m + 64, 7.0, np.float32)  # the store holds len(f) entries; nothing written past it
    store = guarded[:m]
    below, points, k = loops.count_bracket(kernels._np(f), b, np.float32(lo), np.float32(hi),
                                           None if tie is None else np.float32(tie), store)
    eq = (c == tie) if tie is not None else torch.zeros(m, dtype=torch.bool)
    keep = (c >= lo) & (c <= hi) & ~eq
    assert below == int((c < lo).sum()) and points == int(eq.sum()) and k == int(keep.sum()) > 0
    assert same_bytes(torch.from_numpy(store[:k]), c[keep])  # a NaN is below nothing and in no bracket
    assert points > 1000 if tie is not None else points == 0
    assert (guarded[m:] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("ks", [[1], [2, 140_000], [14], [139_990], [70_000], [7_000, 133_000]])
def test_kth_smallest_of_rows_same_values_with_and_without_kernel(monkeypatch, dtype, absolute, ks):
    """Rows (PCB's drop threshold of beta, signed; the flat merges' |tau|): the compiled count against
    NumPy's and torch.kthvalue, on rows with exact zeros, -0.0, ties and both signs, at the extreme ranks
    (brackets open on one side) and inside."""
    from mergelib.selection import kth_smallest
    g = torch.Generator().manual_seed(len(ks))
    x = (torch.randn(2, 140_000, generator=g) * 300).round() / 300  # ties
    x[:, :20_000] = 0.0
    x[:, 20_000:21_000] = -0.0
    x = x[:, torch.randperm(140_000, generator=g)].to(dtype)
    counted = []
    real = kernels.count_brackets
    monkeypatch.setattr(kernels, "count_brackets", lambda *a: counted.append(1) or real(*a))
    fast, slow = _both(lambda: kth_smallest(x, ks, absolute=absolute))
    ref = torch.stack([(x.abs() if absolute else x).kthvalue(k, dim=1).values for k in ks], -1)
    assert counted and torch.equal(fast, ref) and torch.equal(slow, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_count_brackets_on_one_value_and_in_small_steps(monkeypatch, dtype):
    """A bracket on one value (lo == hi == tie: the few magnitudes of bf16 task vectors) is counted and
    nothing kept, as the NumPy counter does; calls of 1,000 entries grow each rank's buffer many times
    over three segments given by a generator, each taken once."""
    from mergelib.selection import _NumpyCounter, kernel_brackets
    cols = _columns(2, {"a": (40, 300), "b": (5_000,), "c": (77,)}, seed=14, dup=True, dtype=dtype)
    block = torch.stack([cols.row(i) for i in range(2)]).abs()
    vals = [torch.unique(block[i]) for i in range(2)]
    # per row: a bracket on one value, a wide bracket with that value as its tie, one without a tie
    brackets = [[(v[1], v[1], v[1]), (v[1], v[len(v) // 2], v[1]), (v[2], v[len(v) // 2], None)] for v in vals]
    assert kernel_brackets(brackets) and not kernel_brackets([[(vals[0][3], vals[0][3], None)]])
    monkeypatch.setattr(kernels, "_COUNT_STEP", 1000)
    taken = []

    def segments():
        for k in cols.layout.keys:
            taken.append(k)
            yield cols.pretrained[k], [m[k] for m in cols.models]
    got = kernels.count_brackets(segments(), brackets)
    assert taken == list(cols.layout.keys)
    for i in range(2):
        ctr = _NumpyCounter(brackets[i], np.dtype(np.float32), block.shape[1], absolute=False)
        ctr.add(block[i].numpy())
        below, cands = ctr.result()
        for r in range(3):
            b, points, c = got[i][r]
            ref = cands[r][0]
            assert b == below[r]
            if r == 2:
                assert points == 0 and torch.equal(torch.from_numpy(c), ref)
            else:
                assert points == ref.count > 0 and torch.equal(torch.from_numpy(c), ref.rest)
        assert got[i][0][2].size == 0 and got[i][1][2].size > 1000  # grown past one call


def test_per_tensor_ties_thresholds_from_each_tensors_columns():
    pre, fts = _set({"a.weight": (300, 250), "b.weight": (500, 200), "c.bias": (77,)}, 4, seed=12, ties=True)
    fast, slow = _both(lambda: merge(pre, fts, "ties", rules=None, granularity="tensor"))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)
    x, layout = flatten(fts, sorted(pre), subtract=pre)
    flat = ties_merge(x, 0.2, granularity="tensor", layout=layout)
    for k, s, e in layout.segments():
        assert same_bytes(fast[k].reshape(-1), pre[k].reshape(-1) + flat[s:e])


@pytest.mark.parametrize("method,scale", [("task_arithmetic", 0.3), ("task_arithmetic", 1.0), ("task_arithmetic", 0.0),
                                          ("task_arithmetic", -0.7), ("task_arithmetic", [0.2, 0.5, 1.1]),
                                          ("ties", 1.0), ("ties", 0.45), ("ties", -0.3)])
@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_last_step_same_bits(method, scale, majority, monkeypatch):
    """theta_0 + lambda * tau_m: fused into the kernel where torch.add rounds once (fused_add_matches_torch),
    else torch.add after it; per-task lambdas take the torch code. The same bits either way (TIES with
    both majority signs: its zero-sum columns are rewritten after the sweep)."""
    pre, fts = _cancelling_set(majority, base_scale=3.0)
    more_pre, more_fts = _set(SHAPES, 2, seed=13)
    pre.update(more_pre)
    for ft, more in zip(fts, more_fts):
        ft.update(more)
    if isinstance(scale, list):
        scale = scale[:2]
    hp = {"density": 0.7} if method == "ties" else {}
    fast, slow = _both(lambda: merge(pre, fts, method, scale=scale, rules=None, **hp))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)
    monkeypatch.setattr(kernels, "fused_add_matches_torch", lambda: False)
    unfused = merge(pre, fts, method, scale=scale, rules=None, **hp)
    assert all(same_bytes(unfused[k], slow[k]) for k in pre)


def test_scaled_sum_is_one_rounding_of_base_plus_scale_times_sum():
    base = torch.tensor([1.0, 3.0, -2.0])
    f = [torch.tensor([1.0 + 2.0 ** -23, 3.5, -2.0])]
    out = torch.empty(3)
    assert kernels.sum_task_vectors(out, f, base, scale=0.5) == 0
    # sums 2**-23, 0.5, 0: 1 + 2**-24 rounds (to even) to 1; 3 + 0.25; -2 + 0.5 * 0 = -2
    assert same_bytes(out, torch.tensor([1.0, 3.25, -2.0]))
    # one rounding, not two: sum 1 + 2**-23 times 1 - 2**-24 is 1 + 2**-24 - 2**-47, which alone would
    # round to 1 (and -1 + 1 = 0); fused with the base -1 it leaves 2**-24 - 2**-47 exactly
    out = torch.empty(1)
    kernels.sum_task_vectors(out, [torch.tensor([2.0 ** -23])], torch.tensor([-1.0]), scale=1 - 2.0 ** -24)
    assert out.item() == 2.0 ** -24 - 2.0 ** -47
    assert isinstance(kernels.fused_add_matches_torch(), bool)


# ----------------------------------------------------------------------------------------------
# PCB (official code): the two sweeps around torch's exp and tanh
# ----------------------------------------------------------------------------------------------
def test_pcb_scores_hand_computed():
    # x_0 = (0.5, -1), x_1 = (0.25, 2): tot = (0.75, 1); clip [0.5, 1] and [0.25, 2] (spans 0.5, 1.75)
    base = torch.zeros(2)
    fts = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])]
    lo, hi = np.array([0.5, 0.25], np.float32), np.array([1.0, 2.0], np.float32)
    z, p = torch.full((2, 3), 7.0), torch.full((2, 3), 7.0)
    bad, big = kernels.pcb_scores(z, p, 1, fts, base, lo, hi, hi - lo)  # columns 1 and 2 of the blocks
    assert (bad, big) == (0, 4)  # every |p| >= 2**-12
    # z = 2 * ((clamp(|x|) - lo) / span)^2: task 0 (0.5 - 0.5) / 0.5 = 0, (1 - 0.5) / 0.5 = 1; task 1: 0, 1
    assert same_bytes(z, torch.tensor([[7.0, 0.0, 2.0], [7.0, 0.0, 2.0]]))
    assert same_bytes(p, torch.tensor([[7.0, 0.375, -1.0], [7.0, 0.1875, 2.0]]))  # x_i * tot
    fts[1][1] = float("nan")
    assert kernels.pcb_scores(z, p, 0, [f * 1e-3 for f in fts], base, lo, hi, hi - lo) == (1, 2)  # NaN: big


@pytest.mark.parametrize("lam,want", [(None, [0.5, 2.0]), (np.array([2.0, -1.0], np.float32), [1.0, -2.0])])
def test_pcb_weighted_sum_hand_computed(lam, want):
    base = torch.zeros(2)
    fts = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])]
    lo, hi = np.array([0.5, 0.25], np.float32), np.array([1.0, 2.0], np.float32)
    beta = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    q, span = np.array([1.0, 2.0], np.float32), np.array([2.0, 3.0], np.float32)  # max - q: 3 - 1, 5 - 2
    num, den = torch.zeros(2), torch.zeros(2)
    kernels.pcb_weighted_sum(num, den, beta, fts, base, lo, hi, q, span, lam)
    # s_0 = ((3 - 1) / 2, 0), s_1 = (0, (5 - 2) / 3); tau' = sign(x) clamp(|x|) = (0.5, -1) and (0.25, 2)
    assert same_bytes(num, torch.tensor(want))  # (0.5 * 1 + 0.25 * 0, -1 * 0 + 2 * 1), times lam where given
    assert same_bytes(den, torch.tensor([1.0, 1.0]))


def _spy_pcb_scores(monkeypatch):
    """Record the (bad, big) of every kernels.pcb_scores call."""
    seen, real = [], kernels.pcb_scores

    def spy(*a):
        seen.append(real(*a))
        return seen[-1]
    monkeypatch.setattr(kernels, "pcb_scores", spy)
    return seen


@pytest.mark.parametrize("seed,ties,tv_scale,dtype", [(0, False, 1e-3, torch.float32), (1, True, 1e-3, torch.float32),
                                                      (2, False, "mixed", torch.float32), (3, False, 0.3, torch.float32),
                                                      (4, False, "mixed", torch.bfloat16), (5, True, 0.3, torch.bfloat16)])
@pytest.mark.parametrize("hp", [{}, {"density": 0.3}, {"density": 1.0}, {"scale": [0.5, 1.0, -2.0, 1.5, 0.25]}])
def test_merge_pcb_same_bits_with_and_without_kernels(monkeypatch, seed, ties, tv_scale, dtype, hp):
    """Through merge(): ties and zeros, bf16, per-task lambdas, densities up to 1, and products tau_i * sum_j
    tau_j at or above 2**-12 in every tensor (0.3), in one tensor only ("mixed"), or in a few entries (1e-3)."""
    pre, fts = _set(SHAPES, 5, seed=seed, ties=ties, scale=1e-4 if tv_scale == "mixed" else tv_scale, dtype=dtype)
    if tv_scale == "mixed":  # b.weight's task vectors 300x larger: its products reach tanh's range
        for ft in fts:
            ft["b.weight"] = pre["b.weight"] + 300 * (ft["b.weight"].float() - pre["b.weight"].float()).to(dtype)
    seen = _spy_pcb_scores(monkeypatch)
    fast, slow = _both(lambda: merge(pre, fts, "pcb", rules=None, **hp))
    assert all(same_bytes(fast[k], slow[k]) for k in pre)
    assert seen and all(bad == 0 for bad, _ in seen)  # the compiled sweep ran; every column sum finite
    if tv_scale == "mixed":
        assert any(big for _, big in seen) and not all(big for _, big in seen)
    elif tv_scale == 0.3:
        assert all(big for _, big in seen)


def test_pcb_kernel_agrees_with_the_flat_function():
    pre, fts = _set(SHAPES, 8, seed=9, scale=3e-3)  # 8 tasks: four column chunks of 65,536
    x, layout = flatten(fts, sorted(pre), subtract=pre)
    flat = pcb_merge(x, 0.1, lambdas=[1.0, 0.5, 2.0, 1.0, 1.0, 0.25, 1.0, 3.0])
    merged = merge(pre, fts, "pcb", rules=None, density=0.1, scale=[1.0, 0.5, 2.0, 1.0, 1.0, 0.25, 1.0, 3.0])
    for k, s, e in layout.segments():  # merge()'s last step: theta_0 + 1.0 * tau_m
        assert same_bytes(merged[k].reshape(-1), torch.add(pre[k].reshape(-1), flat[s:e], alpha=1.0))


def test_kept_scores_count_keep_and_select():
    """KeptScores against NumPy: per row, #(< floor), #(== floor), the scores above it with their columns in
    order (blocks of any width, the capacity grown as needed, nothing written past it), the k-th smallest
    score at every rank (the floor itself where the rank falls on its copies; None below the floor), and
    each row's kept entries of a column range."""
    g = np.random.default_rng(3)
    n, D = 3, 5_000
    rows = (g.standard_normal((n, D)) * 4).round().astype(np.float32) / 4  # ties, the floor among them
    floors = np.array([0.25, -np.inf, 1.0], np.float32)
    kept = kernels.KeptScores(floors, capacity=64, limit=D)
    for c0, c1 in [(0, 1000), (1000, 1017), (1017, 1030), (1030, 5000)]:
        block = torch.from_numpy(np.ascontiguousarray(rows[:, c0:c1]))
        assert kept.add(block, c0)
    for i in range(n):
        r, f = rows[i], floors[i]
        assert kept.below[i] == (r < f).sum() and kept.at[i] == (r == f).sum() and kept.kept[i] == (r > f).sum()
        assert np.array_equal(kept.vals[i, : kept.kept[i]], r[r > f])
        assert np.array_equal(kept.poss[i, : kept.kept[i]], np.flatnonzero(r > f))
        srt = np.sort(r)
        for k in [1, 7, D // 3, D // 2, D - 300, D - 1, D]:
            got = kept.kth(i, k)
            assert (got is None) if k <= kept.below[i] else got == srt[k - 1]
        assert kept.kth(i, D - 3, hi=np.float32(0.0)) == srt[D - 4]  # a ceiling below the rank: still exact
    starts, ends = kept.ranges(1000, 1030)
    for i in range(n):
        assert np.array_equal(kept.poss[i, starts[i]:ends[i]], 1000 + np.flatnonzero(rows[i, 1000:1030] > floors[i]))
    block = torch.empty(n, 30)
    kept.scatter(block, 1000, np.array([-5.0, -6.0, -7.0], np.float32))
    want = np.where(rows[:, 1000:1030] > floors[:, None], rows[:, 1000:1030], np.array([[-5.0], [-6.0], [-7.0]]))
    assert np.array_equal(block.numpy(), want.astype(np.float32))
    small = kernels.KeptScores(floors, capacity=16, limit=100)  # a row keeps more than the limit: refused
    assert not small.add(torch.from_numpy(np.ascontiguousarray(rows[:, :1000])), 0)


def test_exp_has_the_same_bits_wherever_an_entry_lies():
    """KeptScores.add_bounded takes torch's float32 exp of the candidates packed together, where the dense
    path takes it of whole N x w blocks: on this build an entry's exp must not depend on its position in the
    tensor (a vectorised loop's scalar tail rounding otherwise), for tensors of every length mod 64."""
    g = torch.Generator().manual_seed(4)
    z = torch.rand(8 * 4099, generator=g) * 8  # PCB's z = N * minmax^2 lies in [0, N]
    z[:64] = torch.tensor([0.0, 8.0, 1e-30, 88.0, 88.7, 89.0, -0.0, 1e-7] * 8)
    whole = z.exp()
    for size in [*range(1, 70), 1000, 4097, 4099 * 3]:
        idx = torch.randperm(z.numel(), generator=g)[:size]
        assert same_bytes(z[idx].exp(), whole[idx]), size
        assert same_bytes(z[-size:].clone().exp_(), whole[-size:]), size


def test_tanh_has_the_same_bits_wherever_an_entry_lies():
    """ScoreCandidates takes torch's float32 tanh of the candidates' cross terms packed together, where the
    dense path takes it (competition._tanh_) of whole N x w blocks: on this build an entry's tanh must not
    depend on its position in the tensor, for tensors of every length mod 64; and tanh(p) <= p for p >= 0,
    which the scores' bound takes for granted."""
    from mergelib.competition import _tanh_
    g = torch.Generator().manual_seed(6)
    p = torch.randn(8 * 4099, generator=g) * 3e-4  # around tanh's threshold 2**-12
    p[:64] = torch.tensor([0.0, -0.0, 2.0 ** -12, -(2.0 ** -12), 0.5, 9.0, 1e-30, 4e-4] * 8)
    whole = p.tanh()
    for size in [*range(1, 70), 1000, 1024, 4097, 4099 * 3]:
        idx = torch.randperm(p.numel(), generator=g)[:size]
        assert same_bytes(p[idx].tanh(), whole[idx]), size
        assert same_bytes(_tanh_(p[-size:].clone()), whole[-size:]), size
    grid = torch.cat([torch.logspace(-40, 2, 1_000_001), torch.rand(1 << 20, generator=g) * 2.0 ** -10])
    assert (grid.tanh() <= grid).all()


def test_score_candidates_fill_gives_the_scores_where_the_bound_reaches():
    """ScoreCandidates.fill: the exact scores exp(z) * tanh(p) wherever the bound reaches the row's threshold,
    the row's fill elsewhere; every score at or above its threshold is among them."""
    from mergelib.competition import _tanh_
    g = torch.Generator().manual_seed(7)
    n, w = 5, 3001
    z = torch.rand(n, w, generator=g) * n
    z[:, :3] = torch.tensor([0.0, float(n), 1e-30])
    p = torch.randn(n, w, generator=g) * 1e-4
    p[1, ::7] *= 20.0  # in tanh's range
    p[2, 5], p[2, 6] = 0.0, -0.0
    dense = torch.mul(z.exp(), _tanh_(p.clone()))
    thresholds = torch.quantile(dense, 0.95, dim=1).numpy().astype(np.float32)
    thresholds[3] = float(dense[3].max())  # one row: only its largest score reaches
    cand = kernels.ScoreCandidates()
    ub = cand.bounds(n, w)
    kernels._loops().pcb_bound_rows(z.numpy(), p.numpy(), ub)
    fill = np.array([-np.inf, 0.0, 1.0, -2.0, 3.0], np.float32)
    out = torch.full((n, w), float("nan"))
    cand.fill(z, p, thresholds, fill, out, tanh=True)
    reach = torch.from_numpy(ub >= thresholds[:, None])
    want = torch.where(reach, dense, torch.from_numpy(fill)[:, None])
    assert same_bytes(out, want)
    assert bool((reach | (dense < torch.from_numpy(thresholds)[:, None])).all())  # no score at or above is left
    assert 0 < int(reach.sum()) < n * w // 5 and int(reach[3].sum()) >= 1


def test_pcb_score_bound_is_above_the_score_and_close_to_it():
    """The bound of kernels.pcb_scores' ``bounds``: at or above torch's exp(z) * p for every z in [0, N] up to
    the most tasks it takes, 80 (a fine grid, the grid's float32 neighbours, both ends) and p > 0, within
    0.25 % of it; 0 where p <= 0."""
    top = float(kernels.ScoreCandidates.BOUNDED_TASKS)
    assert top == kernels.KeptScores.BOUNDED_TASKS == 80
    z = torch.linspace(0, top, 2_000_001)
    z = torch.cat([z, torch.from_numpy(np.nextafter(z.numpy(), np.float32(np.inf))), torch.tensor([top])])
    z = z.clamp_max(top)
    n = 1
    for p_value in (1e-30, 3.7e-9, 2.0 ** -13):
        p = torch.full_like(z, p_value)
        ub = np.empty((n, z.numel()), np.float32)
        kernels._loops().pcb_bound_rows(z.view(1, -1).numpy(), p.view(1, -1).numpy(), ub)
        beta = (z.exp() * p).numpy()
        assert (ub[0] >= beta).all() and (ub[0] <= beta * np.float32(1.0025)).all(), p_value
    ub = np.empty((1, 4), np.float32)
    kernels._loops().pcb_bound_rows(np.array([[0.0, 3.0, 80.0, 1.0]], np.float32),
                                    np.array([[0.0, -1e-9, -0.0, -2.0 ** -13]], np.float32), ub)
    assert (ub == 0).all()


def _pcb_paths(monkeypatch, pre, fts, bounded=None, tanh=None, **hp):
    """merge(pcb) by its sparse compiled path (asserted to finish there; ``bounded``: whether some chunk must
    have taken exp only at the candidates, KeptScores.add_bounded; ``tanh``: whether some such chunk must have
    taken tanh of its candidates too), its dense compiled path and the torch code."""
    from mergelib import competition
    made, bound = [], []
    real = kernels.KeptScores

    class Spy(real):
        def kth(self, *a, **k):
            made.append(1)
            return real.kth(self, *a, **k)

        def add_bounded(self, z, p, col, maxima, tanh=False):
            bound.append(tanh)
            return real.add_bounded(self, z, p, col, maxima, tanh)
    monkeypatch.setattr(kernels, "KeptScores", Spy)
    sparse = merge(pre, fts, "pcb", rules=None, **hp)
    assert made, "the sparse path did not run"
    if bounded is not None:
        assert bool(bound) == bounded
    if tanh is not None:
        assert any(bound) == tanh
    with monkeypatch.context() as m:
        m.setattr(competition, "PCB_SPARSE_DENSITY", 0.0)
        dense = merge(pre, fts, "pcb", rules=None, **hp)
    with kernels.use(False):
        slow = merge(pre, fts, "pcb", rules=None, **hp)
    return sparse, dense, slow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hp", [{}, {"density": 0.2}, {"density": 0.01, "scale": [1.0, 0.5, 2.0, -1.0, 0.25]}])
@pytest.mark.parametrize("tv_scale", [1e-3, 1e-4])
def test_pcb_sparse_scores_same_bits(monkeypatch, dtype, hp, tv_scale):
    """PCB keeping only the scores above a floor below its drop threshold gives the bits of the N x D
    scores, compiled and in torch, exp (and tanh) taken only at the candidates of the scores' bound: with
    cross terms tau_i * sum_j tau_j reaching tanh's range in every column chunk (1e-3: some candidates take
    tanh), and below it (1e-4)."""
    pre, fts = _set(SHAPES, 5, seed=11, ties=True, dtype=dtype, scale=tv_scale)
    sparse, dense, slow = _pcb_paths(monkeypatch, pre, fts, bounded=True, tanh=tv_scale > 1e-4, **hp)
    assert all(same_bytes(sparse[k], dense[k]) and same_bytes(sparse[k], slow[k]) for k in pre)


def test_pcb_sparse_scores_with_most_entries_unchanged(monkeypatch):
    """Fine-tunes that left 97 % of the weights unchanged: most scores are exactly 0, the drop threshold
    and the floor fall on that value, counted, not kept; the same bits."""
    pre, fts = _set(SHAPES, 4, seed=12)
    g = torch.Generator().manual_seed(0)
    for ft in fts:
        for k in ft:
            same = torch.rand(ft[k].shape, generator=g) < 0.97
            ft[k] = torch.where(same, pre[k], ft[k])
    sparse, dense, slow = _pcb_paths(monkeypatch, pre, fts, bounded=False)  # the floor is 0: no bound
    assert all(same_bytes(sparse[k], dense[k]) and same_bytes(sparse[k], slow[k]) for k in pre)


def test_pcb_sparse_scores_bounded_and_dense_chunks(monkeypatch):
    """Task vectors whose cross terms reach tanh's range in most entries of one tensor: the column chunks
    that hold it take exp and tanh of every entry, the others only at the candidates of the bound (some of
    them through tanh); the same bits as the dense paths."""
    from mergelib import competition
    pre, fts = _set(SHAPES, 5, seed=14, scale=1e-4)
    for ft in fts:  # d.weight's task vectors 300x larger: most of its products reach 2**-12
        ft["d.weight"] = pre["d.weight"] + 300 * (ft["d.weight"] - pre["d.weight"])
    monkeypatch.setattr(competition._select, "CHUNK", 5 * 8192)  # chunks of 8192 columns: some hold d.weight
    seen = _spy_pcb_scores(monkeypatch)
    routes, real = [], competition._bounded_chunk
    monkeypatch.setattr(competition, "_bounded_chunk", lambda *a: routes.append(real(*a)) or routes[-1])
    sparse, dense, slow = _pcb_paths(monkeypatch, pre, fts, bounded=True, tanh=True)
    assert any(big for _, big in seen) and not all(big for _, big in seen)
    assert True in routes and False in routes  # bounded chunks and dense ones
    assert all(same_bytes(sparse[k], dense[k]) and same_bytes(sparse[k], slow[k]) for k in pre)


@pytest.mark.parametrize("miss", ["floor above the threshold", "too many kept"])
def test_pcb_sparse_scores_fall_back_to_the_dense_path(monkeypatch, miss):
    """A sample whose floor lies above the drop threshold, or a row that would keep more than its limit:
    the merge takes the dense path, with the same bits."""
    from mergelib import competition
    pre, fts = _set(SHAPES, 5, seed=13)
    want = merge(pre, fts, "pcb", rules=None)
    fell = []
    real_sparse = competition._pcb_official_sparse

    def spy(*a, **k):
        out = real_sparse(*a, **k)
        fell.append(out is None)
        return out
    monkeypatch.setattr(competition, "_pcb_official_sparse", spy)
    if miss == "floor above the threshold":
        real = competition._select._brackets
        monkeypatch.setattr(competition._select, "_brackets",  # one rank: the drop threshold's bracket
                            lambda s, n, ks: [(torch.tensor(1e30), None, None)] if len(ks) == 1 else real(s, n, ks))
    else:
        monkeypatch.setattr(kernels.KeptScores, "add", lambda self, b, c0: False)
        monkeypatch.setattr(kernels.KeptScores, "add_bounded", lambda self, *a: False)
    got = merge(pre, fts, "pcb", rules=None)
    assert fell == [True] and all(same_bytes(got[k], want[k]) for k in pre)


def test_blocks_reaching_tanh_range_as_the_torch_rule():
    """kernels.blocks_reaching flags the blocks _tanh_ must take: any |x| >= 2**-12 (both signs, the
    threshold itself), NaN, inf; and _tanh_ gives tanh's bits with the flags from either side."""
    from mergelib.competition import TANH_IDENTITY_BELOW, _tanh_
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 1024, generator=g) * 3e-5
    x[3, 7], x[9, 1023], x[20, 0], x[33, 500] = 2.0 ** -12, -(2.0 ** -12), float("nan"), float("-inf")
    x[40, 9] = float(np.nextafter(np.float32(2.0 ** -12), np.float32(0)))  # just below: not flagged
    x[50:53] *= 100.0
    got = kernels.blocks_reaching(x, TANH_IDENTITY_BELOW)
    lo, hi = torch.aminmax(x, dim=1)
    ref = torch.logical_and(hi < TANH_IDENTITY_BELOW, lo > -TANH_IDENTITY_BELOW).logical_not_().nonzero().view(-1)
    assert torch.equal(got, ref) and got.tolist() == [3, 9, 20, 33, 50, 51, 52]
    fast, slow = _both(lambda: _tanh_(x.clone().view(-1)))
    expect = x.clone().tanh_().view(-1)
    assert same_bytes(fast[~expect.isnan()], expect[~expect.isnan()]) and same_bytes(fast, slow)


# ----------------------------------------------------------------------------------------------
# DARE: torch's CPU generator reproduced (MT19937), the drop and rescale in one pass
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 5489, 2 ** 32 + 5, 2 ** 63 - 1])
def test_mt19937_draws_are_torch_rand(seed):
    """The loop's draws are torch.rand's on a seeded CPU generator, across the 624-word state's refills
    (lengths 1, 623-625, 1,249, 10,007) and seeds above 2**32 (manual_seed keeps their low 32 bits)."""
    loops = kernels._loops()
    for n in (1, 623, 624, 625, 1249, 10_007):
        draws = np.empty(n, dtype=np.int64)
        loops.mt19937_uniform24(np.int64(seed), draws)
        ref = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        assert np.array_equal(draws.astype(np.float64) * 2.0 ** -24, ref.double().numpy()), n
    assert kernels.dare_matches_torch()


def test_mt19937_first_output_of_the_reference_seed():
    """std::mt19937 with its default seed 5489 gives 3499211612 first (the C++ standard's check value; its
    10,000th output is 4123659995): the generator itself, independently of torch."""
    loops = kernels._loops()
    mt = np.empty(loops.MT_N, dtype=np.uint32)
    loops.mt19937_seed(np.int64(5489), mt)
    loops.mt19937_next_state(mt)
    assert int(loops.mt_temper(np.int64(mt[0]))) == 3499211612
    for _ in range(10_000 // loops.MT_N):
        loops.mt19937_next_state(mt)
    assert int(loops.mt_temper(np.int64(mt[10_000 % loops.MT_N - 1]))) == 4123659995


def test_dare_threshold_hand_computed():
    # ceil(float32(p) * 2**24): float32(0.1) * 2**24 = 1677721.625; float32(0.9) = 15099494 / 2**24 exactly
    assert [kernels.dare_threshold(p) for p in (0.0, 0.1, 0.5, 0.9)] == [0, 1677722, 1 << 23, 15099494]


def _torch_dare(x, seed, p):
    keep = torch.rand(x.numel(), generator=torch.Generator().manual_seed(seed)).ge_(p)
    out = torch.mul(x, keep)
    return out.div_(1 - p)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99, 0.3])
@pytest.mark.parametrize("inplace", [False, True])
def test_dare_drop_is_torch_mul_then_div(p, inplace):
    """Drop and rescale in one pass against torch.mul(src, keep) then div_(1 - p): kept entries divided,
    dropped ones +0 or -0 by their sign, lengths that are no multiple of 624, src and out one tensor."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100_003, generator=g)
    x[::97] = -x[::97].abs()
    ref = _torch_dare(x, 11, p)
    out = x.clone() if inplace else torch.full_like(x, 7.0)
    kernels.dare_drop(out if inplace else x, out, 11, p)
    assert same_bytes(out, ref)
    assert (out.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).any() or p == 0.0


def test_dare_drop_at_the_threshold():
    """An entry whose uniform equals float32(p) is kept (u >= p); at p half a step of 2**-24 above it, dropped
    (a floor for the ceil, or > for >=, changes these entries)."""
    loops = kernels._loops()
    draws = np.empty(1000, dtype=np.int64)
    loops.mt19937_uniform24(np.int64(21), draws)
    j = int(np.flatnonzero(draws < (1 << 23))[0])  # a 24-bit value v < 2**23: v + 0.5 is a float32 too
    v = int(draws[j])
    x = torch.ones(1000)
    for p, kept in ((v * 2.0 ** -24, True), ((v + 0.5) * 2.0 ** -24, False)):
        assert float(np.float32(p)) == p
        out = torch.empty(1000)
        kernels.dare_drop(x, out, 21, p)
        assert same_bytes(out, _torch_dare(x, 21, p))
        assert (out[j] > 0) == kept


def test_dare_flat_and_state_dict_compiled_and_not():
    """dare_flat (merge()'s and the streamed merges' DARE) and dare_state_dict give the same bits with the
    loop and with torch's draws, also when the loop is ruled out by dare_matches_torch."""
    from unittest import mock

    from mergelib.competition import dare_flat, dare_state_dict
    from mergelib.task_vectors import FlatLayout
    layout = FlatLayout.from_shapes({"a": (300, 250), "b": (1100,), "c": ()})
    x = torch.randn(3, layout.D, generator=torch.Generator().manual_seed(4))
    fast, slow = _both(lambda: dare_flat(x, 0.7, layout, seed=5, tasks=["u", "v", "w"]))
    assert same_bytes(fast, slow)
    with mock.patch.object(kernels, "dare_matches_torch", lambda: False):
        assert same_bytes(dare_flat(x, 0.7, layout, seed=5, tasks=["u", "v", "w"]), fast)
    y = x.clone()
    assert dare_flat(y, 0.7, layout, seed=5, tasks=["u", "v", "w"], inplace=True) is y and same_bytes(y, fast)
    sd = {"a": x[1, :75_000].view(300, 250).clone(), "b": x[1, 75_000:76_100].clone(), "c": x[1, -1].clone()}
    fast_sd, slow_sd = _both(lambda: dare_state_dict(sd, 0.7, seed=5, task="v"))
    assert all(same_bytes(fast_sd[k], slow_sd[k]) and fast_sd[k].shape == sd[k].shape for k in sd)
    assert same_bytes(torch.cat([fast_sd[k].reshape(-1) for k in ("a", "b", "c")]), fast[1])
