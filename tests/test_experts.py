"""FREE-Merging experts: extraction, rescaling, storage, per-task parameters, trained experts."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.func import functional_call

from mergelib.experts import (Expert, LowRankExpert, SparseExpert, allocate_ranks, expert_scale,
                              extract_expert, free_params, load_expert, train_expert)
from mergelib.hparams import HyperparameterError
from mergelib.models import ViT

from bits import same_bytes


def _rand_sd(shapes, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


SHAPES = {"blocks.0.attn.qkv.weight": (12, 10), "blocks.0.attn.qkv.bias": (12,),
          "blocks.0.mlp.fc1.weight": (3, 4, 9), "blocks.0.mlp.fc2.weight": (2, 33)}


def test_k1_with_zero_backbone_gives_pretrained_plus_rescaled_task_vector():
    theta0, tau = _rand_sd(SHAPES, 0), _rand_sd(SHAPES, 1, 0.1)
    zero = {k: torch.zeros_like(v) for k, v in tau.items()}
    mu, lam_e = 2.5, 0.3
    expert = extract_expert(tau, 1.0, rescale=mu)
    assert expert.mu == mu and expert.density() == 1.0
    for mode in ("add", "replace"):
        out = free_params(theta0, zero, 0.7, expert, lam_e, mode=mode)
        for k in theta0:
            torch.testing.assert_close(out[k], theta0[k] + lam_e * mu * tau[k], rtol=1e-6, atol=1e-7)
    # both rescale formulas carry log(k): at k = 1 the rescaled expert vanishes
    e1 = extract_expert(tau, 1.0, rescale="official", filtered_tv=tau)
    assert e1.mu == 0.0 and all(bool((v == 0).all()) for v in e1.to_dense().values())


@pytest.mark.parametrize("k", [0.01, 0.1, 0.29, 0.5, 0.999, 1.0])
def test_per_row_density_is_floor_cols_times_k_and_keeps_the_largest(k):
    tau = _rand_sd(SHAPES, 2)
    e = extract_expert(tau, k, rescale=None, budget="row_floor")
    for key, t in tau.items():
        cols = t.shape[-1]
        rows = t.numel() // cols
        kk = math.floor(cols * k)
        assert e.row_density(key) == kk / cols
        mask = e.support_mask(key).reshape(rows, cols)
        assert mask.sum(1).tolist() == [kk] * rows  # exactly kk distinct entries in every row
        a = t.reshape(rows, cols).abs()
        if 0 < kk < cols:  # the kept entries are the largest |tau| of their row
            kept_min = a.masked_fill(~mask, float("inf")).min(1).values
            dropped_max = a.masked_fill(mask, -1.0).max(1).values
            assert bool((kept_min >= dropped_max).all())
        dense = e.to_dense()[key]
        assert torch.equal(dense, torch.where(mask.view(t.shape), t, torch.zeros_like(t)))
    total = sum(t.numel() for t in tau.values())
    assert e.density() == sum(math.floor(t.shape[-1] * k) * t.numel() // t.shape[-1] for t in tau.values()) / total


def test_official_and_paper_rescale_by_hand():
    tau = {"a": torch.tensor([[4.0, -1.0, 0.5, 2.0], [0.1, -0.2, 3.0, -6.0]]), "b": torch.tensor([1.0, -3.0])}
    fr = {"a": torch.full((2, 4), 0.5), "b": torch.tensor([0.25, -0.25])}
    k = 0.5
    # kept: a rows {4, 2} and {3, -6}; b {-3}.  mean|M|: a = 15/8, b = 3/2
    m = [15 / 8, 3 / 2]
    e_fr = (0.5 + 0.25) / 2
    mu_official = -math.log10(k) * (sum(m) / 2 / k) / e_fr
    e = extract_expert(tau, k, rescale="official", filtered_tv=fr, budget="row_floor")
    assert e.mu == pytest.approx(mu_official, rel=1e-6)
    torch.testing.assert_close(e.to_dense()["a"], mu_official * torch.tensor(
        [[4.0, 0, 0, 2.0], [0, 0, 3.0, -6.0]]))
    e_raw = (sum(abs(v) for v in tau["a"].flatten().tolist()) / 8 + 2.0) / 2
    lam = 0.4
    mu_paper = -(sum(m) / 2) * math.log(k) / (lam * e_raw)
    assert extract_expert(tau, k, rescale="paper", lam=lam, budget="row_floor").mu == pytest.approx(mu_paper, rel=1e-6)
    mu_paper_fr = -(sum(m) / 2) * math.log(k) / (lam * e_fr)
    assert extract_expert(tau, k, "paper", filtered_tv=fr, lam=lam, budget="row_floor").mu == pytest.approx(mu_paper_fr, rel=1e-6)
    kept_means = [15 / 4, 3.0]  # mean |kept entries|: a {4, 2, 3, 6}, b {3}
    assert expert_scale(kept_means, [0.5, 0.25], k, "official") == pytest.approx(mu_official)


def test_add_and_replace_differ_exactly_on_the_support():
    theta0, tau, s = _rand_sd(SHAPES, 3), _rand_sd(SHAPES, 4, 0.1), _rand_sd(SHAPES, 5, 0.1)
    c = 0.5
    e = extract_expert(tau, 0.3, rescale="official", filtered_tv=s)
    add = free_params(theta0, s, c**2, e, c, mode="add")
    rep = free_params(theta0, s, c**2, e, c, mode="replace")
    for k in theta0:
        mask = e.support_mask(k)
        assert bool(mask.any()) and not bool(mask.all())
        assert torch.equal((add[k] != rep[k]), mask)  # differ on S (s != 0 there), equal elsewhere
        torch.testing.assert_close(add[k][mask] - rep[k][mask], c**2 * s[k][mask])
        # official form: theta0 + c*z, z = e on S and c*s elsewhere
        z = torch.where(mask, e.to_dense()[k], c * s[k])
        torch.testing.assert_close(rep[k], theta0[k] + c * z)
        torch.testing.assert_close(add[k], theta0[k] + c**2 * s[k] + c * e.to_dense()[k])


def test_sparse_storage_round_trips_exactly_with_exact_bytes(tmp_path):
    g = torch.Generator().manual_seed(6)
    dense = {}
    for key, (rows, cols, kk) in {"w8": (5, 16, 3), "w16": (3, 300, 7), "w32": (1, 40000, 4),
                                  "bias": (1, 9, 2)}.items():
        t = torch.zeros(rows, cols)
        for r in range(rows):
            t[r, torch.randperm(cols, generator=g)[:kk]] = torch.rand(kk, generator=g) + 0.5
        dense[key] = t if key != "bias" else t.view(cols)
    ks = {"w8": 3 / 16, "w16": 7 / 300 + 1e-9, "w32": 4 / 40000 + 1e-12, "bias": 2 / 9 + 1e-9}
    for key, k in ks.items():
        e = extract_expert({key: dense[key]}, k, rescale=None, budget="row_floor")
        assert torch.equal(e.to_dense()[key], dense[key])  # dense -> sparse -> dense is exact
    e = SparseExpert(*_merge_parts([extract_expert({key: dense[key]}, k, rescale=None, budget="row_floor")
                                    for key, k in ks.items()]))
    assert {k: v.dtype for k, v in e.indices.items()} == {
        "w8": torch.uint8, "w16": torch.int16, "w32": torch.int32, "bias": torch.uint8}
    expected = 5 * 3 * (4 + 1) + 3 * 7 * (4 + 2) + 1 * 4 * (4 + 4) + 1 * 2 * (4 + 1)
    assert e.nbytes == expected == sum(t.nbytes for t in e.state_dict().values())
    path = e.save(tmp_path / "sub" / "expert.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["expert.safetensors"]  # no temp file left
    assert sum(t.nbytes for t in load_file(str(path)).values()) == expected
    back = load_expert(path)
    assert isinstance(back, SparseExpert) and back.shapes == e.shapes and back.mu == e.mu
    for key in dense:
        assert torch.equal(back.to_dense()[key], dense[key])
        assert back.indices[key].dtype == e.indices[key].dtype
    again = SparseExpert.from_state_dict(e.state_dict(), e.config())
    assert all(torch.equal(again.to_dense()[k], dense[k]) for k in dense)
    with pytest.raises(ValueError, match="not a 'lowrank'"):
        LowRankExpert.load(path)


def _merge_parts(experts):
    values, indices, shapes = {}, {}, {}
    for e in experts:
        values.update(e.values)
        indices.update(e.indices)
        shapes.update(e.shapes)
    return values, indices, shapes


def test_to_moves_and_casts_values_only():
    e = extract_expert(_rand_sd(SHAPES, 7), 0.25, rescale=2.0)
    d = e.to("cpu", torch.float64)
    assert all(v.dtype == torch.float64 for v in d.values.values())
    assert all(d.indices[k].dtype == e.indices[k].dtype for k in e.keys)
    assert all(torch.equal(d.to_dense()[k], e.to_dense()[k].double()) for k in e.keys)


def test_error_cases():
    tau = _rand_sd(SHAPES, 8)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(HyperparameterError, match=r"k=.*expected a finite real number in \(0, 1\]"):
            extract_expert(tau, bad, rescale=None)
    with pytest.raises(ValueError, match="needs filtered_tv"):
        extract_expert(tau, 0.1)
    with pytest.raises(ValueError, match="filtered_tv has no tensor 'blocks.0.attn.qkv.bias'"):
        extract_expert(tau, 0.1, filtered_tv={k: v for k, v in tau.items() if "bias" not in k})
    with pytest.raises(ValueError, match="unknown rescale"):
        extract_expert(tau, 0.1, rescale="log2")
    e = extract_expert(tau, 0.1, rescale=None)
    other = dict(tau, **{"blocks.0.mlp.fc2.weight": torch.zeros(2, 34)})
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc2.weight' has shape \(2, 33\)"):
        free_params(other, {}, 1.0, e, 1.0)
    with pytest.raises(ValueError, match="'blocks.0.attn.qkv.bias' is not in the pretrained"):
        free_params({k: v for k, v in tau.items() if "bias" not in k}, {}, 1.0, e, 1.0)
    with pytest.raises(ValueError, match="unknown mode"):
        free_params(tau, {}, 1.0, e, 1.0, mode="mix")
    lr = LowRankExpert({"w": (torch.ones(4, 1), torch.ones(1, 3))}, {"w": (4, 3)})
    with pytest.raises(ValueError, match="replace' needs a SparseExpert"):
        free_params({"w": torch.zeros(4, 3)}, {}, 1.0, lr, 1.0, mode="replace")
    with pytest.raises(ValueError, match="too small"):
        allocate_ranks({"w": (4, 3)}, 27)


def test_allocate_ranks_fills_the_budget_round_robin():
    shapes = {"a": (48, 16), "b": (16, 16), "c": (4, 3)}
    # rank-1 costs: a 256, b 128, c 28 bytes (float32); sum 412; cap c at 3
    ranks = allocate_ranks(shapes, 1000)
    # uniform rank 1000 // 412 = 2 (824 bytes, 176 left); round robin: a (256) no, b (128) yes, c (28) yes
    assert ranks == {"a": 2, "b": 3, "c": 3}
    cost = 2 * 256 + 3 * 128 + 3 * 28
    assert cost == 980
    lr = LowRankExpert({k: (torch.zeros(s[0], r), torch.zeros(r, s[1])) for (k, s), r in
                        zip(shapes.items(), ranks.values())}, shapes)
    assert lr.nbytes == cost


def _toy(seed=0):
    torch.manual_seed(seed)  # module construction only; data come from explicit generators
    vit = ViT(image_size=8, patch_size=4, dim=16, depth=1, heads=2)
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(16, 3)
    x = torch.randn(48, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    return vit, {k: v.detach().clone() for k, v in vit.state_dict().items()}, head, x, y


def _loss(vit, params, head, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(head(functional_call(vit, params, (x,))), y))


def test_trained_expert_respects_budget_and_reduces_training_loss(tmp_path):
    vit, merged, head, x, y = _toy()
    tv = {k: v for k, v in merged.items() if ("attn" in k or "mlp" in k) and v.dim() == 2}
    budget = extract_expert(tv, 0.2, rescale=None).nbytes
    e = train_expert(vit, merged, head, x, y, budget, steps=40, lr=2e-2, batch_size=16, seed=1,
                     keys=list(tv), progress=False)
    assert isinstance(e, LowRankExpert) and set(e.keys) <= set(tv)
    assert 0.5 * budget < e.nbytes <= budget
    before = _loss(vit, merged, head, x, y)
    after = _loss(vit, free_params(merged, {}, 0.0, e, 1.0), head, x, y)
    assert after < 0.8 * before, (before, after)
    assert len(e.meta["loss_history"]) == 40
    # frozen: the head and the module's own weights did not move
    assert all(p.grad is None for p in head.parameters())
    assert all(torch.equal(v, merged[k]) for k, v in vit.state_dict().items())
    # same seed, same expert; save/load round trip
    e2 = train_expert(vit, merged, head, x, y, budget, steps=5, lr=2e-2, batch_size=16, seed=1,
                      keys=list(tv), progress=False)
    e3 = train_expert(vit, merged, head, x, y, budget, steps=5, lr=2e-2, batch_size=16, seed=1,
                      keys=list(tv), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(e2.state_dict().values(), e3.state_dict().values()))
    back = Expert.load(e.save(tmp_path / "lr.safetensors"))
    assert isinstance(back, LowRankExpert) and back.ranks == e.ranks
    assert all(torch.equal(back.to_dense()[k], e.to_dense()[k]) for k in e.keys)
    torch.testing.assert_close(free_params(merged, {}, 0.0, e, 0.5)[e.keys[0]],
                               merged[e.keys[0]] + 0.5 * e.to_dense()[e.keys[0]])


# ----------------------------------------------------------------------------------------------
# budgets, rounding, mu over the kept entries, checksums
# ----------------------------------------------------------------------------------------------
def test_budget_count_rounds_exactly():
    from mergelib.experts import budget_count
    assert int(100 * 0.29) == 28  # the floating-point trap
    assert budget_count(100, 0.29) == 29 and budget_count(100, 0.29, "round") == 29
    assert budget_count(64, 0.01) == 0 and budget_count(64, 0.01, "round") == 1
    assert budget_count(768, 0.01) == 7 and budget_count(10, 0.25, "round") == 3  # 2.5 rounds half up
    tau = {"w": torch.arange(1.0, 101.0).view(1, 100)}
    for budget in ("row_floor", "row_min1", "tensor"):
        assert extract_expert(tau, 0.29, rescale=None, budget=budget).num_stored == 29


def test_budgets_by_hand():
    t = torch.tensor([[0.1, -5.0, 0.2, 0.3], [0.4, 0.5, -0.6, 0.7], [9.0, 8.0, 0.0, -7.0]])
    tau = {"w": t}
    # k = 0.2: floor(4 * 0.2) = 0 per row, round(12 * 0.2) = 2 per tensor
    floor = extract_expert(tau, 0.2, rescale=None, budget="row_floor")
    assert floor.num_stored == 0 and not floor.support_mask("w").any()  # every row empty
    min1 = extract_expert(tau, 0.2, rescale=None, budget="row_min1")
    assert min1.support_mask("w").tolist() == [[False, True, False, False], [False, False, False, True],
                                               [True, False, False, False]]  # the largest |.| of each row
    assert torch.equal(min1.to_dense()["w"], torch.where(min1.support_mask("w"), t, 0.0))
    whole = extract_expert(tau, 0.2, rescale=None, budget="tensor")
    assert whole.layouts["w"] == "flat" and whole.grid("w") == (1, 12)
    assert whole.support_mask("w").tolist() == [[False] * 4, [False] * 4, [True, True, False, False]]  # 9, 8
    assert torch.equal(whole.to_dense()["w"], torch.where(whole.support_mask("w"), t, 0.0))
    theta0 = {"w": torch.ones(3, 4)}
    for mode in ("add", "replace"):  # the flat layout applies like the row layout
        torch.testing.assert_close(free_params(theta0, {}, 1.0, whole, 1.0, mode)["w"], theta0["w"] + whole.to_dense()["w"])
    with pytest.raises(HyperparameterError, match="budget='rows'"):
        extract_expert(tau, 0.2, rescale=None, budget="rows")


def test_mu_uses_kept_entries_only():
    g = torch.Generator().manual_seed(0)
    tau = {"a": torch.randn(4, 200, generator=g), "b": torch.randn(8, 300, generator=g)}
    fr = {k: 0.5 * v for k, v in tau.items()}
    for budget in ("row_floor", "tensor", "row_min1"):
        for rescale in ("official", "paper"):
            mu = extract_expert(tau, 0.01, rescale, filtered_tv=fr, budget=budget).mu
            # an all-zero tensor, or a narrow one that keeps nothing, must not move mu
            more = dict(tau, z=torch.zeros(5, 64))
            more_fr = dict(fr, z=torch.zeros(5, 64))
            assert extract_expert(more, 0.01, rescale, filtered_tv=more_fr, budget=budget).mu == pytest.approx(mu)
    narrow = dict(tau, n=torch.randn(6, 64, generator=g))  # floor(64 * 0.01) = 0: nothing kept
    narrow_fr = dict(fr, n=0.5 * narrow["n"])
    mu = extract_expert(tau, 0.01, "official", filtered_tv=fr, budget="row_floor").mu
    assert extract_expert(narrow, 0.01, "official", filtered_tv=narrow_fr, budget="row_floor").mu == pytest.approx(mu)
    # official mu by hand: -log10(k) * mean over keys of mean|kept| / mean over keys of mean|FR|
    e = extract_expert(tau, 0.01, "official", filtered_tv=fr, budget="row_floor")
    kept = [float(e.values[k].abs().double().mean()) for k in tau]  # values are mu * tau: divide back
    ref = [float(fr[k].abs().double().mean()) for k in tau]
    m_top = sum(kept) / 2 / e.mu
    assert e.mu == pytest.approx(2 * m_top / (sum(ref) / 2), rel=1e-6)


def test_expert_file_checksum_catches_a_flipped_byte(tmp_path):
    from mergelib.experts import CorruptExpertError
    e = extract_expert(_rand_sd(SHAPES, 9), 0.25, rescale=1.5)
    path = e.save(tmp_path / "e.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # a bit of the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptExpertError, match="is damaged: SHA-256"):
        load_expert(bad)
    back = load_expert(path)
    assert all(torch.equal(back.to_dense()[k], e.to_dense()[k]) for k in e.keys)
    from safetensors.torch import save_file
    save_file({k: v for k, v in e.state_dict().items()}, tmp_path / "old.safetensors",
              metadata={"mergelib_expert": __import__("json").dumps(e.config())})
    with pytest.raises(CorruptExpertError, match="carries no checksum"):
        load_expert(tmp_path / "old.safetensors")


# ----------------------------------------------------------------------------------------------
# topk_threshold (the threshold behind the experts' top-k masks)
# ----------------------------------------------------------------------------------------------
def _tied(shape, seed, dtype=torch.float32, levels=7):
    """Random entries on few levels of both signs: many ties of x and of |x| (e.g. -3 and 3)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, shape, generator=g) * 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_topk_threshold_equals_torch_topk_with_ties(dtype):
    from mergelib.selection import topk_threshold
    x = _tied((5, 4, 23), 31, dtype)
    x[0, 0] = 1.5  # a row that is one value only
    for dim in (-1, 0, 1):
        n = x.shape[dim]
        for keep in sorted({1, 2, n // 2, n - 1, n}):
            for absolute in (True, False):
                a = x.abs() if absolute else x
                ref = torch.topk(a, keep, dim=dim).values.narrow(dim, keep - 1, 1).squeeze(dim)
                got = topk_threshold(x, keep, dim=dim, absolute=absolute)
                assert got.dtype == dtype and torch.equal(got, ref), (dim, keep, absolute)
                assert torch.equal(got, torch.kthvalue(a, n - keep + 1, dim=dim).values)
                kd = topk_threshold(x, keep, dim=dim, keepdim=True, absolute=absolute)
                assert torch.equal(kd, ref.unsqueeze(dim))
                # by definition: at least ``keep`` entries are >= it, fewer than ``keep`` are > it
                assert bool(((a >= kd).sum(dim) >= keep).all()) and bool(((a > kd).sum(dim) < keep).all())
    # absolute is the default: the 2nd largest |x| of (-3, 1, 2) is 2, of x itself 1
    t = torch.tensor([-3.0, 1.0, 2.0])
    assert float(topk_threshold(t, 2)) == 2.0 and float(topk_threshold(t, 2, absolute=False)) == 1.0
    assert float(topk_threshold(torch.tensor([-2.0, 2.0, 1.0]), 2)) == 2.0  # a tie across signs


def test_topk_threshold_long_tied_rows_and_errors():
    from mergelib.selection import LONG_ROW, topk_threshold
    n = LONG_ROW + 4321  # the sampled-bracket path
    x = _tied((3, n), 32, levels=40)
    x[1, : n // 2] = 0.0  # a heavy tie at zero (a DARE-dropped task vector)
    x[2] = torch.randn(n, generator=torch.Generator().manual_seed(33))  # distinct values: rank errors show
    zeros = int((x[1] == 0).sum())
    # ranks inside the tie, on its last copy and just above it (keep = n - zeros + 1 / n - zeros)
    for keep in (1, 17, n // 3, n // 2 + 5, n - zeros + 1, n - zeros, n - 1):
        for absolute in (True, False):
            a = x.abs() if absolute else x
            ref = torch.topk(a, keep, dim=1).values[:, -1]
            assert torch.equal(topk_threshold(x, keep, absolute=absolute), ref), (keep, absolute)
    for bad in (0, 24, -1):
        with pytest.raises(ValueError, match=r"out of range \[1, 23\]"):
            topk_threshold(torch.ones(3, 23), bad)


# ----------------------------------------------------------------------------------------------
# Expert storage: save_expert / read_expert_file / load_expert
# ----------------------------------------------------------------------------------------------
def _odd_sparse_expert():
    g = torch.Generator().manual_seed(41)
    shapes = {"a.weight": (3, 5), "b.weight": (2, 300), "c.bias": (7,), "d.scalar": (), "e.conv": (2, 3, 4),
              "f.flat": (4, 70000)}
    layouts = {"f.flat": "flat"}
    dtypes = {"a.weight": torch.float16, "b.weight": torch.bfloat16, "c.bias": torch.float64,
              "d.scalar": torch.float32, "e.conv": torch.float32, "f.flat": torch.float32}
    kk = {"a.weight": 2, "b.weight": 5, "c.bias": 3, "d.scalar": 1, "e.conv": 0, "f.flat": 6}
    idx_dtypes = {"a.weight": torch.uint8, "b.weight": torch.int16, "c.bias": torch.uint8,
                  "d.scalar": torch.uint8, "e.conv": torch.uint8, "f.flat": torch.int32}
    values, indices = {}, {}
    for k, shape in shapes.items():
        rows, cols = (1, math.prod(shape)) if k in layouts else (math.prod(shape[:-1]), shape[-1] if shape else 1)
        idx = torch.stack([torch.randperm(cols, generator=g)[:kk[k]].sort().values for _ in range(rows)])
        indices[k] = idx.to(idx_dtypes[k])
        values[k] = torch.randn(rows, kk[k], generator=g, dtype=torch.float64).to(dtypes[k])
    # awkward bit patterns that a lossy or casting writer would change
    values["c.bias"][0, 0] = -0.0
    values["c.bias"][0, 1] = 5e-324  # float64 subnormal
    values["a.weight"][0, 1] = float("nan")
    values["a.weight"][1, 0] = float("-inf")
    values["b.weight"][1, 4] = 1e-40  # bf16 subnormal
    return SparseExpert(values, indices, shapes, mu=0.123456789, k=0.0625,
                        meta={"task": "SVHN", "nested": {"a": [1, 2.5, None]}}, layouts=layouts)


def test_storage_round_trip_is_bit_exact_for_sparse_and_low_rank(tmp_path):
    from mergelib.experts.storage import read_expert_file, save_expert
    e = _odd_sparse_expert()
    path = save_expert(e, tmp_path / "deep" / "er" / "e.safetensors")
    assert path == tmp_path / "deep" / "er" / "e.safetensors" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["e.safetensors"]
    state, config = read_expert_file(path)
    assert config == e.config() and set(state) == set(e.state_dict())
    assert all(same_bytes(state[k], v) for k, v in e.state_dict().items())
    back = load_expert(path)
    assert type(back) is SparseExpert and back.shapes == e.shapes and back.layouts == e.layouts
    assert (back.mu, back.k, back.meta) == (e.mu, e.k, e.meta)
    for k in e.keys:
        assert same_bytes(back.values[k], e.values[k]), k
        assert same_bytes(back.indices[k], e.indices[k]), k
    assert back.nbytes == e.nbytes
    for k, v in e.to_dense().items():  # NaN-aware: the dense tensors agree bit for bit too
        assert same_bytes(back.to_dense()[k], v)
    assert SparseExpert.load(path).config() == e.config()
    # a low-rank expert round-trips the same way, and saving again over a file replaces it
    g = torch.Generator().manual_seed(42)
    lr = LowRankExpert({"w": (torch.randn(6, 2, generator=g).to(torch.bfloat16),
                              torch.randn(2, 12, generator=g).to(torch.bfloat16)),
                        "v": (torch.randn(3, 1, generator=g, dtype=torch.float64),
                              torch.randn(1, 4, generator=g, dtype=torch.float64))},
                       {"w": (6, 3, 4), "v": (3, 4)}, meta={"loss_history": [1.5, 0.25], "ranks": {"w": 2}})
    save_expert(lr, path)
    back = load_expert(path)
    assert type(back) is LowRankExpert and back.config() == lr.config() and back.ranks == {"w": 2, "v": 1}
    assert all(same_bytes(back.state_dict()[k], v) for k, v in lr.state_dict().items())
    assert sorted(p.name for p in path.parent.iterdir()) == ["e.safetensors"]


def test_storage_errors_name_the_problem(tmp_path):
    import json

    from safetensors.torch import save_file

    from mergelib.experts import CorruptExpertError
    from mergelib.experts.storage import expert_checksum, read_expert_file
    e = extract_expert(_rand_sd(SHAPES, 43), 0.25, rescale=None)
    good = e.save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    with pytest.raises(FileNotFoundError, match="expert file not found: .*missing.safetensors"):
        load_expert(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="expert file not found"):
        load_expert(tmp_path)  # a folder is not a file
    # truncated (mid-data, mid-header, empty) and garbage files: unreadable, named with the path
    for name, data in {"half": raw[: len(raw) // 2], "last_byte": raw[:-1], "header": raw[:6], "empty": b"",
                       "text": b"this is not a safetensors file at all"}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(CorruptExpertError, match=rf"expert file .*{name}\.safetensors cannot be read"):
            load_expert(bad)
    # the config edited in place (mu 1.0 -> 7.0, still valid JSON of the same length): the checksum
    # covers the config too
    assert e.mu == 1.0 and raw.count(b'mu\\": 1.0') == 1
    (tmp_path / "cfg.safetensors").write_bytes(raw.replace(b'mu\\": 1.0', b'mu\\": 7.0'))
    with pytest.raises(CorruptExpertError, match="is damaged: SHA-256"):
        read_expert_file(tmp_path / "cfg.safetensors")
    # a safetensors file that is not an expert: wrong / no metadata key
    state = e.state_dict()
    save_file(state, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a mergelib expert file .*'mergelib_expert'"):
        load_expert(tmp_path / "plain.safetensors")
    save_file(state, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a mergelib expert file"):
        load_expert(tmp_path / "other.safetensors")
    # a consistent file (valid checksum) whose tensors lack a key the config names
    config_json = json.dumps(e.config())
    drop = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.bias::indices"}
    save_file(drop, tmp_path / "drop.safetensors",
              metadata={"mergelib_expert": config_json, "mergelib_sha256": expert_checksum(drop, config_json)})
    with pytest.raises(ValueError, match="sparse expert state is missing 'blocks.0.attn.qkv.bias::indices'"):
        load_expert(tmp_path / "drop.safetensors")
    # an unknown kind, and a tensor renamed after saving (the checksum covers names)
    cfg_x = json.dumps(dict(e.config(), kind="dense"))
    save_file(state, tmp_path / "kind.safetensors",
              metadata={"mergelib_expert": cfg_x, "mergelib_sha256": expert_checksum(state, cfg_x)})
    with pytest.raises(ValueError, match="unknown expert kind 'dense'"):
        load_expert(tmp_path / "kind.safetensors")
    renamed = {("x" + k if k.endswith("bias::values") else k): v for k, v in state.items()}
    save_file(renamed, tmp_path / "renamed.safetensors",
              metadata={"mergelib_expert": config_json, "mergelib_sha256": expert_checksum(state, config_json)})
    with pytest.raises(CorruptExpertError, match="is damaged"):
        load_expert(tmp_path / "renamed.safetensors")
    assert good.read_bytes() == raw  # reading never touched the good file


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import safetensors.torch as st

    from mergelib.experts.storage import save_expert
    e = extract_expert(_rand_sd(SHAPES, 44), 0.25, rescale=None)
    real_save = st.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)  # bytes reach the (temporary) file ...
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(st, "save_file", dies_half_way)
    target = tmp_path / "new" / "e.safetensors"
    with pytest.raises(OSError, match="No space left"):
        save_expert(e, target)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no partial file, no temporary
    # over an existing expert: the old file stays complete and loadable
    monkeypatch.setattr(st, "save_file", real_save)
    old = extract_expert(_rand_sd(SHAPES, 45), 0.5, rescale=None)
    save_expert(old, target)
    before = target.read_bytes()
    monkeypatch.setattr(st, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        e.save(target)
    assert target.read_bytes() == before and list(target.parent.iterdir()) == [target]
    assert all(torch.equal(load_expert(target).to_dense()[k], old.to_dense()[k]) for k in old.keys)
