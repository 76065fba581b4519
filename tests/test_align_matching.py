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
