"""Task vectors: selection rules, validation, arithmetic, flattening (mergelib.task_vectors)."""
import pytest
import torch

from mergelib.models import ResNet20, ViT
from mergelib.task_vectors import (DEFAULT_RULES, FlatLayout, NonFiniteError, StateDictDtypeError,
                                   StateDictKeyError, StateDictShapeError, TaskVector, apply_task_vector,
                                   cosine_similarity_matrix, detect_family, flatten, resolve_rules,
                                   select_keys, task_vector, unflatten, validate_state_dicts)


@pytest.fixture(scope="module")
def vit_sd():
    torch.manual_seed(0)
    return ViT(dim=32, depth=2, heads=2).state_dict()


def _perturb(sd, seed, eps=0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: v + eps * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in sd.items()}


# ---------------------------------------------------------------------------------- selection
def test_select_keys_default_is_every_float_tensor_sorted(vit_sd):
    keys = select_keys(vit_sd)
    assert keys == sorted(vit_sd)
    sd = dict(vit_sd, position_ids=torch.arange(5), **{"bn.num_batches_tracked": torch.tensor(3)})
    assert select_keys(sd) == keys  # integer buffers always skipped


def test_select_keys_flags(vit_sd):
    mats = select_keys(vit_sd, matrices_only=True)
    assert "blocks.0.attn.qkv.weight" in mats and "patch_embed.proj.weight" in mats and "pos_embed" in mats
    assert "cls_token" not in mats and "blocks.0.attn.qkv.bias" not in mats and "norm.weight" not in mats
    no_norm = select_keys(vit_sd, skip_norm=True)
    assert not any(".norm" in k or k.startswith("norm.") for k in no_norm)
    assert "blocks.1.mlp.fc1.weight" in no_norm
    no_emb = select_keys(vit_sd, skip_embed=True)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}.isdisjoint(no_emb)
    no_bias = select_keys(vit_sd, skip_bias=True)
    assert not any(k.endswith("bias") for k in no_bias) and "blocks.0.norm1.weight" in no_bias
    inc = select_keys(vit_sd, include=r"mlp\.fc1", exclude=[r"bias$"])
    assert inc == ["blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight"]


def test_default_rules(vit_sd):
    assert detect_family(vit_sd) == "vit"
    free = select_keys(vit_sd, **DEFAULT_RULES["vit_attn_mlp"])
    assert free and all(".attn." in k or ".mlp." in k for k in free)
    assert len(free) == 16  # 2 blocks x (qkv, proj, fc1, fc2) x (weight, bias)
    rsd = ResNet20().state_dict()
    assert detect_family(rsd) == "resnet"
    rkeys = select_keys(rsd, **resolve_rules("auto", rsd))
    assert not any(k.startswith("linear.") or "running_" in k for k in rkeys)
    assert "layer1.0.conv1.weight" in rkeys and "bn1.weight" in rkeys
    with pytest.raises(ValueError, match="unknown rules 'nope'; expected 'auto'"):
        resolve_rules("nope", vit_sd)
    with pytest.raises(ValueError, match=r"unknown rules 'resnets' \(did you mean 'resnet'\?\)"):
        resolve_rules("resnets", vit_sd)


# ---------------------------------------------------------------------------------- validation
def test_validate_reports_missing_and_extra_keys(vit_sd):
    ft = dict(vit_sd)
    del ft["norm.bias"]
    ft["head.weight"] = torch.zeros(3)
    with pytest.raises(StateDictKeyError, match=r"missing in finetuned\[0\]: 'norm.bias'.*extra in "
                                                 r"finetuned\[0\].*'head.weight'") as e:
        validate_state_dicts(vit_sd, [ft])
    assert isinstance(e.value, KeyError) and not str(e.value).startswith('"')


def test_validate_shape_dtype_nonfinite(vit_sd):
    bad = dict(vit_sd, **{"blocks.0.attn.proj.weight": torch.zeros(32, 31)})
    with pytest.raises(StateDictShapeError, match=r"'blocks.0.attn.proj.weight'.*\(32, 31\).*mnist"):
        validate_state_dicts(vit_sd, {"mnist": bad})
    bad = dict(vit_sd, **{"norm.weight": vit_sd["norm.weight"].double()})
    with pytest.raises(StateDictDtypeError, match=r"'norm.weight'.*float64"):
        validate_state_dicts(vit_sd, [bad])
    bad = dict(vit_sd, **{"blocks.1.mlp.fc2.bias": vit_sd["blocks.1.mlp.fc2.bias"].clone()})
    bad["blocks.1.mlp.fc2.bias"][3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'blocks.1.mlp.fc2.bias' of finetuned\[1\].*1 NaN"):
        validate_state_dicts(vit_sd, [vit_sd, bad])
    inf = dict(vit_sd, cls_token=torch.full_like(vit_sd["cls_token"], float("inf")))
    with pytest.raises(NonFiniteError, match="'cls_token' of pretrained"):
        validate_state_dicts(inf, [inf])
    # restricting the checked keys skips the others
    assert validate_state_dicts(vit_sd, [bad], keys=["norm.weight"]) == ["norm.weight"]
    with pytest.raises(ValueError, match="empty"):
        validate_state_dicts(vit_sd, [])


# ---------------------------------------------------------------------------------- TaskVector
def _tv(**kw):
    return TaskVector({k: torch.tensor(v, dtype=torch.float32) for k, v in kw.items()})


def test_task_vector_arithmetic_by_hand():
    a, b = _tv(w=[1.0, 2.0], b=[3.0]), _tv(w=[0.5, -1.0], b=[1.0])
    assert list(a.keys()) == ["b", "w"]
    assert (a + b)["w"].tolist() == [1.5, 1.0] and (a - b)["b"].tolist() == [2.0]
    assert (-a)["w"].tolist() == [-1.0, -2.0]
    assert (2 * a)["w"].tolist() == [2.0, 4.0] and (a * 2)["b"].tolist() == [6.0]
    assert (a / 2)["w"].tolist() == [0.5, 1.0]
    assert sum([a, b])["w"].tolist() == [1.5, 1.0]
    assert float(a.dot(b)) == pytest.approx(1 * 0.5 + 2 * -1 + 3 * 1)
    assert float(a.norm()) == pytest.approx(14 ** 0.5)
    assert float(a.cosine_similarity(b)) == pytest.approx(1.5 / (14 ** 0.5 * 2.25 ** 0.5))
    with pytest.raises(TypeError):
        a * b
    with pytest.raises(StateDictKeyError, match=r"only in left 'b'.*only in right 'c'"):
        a + _tv(w=[0.0, 0.0], c=[1.0])
    with pytest.raises(StateDictShapeError, match="'w'"):
        a - _tv(w=[0.0], b=[1.0])


def test_task_vector_and_apply_roundtrip(vit_sd):
    ft = _perturb(vit_sd, 1)
    before = {k: v.clone() for k, v in ft.items()}
    tv = task_vector(vit_sd, ft, exclude=r"norm")
    assert all("norm" not in k for k in tv) and all(t.dtype == torch.float32 for t in tv.values())
    out = tv.apply_to(vit_sd, scale=1.0)
    for k in vit_sd:
        if "norm" in k:
            assert out[k] is vit_sd[k]
        else:
            torch.testing.assert_close(out[k], ft[k], rtol=0, atol=1e-6)
    assert all(torch.equal(ft[k], before[k]) for k in ft)  # inputs untouched
    zero = apply_task_vector(vit_sd, tv, scale=0.0)
    assert all(torch.equal(zero[k], vit_sd[k]) for k in vit_sd)
    half = apply_task_vector(vit_sd, tv, 0.5)
    k = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(half[k], vit_sd[k] + 0.5 * (ft[k] - vit_sd[k]))
    with pytest.raises(StateDictKeyError, match="'extra'"):
        apply_task_vector(vit_sd, {"extra": torch.zeros(1)})


def test_apply_keeps_low_precision_dtype():
    pre = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([1.5, 2.5], dtype=torch.bfloat16)}
    tv = task_vector(pre, ft)
    assert tv["w"].dtype == torch.float32
    out = apply_task_vector(pre, tv, 2.0)
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 3.0]


# ---------------------------------------------------------------------------------- flattening
def test_flatten_unflatten_roundtrip(vit_sd):
    fts = [_perturb(vit_sd, s) for s in range(3)]
    tvs = [task_vector(vit_sd, f) for f in fts]
    x, layout = flatten(tvs)
    assert x.shape == (3, sum(v.numel() for v in vit_sd.values())) and x.dtype == torch.float32
    assert layout.keys == tuple(sorted(vit_sd)) and layout.D == x.shape[1]
    assert layout.offsets[1] == layout.numels[0]
    back = unflatten(x, layout)
    for i, tv in enumerate(tvs):
        for k in tv:
            assert torch.equal(back[k][i], tv[k])
    # subtract= builds the same matrix straight from the fine-tuned state dicts
    x2, _ = flatten(fts, layout.keys, subtract=vit_sd)
    assert torch.equal(x, x2)
    # unflatten returns views
    one = unflatten(x[0], layout)
    one["norm.bias"].fill_(7.0)
    assert (x[0, layout.segment("norm.bias")] == 7.0).all()
    with pytest.raises(ValueError, match="D="):
        unflatten(x[:, :-1], layout)
    assert FlatLayout.from_shapes({"b": (2, 3), "a": (4,)}).segments() == [("a", 0, 4), ("b", 4, 10)]


def test_cosine_similarity_matrix(vit_sd):
    tvs = [task_vector(vit_sd, _perturb(vit_sd, s)) for s in range(3)]
    tvs.append(2.0 * tvs[0])
    cs = cosine_similarity_matrix(tvs)
    x, _ = flatten(tvs)
    ref = torch.nn.functional.cosine_similarity(x[:, None].double(), x[None].double(), dim=-1)
    torch.testing.assert_close(cs, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cosine_similarity_matrix(x), ref, rtol=1e-5, atol=1e-6)
    assert cs[0, 3] == pytest.approx(1.0) and abs(float(cs[0, 1])) < 0.2


def test_empty_matrix_huge_pages_and_plain():
    """Large CPU matrices come from a huge-page mapping: an ordinary writable contiguous tensor whose
    memory lives as long as any view of it; small ones are plain torch.empty."""
    from mergelib.task_vectors import HUGE_PAGE_BYTES, empty_matrix

    n = HUGE_PAGE_BYTES // 4 // 2 + 5
    big = empty_matrix((2, n))
    assert big.shape == (2, n) and big.dtype == torch.float32 and big.is_contiguous()
    big.fill_(1.5)
    view = big[1, 3:10]
    del big
    import gc
    gc.collect()
    assert torch.equal(view, torch.full((7,), 1.5))  # the mapping outlives the matrix while viewed
    half = empty_matrix((2, n), dtype=torch.float16)
    assert half.dtype == torch.float16 and half.element_size() == 2
    small = empty_matrix((3, 4))
    assert small.shape == (3, 4) and small.is_contiguous()


def test_zeros_matrix_reads_zeros_at_every_size():
    """zeros_matrix is torch.zeros: on a fresh mapping (large, not written by us) and plain (small), in
    any dtype, and a second large one after the first was written and freed is zeros again."""
    from mergelib.task_vectors import HUGE_PAGE_BYTES, zeros_matrix

    n = HUGE_PAGE_BYTES // 4 // 2 + 5
    for dtype in (torch.float32, torch.float16):
        big = zeros_matrix((2, n), dtype=dtype)
        assert big.shape == (2, n) and big.dtype == dtype and big.is_contiguous()
        assert int(torch.count_nonzero(big)) == 0
        big.fill_(3.0)
        del big
        assert int(torch.count_nonzero(zeros_matrix((2, n), dtype=dtype))) == 0
    small = zeros_matrix((3, 4), dtype=torch.float64)
    assert torch.equal(small, torch.zeros(3, 4, dtype=torch.float64))


def test_all_finite_with_a_sum_that_overflows():
    """A finite sum proves finiteness; a sum that overflows is checked again exactly."""
    from mergelib.competition import all_finite

    big = torch.full((1000,), 3e38)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(1000)
        t[17] = bad
        assert not all_finite(t)
        big2 = big.clone()
        big2[5] = bad
        assert not all_finite(big2)
    assert all_finite(torch.tensor([], dtype=torch.float32)) and all_finite(torch.arange(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_task_vector_columns_equal_flatten_bit_for_bit(dtype):
    """Column blocks (spanning tensor boundaries), gathered entries and rows are flatten's bits."""
    from mergelib.task_vectors import TaskVectorColumns

    g = torch.Generator().manual_seed(1)
    shapes = {"a": (30, 25), "b": (1100,), "c": (7,), "d": (3, 2, 5)}
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    fts = [{k: (pre[k].float() + 1e-2 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}
           for _ in range(3)]
    x, layout = flatten(fts, list(shapes), subtract=pre)
    cols = TaskVectorColumns(fts, pre, list(shapes))
    assert cols.shape == tuple(x.shape) and cols.layout == layout
    ints = lambda t: t.contiguous().view(torch.int32)
    for c0, c1 in [(0, layout.D), (0, 10), (740, 760), (749, 751), (1850, 1857), (1857, 1887), (5, 1886)]:
        out = torch.full((3, c1 - c0), float("nan"))
        assert torch.equal(ints(cols.block(c0, c1, out)), ints(x[:, c0:c1])), (c0, c1)
        assert torch.equal(ints(cols.block(c0, c1, out[:2], rows=[2, 0])), ints(x[[2, 0], c0:c1]))
    pos = torch.randint(0, layout.D, (500,), generator=g).sort().values
    assert torch.equal(ints(cols.gather(pos)), ints(x[:, pos]))
    for i in range(3):
        assert torch.equal(ints(cols.row(i)), ints(x[i]))


def test_flatten_into_a_reused_buffer():
    """``flatten(..., out=)`` writes the same bits into a caller's buffer (a Scratch reused from tensor
    to tensor); a buffer of the wrong size or dtype is refused by name, before anything is written."""
    from mergelib.task_vectors import Scratch
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(30, 7, generator=g), "b": torch.randn(7, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    expect, layout = flatten(fts, subtract=pre)
    scratch = Scratch()
    scratch.reserve(3 * layout.D + 100, ["block"])
    buf = scratch.get("block", 3 * layout.D)
    got, _ = flatten(fts, subtract=pre, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, expect)
    assert scratch.get("block", 10).data_ptr() == buf.data_ptr()  # reused, not reallocated
    bf = fts[0]["w"].to(torch.bfloat16)  # a cast on the way: one copy then one subtraction, the same bits
    got, _ = flatten([{"w": bf}], ["w"], subtract=pre, out=scratch.get("block", 210))
    assert torch.equal(got, flatten([{"w": bf}], ["w"], subtract=pre)[0])
    before = buf.clone()
    with pytest.raises(ValueError, match=r"out must hold 3 x 217 torch.float32 entries"):
        flatten(fts, subtract=pre, out=torch.zeros(3 * layout.D - 1))
    with pytest.raises(ValueError, match="out must hold"):
        flatten(fts, subtract=pre, out=torch.zeros(3 * layout.D, dtype=torch.float64))
    assert torch.equal(buf, before)
