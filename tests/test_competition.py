"""TIES, DARE and PCB on flat task-vector matrices (mergelib.competition)."""
import math

import numpy as np
import pytest
import torch

from mergelib.competition import (dare, dare_flat, dare_seed, dare_state_dict, disjoint_mean, elect_sign,
                                  kth_smallest, pcb_merge, pcb_scores, ties_merge, trim)
from mergelib.task_vectors import FlatLayout

from bits import same_bits_any_nan_payload


def _randn(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_kth_smallest_matches_sort():
    x = _randn(3, 101)
    s = x.sort(1).values
    for k in (1, 17, 101):
        assert torch.equal(kth_smallest(x, k, dim=1), s[:, k - 1])
    with pytest.raises(ValueError, match="k=0"):
        kth_smallest(x, 0)


# ---------------------------------------------------------------------------------- TIES
def test_ties_plus3_minus1_minus1_elects_plus():
    tvs = torch.tensor([[3.0], [-1.0], [-1.0]])
    assert elect_sign(tvs).tolist() == [1.0]
    assert ties_merge(tvs, density=1.0).tolist() == [3.0]
    # the count rule disagrees: two negatives outvote one positive
    assert ties_merge(tvs, density=1.0, sign_rule="count").tolist() == [-1.0]


def test_ties_small_case_by_hand():
    tvs = torch.tensor([[4.0, -1.0, 0.5, 2.0],
                        [-3.0, 2.0, 1.0, -0.1],
                        [1.0, -5.0, 0.2, 3.0]])
    # density 0.5: k = 4 - int(2) = 2 -> threshold = 2nd smallest |x|, entries >= it are kept (3 per row)
    tr = trim(tvs, 0.5)
    assert tr.tolist() == [[4.0, -1.0, 0.0, 2.0], [-3.0, 2.0, 1.0, 0.0], [1.0, -5.0, 0.0, 3.0]]
    sign = elect_sign(tr)  # column sums: 2, -4, 1, 5
    assert sign.tolist() == [1.0, -1.0, 1.0, 1.0]
    # mean over the agreeing entries: (4+1)/2, (-1-5)/2, 1/1, (2+3)/2
    assert disjoint_mean(tr, sign).tolist() == [2.5, -3.0, 1.0, 2.5]
    assert ties_merge(tvs, 0.5).tolist() == [2.5, -3.0, 1.0, 2.5]


def test_elect_sign_zero_takes_majority_sign():
    tvs = torch.tensor([[1.0, 2.0, 1.0], [-1.0, 1.0, 1.0]])  # column 0 sums to 0; total sign +
    assert elect_sign(tvs).tolist() == [1.0, 1.0, 1.0]
    assert ties_merge(tvs, 1.0).tolist() == [1.0, 1.5, 1.0]


def test_trim_keeps_requested_fraction_and_ties():
    x = _randn(4, 1000, seed=1)
    for density in (0.01, 0.2, 0.5, 0.999):
        kept = (trim(x, density) != 0).sum(1)
        assert kept.tolist() == [int(1000 * density) + 1] * 4  # official ">= kthvalue" keeps one more
    assert torch.equal(trim(x, 1.0), x)
    tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])  # density 0.2 -> threshold 2: all three 2s kept
    assert (trim(tied, 0.2) != 0).sum().item() == 3
    # numpy reference of the global rule
    xn = x.numpy()
    thr = np.sort(np.abs(xn), axis=1)[:, 1000 - 200 - 1][:, None]
    assert np.array_equal(trim(x, 0.2).numpy(), np.where(np.abs(xn) >= thr, xn, 0))


def test_trim_per_tensor_uses_segments():
    layout = FlatLayout.from_shapes({"a": (10,), "b": (4, 5)})
    x = _randn(2, 30, seed=2)
    x[:, 10:] *= 100  # global trimming would keep only entries of "b"
    per = trim(x, 0.3, granularity="tensor", layout=layout)
    assert (per[:, :10] != 0).sum(1).tolist() == [4, 4] and (per[:, 10:] != 0).sum(1).tolist() == [7, 7]
    glob = trim(x, 0.3)
    assert (glob[:, :10] != 0).sum().item() == 0
    y = x.clone()
    assert trim(y, 0.3, granularity="tensor", layout=layout, inplace=True) is y and torch.equal(y, per)
    with pytest.raises(ValueError, match="layout"):
        trim(x, 0.3, granularity="tensor")
    with pytest.raises(ValueError, match="granularity='row'"):
        trim(x, 0.3, granularity="row")


def test_ties_invariants():
    tau = _randn(1, 500, seed=3)[0]
    assert torch.equal(ties_merge(tau[None], density=1.0), tau)  # N=1, k=100%
    same = tau.expand(3, -1).clone()
    torch.testing.assert_close(ties_merge(same, density=1.0), tau)  # identical copies: (3 tau) / 3
    torch.testing.assert_close(ties_merge(same, density=0.2), trim(tau[None], 0.2)[0])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"density={bad}"):
            ties_merge(same, density=bad)


# ---------------------------------------------------------------------------------- DARE
def test_dare_identity_density_and_unbiased():
    tau = _randn(1, 2000, seed=4)[0]
    assert torch.equal(dare(tau, 0.0, torch.Generator().manual_seed(0)), tau)
    p = 0.7
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([dare(tau, p, g) for _ in range(200)])
    kept = (draws != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    sigma = tau.abs() * math.sqrt(p / (1 - p)) / math.sqrt(200)  # std of the mean of 200 draws
    assert ((draws.mean(0) - tau).abs() <= 3 * sigma + 1e-6).float().mean() > 0.99
    kept_vals = draws[0][draws[0] != 0]
    torch.testing.assert_close(kept_vals, tau[draws[0] != 0] / (1 - p))


def test_dare_needs_generator_and_valid_p():
    tau = torch.ones(5)
    with pytest.raises(TypeError, match="Generator"):
        dare(tau, 0.5, None)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match=f"p={bad}"):
            dare(tau, bad, torch.Generator())


def test_dare_seeding_is_per_task_and_tensor_and_order_free():
    tv = {"a": torch.ones(50), "b": torch.ones(6, 7)}
    d1 = dare_state_dict(tv, 0.5, seed=3, task="mnist")
    d2 = dare_state_dict({"b": tv["b"], "a": tv["a"]}, 0.5, seed=3, task="mnist")
    assert all(torch.equal(d1[k], d2[k]) for k in tv)
    d3 = dare_state_dict(tv, 0.5, seed=3, task="svhn")
    assert not torch.equal(d1["a"], d3["a"])
    assert dare_seed(3, "mnist", "a") != dare_seed(3, "mnist", "b")
    # the flat version gives the same masks
    layout = FlatLayout.from_shapes({k: v.shape for k, v in tv.items()})
    x = torch.ones(2, layout.D)
    flat = dare_flat(x, 0.5, layout, seed=3, tasks=["mnist", "svhn"])
    assert torch.equal(flat[0, layout.segment("b")].view(6, 7), d1["b"])
    assert torch.equal(flat[1, layout.segment("a")], d3["a"])
    assert torch.equal(x, torch.ones(2, layout.D))  # not in place by default


# ---------------------------------------------------------------------------------- PCB
def _f32(fn, x):
    """Elementwise exp/tanh with torch's float32 kernels: PCB's exp(N x^2) amplifies 1-ulp
    differences between libm implementations into visible weight changes near the threshold."""
    return fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def _pcb_official_reference(tvs: np.ndarray, r: float) -> np.ndarray:
    """Naive transcription of pcb-merging.py::PCB_merge: Python sorting, indices and loops, float32."""
    n, d = tvs.shape
    tvs = tvs.astype(np.float32)
    total = np.zeros(d, np.float32)
    for i in range(n):
        total += tvs[i]
    tprime = np.zeros_like(tvs)
    score = np.zeros_like(tvs)
    for i in range(n):
        a = np.abs(tvs[i])
        srt = sorted(a.tolist())
        lo, hi = np.float32(srt[int(d * 0.0001)]), np.float32(srt[int(d * (1 - 0.0001) - 1)])
        a = np.array([min(max(v, lo), hi) for v in a], np.float32)
        tprime[i] = np.sign(tvs[i]) * a
        x = np.array([np.float32(n) * ((a[j] - lo) / (hi - lo)) ** 2 for j in range(d)], np.float32)
        score[i] = _f32(torch.exp, x) * _f32(torch.tanh, tvs[i] * total)
    s = np.zeros_like(tvs)
    for i in range(n):
        q = np.float32(sorted(score[i].tolist())[int(d * (1 - r))])
        mx = score[i].max()
        for j in range(d):
            s[i, j] = (max(score[i, j], q) - q) / (mx - q)
    return (tprime * s).sum(0) / np.maximum(s.sum(0), 1e-12)


@pytest.mark.parametrize("n,d,r", [(3, 40, 0.3), (4, 257, 0.05), (2, 12000, 0.1)])
def test_pcb_official_matches_naive_reference(n, d, r):
    tvs = _randn(n, d, seed=d) * torch.linspace(0.1, 2.0, d)  # heterogeneous magnitudes
    ref = _pcb_official_reference(tvs.numpy(), r)
    out = pcb_merge(tvs, r, mode="official")
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-5, atol=1e-6)
    if d >= 10000:  # int(D * 1e-4) = 1: the smallest |tau| is clipped up to the 2nd smallest
        a = tvs.abs()
        i = int(a[0].argmin())
        intra, _ = pcb_scores(tvs)
        assert intra[0, i] == intra[0, int(a[0].kthvalue(2).indices)]


def test_tanh_is_the_identity_below_its_threshold():
    """The fact PCB's cross term relies on (``competition.TANH_IDENTITY_BELOW``): torch's float32 tanh
    returns x for |x| < 2**-12, on this build. Every float32 of the eight binades below the threshold,
    both signs, and 2**16 random ones of each binade below those, subnormals and +-0 included."""
    from mergelib.competition import TANH_IDENTITY_BELOW
    assert TANH_IDENTITY_BELOW == 2.0 ** -12
    top = 127 - 12  # the biased exponent of 2**-12
    g = torch.Generator().manual_seed(0)
    for e in range(top):
        if e >= top - 8:
            bits = torch.arange(e << 23, (e + 1) << 23, dtype=torch.int32)
        else:
            bits = (e << 23) + torch.randint(0, 1 << 23, (1 << 16,), generator=g, dtype=torch.int32)
        for x in (bits.view(torch.float32), -bits.view(torch.float32)):
            assert torch.equal(torch.tanh(x).view(torch.int32), x.view(torch.int32)), f"binade {e - 127}"
    # just above: tanh rounds below x (so the threshold is not far too low)
    x = torch.tensor([4e-4, -4e-4])
    assert (torch.tanh(x).abs() < x.abs()).all()


@pytest.mark.parametrize("shape", [(8, 4096), (3, 5000), (1, 1023), (2048,), (7, 1024 * 5 + 3)])
@pytest.mark.parametrize("big", ["none", "few", "most", "nan", "inf"])
def test_pcb_tanh_skip_gives_tanh_bits(shape, big):
    from mergelib.competition import _tanh_
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(shape, generator=g) * 3e-5  # products of task-vector entries: far below 2**-12
    flat = x.view(-1)
    if big == "few":  # a few blocks reach the threshold, one entry exactly on it
        flat[[5, flat.numel() // 2, flat.numel() - 1]] = torch.tensor([2.0 ** -12, -0.3, 0.01])
    elif big == "most":
        flat.mul_(1e3)
    elif big in ("nan", "inf"):
        flat[flat.numel() // 2] = float(big)
    expect = x.clone().tanh_()
    out = _tanh_(x)
    assert out is x
    assert same_bits_any_nan_payload(out, expect)
    assert out.isnan().any() == (big == "nan")
    if big == "none":
        assert torch.equal(out, x)
    for other in (x.double(), x.to(torch.bfloat16), x.t() if x.ndim == 2 else x[::2]):  # tanh_ as it is
        expect = other.clone().tanh_()
        got = _tanh_(other.clone())
        assert got.dtype == other.dtype and same_bits_any_nan_payload(got, expect), (other.dtype, other.is_contiguous())


def test_pcb_official_by_hand():
    # D = 5: lo = sorted[0] (no low clip), hi = sorted[int(5*0.9999-1)] = sorted[3] (the max is clipped)
    tvs = torch.tensor([[1.0, -2.0, 3.0, 0.5, 10.0]])
    intra, inter = pcb_scores(tvs)
    a = torch.tensor([1.0, 2.0, 3.0, 0.5, 3.0])
    torch.testing.assert_close(intra[0], torch.exp(((a - 0.5) / 2.5) ** 2))
    torch.testing.assert_close(inter[0], torch.tanh(tvs[0] ** 2))
    # r = 0.4: q = sorted(beta)[int(5*0.6)] = sorted[3]; only the entries above q get weight > 0;
    # with one task the weighted mean is tau' wherever the weight is > 0, else 0
    beta = intra[0] * inter[0]
    q = beta.sort().values[3]
    out = pcb_merge(tvs, 0.4)
    expect = torch.where(beta > q, torch.sign(tvs[0]) * a, torch.zeros(5))
    torch.testing.assert_close(out, expect)
    assert (out != 0).sum() == 1  # the arg-min of the kept entries (q itself) also gets weight 0


def test_pcb_identical_copies_and_convexity():
    tau = _randn(1, 3000, seed=7)[0]
    same = tau.expand(4, -1).clone()
    out = pcb_merge(same, 0.2)
    lo, hi = tau.abs().kthvalue(1).values, tau.abs().kthvalue(int(3000 * 0.9999 - 1) + 1).values
    tprime = torch.sign(tau) * tau.abs().clamp(lo, hi)
    nz = out != 0
    assert nz.float().mean() == pytest.approx(0.2, abs=0.01)
    torch.testing.assert_close(out[nz], tprime[nz])
    # convex combination of the kept lambda_i * tau'_i
    x = _randn(3, 3000, seed=8)
    lams = [0.9, 1.0, 1.3]
    out = pcb_merge(x, 0.3, lambdas=lams)
    intra, inter = pcb_scores(x)
    beta = intra * inter
    kept = beta > beta.sort(1).values[:, int(3000 * 0.7)][:, None]  # weight > 0
    a = x.abs()
    lo, hi = a.sort(1).values[:, :1], a.sort(1).values[:, int(3000 * 0.9999 - 1)][:, None]
    lp = torch.tensor(lams)[:, None] * torch.sign(x) * a.clamp(lo, hi)
    inf = torch.tensor(float("inf"))
    lower = torch.where(kept, lp, inf).min(0).values
    upper = torch.where(kept, lp, -inf).max(0).values
    any_kept = kept.any(0)
    assert any_kept.float().mean() > 0.5 and (out[~any_kept] == 0).all()
    assert ((out >= lower - 1e-6) & (out <= upper + 1e-6))[any_kept].all()
    for mode in ("official", "paper"):
        assert torch.equal(pcb_merge(torch.zeros(3, 50), 0.1, mode=mode), torch.zeros(50))


def test_pcb_kept_fraction_and_dissenter():
    """Density r: each task contributes to tau_m at D - int(D (1 - r)) - 1 entries in official mode (beta > q,
    q = sorted(beta)[int(D (1 - r))] itself gets weight 0) and D - int(D (1 - r)) in paper mode (beta >= q).
    Seen through pcb_merge: the weights do not depend on lambda, so with lambda = e_i the merged vector is
    nonzero exactly where task i contributes; with every lambda 1, where some task does."""
    x = _randn(3, 4000, seed=9)
    r, d = 0.1, 4000
    for mode, kept in (("official", d - int(d * (1 - r)) - 1), ("paper", d - int(d * (1 - r)))):
        intra, inter = pcb_scores(x, mode=mode)
        beta = intra * inter
        contributes = []
        for i in range(3):
            one_hot = [float(j == i) for j in range(3)]
            nz = pcb_merge(x, r, mode=mode, lambdas=one_hot) != 0
            assert int(nz.sum()) == kept, (mode, i)  # 399 / 400 of 4000: the fraction r
            q = beta[i].sort().values[int(d * (1 - r))]
            assert torch.equal(nz, beta[i] > q if mode == "official" else beta[i] >= q), (mode, i)
            contributes.append(nz)
        union = torch.stack(contributes).any(0)
        assert torch.equal(pcb_merge(x, r, mode=mode) != 0, union) and union.sum() > kept
    # equal magnitudes, task 2 disagrees in sign at coordinate 0: its balancing score is lowest there
    y = torch.tensor([[1.0, 0.3, -0.2], [1.0, 0.1, 0.4], [-1.0, 0.2, 0.1]])
    for mode in ("official", "paper"):
        intra, inter = pcb_scores(y, mode=mode)
        b = intra * inter
        assert b[2, 0] < b[0, 0] and b[2, 0] < b[1, 0]


def _pcb_paper_reference(tvs: np.ndarray, r: float) -> np.ndarray:
    """The paper's equations with true softmax normalisers, float64."""
    n, d = tvs.shape
    t = tvs.astype(np.float64)

    def norm(v):
        return (v - v.min()) / (v.max() - v.min())

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    beta = np.zeros_like(t)
    for i in range(n):
        intra = softmax(n * norm(t[i] * t[i]))
        inter = sum(softmax(norm(t[i] * t[j])) for j in range(n))
        beta[i] = intra * inter
        q = np.sort(beta[i])[int((1 - r) * d)]
        beta[i] = np.where(beta[i] >= q, beta[i], 0.0)
    den = beta.sum(0)
    return np.where(den > 0, (beta * t).sum(0) / np.where(den > 0, den, 1), 0.0)


def test_pcb_paper_matches_reference():
    x = _randn(3, 600, seed=10)
    ref = _pcb_paper_reference(x.numpy(), 0.25)
    out = pcb_merge(x, 0.25, mode="paper")
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-6)
    assert (out != 0).float().mean() > 0.25  # union of the per-task top-25% masks
    intra, inter = pcb_scores(x, mode="paper")
    torch.testing.assert_close(intra.mean(1), torch.ones(3))  # softmax scaled by D
    torch.testing.assert_close(inter.mean(1), torch.full((3,), 3.0))


def test_pcb_errors():
    x = torch.ones(2, 10)
    with pytest.raises(ValueError, match="density=0"):
        pcb_merge(x, 0)
    with pytest.raises(ValueError, match="density=1.2"):
        pcb_merge(x, 1.2)
    with pytest.raises(ValueError, match="mode='exact'"):
        pcb_merge(x, 0.1, mode="exact")
    with pytest.raises(ValueError, match="lambdas has 3 entries for 2"):
        pcb_merge(x, 0.1, lambdas=[1, 1, 1])
    with pytest.raises(ValueError, match="N x D"):
        pcb_merge(torch.ones(10), 0.1)


# ----------------------------------------------------------------------------------------------
# non-finite inputs, sign election ties (mergekit/peft), device-independent DARE
# ----------------------------------------------------------------------------------------------
def _with(value, shape=(3, 50), at=(1, 7)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[at] = value
    return x


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_public_functions_reject_non_finite_task_vectors(bad):
    from mergelib.competition import dare_flat, disjoint_mean, pcb_scores, trim
    from mergelib.task_vectors import FlatLayout, NonFiniteError
    x = _with(bad)
    layout = FlatLayout.from_shapes({"w": (50,)})
    for call in (lambda: pcb_merge(x, 0.2, mode="paper"), lambda: pcb_merge(x, 0.2), lambda: pcb_scores(x),
                 lambda: ties_merge(x, 0.2), lambda: trim(x, 0.2), lambda: elect_sign(x),
                 lambda: disjoint_mean(x, torch.ones(50)), lambda: dare_flat(x, 0.5, layout, 0)):
        with pytest.raises(NonFiniteError, match=r"non-finite values \((1 NaN, 0 inf|0 NaN, 1 inf)\)"):
            call()


def test_count_rule_resolves_tied_counts_to_plus_one():
    t = torch.tensor([[1.0, -1.0, 0.0, -2.0], [-1.0, 1.0, 0.0, -3.0]])  # counts 0, 0, 0, -2
    assert elect_sign(t, "count").tolist() == [1.0, 1.0, 1.0, -1.0]
    neg = torch.tensor([[1.0, -5.0, -5.0], [-1.0, -5.0, -5.0]])  # the global majority is negative
    assert elect_sign(neg, "count").tolist() == [1.0, -1.0, -1.0]
    # the mass rule keeps the official zero resolution (majority sign of the vector)
    assert elect_sign(torch.tensor([[1.0, -5.0], [-1.0, -5.0]]), "mass").tolist() == [-1.0, -1.0]


def _peft_merge_utils():
    import importlib.util
    spec = importlib.util.find_spec("peft")
    if spec is None:
        pytest.skip("peft is not installed (pip install --no-deps peft)")
    path = f"{spec.submodule_search_locations[0]}/utils/merge_utils.py"  # torch-only file
    mod_spec = importlib.util.spec_from_file_location("peft_merge_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_ties_matches_peft_where_rules_coincide():
    peft = _peft_merge_utils()
    g = torch.Generator().manual_seed(3)
    tv = torch.randint(-1, 2, (4, 3072), generator=g).float() * torch.rand(4, 3072, generator=g)
    ours = elect_sign(tv, "count")
    theirs = peft.calculate_majority_sign_mask(tv, method="frequency")
    assert torch.equal(theirs, torch.sign(tv) == ours)
    # whole TIES at density 1 (no trim: peft keeps exactly k by topk, TIES keeps ties by kthvalue)
    ref = peft.ties(tv, torch.ones(4), density=1.0, majority_sign_method="frequency")
    torch.testing.assert_close(ties_merge(tv, 1.0, sign_rule="count"), ref, rtol=0, atol=1e-6)
    mass = peft.ties(tv, torch.ones(4), density=1.0, majority_sign_method="total")
    nonzero = tv.sum(0) != 0  # peft resolves a zero sum to +1, the official TIES code to the majority
    torch.testing.assert_close(ties_merge(tv, 1.0)[nonzero], mass[nonzero], rtol=0, atol=1e-6)


def test_dare_masks_do_not_depend_on_the_device():
    from mergelib.competition import dare_flat, dare_state_dict
    from mergelib.task_vectors import FlatLayout
    x = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    layout = FlatLayout.from_shapes({"a": (5, 4), "b": (10,)})
    ref = dare_flat(x, 0.5, layout, seed=7)
    sd = dare_state_dict({"a": x[0, :20].view(5, 4), "b": x[0, 20:]}, 0.5, seed=7, task=0)
    torch.testing.assert_close(torch.cat([sd["a"].reshape(-1), sd["b"]]), ref[0])
    if torch.cuda.is_available():
        torch.testing.assert_close(dare_flat(x.cuda(), 0.5, layout, seed=7).cpu(), ref)
    with pytest.raises(ValueError, match="seed=True"):
        dare_flat(x, 0.5, layout, seed=True)


def test_dare_keeps_drawn_on_threads_are_the_masks_of_each_tensor():
    """The GPU path of dare_flat draws every mask on a thread pool: the same masks as one draw per
    (task, tensor) with its own seeded CPU generator, whatever the number of threads."""
    from mergelib.competition import _dare_keep, _dare_keeps
    from mergelib.task_vectors import FlatLayout
    layout = FlatLayout.from_shapes({"a": (70, 40), "b": (33,), "c": (5, 900)})
    tasks = ["x", 3, "z"]
    want = torch.stack([torch.cat([_dare_keep(e - s, 0.7, 5, t, k, "cpu") for k, s, e in layout.segments()])
                        for t in tasks])
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 4):
            torch.set_num_threads(n_threads)
            got = _dare_keeps(len(tasks), layout, tasks, 0.7, 5)
            assert got.dtype == torch.bool and torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)
    assert 0.2 < want.float().mean() < 0.4  # p = 0.7 drops about 70 %
