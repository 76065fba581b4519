"""Exact order statistics (mergelib.selection) against torch.kthvalue, and the TIES trim rules."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

import mergelib as ml
from mergelib import selection as sel
from mergelib.competition import ties_merge, trim
from mergelib.task_vectors import FlatLayout

from bits import same_bits_any_zero_sign
from row_cases import make_rows

N_LONG = sel.LONG_ROW + 4321  # long enough for the bracket-and-count path


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "subnormal", "constant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kth_smallest_equals_kthvalue(kind, dtype):
    x = make_rows(kind, dtype, N_LONG)
    n = x.shape[1]
    for k in (1, 2, n // 10, n // 2, n - n // 20, n - 1, n):
        want = torch.kthvalue(x, k, dim=1).values
        got = sel.kth_smallest(x, k, dim=1)
        assert same_bits_any_zero_sign(got, want), (kind, dtype, k)
        got_abs = sel.kth_smallest(x, k, dim=1, absolute=True)
        assert same_bits_any_zero_sign(got_abs, torch.kthvalue(x.abs(), k, dim=1).values), (kind, dtype, k, "abs")


def test_kth_smallest_many_ranks_keepdim_and_dims():
    x = make_rows("normal", n=N_LONG, rows=3)
    ks = [1, 77, x.shape[1]]
    got = sel.kth_smallest(x, ks, dim=1)
    assert got.shape == (3, 3)
    for j, k in enumerate(ks):
        assert same_bits_any_zero_sign(got[:, j], torch.kthvalue(x, k, dim=1).values)
    kd = sel.kth_smallest(x, 5, dim=1, keepdim=True)
    assert kd.shape == (3, 1) and same_bits_any_zero_sign(kd, torch.kthvalue(x, 5, dim=1, keepdim=True).values)
    xt = x.T.contiguous()  # reduce over dim 0
    assert same_bits_any_zero_sign(sel.kth_smallest(xt, 9, dim=0), torch.kthvalue(xt, 9, dim=0).values)


def test_short_rows_single_elements_and_errors():
    x = torch.tensor([[3.0], [-1.0]])
    assert torch.equal(sel.kth_smallest(x, 1, dim=1), torch.tensor([3.0, -1.0]))
    assert sel.kth_smallest(torch.tensor([7.0]), 1).item() == 7.0
    with pytest.raises(ValueError):
        sel.kth_smallest(torch.zeros(4), 5)
    with pytest.raises(ValueError):
        sel.kth_smallest(torch.zeros(4), 0)


def test_bracket_fallback_is_exact(monkeypatch):
    """A sample that misses the k-th value (forced here) still gives the exact answer."""
    x = make_rows("normal", n=N_LONG, rows=1)
    monkeypatch.setattr(sel, "_sample_index", lambda n, m, dev: torch.zeros(m, dtype=torch.long))
    for k in (1, 1000, x.shape[1]):
        assert same_bits_any_zero_sign(sel.kth_smallest(x, k, dim=1), torch.kthvalue(x, k, dim=1).values)


def test_backend_switch():
    x = make_rows("normal", n=N_LONG, rows=1)
    with sel.backend("torch"):
        assert sel.get_backend() == "torch"
        a = sel.kth_smallest(x, 100, dim=1)
    assert sel.get_backend() == "auto"
    assert same_bits_any_zero_sign(a, sel.kth_smallest(x, 100, dim=1))
    with pytest.raises(ValueError):
        sel.set_backend("radix")


def test_topk_mask():
    x = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0]])
    m = sel.topk_mask(x, 2)  # ties at |3|: the lower indices first
    assert m.tolist() == [[False, True, True, False, False]]
    assert sel.topk_mask(x, 0).sum() == 0 and sel.topk_mask(x, 5).all()


# ------------------------------------------------------------------------------------------------
# kth_smallest_columns: a matrix read by column blocks
# ------------------------------------------------------------------------------------------------
class _Columns:
    """An ``N x n`` matrix given by column blocks, the interface :func:`sel.kth_smallest_columns` reads
    (that of ``task_vectors.TaskVectorColumns``); counts the rows built whole (short rows, a missed sample)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.shape, self.dtype, self.device = x, tuple(x.shape), x.dtype, x.device
        self.rows_built = 0

    def block(self, c0, c1, out):
        return out.copy_(self.x[:, c0:c1])

    def gather(self, positions):
        return self.x[:, positions]

    def row(self, i):
        self.rows_built += 1
        return self.x[i].clone()


def _column_rows(dtype, n=N_LONG):
    """Six long rows: normal values; few distinct values (many ties); two thirds +0.0 and -0.0; 42 %
    exact zeros of both signs among small values; every value twice (with both signs); one value."""
    g = torch.Generator().manual_seed(4)
    zeros = torch.randn(n, generator=g)
    zeros[::3], zeros[1::3] = 0.0, -0.0
    half = torch.randn(n // 2 + 1, generator=g)
    twice = torch.cat([half, -half])[torch.randperm(2 * half.numel(), generator=g)][:n]
    return torch.stack([torch.randn(n, generator=g), (torch.randn(n, generator=g) * 3).round(), zeros,
                        _unchanged_weights(torch.float32, n=n, rows=1)[0], twice, torch.full((n,), 0.25)]).to(dtype)


@pytest.mark.parametrize("chunk", [sel.CHUNK, 1 << 14])  # one column block / 23 blocks of 3072 columns
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kth_smallest_columns_equals_kthvalue(monkeypatch, dtype, chunk):
    """Rows longer than LONG_ROW, read by column blocks in one counting pass: bit for bit
    torch.kthvalue of every row (of |x| where absolute), for several ranks at once and for one,
    without building any row whole (the counting path, not the fallback)."""
    monkeypatch.setattr(sel, "CHUNK", chunk)
    x = _column_rows(dtype)
    n = x.shape[1]
    assert n >= sel.LONG_ROW
    ks = [1, 2, n // 10, n // 3, n // 2, 2 * n // 3, n - n // 20, n - 1, n]
    for absolute in (True, False):
        xa = x.abs() if absolute else x
        want = torch.stack([torch.kthvalue(xa, k, dim=1).values for k in ks], 1)
        cols = _Columns(x)
        got = sel.kth_smallest_columns(cols, ks, absolute=absolute)
        assert got.shape == (6, len(ks)) and same_bits_any_zero_sign(got, want), (dtype, absolute)
        one = sel.kth_smallest_columns(cols, n // 3, absolute=absolute)
        assert one.shape == (6, 1) and same_bits_any_zero_sign(one, want[:, 3:4]), (dtype, absolute)
        assert cols.rows_built == 0


def test_kth_smallest_columns_fallback_short_rows_task_vectors_and_errors(monkeypatch):
    """A sample that misses (forced) falls back to each row, exact and row by row; short rows go to
    kthvalue; the task vectors of state dicts (TaskVectorColumns, several tensors) give the values of
    their flat matrix; k out of [1, n] is refused."""
    from mergelib.task_vectors import TaskVectorColumns, flatten

    x = _column_rows(torch.float32)
    n = x.shape[1]
    ks = [1, 4321, n // 2, n]
    want = torch.stack([torch.kthvalue(x.abs(), k, dim=1).values for k in ks], 1)
    short = _Columns(x[:, : sel.LONG_ROW - 1])
    assert same_bits_any_zero_sign(sel.kth_smallest_columns(short, 77), torch.kthvalue(short.x.abs(), 77, dim=1, keepdim=True).values)
    with monkeypatch.context() as m:
        m.setattr(sel, "_sample_index", lambda n, m_, dev: torch.zeros(m_, dtype=torch.long))
        cols = _Columns(x)
        assert same_bits_any_zero_sign(sel.kth_smallest_columns(cols, ks), want)
        assert cols.rows_built > 0  # the fallback ran, and each row got its own values
    g = torch.Generator().manual_seed(2)
    pre = {"a.weight": torch.randn(300, 200, generator=g), "b.bias": torch.randn(7001, generator=g)}
    fts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    fts[1]["b.bias"] = pre["b.bias"].clone()  # a tensor left unchanged: exact zeros
    tv, _ = flatten(fts, sorted(pre), subtract=pre)
    ks = [1, 30_000, tv.shape[1] // 2, tv.shape[1]]
    want = torch.stack([torch.kthvalue(tv.abs(), k, dim=1).values for k in ks], 1)
    assert same_bits_any_zero_sign(sel.kth_smallest_columns(TaskVectorColumns(fts, pre, sorted(pre)), ks), want)
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match=f"k={bad} out of range \\[1, {n}\\]"):
            sel.kth_smallest_columns(_Columns(x), [5, bad])


# ------------------------------------------------------------------------------------------------
# TIES trim rules
# ------------------------------------------------------------------------------------------------
def _layout_and_tvs(n=3, dtype=torch.float32, seed=0):
    shapes = {"a.weight": (256, 300), "b.bias": (300,), "c.weight": (70, 1000), "d": (5,)}
    lay = FlatLayout.from_shapes(shapes)
    g = torch.Generator().manual_seed(seed)
    return lay, (torch.randn(n, lay.D, generator=g) * 1e-3).to(dtype).float()


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_exact_trim_keeps_exactly_int_d_density(granularity):
    lay, x = _layout_and_tvs(dtype=torch.bfloat16)  # bf16 values: many ties at the threshold
    for density in (0.1, 0.2, 0.5):
        t = trim(x, density, granularity=granularity, layout=lay, trim_rule="exact")
        segs = [(0, lay.D)] if granularity == "global" else [(s, e) for _, s, e in lay.segments()]
        for s, e in segs:
            kept = (t[:, s:e] != 0).sum(1)
            assert (kept <= int((e - s) * density)).all()  # exact zeros in x are never "kept"
            nonzero = (x[:, s:e] != 0).sum(1)
            assert torch.equal(kept, torch.minimum(nonzero, torch.tensor(int((e - s) * density))))
        off = trim(x, density, granularity=granularity, layout=lay)  # official keeps every tie
        assert ((off != 0).sum() >= (t != 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_trim_is_a_stable_top_k_across_chunks(monkeypatch, dtype):
    """The exact rule keeps each row's int(d * density) largest |x|, ties taken in index order: against
    a stable sort in NumPy, with short column chunks so that a row's budget of ties runs out inside
    one chunk while other rows take every tie of it or none."""
    import mergelib.competition as comp

    monkeypatch.setattr(sel, "CHUNK", 1 << 12)  # column chunks of 1024 entries (4 rows)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-6, 7, (4, 10_000), generator=g).to(dtype) / 4  # few distinct values: ties everywhere
    x[1, :5000] = 0.25  # row 1: one long run of ties
    x[2] = torch.randn(10_000, generator=g).to(dtype)  # row 2: few ties
    x[3, ::3] = -0.0
    assert len(comp._column_chunks(4, 10_000, x.device)) > 5
    for density in np.linspace(0.01, 0.97, 33).tolist():
        got = trim(x, density, trim_rule="exact")
        k = int(x.shape[1] * density)
        a = x.abs().float().numpy()
        want = torch.zeros_like(x)
        for r in range(x.shape[0]):
            top = np.lexsort((np.arange(a.shape[1]), -a[r]))[:k]  # by |x| descending, then by index
            want[r, top] = x[r, top]
        want = torch.where(want == 0, x * 0, want)  # a dropped entry is x * 0 (keeps the sign of zero)
        assert same_bits_any_zero_sign(got, want), density


def test_official_rule_keeps_ties_on_bf16_task_vectors():
    """The documented effect (docs/methods.md): on bf16 task vectors, density 0.1 keeps well over 10 %."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(200_000, generator=g) * 0.02).bfloat16()
    ft = (base.float() + torch.randn(200_000, generator=g) * 1e-4).bfloat16()
    tv = (ft.float() - base.float())[None]
    kept = (trim(tv, 0.1) != 0).float().mean().item()
    exact = (trim(tv, 0.1, trim_rule="exact") != 0).float().mean().item()
    assert kept > 0.1 + 1e-3 and exact <= 0.1 + 1e-6  # official: every tie at the threshold survives


def _peft_merge_utils():
    """peft.utils.merge_utils, loaded from its file (it imports only torch; the peft package itself
    needs transformers, which the course environment does not install)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("peft not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "utils" / "merge_utils.py"
    mspec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("sign_rule,peft_rule", [("mass", "total"), ("count", "frequency")])
def test_ties_tensor_exact_matches_peft_bit_for_bit(sign_rule, peft_rule):
    pm = _peft_merge_utils()
    g = torch.Generator().manual_seed(1)
    shapes = {"blocks.0.attn.qkv.weight": (96, 32), "blocks.0.mlp.fc1.weight": (300, 256),
              "blocks.0.mlp.fc1.bias": (300,)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in pre.items()} for _ in range(3)]
    merged = ml.merge(pre, fts, "ties", scale=1.0, rules=None, density=0.2, granularity="tensor",
                      trim_rule="exact", sign_rule=sign_rule)
    for k in shapes:
        tvs = [ft[k] - pre[k] for ft in fts]
        ref = pm.ties(tvs, torch.ones(len(tvs)), 0.2, majority_sign_method=peft_rule)
        want = pre[k] + ref
        assert same_bits_any_zero_sign(merged[k], want), k


def test_benchmark_peft_row_is_the_exact_per_tensor_merge():
    """benchmarks/bench_merge.py times peft's ties tensor by tensor as the reference of the row
    ``merge(): TIES per tensor, trim_rule=exact``: it must compute that merge. (Where the threshold is
    tied, peft's ``topk`` picks among the tied entries in an order torch leaves unspecified and mergelib
    takes them lowest index first, docs/methods.md; Gaussian task vectors have no such ties.)"""
    _peft_merge_utils()  # skips without peft
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_merge.py"
    spec = importlib.util.spec_from_file_location("_bench_merge", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.Generator().manual_seed(4)
    shapes = {"a.weight": (64, 80), "b.weight": (5000,)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in pre.items()} for _ in range(3)]
    theirs = bench.peft_ties_per_tensor(bench.peft_merge_utils(), pre, fts, 0.2)
    ours = ml.merge(pre, fts, "ties", scale=1.0, rules=None, density=0.2, granularity="tensor", trim_rule="exact")
    assert all(same_bits_any_zero_sign(ours[k], theirs[k]) for k in shapes)


def test_ties_merge_rules_validate():
    lay, x = _layout_and_tvs()
    with pytest.raises(ValueError, match=r"trim_rule='paper' is not allowed: expected one of \('official', 'exact'\)"):
        ties_merge(x, 0.2, trim_rule="paper")
    a = ties_merge(x, 0.2, trim_rule="exact")
    b = ties_merge(x, 0.2)
    assert a.shape == b.shape == (lay.D,)
    # ties at the threshold, by hand: density 0.4 of d = 5 is int(2) entries per row
    t = torch.tensor([[4.0, 2.0, -2.0, 2.0, 1.0], [1.0, -3.0, 3.0, 3.0, 0.5]])
    # official: threshold = the (5 - 2)-th smallest |x| (2 and 3), every entry >= it kept (4 and 3 entries)
    assert trim(t, 0.4).tolist() == [[4, 2, -2, 2, 0], [0, -3, 3, 3, 0]]
    # exact: the 2 largest |x| of each row, ties taken in index order
    assert trim(t, 0.4, trim_rule="exact").tolist() == [[4, 2, 0, 0, 0], [0, -3, 3, 0, 0]]
    # column sums 4, -1, 1, 5, 0 (official) / 4, -1, 3, 0, 0 (exact): the means of the agreeing entries
    official, exact = [4.0, -3.0, 3.0, 2.5, 0.0], [4.0, -3.0, 3.0, 0.0, 0.0]
    assert ties_merge(t, 0.4).tolist() == official
    assert ties_merge(t, 0.4, trim_rule="exact").tolist() == exact
    # the same matrix twice: per tensor, each copy is trimmed as above; globally (d = 10, 4 kept) the exact
    # rule keeps row 0's two 4s and its first two 2s, all in the first copy
    two = FlatLayout.from_shapes({"a": (5,), "b": (5,)})
    tt = torch.cat([t, t], 1)
    assert ties_merge(tt, 0.4, granularity="tensor", layout=two, trim_rule="exact").tolist() == exact * 2
    assert ties_merge(tt, 0.4, granularity="tensor", layout=two).tolist() == official * 2
    assert trim(tt, 0.4, trim_rule="exact").tolist() == [[4, 2, -2, 0, 0, 4, 0, 0, 0, 0],
                                                         [0, -3, 3, 3, 0, 0, -3, 0, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "subnormal"])
def test_numpy_and_torch_counting_passes_agree(monkeypatch, kind, dtype):
    """The CPU counting pass runs in NumPy (bf16 read as float32); the torch pass (CUDA's) gives the
    same values, in the row's dtype, including the sample-missed fallback."""
    x = make_rows(kind, dtype, N_LONG, rows=1)
    n = x.shape[1]
    ks = [1, n // 3, n - n // 10, n]
    assert sel._numpy_pass_ok(x[0])
    fast = sel.kth_smallest(x, ks, dim=1, absolute=True)
    monkeypatch.setattr(sel, "_numpy_pass_ok", lambda row: False)
    slow = sel.kth_smallest(x, ks, dim=1, absolute=True)
    assert fast.dtype == slow.dtype == dtype and same_bits_any_zero_sign(fast, slow)
    monkeypatch.setattr(sel, "_sample_index", lambda n, m, dev: torch.zeros(m, dtype=torch.long))
    assert same_bits_any_zero_sign(sel.kth_smallest(x, ks, dim=1, absolute=True), slow)


def test_counting_pass_dtypes():
    assert sel._numpy_pass_ok(torch.zeros(3, dtype=torch.bfloat16))  # read as float32: NumPy has no bf16
    assert sel._as_numpy(torch.tensor([1.5, -0.0], dtype=torch.bfloat16)).dtype == np.float32
    assert not sel._numpy_pass_ok(torch.zeros(3, requires_grad=True))


def _unchanged_weights(dtype, n=N_LONG, rows=2, share=0.42, seed=1):
    """Rows like the task vectors of a fine-tune that left ``share`` of its weights exactly unchanged:
    a block of exact zeros (both signs) among normal values, scattered at random positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 1e-3
    zero = torch.rand(rows, n, generator=g) < share
    x[zero] = 0.0
    x[zero & (torch.rand(rows, n, generator=g) < 0.3)] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("numpy_pass", [True, False])
def test_a_heavy_tie_in_the_bracket_is_counted_not_kept(monkeypatch, dtype, numpy_pass):
    """A value that fills much of the sample (the exact zeros of unchanged weights) is counted by the
    counting pass instead of kept as a candidate, wherever the rank falls: below the tie, on its first
    and last copy, above it; the same values as torch.kthvalue, in both counting passes; the candidates
    kept are only the bracket's other entries."""
    x = _unchanged_weights(dtype)
    n = x.shape[1]
    if not numpy_pass:
        monkeypatch.setattr(sel, "_numpy_pass_ok", lambda row: False)
    kept = []
    real_finish = sel._finish
    monkeypatch.setattr(sel, "_finish", lambda ks, below, cands, *a: kept.append(cands) or real_finish(ks, below, cands, *a))
    for absolute in (False, True):
        srt = (x.abs() if absolute else x).float().sort(1).values
        first = int((srt[0] < 0).sum())  # rank - 1 of the first zero of row 0
        last = first + int((srt[0] == 0).sum()) - 1
        ks = [1, 5, first, first + 1, (first + last) // 2, last + 1, last + 2, n // 2, n - 3]
        ks = sorted({min(max(k, 1), n) for k in ks})
        got = sel.kth_smallest(x, ks, dim=1, absolute=absolute)
        want = torch.stack([torch.kthvalue(x.abs() if absolute else x, k, dim=1).values for k in ks], 1)
        assert same_bits_any_zero_sign(got, want), (dtype, absolute)
    tied = [c[0] for cands in kept for c in cands if isinstance(c[0], sel._Tied)]
    assert tied and all(float(t.value) == 0.0 and t.count > n // 4 and t.rest.numel() < n // 8 for t in tied)


def test_brackets_pick_a_tie_only_when_it_is_frequent():
    s = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    lo, hi, tie = sel._brackets(s, 1 << 20, [1 << 19])[0]  # distinct values: no tie
    assert tie is None and lo < hi
    s[: 4096 // sel.TIE_SHARE] = 0.0  # exactly 1/TIE_SHARE of the sample is 0, in the bracket
    assert float(sel._brackets(s, 1 << 20, [1 << 19])[0][2]) == 0.0
    s[0] = 0.5  # one copy fewer: not frequent enough
    assert sel._brackets(s, 1 << 20, [1 << 19])[0][2] is None
    lo, hi, tie = sel._brackets(torch.zeros(4096), 1 << 20, [1 << 19])[0]  # a bracket on one value
    assert lo == hi == tie == 0
    lo, hi, tie = sel._brackets(torch.zeros(4096), 1 << 20, [7])[0]  # open below, its end tied
    assert lo is None and hi == tie == 0


def test_brackets_hold_their_values_not_the_sorted_sample():
    """The brackets outlive the sample on a streamed counting pass: their bounds and tied values are
    values of their own (a view would keep the whole sorted sample in memory during the pass)."""
    g = torch.Generator().manual_seed(0)
    sample = torch.cat([torch.rand(50_000, generator=g), torch.zeros(30_000)])  # heavy ties: a tied value
    got = sel._brackets(sample, 10 * sample.numel(), [100_000, 300_000, 400_000, 790_000])
    for lo, hi, tie in got:
        for v in (lo, hi, tie):
            if v is not None:
                assert v.untyped_storage().nbytes() == v.element_size()
    assert got[0][0] == got[0][1] == got[0][2] == 0  # a bracket on the zeros alone
    assert got[1][0] < got[1][1] and got[1][2] == 0  # the zeros inside a wider bracket


def _brackets_from_a_sort(sample: torch.Tensor, n: int, ks):
    """The brackets of :func:`mergelib.selection._brackets` as its definition reads: from the whole sorted
    sample (the compiled CPU path selects only the ranks it needs)."""
    s, m, out = sample.float().sort().values, sample.numel(), []
    for k in ks:
        p = k / n
        margin = 5.0 * np.sqrt(m * p * (1 - p)) + 16
        lo_i, hi_i = int(np.floor(p * m - margin)), int(np.ceil(p * m + margin))
        lo, hi = (s[lo_i] if lo_i >= 0 else None), (s[hi_i] if hi_i < m else None)
        if lo is not None and lo == hi:
            out.append((lo, hi, lo))
            continue
        vals, counts = torch.unique_consecutive(s[max(lo_i, 0): min(hi_i, m - 1) + 1], return_counts=True)
        v = vals[counts.argmax()]
        out.append((lo, hi, v if int((s == v).sum()) * sel.TIE_SHARE >= m else None))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros of both signs", "nan and inf"])
def test_brackets_select_the_ranks_of_a_sorted_sample(dtype, kind):
    """The brackets' bounds and tied values are those of the whole sorted sample, at every rank (both
    ends, open brackets, several ranks at once), though only the ranks in use are selected."""
    g = torch.Generator().manual_seed(len(kind))
    x = torch.randn(20_000, generator=g)
    if kind == "ties":
        x = (x * 4).round() / 4
    elif kind == "zeros of both signs":
        x[::3], x[1::3] = 0.0, -0.0
    elif kind == "nan and inf":
        x[::50], x[1::97], x[2::89] = float("nan"), float("inf"), float("-inf")
    x = x.to(dtype)
    n = 50 * x.numel()
    ks = [1, 7, n // 100, n // 3, n // 2, n - n // 10, n - 5, n]
    for (lo, hi, tie), (rlo, rhi, rtie) in zip(sel._brackets(x, n, ks), _brackets_from_a_sort(x, n, ks)):
        for v, r in ((lo, rlo), (hi, rhi), (tie, rtie)):
            assert (v is None) == (r is None)
            if v is not None:
                assert float(v) == float(r) or (np.isnan(float(v)) and np.isnan(float(r)))
