"""FR-Merging filters (mergelib.fourier)."""
import math

import pytest
import torch

from mergelib.fourier import align_magnitudes, fr_filter, fr_mask, fr_merge, fr_paper_coefficients
from mergelib.merging import merge
from mergelib.task_vectors import FlatLayout

SHAPES = [(8, 8), (16, 16), (12, 36), (48, 16), (10, 6)]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _official_mask_loops(h, w, ratio, base="min"):
    r = ratio * (min(h, w) if base == "min" else max(h, w))
    return torch.tensor([[math.sqrt((u - h // 2) ** 2 + (v - w // 2) ** 2) <= r for v in range(w)]
                         for u in range(h)])


def test_official_mask_matches_loops():
    for h, w in SHAPES + [(7, 5)]:
        for ratio in (0.1, 0.35, 0.5, 0.7):  # 0.5 on (10, 6): R = 3 lies on the grid (d <= R matters)
            assert torch.equal(fr_mask((h, w), ratio), _official_mask_loops(h, w, ratio)), (h, w, ratio)
    assert torch.equal(fr_mask((12, 36), 0.2, base="max"), _official_mask_loops(12, 36, 0.2, "max"))


def test_official_filter_is_ifft2_of_masked_fft2():
    for h, w in SHAPES + [(7, 9), (9, 4)]:  # odd sizes take the non-symmetric full-FFT path
        x = _randn(3, h, w, seed=h * w)
        m = fr_mask((h, w), 0.5)
        ref = torch.fft.ifft2(torch.fft.fft2(x.double()) * m).real.float()
        torch.testing.assert_close(fr_filter(x, 0.5), ref, rtol=1e-5, atol=1e-5)


def test_paper_filter_is_shift_zero_disc_unshift():
    for h, w in SHAPES + [(7, 9)]:
        x = _randn(h, w, seed=1)
        d0 = 0.4 * min(h, w) / 2
        spec = torch.fft.fftshift(torch.fft.fft2(x.double()))
        for u in range(h):
            for v in range(w):
                if math.hypot(u - h // 2, v - w // 2) < d0:
                    spec[u, v] = 0
        ref = torch.fft.ifft2(torch.fft.ifftshift(spec)).real.float()
        torch.testing.assert_close(fr_filter(x, 0.4, mode="paper"), ref, rtol=1e-5, atol=1e-5)


def test_nothing_removed_is_identity():
    for h, w in SHAPES:
        x = _randn(2, h, w, seed=3)
        big = math.hypot(h, w) / min(h, w)  # R >= the largest distance
        assert fr_mask((h, w), big).all()
        torch.testing.assert_close(fr_filter(x, big), x, rtol=0, atol=1e-5)
        torch.testing.assert_close(fr_filter(x, 0.0, mode="paper"), x, rtol=0, atol=1e-5)  # D0 = 0


@pytest.mark.parametrize("shape", [(8, 8), (16, 16), (12, 36), (48, 16), (64, 192)])
def test_constant_matrix_is_removed(shape):
    c = torch.full(shape, 3.0)
    for ratio in (0.1, 0.5, 0.7):
        assert fr_filter(c, ratio).abs().max() < 1e-5, ratio  # official, base=min
        assert fr_filter(c, ratio, mode="paper").abs().max() < 1e-5, ratio
    assert not fr_mask(shape, 0.7)[0, 0]  # DC is not kept


def test_nyquist_checkerboard_passes():
    for h, w in [(8, 8), (12, 36), (48, 16)]:
        a = torch.arange(h)[:, None] + torch.arange(w)[None]
        chk = (-1.0) ** a
        for ratio in (0.2, 0.7, 1.0):
            torch.testing.assert_close(fr_filter(chk, ratio, mode="paper"), chk, rtol=0, atol=1e-5)
        torch.testing.assert_close(fr_filter(chk, 0.1), chk, rtol=0, atol=1e-5)  # the kept centre


def test_filter_linear_real_shape_dtype_batched():
    x, y = _randn(4, 12, 36, seed=5), _randn(4, 12, 36, seed=6)
    for mode in ("official", "paper"):
        f = fr_filter(2.0 * x - y, 0.6, mode=mode)
        torch.testing.assert_close(f, 2.0 * fr_filter(x, 0.6, mode=mode) - fr_filter(y, 0.6, mode=mode),
                                   rtol=1e-5, atol=1e-5)
        assert f.shape == x.shape and f.dtype == torch.float32
        torch.testing.assert_close(f[2], fr_filter(2.0 * x[2] - y[2], 0.6, mode=mode))
    assert fr_filter(x.to(torch.bfloat16), 0.6).dtype == torch.float32
    assert fr_filter(x.double(), 0.6).dtype == torch.float32


def test_removed_fractions_match_methods_table():
    assert 1 - fr_mask((768, 768), 0.7).float().mean() < 0.001  # only DC and its neighbours
    assert 1 - fr_mask((2304, 768), 0.7).float().mean() == pytest.approx(0.58, abs=0.01)
    assert 1 - fr_mask((3072, 768), 0.7).float().mean() == pytest.approx(0.68, abs=0.01)
    assert 1 - fr_mask((768, 3072), 0.7).float().mean() == pytest.approx(0.68, abs=0.01)


def test_compat_double_ring():
    h, w = 40, 30  # low radius = 3
    x = _randn(h, w, seed=7)
    d = torch.sqrt(((torch.arange(h)[:, None] - 20) ** 2 + (torch.arange(w)[None] - 15) ** 2).float())
    wt = ((d >= 3) & (d <= 0.5 * 30)).float() + (d <= 3).float()
    assert (wt == 2).sum() == 4  # the ring d == 3: (0, +-3), (+-3, 0)
    ref = torch.fft.ifft2(torch.fft.fft2(x.double()) * wt).real.float()
    torch.testing.assert_close(fr_filter(x, 0.5, compat_double_ring=True), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fr_filter(x, 0.5, compat_double_ring=True), fr_filter(x, 0.5))
    with pytest.raises(ValueError, match="compat_double_ring"):
        fr_filter(x, 0.5, mode="paper", compat_double_ring=True)


def test_filter_errors():
    with pytest.raises(ValueError, match="mode='radial'"):
        fr_filter(torch.ones(4, 4), 0.5, mode="radial")
    with pytest.raises(ValueError, match="base='mean'"):
        fr_mask((4, 4), 0.5, base="mean")
    with pytest.raises(ValueError, match="ratio=-1"):
        fr_filter(torch.ones(4, 4), -1)
    with pytest.raises(ValueError, match="shape"):
        fr_filter(torch.ones(4), 0.5)


def test_align_magnitudes_by_hand():
    x = torch.tensor([[1.0, -1.0], [2.0, 2.0], [0.0, 0.0]])
    out = align_magnitudes(x)
    assert out.tolist() == [[2.0, -2.0], [2.0, 2.0], [0.0, 0.0]]  # all-zero task stays 0 (no NaN)
    assert x.tolist()[0] == [1.0, -1.0]  # not in place by default
    per_key = {"a": _randn(3, 4, 5, seed=1) * torch.tensor([1.0, 3.0, 0.5])[:, None, None],
               "b": _randn(3, 7, seed=2)}
    al = align_magnitudes(per_key)
    for k, v in al.items():
        m = v.reshape(3, -1).abs().mean(1)
        torch.testing.assert_close(m, m.max().expand(3))
    layout = FlatLayout.from_shapes({"a": (4, 5), "b": (7,)})
    flat = torch.cat([per_key["a"].reshape(3, -1), per_key["b"]], 1)
    torch.testing.assert_close(align_magnitudes(flat, layout)[:, layout.segment("a")],
                               al["a"].reshape(3, -1))
    lam = fr_paper_coefficients(torch.tensor([[1.0, -1.0], [3.0, 3.0]]))
    assert lam.tolist() == [0.25, 0.75]


def test_fr_merge_pieces():
    layout = FlatLayout.from_shapes({"attn.weight": (8, 6), "attn.bias": (8,)})
    x = _randn(3, layout.D, seed=4)
    # nothing removed + no alignment: the plain sum
    torch.testing.assert_close(fr_merge(x, layout, ratio=10.0, align="none"), x.sum(0), rtol=0, atol=1e-5)
    out = fr_merge(x, layout, ratio=0.3, align="none")
    w = layout.segment("attn.weight")
    torch.testing.assert_close(out[w], fr_filter(x[:, w].view(3, 8, 6), 0.3).sum(0).reshape(-1))
    b = layout.segment("attn.bias")
    torch.testing.assert_close(out[b], x[:, b].sum(0))  # 1-D: summed unfiltered
    compat = fr_merge(x, layout, ratio=0.3, align="none", compat_official=True)
    assert torch.equal(compat[b], x[0, b]) and torch.equal(compat[w], out[w])  # bias = task 1's
    paper = fr_merge(x, layout, ratio=10.0, align="paper")
    torch.testing.assert_close(paper, fr_paper_coefficients(x) @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="align='max'"):
        fr_merge(x, layout, align="max")


def _untransposed(rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``N x numel`` rows that hold each task's ``shape`` matrix transposed -> the matrices' own rows."""
    return rows.view(-1, shape[1], shape[0]).transpose(1, 2).reshape(rows.shape[0], -1)


@pytest.mark.parametrize("shape", [(1024, 1024), (2048, 513), (768, 1366), (3072, 384)])
@pytest.mark.parametrize("align", ["none", "official"])
def test_large_tensors_are_filtered_one_task_at_a_time(shape, align):
    """fr_merge filters a tensor of 2**19 entries or more task by task (one task's FFT temporaries, not
    N tasks'): each task's own filter, bit for bit; the alignment's m_i are the filtered rows' L1 norms
    (the same ratios as mean |.|, up to rounding); the aligned sum adds the scaled rows in order."""
    from mergelib import fourier

    layout = FlatLayout.from_shapes({"w.weight": shape})
    assert layout.D >= fourier._ONE_TASK_AT_A_TIME
    x = _randn(3, layout.D, seed=5) * torch.tensor([[1.0], [0.1], [3.0]])
    per_task = torch.stack([fr_filter(row.view(shape), 0.7).view(-1) for row in x])
    filtered, factors, transposed = fourier._fr_filter_align(x.clone(), shape, 0.7, "official", "min", align, False)
    assert transposed == (shape == (3072, 384))  # its band: 269 of its transpose's 1537 columns
    assert torch.equal(_untransposed(filtered, shape) if transposed else filtered, per_task)
    kept, f2, t2 = fourier._fr_filter_align(x, shape, 0.7, "official", "min", align, False, keep_input=True)
    assert kept.data_ptr() != x.data_ptr() and t2 == transposed  # x read only: the same bits from a copy
    assert torch.equal(_untransposed(kept, shape) if t2 else kept, per_task)
    assert f2 is None or torch.equal(f2, factors)
    got = fr_merge(x, layout, ratio=0.7, align=align)
    if align == "none":
        assert factors is None and torch.equal(got, fourier._row_sum(per_task))
        paper = fr_merge(x, layout, ratio=0.7, align="paper")  # the filtered rows in place, untransposed
        torch.testing.assert_close(paper, fr_paper_coefficients(per_task) @ per_task, rtol=1e-5, atol=1e-6)
        return
    l1 = per_task.double().abs().sum(1).float()  # float64 sums: their float32 roundings in any order
    assert torch.equal(factors, l1.max() / l1)
    assert torch.equal(got, fourier._row_sum(per_task * factors[:, None]))
    torch.testing.assert_close(got, fourier._row_sum(align_magnitudes(per_task)), rtol=0,
                               atol=1e-5 * float(got.abs().max()))


@pytest.mark.parametrize(("shape", "kw", "transposed", "kept"), [
    ((768, 3072), {}, False, (999, 1537)),  # the disc around (384, 1536): |v - 1536| <= 0.7 * 768
    ((3072, 768), {}, True, (999, 1537)),  # the same disc, in the transpose's half spectrum
    ((2048, 512), {}, True, (666, 1025)),  # 1024 - floor(0.7 * 512)
    ((512, 2050), {}, False, (667, 1026)),
    ((1536, 770), {"compat_double_ring": True}, False, (0, 386)),  # the transpose's (229, 769): 70 %
    ((1024, 1030), {"mode": "paper"}, False, (0, 516)),  # a high-pass keeps every column
    ((1024, 1024), {"mode": "paper", "ratio": 3.0}, False, (0, 0)),  # D0 beyond every frequency: nothing
    ((1025, 1027), {}, None, None),  # odd sizes: not Hermitian-symmetric, the complex transform
])
def test_large_matrices_are_filtered_by_rows_over_the_masks_band(shape, kw, transposed, kept):
    """A single matrix of 2**19 entries or more on the CPU is filtered by fourier._filter_band: 1-D
    transforms along contiguous rows, the transform along H over the band of the half spectrum's
    columns where the mask keeps anything (in the orientation that keeps fewer, by hand above), the
    float64 filter's values up to rounding."""
    from mergelib import fourier

    h, w = shape
    assert h * w >= fourier._ONE_TASK_AT_A_TIME
    kw = {"ratio": 0.7, **kw}
    band = fourier._band(h, w, kw["ratio"], kw.get("mode", "official"), "min", kw.get("compat_double_ring", False))
    assert (band is None) == (transposed is None)
    if band is not None:
        assert (band.transposed, (band.c0, band.c1)) == (transposed, kept)
    x = _randn(h, w, seed=3)
    wt = fourier._weights_cpu(h, w, kw["ratio"], kw.get("mode", "official"), "min",
                              kw.get("compat_double_ring", False))[0].double()
    ref = torch.fft.ifft2(torch.fft.fft2(x.double()) * wt).real.float()
    got = fr_filter(x, **kw)
    assert got.is_contiguous() and got.shape == shape
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6 * max(float(ref.abs().max()), 1.0))
    assert torch.equal(fr_filter(x[None], **kw)[0], got) or band is not None  # a batch: the 2-D transforms


def test_fr_rejects_nan_ratio_and_non_finite_input_and_1d_matrix():
    from mergelib.hparams import HyperparameterError
    from mergelib.task_vectors import FlatLayout, NonFiniteError
    w = torch.randn(4, 6)
    for call in (lambda: fr_filter(w, float("nan")), lambda: fr_mask((4, 6), float("nan")),
                 lambda: fr_filter(w, float("inf")), lambda: fr_filter(w, True), lambda: fr_mask((4, 6), "0.7")):
        with pytest.raises(HyperparameterError, match="ratio="):
            call()
    w[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN"):
        fr_filter(w, 0.7)
    with pytest.raises(ValueError, match=r"must be an N x D tensor, got \(5,\)"):
        fr_merge(torch.randn(5), FlatLayout.from_shapes({"w": (5,)}))


def test_fr_merge_says_which_tensors_it_filters():
    import mergelib as ml
    from mergelib.fourier import FRFilterWarning, fr_filtered_keys
    from mergelib.task_vectors import FlatLayout
    layout = FlatLayout.from_shapes({"conv.weight": (4, 3, 3, 3), "fc.weight": (4, 6), "fc.bias": (4,)})
    assert fr_filtered_keys(layout) == ["fc.weight"]
    x = torch.randn(2, layout.D)
    with pytest.warns(FRFilterWarning, match=r"1 selected tensor\(s\) with more than 2 dims .*conv.weight "
                                             r"\(4, 3, 3, 3\).*filtered: 1 tensor\(s\) \(fc.weight\)"):
        fr_merge(x, layout)
    pre = {"conv.weight": torch.randn(4, 3, 3, 3)}
    fts = [{"conv.weight": pre["conv.weight"] + 0.1 * torch.randn(4, 3, 3, 3)} for _ in range(2)]
    with pytest.raises(ValueError, match="none of the 1 selected tensors is 2-D"):
        ml.merge(pre, fts, "fr")


def test_buffers_reused_across_tensors_of_different_shapes_keep_the_bits():
    """fr_merge and merge() reuse one block, one |.| and one spectrum buffer from tensor to tensor
    (Scratch); tensors of other shapes and sizes after a large one (a larger spectrum, a smaller
    block, odd sizes that take the complex transform) still get each tensor's own filter, bit for bit,
    and merge()'s results do not share memory."""
    from mergelib import fourier, merge

    shapes = {"a.weight": (1024, 1030), "b.weight": (1100, 1000), "c.weight": (1025, 1023), "d.weight": (6, 10),
              "e.bias": (10,)}
    layout = FlatLayout.from_shapes(shapes)
    x = _randn(3, layout.D, seed=9) * 1e-2
    want = []
    for k, s, e in layout.segments():
        seg = x[:, s:e]
        if len(shapes[k]) == 2 and e - s >= fourier._ONE_TASK_AT_A_TIME:  # filtered task by task
            seg = torch.stack([fr_filter(row.reshape(shapes[k]), 0.7).reshape(-1) for row in seg])
            l1 = seg.double().abs().sum(1).float()  # m_i: the L1 norms (float64 sums)
            want.append(fourier._row_sum(seg * (l1.max() / l1)[:, None]))
            continue
        elif len(shapes[k]) == 2:
            seg = fr_filter(seg.reshape(3, *shapes[k]), 0.7).reshape(3, -1)
        want.append(fourier._row_sum(align_magnitudes(seg)))
    want = torch.cat(want)
    assert torch.equal(fr_merge(x, layout, ratio=0.7), want)
    pre = {k: torch.zeros(s) for k, s in shapes.items()}
    fts = [{k: x[i, s:e].reshape(shapes[k]).clone() for k, s, e in layout.segments()} for i in range(3)]
    got = merge(pre, fts, "fr", rules=None, ratio=0.7, scale=1.0)
    for k, s, e in layout.segments():
        assert torch.equal(got[k].reshape(-1), want[s:e]), k
    ptrs = [t.data_ptr() for t in got.values()]
    assert len(set(ptrs)) == len(ptrs)


def test_fr_tensor_writes_into_out_with_the_same_bits():
    """fr_merge has fr_tensor write each tensor's result into its merged vector (``out``): the bits of
    the returned tensor, for a summed weight and for a bias that takes task 1's row (compat_official)."""
    from mergelib.fourier import fr_tensor

    x = _randn(3, 40 * 30, seed=3) * 1e-2
    for key, compat in (("w.weight", False), ("b.bias", True), ("b.bias", False)):
        want = fr_tensor(x.clone(), key, (40, 30), compat_official=compat)
        out = torch.full((40 * 30,), float("nan"))
        got = fr_tensor(x.clone(), key, (40, 30), compat_official=compat, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, want), (key, compat)


def test_paper_coefficients_contiguous_and_not():
    """lambda_i = mean|v_i| / sum_j mean|v_j|: bit for bit the plain formula on a contiguous matrix (|v|
    goes into a huge-page buffer there), and the same values on a transposed view."""
    x = _randn(4, 3000, seed=5)
    e = x.abs().mean(1)
    assert torch.equal(fr_paper_coefficients(x), e / e.sum())
    xt = x.t().contiguous().t()  # the same values, column-major
    assert not xt.is_contiguous()
    torch.testing.assert_close(fr_paper_coefficients(xt), e / e.sum())


FR_VARIANTS = [{}, {"mode": "paper"}, {"mode": "paper", "base": "max"}, {"base": "max"},
               {"compat_double_ring": True}, {"mode": "paper", "align": "none"},
               {"mode": "paper", "base": "max", "align": "paper"}, {"base": "max", "align": "paper"},
               {"compat_double_ring": True, "compat_official": True},
               {"mode": "paper", "align": "paper", "compat_official": True}]


def test_merge_fr_variants_equal_their_computation_from_fr_filter():
    """merge(..., "fr") for FR's modes, bases, alignments and quirks against FR's merged model built here
    from fr_filter (checked above against ifft2(M . fft2)) following docs/methods.md section 6: every 2-D
    task-vector matrix filtered, other tensors left as they are; align="official": each task's tensor
    scaled to the largest task's mean |.|, then summed; "none": summed; "paper": sum_i lambda_i FR(tau_i),
    lambda_i = E_i / sum_j E_j, E_i = mean |FR(tau_i)| over the whole model; compat_official: tensors
    without "weight" in their key take task 1's (filtered, aligned) delta; theta = theta_0 + c tau_m.
    Rectangular matrices, so that min and max differ, with min(H, W) // 10 = 1 (the double ring)."""
    shapes = {"attn.weight": (12, 20), "mlp.weight": (30, 10), "attn.bias": (12,)}
    g = torch.Generator().manual_seed(11)
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    mags = [1.0, 3.0, 0.5]  # tasks of different magnitudes: the alignments matter
    fts = [{k: v + 0.02 * a * torch.randn(v.shape, generator=g) for k, v in pre.items()} for a in mags]
    for k in ("attn.weight", "mlp.weight"):  # task 1: a large DC component, which every filter here removes
        fts[0][k] = fts[0][k] + 0.05
    ratio, c = 0.4, 0.7
    outs = []
    for hp in FR_VARIANTS:
        o = {"mode": "official", "base": "min", "align": "official", "compat_official": False,
             "compat_double_ring": False} | hp
        filt = {}
        for k, s in shapes.items():
            tau = torch.stack([ft[k] - pre[k] for ft in fts])
            filt[k] = fr_filter(tau, ratio, o["mode"], o["base"], o["compat_double_ring"]) if len(s) == 2 else tau
        if o["align"] == "paper":
            e = torch.stack([torch.cat([filt[k][i].reshape(-1) for k in shapes]).abs().mean() for i in range(3)])
            lam = e / e.sum()
            merged = {k: sum(lam[i] * filt[k][i] for i in range(3)) for k in shapes}
        else:
            if o["align"] == "official":
                for k in shapes:
                    m = filt[k].reshape(3, -1).abs().mean(1)
                    filt[k] = filt[k] * (m.max() / m).view(3, *[1] * len(shapes[k]))
            merged = {k: filt[k].sum(0) for k in shapes}
        if o["compat_official"]:
            merged = {k: v if "weight" in k else filt[k][0] for k, v in merged.items()}
        out = merge(pre, fts, "fr", scale=c, rules=None, ratio=ratio, **hp)
        for k in shapes:
            torch.testing.assert_close(out[k], pre[k] + c * merged[k], rtol=1e-5, atol=1e-6, msg=f"{hp} {k}")
        outs.append(out)
    for i in range(len(outs)):  # every option changes the result here (so each one was passed on)
        for j in range(i):
            assert any(not torch.allclose(outs[i][k], outs[j][k], rtol=1e-4, atol=1e-4) for k in shapes), \
                (FR_VARIANTS[i], FR_VARIANTS[j])


@pytest.mark.parametrize("shape", [(48, 40), (33, 17), (200,)])
@pytest.mark.parametrize("align", ["official", "none"])
def test_fr_tensor_of_the_gpu_reads_its_block_twice_and_sums_the_same(shape, align):
    """fr_tensor's GPU form (_fr_tensor_two_reads: L1 norms and one weighted sum of the rows after the
    filter) on a strided segment of a wider matrix, left unwritten: the CPU form's result up to rounding.
    Here with the torch code (tests/test_gpu_kernels.py runs it with the Triton kernel)."""
    from mergelib.fourier import _fr_tensor_two_reads, fr_tensor
    numel = math.prod(shape)
    g = torch.Generator().manual_seed(numel)
    wide = torch.randn(4, numel + 50, generator=g) * torch.tensor([1.0, 0.5, 2.0, 0.0])[:, None]
    seg = wide[:, 25:25 + numel]  # rows contiguous, row stride numel + 50; task 4 all zero
    before = wide.clone()
    got = _fr_tensor_two_reads(seg, shape, 0.7, "official", "min", align, False)
    want = fr_tensor(seg.contiguous(), "w", shape, 0.7, align=align)
    tol = 1e-6 * float(want.abs().max())  # rounding of sums of eight-fold products: relative to the largest
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert torch.equal(wide, before)
    out = torch.full((numel,), float("nan"))
    assert _fr_tensor_two_reads(seg, shape, 0.7, "official", "min", align, False, out=out) is out
    torch.testing.assert_close(out, want, rtol=0, atol=tol)
    # compat_official's non-weight tensors: task 1's aligned row, the input still unwritten
    first = _fr_tensor_two_reads(seg, shape, 0.7, "official", "min", align, False, first_task_only=True)
    want = fr_tensor(seg.contiguous(), "b.bias", shape, 0.7, align=align, compat_official=True)
    torch.testing.assert_close(first, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(wide, before)


@pytest.mark.parametrize("shape", [(768, 1536), (1536, 768), (1025, 1027)])
def test_tasks_filtered_one_at_a_time_give_their_sums_for_the_late_check(shape):
    """The matrices filtered one task at a time give each task's sum off their forward transform (the
    DC bins, in either orientation of the band), for the finiteness check at the end of fr_merge and
    merge(); a NaN or an inf anywhere in a task makes its sum non-finite, and fr_merge names it."""
    from mergelib import fourier
    from mergelib.task_vectors import NonFiniteError

    x = _randn(3, shape[0] * shape[1], seed=8)
    sums = torch.empty(3)
    fourier._fr_filter_align(x.clone(), shape, 0.7, "official", "min", "official", False, row_sums=sums)
    torch.testing.assert_close(sums, x.double().sum(1).float(), rtol=0, atol=1e-3)
    layout = FlatLayout.from_shapes({"w.weight": shape, "b.bias": (5,)})
    numel = shape[0] * shape[1]
    for where, bad in ((17, float("nan")), (numel - 1, float("inf")), (numel + 2, float("nan"))):  # the bias too
        y = _randn(3, layout.D, seed=9)
        y[1, where] = bad
        with pytest.raises(NonFiniteError, match="NaN|inf"):
            fr_merge(y, layout, ratio=0.7)
        with pytest.raises(NonFiniteError, match="NaN|inf"):
            fr_merge(y, layout, ratio=50.0, mode="paper")  # nothing kept: the sums still see it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrices_filtered_one_task_at_a_time_agree_across_fr_merge_merge_and_merge_files(tmp_path, dtype):
    """fr_merge (tasks read straight from the flat matrix), merge() (each task's vector computed as it is
    read, fourier._TaskRows) and merge_files (each tensor's block from disk) give the same bits for the
    matrices filtered one task at a time: a band in the matrix's own half spectrum (768 x 768, 1536 x 384
    in the transpose's: 3072 x 384), an odd one (727 x 1031: the complex transform), with bf16 or fp32
    checkpoints."""
    from safetensors.torch import load_file, save_file

    import mergelib as ml
    from mergelib import fourier
    from mergelib.task_vectors import flatten

    shapes = {"a.weight": (768, 768), "b.weight": (3072, 384), "c.weight": (727, 1031), "d.bias": (768,)}
    assert all(fourier._one_task_at_a_time(s, "cpu") for k, s in shapes.items() if k != "d.bias")
    assert fourier._band(3072, 384, 0.7, "official", "min", False).transposed
    g = torch.Generator().manual_seed(3)
    pre = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    fts = [{k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3 * (i + 1)).to(dtype) for k, v in pre.items()}
           for i in range(3)]
    got = ml.merge(pre, fts, "fr", rules=None, scale=1.0)
    x, layout = flatten(fts, sorted(shapes), subtract=pre)
    flat = fourier.fr_merge(x, layout, 0.7)
    for k, s, e in layout.segments():
        assert torch.equal(got[k], (pre[k].float() + flat[s:e].view(shapes[k])).to(dtype)), k
    save_file(pre, str(tmp_path / "base.safetensors"))
    for i, ft in enumerate(fts):
        save_file(ft, str(tmp_path / f"ft{i}.safetensors"))
    out = ml.merge_files(tmp_path / "base.safetensors", [tmp_path / f"ft{i}.safetensors" for i in range(3)],
                         tmp_path / "out", "fr", rules=None, scale=1.0, quiet=True)
    streamed = {}
    for f in sorted(out.glob("*.safetensors")):
        streamed.update(load_file(str(f)))
    for k in shapes:
        assert torch.equal(streamed[k].view(torch.int16) if dtype == torch.bfloat16 else streamed[k],
                           got[k].view(torch.int16) if dtype == torch.bfloat16 else got[k]), k


def test_scratch_zeroed_buffer_is_zeroed_once_per_layout():
    """Scratch.zeroed: zeros the first time for a layout, then as the caller left it; a new layout, or a
    get() of the same name in between, zeroes it again."""
    from mergelib.task_vectors import Scratch

    s = Scratch()
    b = s.zeroed("h", 6, ("a", 1))
    assert torch.equal(b, torch.zeros(6))
    b[2:4] = 5.0
    assert torch.equal(s.zeroed("h", 6, ("a", 1))[2:4], torch.full((2,), 5.0))  # the same layout: as left
    assert torch.equal(s.zeroed("h", 6, ("a", 2)), torch.zeros(6))  # another layout: zeroed
    s.zeroed("h", 6, ("a", 2))[0] = 1.0
    s.get("h", 6)  # handed out for anything else: no longer known
    assert torch.equal(s.zeroed("h", 6, ("a", 2)), torch.zeros(6))
