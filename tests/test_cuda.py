"""The CUDA code paths against the CPU ones: exact order statistics bit for bit, every flat merge and
every ``merge()`` method close to the CPU result, masks identical, errors the same.

Skipped where no CUDA device is present (CI has none); run on a lent GPU by ``tools/gpu_check.sh``, which
also runs the GPU benchmark. The CPU results are the reference: the CPU paths are what the rest of the
suite checks against hand-computed cases and independent implementations.
"""
import os

import pytest
import torch

import mergelib as ml
from mergelib import gpu_kernels, kernels
from mergelib import selection as sel
from mergelib.competition import dare_flat, pcb_merge, ties_merge, trim
from mergelib.fourier import fr_merge
from mergelib.task_vectors import FlatLayout, NonFiniteError

from bits import same_bits_any_zero_sign
from row_cases import make_rows

# MERGELIB_TEST_DEVICE=cpu runs this file against the CPU itself: a dry run of the tests' own code
CUDA = torch.device(os.environ.get("MERGELIB_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
N_LONG = sel.LONG_ROW + 4321  # long enough for the sampled bracket and the counting pass


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "subnormal", "heavy tie"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kth_smallest_on_cuda_equals_kthvalue_on_the_cpu(kind, dtype):
    x = make_rows(kind, dtype, N_LONG, rows=3)
    xc = x.to(CUDA)
    n = x.shape[1]
    for k in (1, 2, n // 10, n // 2, n - n // 20, n - 1, n):
        for absolute in (False, True):
            want = torch.kthvalue(x.abs() if absolute else x, k, dim=1).values
            got = sel.kth_smallest(xc, k, dim=1, absolute=absolute)
            assert got.device.type == CUDA.type
            assert same_bits_any_zero_sign(got.cpu(), want), (kind, dtype, k, absolute)


def test_short_rows_many_ranks_and_topk_mask_on_cuda():
    for n in (1, 2, 7, 1000):
        x = torch.randn(4, n, generator=torch.Generator().manual_seed(n))
        ks = sorted({1, (n + 1) // 2, n})
        got = sel.kth_smallest(x.to(CUDA), ks, dim=1).cpu()
        for j, k in enumerate(ks):
            assert same_bits_any_zero_sign(got[:, j], torch.kthvalue(x, k, dim=1).values)
    x = make_rows("ties", torch.float32, N_LONG, rows=3)  # many ties at the threshold: the index-order rule decides
    for keep in (1, 5000, N_LONG // 3):
        assert torch.equal(sel.topk_mask(x.to(CUDA), keep, dim=1).cpu(), sel.topk_mask(x, keep, dim=1))


def _task_set(n=4, dtype=torch.float32, seed=0):
    """N task vectors over a layout with long 2-D segments (the sampled path) and short ones."""
    layout = FlatLayout.from_shapes({"a.weight": (320, 256), "b.weight": (96, 128), "b.bias": (96,),
                                     "c.weight": (256, 320)})
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layout.D, generator=g) * torch.linspace(0.5e-3, 2e-3, n)[:, None]
    x[:, ::97] = 0.0  # exact zeros, as in task vectors of frozen or unchanged entries
    return x.to(dtype), layout


def _close(got: torch.Tensor, want: torch.Tensor, rtol=2e-5, mismatch=0.0):
    """``got`` (CUDA) against ``want`` (CPU): same shape and dtype, within rtol of the largest |want|
    everywhere except at most ``mismatch`` of the entries (selections at a threshold that the two
    devices' rounding of a score puts on different sides)."""
    assert got.device.type == CUDA.type and got.shape == want.shape and got.dtype == want.dtype
    diff = (got.cpu().double() - want.double()).abs()
    bad = diff > rtol * want.double().abs().max().clamp(min=1e-30)
    assert bad.double().mean() <= mismatch, (int(bad.sum()), want.numel())


def on(sd: dict) -> dict:
    """A state dict's tensors on the tested device."""
    return {k: v.to(CUDA) for k, v in sd.items()}


def on_cpu(fn, *args, **kwargs):
    """The CPU reference: the torch code (no Numba kernels: the suite checks them against it bit for bit,
    and their compilation would cost a GPU lease a minute)."""
    with kernels.use(False):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("trim_rule", ["official", "exact"])
@pytest.mark.parametrize("sign_rule", ["mass", "count"])
def test_ties_on_cuda_matches_the_cpu(granularity, trim_rule, sign_rule):
    x, layout = _task_set()
    kw = dict(granularity=granularity, layout=layout, trim_rule=trim_rule)
    # the trim is an exact order statistic: the same entries kept on both devices
    assert torch.equal(trim(x.to(CUDA), 0.2, **kw).cpu(), on_cpu(trim, x, 0.2, **kw))
    got, want = ties_merge(x.to(CUDA), 0.2, sign_rule=sign_rule, **kw), on_cpu(ties_merge, x, 0.2, sign_rule=sign_rule, **kw)
    _close(got, want)
    if trim_rule == "official" and gpu_kernels.available(x.to(CUDA)):  # the Triton sweep: the CPU's bits
        assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))


def test_triton_thresholds_on_long_rows_are_kthvalue():
    """gpu_kernels.kth_abs_rows on rows of the benchmark's length (the counting kernel, not the sample
    alone), with ties: torch.kthvalue's values."""
    x = torch.randn(3, 3_000_000, generator=torch.Generator().manual_seed(5))
    x[:, ::4] = (x[:, ::4] * 8).round() / 8  # many repeated magnitudes
    xc = x.to(CUDA)
    for k in (1, 600_000, 2_400_000, 3_000_000):
        got = gpu_kernels.kth_abs_rows(xc, k) if gpu_kernels.available(xc) else sel.kth_smallest(
            xc, k, dim=1, keepdim=True, absolute=True)
        assert same_bits_any_zero_sign(got.cpu(), torch.kthvalue(x.abs(), k, dim=1, keepdim=True).values), k


def test_dare_pcb_and_fr_on_cuda_match_the_cpu():
    x, layout = _task_set()
    xc = x.to(CUDA)
    tasks = ["a", "b", "c", "d"]
    # the same masks (CPU draws); the rescale rounds differently (CUDA divides by a scalar through its reciprocal)
    got, want = dare_flat(xc, 0.9, layout, seed=3, tasks=tasks), on_cpu(dare_flat, x, 0.9, layout, seed=3, tasks=tasks)
    assert torch.equal(got.cpu() != 0, want != 0) and 0.05 < float((want != 0).float().mean()) < 0.15
    _close(got, want, rtol=1e-6)
    for mode in ("official", "paper"):  # scores go through exp/tanh/softmax: a rare entry may flip at q
        _close(pcb_merge(xc, 0.05, mode=mode), on_cpu(pcb_merge, x, 0.05, mode=mode), mismatch=1e-3)
        _close(pcb_merge(xc, 0.3, mode=mode, lambdas=[0.5, 1.0, 1.5, 2.0]),
               on_cpu(pcb_merge, x, 0.3, mode=mode, lambdas=[0.5, 1.0, 1.5, 2.0]), mismatch=1e-3)
    for mode, align in (("official", "official"), ("paper", "paper"), ("official", "none")):
        _close(fr_merge(xc, layout, 0.7, mode=mode, align=align), on_cpu(fr_merge, x, layout, 0.7, mode=mode, align=align),
               rtol=1e-4)
    _close(fr_merge(xc, layout, 0.7, compat_official=True), on_cpu(fr_merge, x, layout, 0.7, compat_official=True),
           rtol=1e-4)  # the bias takes task 1's aligned row
    assert torch.equal(xc.cpu(), x)  # the input untouched (the non-in-place paths, FR reading it in place)


def test_fr_on_cuda_checks_its_input_at_the_end():
    """fr_merge on CUDA checks finiteness once, at the end, through each tensor's row sums (a filtered
    tensor's DC bins): a NaN or inf in a filtered matrix or in a vector is named; finite entries whose
    sums overflow are no error, on either device."""
    x, layout = _task_set()
    for col, value in ((5, float("nan")), (320 * 256 + 96 * 128 + 5, float("inf")), (layout.D - 3, float("-inf"))):
        bad = x.clone()
        bad[2, col] = value
        for align in ("official", "none", "paper"):
            with pytest.raises(NonFiniteError, match="non-finite"):
                fr_merge(bad.to(CUDA), layout, 0.7, align=align)
    huge = torch.full_like(x, 3e38)  # every sum overflows; the entries are finite
    fr_merge(huge.to(CUDA), layout, 0.7)
    on_cpu(fr_merge, huge, layout, 0.7)


def test_dare_state_dict_on_cuda_has_the_cpu_masks():
    """dare_state_dict with tensors on the GPU (their masks drawn together on CPU threads): the CPU's
    masks, and its values within rounding; bf16 kept."""
    from mergelib.competition import dare_state_dict
    g = torch.Generator().manual_seed(4)
    sd = {"w": torch.randn(300, 70, generator=g), "b": torch.randn(33, generator=g).bfloat16()}
    got = dare_state_dict(on(sd), 0.9, seed=3, task="t")
    want = on_cpu(dare_state_dict, sd, 0.9, seed=3, task="t")
    for k in sd:
        assert got[k].device.type == CUDA.type and got[k].dtype == sd[k].dtype
        assert torch.equal(got[k].cpu() != 0, want[k] != 0)
        torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-6 if k == "w" else 8e-3, atol=0)


def test_pcb_on_long_rows_matches_the_cpu(monkeypatch):
    """PCB on rows of the benchmark's length through the Triton passes (gpu_kernels.pcb_official: the
    sampled bracket of the drop threshold and its counting pass, not the sample alone) against the CPU's
    torch code, for 4 tasks and for 1 (Triton compiles an int argument equal to 1 as a constant)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3_000_000, generator=g) * torch.linspace(0.5e-3, 2e-3, 4)[:, None]
    x[:, ::97] = 0.0
    xc = x.to(CUDA)
    fallbacks = []
    exact = sel.kth_smallest
    monkeypatch.setattr(sel, "kth_smallest",
                        lambda *a, **kw: fallbacks.append(kw.get("absolute", False)) or exact(*a, **kw))
    for density, lams in ((0.05, None), (0.2, [0.5, 1.0, 1.5, 2.0])):
        got, got_one = pcb_merge(xc, density, lambdas=lams), pcb_merge(xc[:1], density)  # N = 1: an int
        with monkeypatch.context() as m:  # the CPU references' selections are not the kernel's fallbacks
            m.setattr(sel, "kth_smallest", exact)
            _close(got, on_cpu(pcb_merge, x, density, lambdas=lams), mismatch=1e-4)
            _close(got_one, on_cpu(pcb_merge, x[:1], density), mismatch=1e-4)
    # the drop threshold never needs the fallback (the clip value at rank D / 10**4 lies among the 1 %
    # of exact zeros, a tie that kth_abs_rows hands to the torch selection: absolute=True)
    assert False not in fallbacks or not gpu_kernels.available(xc)


def test_flatten_on_cuda_has_the_cpu_bits():
    """flatten on CUDA (one Triton launch per dtype where the kernels run) gives the CPU's task vectors bit
    for bit, float32 and bf16 tensors, with a base and without, and 9 tasks (two launches)."""
    from mergelib.task_vectors import flatten
    g = torch.Generator().manual_seed(9)
    pre = {"w": torch.randn(300, 70, generator=g), "b": torch.randn(33, generator=g).bfloat16()}
    models = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in pre.items()}
              for _ in range(9)]
    for subtract in (pre, None):
        got, _ = flatten([on(m) for m in models], subtract=None if subtract is None else on(subtract))
        want, _ = flatten(models, subtract=subtract)
        assert got.device.type == CUDA.type and torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))


def _state_dicts(dtype, n=3):
    x, layout = _task_set(n)
    g = torch.Generator().manual_seed(11)
    pre = {k: (torch.randn(shp, generator=g) * 0.02).to(dtype) for k, shp in zip(layout.keys, layout.shapes)}
    views = [{k: v.reshape(shp) for k, v, shp in zip(layout.keys, x[i].split(layout.numels), layout.shapes)}
             for i in range(n)]
    fts = {f"task{i}": {k: (pre[k].float() + views[i][k]).to(dtype) for k in layout.keys} for i in range(n)}
    return pre, fts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ml.METHODS)
def test_merge_on_cuda_matches_the_cpu(method, dtype):
    pre, fts = _state_dicts(dtype)
    pre_c, fts_c = on(pre), {name: on(sd) for name, sd in fts.items()}
    want = on_cpu(ml.merge, pre, fts, method, rules=None)
    got = ml.merge(pre_c, fts_c, method, rules=None)
    assert set(got) == set(want)
    # bf16 outputs: one ulp of bf16 (2^-8 relative) where the float32 results round differently
    rtol, mismatch = (2e-5, 1e-3 if method == "pcb" else 0.0) if dtype == torch.float32 else (8e-3, 1e-2)
    for k in want:
        assert got[k].device.type == CUDA.type and got[k].dtype == dtype, k
        _close(got[k], want[k], rtol=rtol, mismatch=mismatch)
    assert all(torch.equal(fts_c[name][k].cpu(), fts[name][k]) for name in fts for k in fts[name])


def test_merge_on_cuda_names_a_non_finite_input():
    pre, fts = _state_dicts(torch.float32)
    fts["task1"]["b.weight"][3, 4] = float("nan")
    for method in ("task_arithmetic", "ties", "pcb", "fr"):
        with pytest.raises(NonFiniteError, match=r"task1.*b\.weight|b\.weight.*task1"):
            ml.merge(on(pre), {name: on(sd) for name, sd in fts.items()}, method, rules=None)
