"""Planted permutations are recovered exactly by every matching method, and merging a model with its
permuted copy returns the model (METHODS.md §8-§11, §13)."""
import copy

import pytest
import torch
from mergelib.align import (activation_matching, apply_permutation, invert_permutation, merge_aligned, mudsc,
                            permutation_spec, random_permutation, weight_matching, zip_features, zipit)
from mergelib.models import MLP
from test_align_spec import gen, make_resnet, make_vit


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(12, (24, 20), 4).eval()


def _data(shape, n_batches=3, batch=32, seed=7):
    g = gen(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.zeros(batch, dtype=torch.long)) for _ in range(n_batches)]


def _planted(model, seed=1):
    spec = permutation_spec(model)
    perm = random_permutation(spec, gen(seed))
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perm, model.state_dict()))
    return spec, perm, other


def _assert_recovers(found, planted):
    inverse = invert_permutation(planted)
    wrong = [g for g in planted if not torch.equal(found[g], inverse[g])]
    assert not wrong, f"groups not recovered: {wrong}"


def _assert_sd_equal(sd, ref, atol=1e-6):
    for k, v in ref.items():
        torch.testing.assert_close(sd[k].float(), v.float(), rtol=0, atol=atol, msg=k)


CASES = {"mlp": (_mlp, (12,)), "resnet20": (lambda seed=0: make_resnet(1, seed), (3, 8, 8))}


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vit"])
def test_weight_matching_recovers_planted_permutation(name):
    model = {"mlp": _mlp, "resnet20": lambda: make_resnet(2), "vit": make_vit}[name]()
    spec, perm, other = _planted(model)
    found = weight_matching(spec, model.state_dict(), other.state_dict(), seed=3)
    _assert_recovers(found, perm)
    _assert_sd_equal(merge_aligned(spec, model.state_dict(), other.state_dict(), found), model.state_dict())


def test_weight_matching_one_hidden_layer_converges_in_one_iteration(capsys):
    torch.manual_seed(0)
    model = MLP(10, (16,), 3)
    spec, perm, other = _planted(model)
    found = weight_matching(spec, model.state_dict(), other.state_dict(), progress=True)
    _assert_recovers(found, perm)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == ["0", "1"]  # one improving iteration, one that stops
    assert float(lines[1].split()[-1]) == 0.0


def test_weight_matching_include_stats_decides_whether_bn_statistics_count():
    model = make_resnet(1)
    spec, perm, other = _planted(model)
    sd_b = other.state_dict()
    g = gen(11)
    # B = P(A) in its weights, but with large unrelated running statistics
    noisy = {k: (1e4 * torch.rand(v.shape, generator=g) if k.endswith(("running_mean", "running_var")) else v)
             for k, v in sd_b.items()}
    _assert_recovers(weight_matching(spec, model.state_dict(), noisy, include_stats=False), perm)
    with_stats = weight_matching(spec, model.state_dict(), noisy, include_stats=True)
    inverse = invert_permutation(perm)
    assert any(not torch.equal(with_stats[k], inverse[k]) for k in inverse), "statistics should dominate the cost"
    # with consistent statistics both modes recover the planted permutation
    _assert_recovers(weight_matching(spec, model.state_dict(), sd_b, include_stats=False), perm)


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
@pytest.mark.parametrize("method", ["pearson", "cross"])
def test_activation_matching_recovers_planted_permutation(name, method):
    make, shape = CASES[name]
    model = make()
    spec, perm, other = _planted(model)
    found = activation_matching(model, other, _data(shape), method=method)
    _assert_recovers(found, perm)


def test_activation_matching_vit_heads_and_plain_batches():
    model = make_vit()
    spec, perm, other = _planted(model)
    batches = [x for x, _ in _data((3, 8, 8), n_batches=2)]  # plain tensors, not (x, y) tuples
    _assert_recovers(activation_matching(model, other, batches), perm)


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mudsc_align_recovers_planted_permutation(name, alpha):
    make, shape = CASES[name]
    model = make()
    spec, perm, other = _planted(model)
    res = mudsc(model, other, _data(shape), alpha=alpha, variant="align", reset_bn=False, max_iter=3)
    _assert_recovers(res.perm, perm)
    _assert_sd_equal(res.state_dict, model.state_dict())
    # matched units are exact copies in both spaces (similarity 1), except a unit that never fires
    # (random ResNet20 has one; Pearson correlation 0): the score is the mean over groups of the mean
    assert res.score == pytest.approx(1.0, abs=1e-6 if name == "mlp" else 2e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mudsc_group_align_recovers_vit_heads(alpha):
    model = make_vit()
    spec, perm, other = _planted(model)
    res = mudsc(model, other, _data((3, 8, 8), n_batches=2), alpha=alpha, max_iter=2)
    _assert_recovers(res.perm, perm)
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8, generator=gen(9))
        torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_mudsc_weight_only_differs_from_activation_only_on_unrelated_models():
    """alpha really mixes two different similarities: on two independent MLPs the matches differ."""
    a, b = _mlp(0), _mlp(1)
    data = _data((12,))
    p0 = mudsc(a, b, data, alpha=0.0).perm
    p1 = mudsc(a, b, data, alpha=1.0).perm
    wm = weight_matching(permutation_spec(a), a.state_dict(), b.state_dict())
    assert any(not torch.equal(p0[g], p1[g]) for g in p0)
    assert sum(int((p1[g] == wm[g]).sum()) for g in wm) > sum(int((p0[g] == wm[g]).sum()) for g in wm)


@pytest.mark.parametrize("variant", ["align", "zip"])
def test_mudsc_with_precomputed_moments_gives_the_same_result(variant):
    """Passing the pair's moments (collected once for several alphas) changes nothing; wrong moments raise."""
    from mergelib.align import collect_moments

    a, b = make_resnet(), make_resnet()
    with torch.no_grad():  # an unrelated second network
        for p in b.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen(5)))
    data = _data((3, 8, 8), n_batches=2)
    spec = permutation_spec(a)
    moments = collect_moments(a, b, spec, data)
    for alpha in (0.0, 0.5):
        plain = mudsc(a, b, data, alpha=alpha, variant=variant, spec=spec, max_iter=3)
        reused = mudsc(a, b, data, alpha=alpha, variant=variant, spec=spec, max_iter=3, moments=moments)
        assert plain.history == reused.history and plain.score == reused.score
        assert all(torch.equal(v, reused.state_dict[k]) for k, v in plain.state_dict.items())
    with pytest.raises(ValueError, match="moments cover groups"):
        mudsc(a, b, data, alpha=0.5, spec=spec, moments={g: moments[g] for g in list(moments)[1:]})


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_zipit_alpha0_beta0_pairs_every_unit_with_its_copy(name):
    make, shape = CASES[name]
    model = make()
    spec, perm, other = _planted(model)
    res = zipit(model, other, _data(shape), alpha=0.0, beta=0.0, reset_bn=False)
    inverse = invert_permutation(perm)
    for g, m in res.matches.items():
        n = spec.groups[g].size
        expected = torch.zeros(2 * n, n)
        expected[torch.arange(n), torch.arange(n)] = 0.5
        expected[n + inverse[g], torch.arange(n)] = 0.5
        assert torch.equal(m.merge, expected), g
    _assert_sd_equal(res.state_dict, model.state_dict())


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_zipit_merge_columns_sum_to_one_and_keep_n_features(name):
    make, shape = CASES[name]
    a, b = make(0), make(1)
    res = zipit(a, b, _data(shape), alpha=0.5, beta=1.0)
    spec = permutation_spec(a)
    within = 0
    for g, m in res.matches.items():
        n = spec.groups[g].size
        assert m.merge.shape == m.unmerge.shape == (2 * n, n)
        torch.testing.assert_close(m.merge.sum(0), torch.ones(n))
        assert torch.equal(m.unmerge.sum(1), torch.ones(2 * n))  # every unit belongs to one merged feature
        within += int(((m.unmerge[:n].sum(0) > 1) | (m.unmerge[n:].sum(0) > 1)).sum())
    assert within > 0  # beta = 1 allows same-model merges, and some happen on unrelated models
    x = _data(shape, n_batches=1)[0][0]
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()


def test_zip_features_hand_example():
    # units: A0 A1 | B0 B1; A0~B1 and A1~B0 are near-copies, A0~A1 is the best within-model pair
    S = torch.tensor([[1.0, 0.95, 0.1, 0.9],
                      [0.95, 1.0, 0.8, 0.2],
                      [0.1, 0.8, 1.0, 0.3],
                      [0.9, 0.2, 0.3, 1.0]])
    m, score = zip_features(S, alpha=0.0, beta=0.0)  # no within-model merges: A0+B1, A1+B0
    assert torch.equal(m.unmerge, torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]]))
    assert score == pytest.approx((0.9 + 0.8) / 2)
    m, score = zip_features(S, alpha=0.0, beta=1.0)  # budget floor(2/2 * 1) = 1: A0+A1 first, then B0+B1
    assert torch.equal(m.unmerge, torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    assert score == pytest.approx((0.95 + 0.3) / 2)


def _trunk_keys(res, stop):
    from mergelib.align.zipit import _steps
    steps, _ = _steps(res.model.trunk)
    names = [s[0] for s in steps]
    prefixes = tuple(p for _, ps, _ in steps[:names.index(stop) + 1] for p in ps)
    return {k for k in res.state_dict if k.startswith(prefixes)}


@pytest.mark.parametrize("name,stop", [("mlp", "layers.0"), ("resnet20", "layer2.1"), ("resnet20", "layer1.2")])
def test_partial_zip_returns_multi_head_model(name, stop):
    make, shape = CASES[name]
    model = make()
    spec, perm, other = _planted(model)
    data = _data(shape)
    res = zipit(model, other, data, alpha=0.0, beta=0.0, stop_node=stop, reset_bn=False)
    x = data[0][0]
    with torch.no_grad():
        out_a, out_b = res.model(x)
        ref = model(x)
    torch.testing.assert_close(out_a, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_b, ref, rtol=1e-4, atol=1e-5)
    if name == "resnet20":  # only groups that live in the trunk were zipped
        assert ("stream3" in res.matches) == stop.startswith("layer3")
        assert ("stream2" in res.matches) == (stop >= "layer2")
    # two unrelated models: the heads differ and BN reset runs on the multi-head model
    res2 = zipit(make(0), make(1), data, stop_node=stop)
    with torch.no_grad():
        out_a, out_b = res2.model(x)
    assert out_a.shape == out_b.shape == ref.shape and not torch.allclose(out_a, out_b)
    # past the stop node the state dict holds A's layers with real BN statistics (A's branch), not
    # reset ones (mean 0, var 1)
    branch_a = res2.model.branches[0].state_dict()
    post = [k for k in res2.state_dict if k.endswith("running_var") and k not in _trunk_keys(res2, stop)]
    if name == "resnet20":
        assert post
    for k in post:
        torch.testing.assert_close(res2.state_dict[k], branch_a[k])
        assert not torch.equal(res2.state_dict[k], torch.ones_like(res2.state_dict[k]))
    with pytest.raises(ValueError, match="stop_node 'nope' is not a node"):
        zipit(model, other, data, stop_node="nope")


def test_zipit_refuses_attention_heads():
    model = make_vit()
    with pytest.raises(NotImplementedError, match="head-aware groups"):
        zipit(model, model, _data((3, 8, 8), n_batches=1))


# ----------------------------------------------------------------------------------------------
# Direct tests of the building blocks: solve_lap, similarity_matrix, weight_similarity
# ----------------------------------------------------------------------------------------------
def _brute_force_lap(c):
    """Independent maximiser over all n! permutations: (best value, list of optimal permutations)."""
    import itertools
    n = c.shape[0]
    vals = {p: sum(float(c[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n))}
    best = max(vals.values())
    return best, [list(p) for p, v in vals.items() if v == best]


def _lap_value(c, p):
    return float(c.double()[torch.arange(c.shape[0]), p].sum())


def test_solve_lap_hand_3x3_maximises():
    from mergelib.align import solve_lap
    # by hand, sum_i C[i, p[i]] over the 6 permutations: [0,1,2] 6, [0,2,1] 11, [1,0,2] 5,
    # [1,2,0] 9, [2,0,1] 7, [2,1,0] 6 -> max 11 at [0, 2, 1] (the minimiser would be [1, 0, 2], 5)
    C = torch.tensor([[4.0, 1, 3], [2, 0, 5], [3, 2, 2]])
    p, value = solve_lap(C)
    assert p.dtype == torch.long and p.device.type == "cpu" and isinstance(value, float)
    assert p.tolist() == [0, 2, 1] and value == 11.0
    # the matrix is read in float64 whatever its dtype / device, and a graph is not a problem
    p2, v2 = solve_lap(C.to(torch.float16).requires_grad_())
    assert p2.tolist() == [0, 2, 1] and v2 == 11.0
    p3, v3 = solve_lap(-C)  # maximising -C minimises C
    assert p3.tolist() == [1, 0, 2] and v3 == -5.0


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_solve_lap_matches_brute_force_on_small_random_matrices(n):
    from mergelib.align import solve_lap
    for seed in range(3):
        C = torch.randn(n, n, generator=gen(100 + seed))
        p, value = solve_lap(C)
        best, optimal = _brute_force_lap(C.double())
        assert p.tolist() in optimal
        assert value == pytest.approx(best, abs=1e-12) and value == pytest.approx(_lap_value(C, p), abs=1e-12)


@pytest.mark.parametrize("n", [7, 20, 64, 200])
def test_solve_lap_matches_scipy_on_random_matrices(n):
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from mergelib.align import solve_lap
    C = torch.randn(n, n, generator=gen(n), dtype=torch.float64)
    p, value = solve_lap(C)
    assert sorted(p.tolist()) == list(range(n))  # a permutation
    rows, cols = linear_sum_assignment(C.numpy(), maximize=True)
    assert p.tolist() == cols.tolist()  # continuous random entries: the optimum is unique
    assert value == pytest.approx(float(C.numpy()[rows, cols].sum()), abs=1e-9)
    assert value == pytest.approx(_lap_value(C, p), abs=1e-9)
    # it is the maximum, not the minimum: strictly above the minimising assignment
    rmin, cmin = linear_sum_assignment(C.numpy(), maximize=False)
    assert value > float(C.numpy()[rmin, cmin].sum()) + 1e-6
    # no single swap of two assignments improves it (a necessary condition checked without scipy)
    c = C.numpy()
    pp = np.asarray(p)
    i, j = np.triu_indices(n, 1)
    gain = c[i, pp[j]] + c[j, pp[i]] - c[i, pp[i]] - c[j, pp[j]]
    assert gain.size == 0 or gain.max() <= 1e-9


@pytest.mark.parametrize("n", [1, 3, 5, 32])
def test_solve_lap_ties_every_permutation_optimal(n):
    from mergelib.align import solve_lap
    C = torch.full((n, n), 0.75)
    p, value = solve_lap(C)
    assert sorted(p.tolist()) == list(range(n)) and value == pytest.approx(0.75 * n)
    # partial ties: two identical rows - either order of their columns is optimal, the value is fixed
    D = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    q, v = solve_lap(D)
    best, optimal = _brute_force_lap(D.double())
    assert q.tolist() in optimal and v == best == 6.0 and len(optimal) == 2


def test_solve_lap_rejects_bad_input():
    from mergelib.align import solve_lap
    with pytest.raises(ValueError, match=r"square matrix, got shape \(3, 4\)"):
        solve_lap(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"square matrix, got shape \(3,\)"):
        solve_lap(torch.zeros(3))
    with pytest.raises(ValueError, match=r"square matrix, got shape \(2, 2, 2\)"):
        solve_lap(torch.zeros(2, 2, 2))
    for bad in (float("nan"), float("inf"), float("-inf")):
        C = torch.eye(3)
        C[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            solve_lap(C)


def _moments(za, zb):
    from mergelib.align.features import GroupMoments
    m = GroupMoments(za.shape[1], torch.device("cpu"))
    m.update(za, zb)
    return m


def test_similarity_matrix_pearson_and_cross_by_hand():
    import numpy as np
    from mergelib.align import similarity_matrix
    # A0 = (1, 2, 3), A1 = (1, 0, 2); B0 = 2*A0 (corr 1 with A0), B1 = reversed A0 (corr -1 with A0)
    za = torch.tensor([[1.0, 1.0], [2.0, 0.0], [3.0, 2.0]])
    zb = torch.tensor([[2.0, 3.0], [4.0, 2.0], [6.0, 1.0]])
    S = similarity_matrix([_moments(za, zb)])
    assert S.shape == (4, 4) and S.dtype == torch.float64 and S.device.type == "cpu"
    # hand: A1 centred (0, -1, 1), A0 centred (-1, 0, 1) -> corr = 1 / (sqrt 2 sqrt 2) = 0.5
    hand = {(0, 0): 1.0, (0, 2): 1.0, (0, 3): -1.0, (2, 3): -1.0, (0, 1): 0.5, (1, 2): 0.5, (1, 3): -0.5}
    for (i, j), v in hand.items():
        assert float(S[i, j]) == pytest.approx(v, abs=1e-12) and float(S[j, i]) == pytest.approx(v, abs=1e-12)
    z = torch.cat([za, zb], 1).double()
    np.testing.assert_allclose(S.numpy(), np.corrcoef(z.numpy().T), atol=1e-12)
    # cross: E[z z^T] = z^T z / count; e.g. E[A0 B0] = (2 + 8 + 18) / 3
    X = similarity_matrix([_moments(za, zb)], method="cross")
    assert float(X[0, 2]) == pytest.approx(28 / 3, abs=1e-12)
    torch.testing.assert_close(X, z.T @ z / 3, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="method must be 'pearson' or 'cross', got 'cosine'"):
        similarity_matrix([_moments(za, zb)], method="cosine")


def test_similarity_matrix_batches_sites_and_unit_permutations():
    import numpy as np
    from mergelib.align import similarity_matrix
    from mergelib.align.features import GroupMoments
    g = gen(21)
    n = 3
    mix = torch.randn(2 * n, 2 * n, generator=g)
    z1 = torch.randn(50, 2 * n, generator=g) @ mix + 0.3  # correlated units, nonzero mean
    z2 = torch.randn(40, 2 * n, generator=g) @ mix.T - 1.0
    ref1, ref2 = np.corrcoef(z1.double().numpy().T), np.corrcoef(z2.double().numpy().T)
    # several batches accumulate like one: the moments of the concatenation
    m = GroupMoments(n, torch.device("cpu"))
    for chunk in z1.split(7):
        m.update(chunk[:, :n], chunk[:, n:])
    np.testing.assert_allclose(similarity_matrix([m]).numpy(), ref1, atol=1e-10)
    # several observation sites: the mean of the per-site matrices (each site normalised on its own)
    s12 = similarity_matrix([_moments(z1[:, :n], z1[:, n:]), _moments(z2[:, :n], z2[:, n:])])
    np.testing.assert_allclose(s12.numpy(), (ref1 + ref2) / 2, atol=1e-10)
    x12 = similarity_matrix([_moments(z1[:, :n], z1[:, n:]), _moments(z2[:, :n], z2[:, n:])], method="cross")
    z1d, z2d = z1.double(), z2.double()
    torch.testing.assert_close(x12, (z1d.T @ z1d / 50 + z2d.T @ z2d / 40) / 2, rtol=0, atol=1e-10)
    # permuting the units of A and of B permutes rows and columns the same way
    pa, pb = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    full = torch.cat([pa, n + pb])
    for method in ("pearson", "cross"):
        S = similarity_matrix([_moments(z1[:, :n], z1[:, n:])], method)
        Sp = similarity_matrix([_moments(z1[:, :n][:, pa], z1[:, n:][:, pb])], method)
        torch.testing.assert_close(Sp, S[full][:, full], rtol=0, atol=1e-12)
        torch.testing.assert_close(S, S.T, rtol=0, atol=1e-12)  # symmetric
    # Pearson is invariant to a positive affine change of one unit
    za2 = z1[:, :n].clone()
    za2[:, 1] = 4.0 * za2[:, 1] + 7.0
    np.testing.assert_allclose(similarity_matrix([_moments(za2, z1[:, n:])]).numpy(), ref1, atol=1e-9)


def _tiny_mlp_pair(hidden=(3,), seed=0):
    torch.manual_seed(seed)
    a = MLP(4, hidden, 2)
    b = MLP(4, hidden, 2)
    return a, b


def test_weight_similarity_one_layer_by_hand():
    import numpy as np
    from mergelib.align import weight_similarity
    a, b = _tiny_mlp_pair()
    spec = permutation_spec(a)
    sd_a, sd_b = a.state_dict(), b.state_dict()

    def vecs(sd):  # unit j: its row of layers.0.weight, its bias and its input column of head.weight
        return torch.cat([sd["layers.0.weight"], sd["layers.0.bias"][:, None], sd["head.weight"].T], 1).double()

    V = torch.cat([vecs(sd_a), vecs(sd_b)]).numpy()  # (6, 4 + 1 + 2)
    ident = {"layers.0": torch.arange(3)}
    S = weight_similarity(spec, "layers.0", sd_a, sd_b, ident)
    assert S.shape == (6, 6) and S.dtype == torch.float64
    np.testing.assert_allclose(S.numpy(), np.corrcoef(V), atol=1e-6)  # Pearson of the unit vectors
    Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
    np.testing.assert_allclose(weight_similarity(spec, "layers.0", sd_a, sd_b, ident, measure="cosine").numpy(),
                               Vn @ Vn.T, atol=1e-6)
    cross = weight_similarity(spec, "layers.0", sd_a, sd_b, ident, cross_only=True)
    assert cross.shape == (3, 3)
    np.testing.assert_allclose(cross.numpy(), np.corrcoef(V)[:3, 3:], atol=1e-6)
    # the group's own entry in ``matches`` is ignored
    other = weight_similarity(spec, "layers.0", sd_a, sd_b, {"layers.0": torch.tensor([2, 0, 1])})
    torch.testing.assert_close(other, S, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight similarity must be 'pearson' or 'cosine', got 'l2'"):
        weight_similarity(spec, "layers.0", sd_a, sd_b, ident, measure="l2")


def test_weight_similarity_maps_neighbours_through_their_matches():
    from mergelib.align import ZipMatch, weight_similarity
    model = MLP(5, (6, 4), 3)
    torch.manual_seed(3)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    spec = permutation_spec(model)
    planted = random_permutation(spec, gen(4))
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, planted, sd_a)  # B's unit j = A's unit planted[j]
    found = invert_permutation(planted)  # what a matcher returns: applied to B it gives A
    g = "layers.1"  # its unit vectors read layers.0's axis of layers.1.weight: mapped by matches["layers.0"]
    S = weight_similarity(spec, g, sd_a, sd_b, {"layers.0": found["layers.0"]}, cross_only=True)
    # the group's own entry in ``matches`` is ignored
    own = weight_similarity(spec, g, sd_a, sd_b, dict(found, **{g: torch.arange(4).flip(0)}), cross_only=True)
    torch.testing.assert_close(own, S, rtol=0, atol=0)
    n = spec.groups[g].size
    copies = S[planted[g], torch.arange(n)]  # A's unit planted[j] and B's unit j are exact copies
    torch.testing.assert_close(copies, torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(S.argmax(0), planted[g])
    off = S.clone()
    off[planted[g], torch.arange(n)] = -2.0
    assert off.max() < 1 - 1e-3  # no other pair of units is identical
    # with the wrong neighbour match the copies are no longer identical vectors
    wrong = weight_similarity(spec, g, sd_a, sd_b, {"layers.0": torch.arange(6)}, cross_only=True)
    assert max(float(wrong[int(planted[g][j]), j]) for j in range(n)) < 1 - 1e-3
    # zip form: the 0/1 membership of ZipMatch.from_permutation gives the same matrix
    zm = {k: ZipMatch.from_permutation(v) for k, v in found.items()}
    Sz = weight_similarity(spec, g, sd_a, sd_b, zm, cross_only=True)
    torch.testing.assert_close(Sz, S, rtol=0, atol=1e-6)
