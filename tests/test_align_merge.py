"""BatchNorm reset, REPAIR, interpolation/barrier and the MuDSC zip variant (METHODS.md §9, §12, §13)."""
import copy

import pytest
import torch
from torch import nn

from mergelib.align import (apply_permutation, barrier, channel_stats, interpolate, merge_aligned, mudsc,
                            permutation_spec, random_permutation, repair, reset_bn_stats, weight_matching)
from mergelib.models import MLP
from test_align_spec import gen, make_resnet


def _batches(shape, n=4, batch=16, seed=11):
    g = gen(seed)
    return [(torch.randn(batch, *shape, generator=g) * 1.5 + 0.2, torch.zeros(batch)) for _ in range(n)]


def test_reset_bn_stats_matches_an_independent_estimate():
    model = make_resnet(1)
    data = _batches((3, 8, 8))
    # independent estimate: in train mode every BN normalises with batch statistics, so its inputs do
    # not depend on running statistics; record them and average the per-batch mean / unbiased var.
    ref = copy.deepcopy(model).train()
    inputs: dict[str, list] = {}
    bns = {n: m for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook((lambda n: lambda mod, inp: inputs.setdefault(n, []).append(inp[0]))(n))
             for n, m in bns.items()]
    with torch.no_grad():
        for x, _ in data[:3]:
            ref(x)
    for h in hooks:
        h.remove()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = {}  # momenta other than the default (some None) on the model that is reset: each restored as it was
    for i, (n, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)):
        m.momentum = momenta[n] = 0.05 * (i + 1) if i % 3 else None
    assert set(momenta) == set(bns) and len(momenta) > 3
    reset_bn_stats(model, data, num_batches=3)
    assert not model.training and all(not m.training for m in model.modules())
    sd = model.state_dict()
    for name, xs in inputs.items():
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(sd[f"{name}.running_mean"], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sd[f"{name}.running_var"], var, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(before[f"{name}.running_var"], var)
        assert dict(model.named_modules())[name].momentum == momenta[name], name
    for k in sd:  # weights are untouched
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(sd[k], before[k])


def test_reset_bn_stats_restores_train_mode():
    model = make_resnet(1).train()
    model.layer1.eval()  # mixed modes are restored per module
    reset_bn_stats(model, [x for x, _ in _batches((3, 8, 8), n=1)])
    assert model.training and not model.layer1.training and model.layer2.training


def _mlp(seed):
    torch.manual_seed(seed)
    return MLP(10, (32, 32), 4).eval()


def test_repair_identical_endpoints_is_a_no_op():
    model = _mlp(0)
    merged = copy.deepcopy(model)
    repair(model, copy.deepcopy(model), merged, _batches((10,)), alpha=0.5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=0, atol=1e-4)


def test_repair_restores_interpolated_unit_statistics():
    a, b = _mlp(0), _mlp(1)
    spec = permutation_spec(a)
    sd_b = apply_permutation(spec, weight_matching(spec, a.state_dict(), b.state_dict()), b.state_dict())
    b_aligned = copy.deepcopy(b)
    b_aligned.load_state_dict(sd_b)
    merged = copy.deepcopy(a)
    merged.load_state_dict(merge_aligned(spec, a.state_dict(), sd_b, alpha=0.3))
    data = _batches((10,))
    layers = ["layers.0", "layers.1"]
    before = channel_stats(merged, layers, data)
    repair(a, b_aligned, merged, data, alpha=0.3)
    sa, sb, after = (channel_stats(m, layers, data) for m in (a, b_aligned, merged))
    for name in layers:
        mu = 0.7 * sa[name][0] + 0.3 * sb[name][0]
        sd = 0.7 * (sa[name][1] + 1e-5).sqrt() + 0.3 * (sb[name][1] + 1e-5).sqrt()
        torch.testing.assert_close(after[name][0], mu, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close((after[name][1] + 1e-5).sqrt(), sd, rtol=1e-4, atol=1e-4)
        assert (before[name][1].sqrt() - sd).abs().max() > 1e-2  # averaging had changed them


def test_repair_refuses_batchnorm_networks():
    m = make_resnet(1)
    with pytest.raises(ValueError, match="use reset_bn_stats"):
        repair(m, m, m, _batches((3, 8, 8), n=1))


def test_interpolate_endpoints_midpoint_and_errors():
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) for k in a)
    torch.testing.assert_close(interpolate(a, b, 1.0), dict(b))
    mid = interpolate(a, b, 0.5)
    torch.testing.assert_close(mid["layers.0.weight"], (a["layers.0.weight"] + b["layers.0.weight"]) / 2)
    with pytest.raises(KeyError, match="only in B"):
        interpolate(a, {**b, "extra": torch.zeros(1)}, 0.5)


def test_barrier_on_a_known_path():
    """Along the path head.bias[0] = 2 alpha - 1: loss = 1 - bias^2 peaks at 1 in the middle."""
    a, b = _mlp(0).state_dict(), dict(_mlp(0).state_dict())
    a = {**a, "head.bias": torch.tensor([-1.0, 0, 0, 0])}
    b["head.bias"] = torch.tensor([1.0, 0, 0, 0])

    def eval_fn(model):
        v = float(model.head.bias[0])
        return {"loss": 1 - v * v, "acc": v * v}

    out = barrier(lambda: MLP(10, (32, 32), 4), a, b, eval_fn, alphas=[0, 0.25, 0.5, 0.75, 1])
    assert out["alphas"] == [0, 0.25, 0.5, 0.75, 1]
    assert out["loss"] == pytest.approx([0, 0.75, 1, 0.75, 0])
    assert out["loss_barrier"] == pytest.approx(1.0)
    assert out["acc_barrier"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="endpoints"):
        barrier(lambda: MLP(10, (32, 32), 4), a, b, eval_fn, alphas=[0.5])


def test_mudsc_zip_variant_planted_and_unrelated():
    model = make_resnet(1)
    spec = permutation_spec(model)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, random_permutation(spec, gen(1)), model.state_dict()))
    data = _batches((3, 8, 8), n=2)
    res = mudsc(model, other, data, alpha=0.5, variant="zip", zip_alpha=0.0, zip_beta=0.0, max_iter=2,
                reset_bn=False)
    assert res.perm is None
    for k, v in model.state_dict().items():
        torch.testing.assert_close(res.state_dict[k].float(), v.float(), rtol=0, atol=1e-6, msg=k)
    res = mudsc(make_resnet(1, 0), make_resnet(1, 1), data, alpha=0.5, variant="zip", max_iter=2)
    for g, m in res.matches.items():
        torch.testing.assert_close(m.merge.sum(0), torch.ones(spec.groups[g].size))
    assert len(res.history) == 2
    with pytest.raises(ValueError, match="variant must be"):
        mudsc(model, other, data, variant="zipit")


def _int_mlp(weights):
    """MLP(3, (2,), 2) with the given small integer weights (exact in float32)."""
    m = MLP(3, (2,), 2)
    m.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()})
    return m


def test_zip_merge_state_dicts_hand_example():
    from mergelib.align import ZipMatch, zip_merge_state_dicts
    a = _int_mlp({"layers.0.weight": [[1, 2, 3], [4, 5, 6]], "layers.0.bias": [1, 2],
                  "head.weight": [[1, 2], [3, 4]], "head.bias": [10, 20]})
    b = _int_mlp({"layers.0.weight": [[7, 8, 9], [10, 11, 12]], "layers.0.bias": [3, 4],
                  "head.weight": [[5, 6], [7, 8]], "head.bias": [30, 50]})
    spec = permutation_spec(a)
    # units [A0, A1, B0, B1]; merged feature 0 = {A0, A1, B1} (a within-model merge too), 1 = {B0}
    m = ZipMatch.from_clusters([[0, 1, 3], [2]], 4)
    # the documented matrices, written out: merge = 1/|cluster| on constituents, unmerge = 0/1
    t = 1 / 3
    assert torch.allclose(m.merge, torch.tensor([[t, 0], [t, 0], [0, 1], [t, 0]]))
    assert torch.equal(m.unmerge, torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0]]))
    out = zip_merge_state_dicts(spec, a.state_dict(), b.state_dict(), {"layers.0": m})
    # layers.0 ("out" axis 0): W* = M_A W_A + M_B W_B: row 0 = (A0 + A1 + B1) / 3, row 1 = B0
    w0 = torch.tensor([[(1 + 4 + 10) / 3, (2 + 5 + 11) / 3, (3 + 6 + 12) / 3], [7.0, 8, 9]])
    torch.testing.assert_close(out["layers.0.weight"], w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["layers.0.bias"], torch.tensor([(1 + 2 + 4) / 3, 3.0]), rtol=0, atol=1e-6)
    # head ("in" axis 1, no grouped out axis): 1/2 (H_A U_A + H_B U_B), U_A = [[1,0],[1,0]], U_B = [[0,1],[1,0]]
    # column 0 = (HA[:,0] + HA[:,1] + HB[:,1]) / 2, column 1 = HB[:,0] / 2
    torch.testing.assert_close(out["head.weight"], torch.tensor([[(1 + 2 + 6) / 2, 5 / 2], [(3 + 4 + 8) / 2, 7 / 2]]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out["head.bias"], torch.tensor([20.0, 35.0]), rtol=0, atol=0)  # plain average
    assert set(out) == set(a.state_dict()) and all(v.dtype == torch.float32 for v in out.values())
    # ``keys``: only those are merged, the rest is A's (cloned, not aliased)
    part = zip_merge_state_dicts(spec, a.state_dict(), b.state_dict(), {"layers.0": m}, keys=["head.bias"])
    assert torch.equal(part["head.bias"], out["head.bias"])
    assert torch.equal(part["layers.0.weight"], a.state_dict()["layers.0.weight"])
    assert part["layers.0.weight"].data_ptr() != a.state_dict()["layers.0.weight"].data_ptr()
    # non-float tensors come from A
    sd_a, sd_b = dict(a.state_dict(), step=torch.tensor(5)), dict(b.state_dict(), step=torch.tensor(9))
    assert int(zip_merge_state_dicts(spec, sd_a, sd_b, {"layers.0": m})["step"]) == 5


def test_zip_merge_state_dicts_two_layers_matrix_formula():
    from mergelib.align import ZipMatch, zip_merge_state_dicts
    g = gen(5)
    a, b = MLP(4, (4, 4), 3), MLP(4, (4, 4), 3)
    for model in (a, b):
        for p in model.parameters():
            p.data = torch.randn(p.shape, generator=g)
    spec = permutation_spec(a)
    m0 = ZipMatch.from_clusters([[0, 5], [1, 2], [3, 7], [4, 6]], 8)
    m1 = ZipMatch.from_clusters([[0, 4, 5], [1], [2, 7], [3, 6]], 8)
    out = zip_merge_state_dicts(spec, a.state_dict(), b.state_dict(), {"layers.0": m0, "layers.1": m1})

    def MU(m):  # M^(i) (merged, n_i) and U^(i) (n_i, merged) from the (2n, n) matrices, by their definition
        return [m.merge[i * 4:(i + 1) * 4].T for i in (0, 1)], [m.unmerge[i * 4:(i + 1) * 4] for i in (0, 1)]

    (M0, U0), (M1, U1) = MU(m0), MU(m1)
    sds = (a.state_dict(), b.state_dict())
    exp = {
        "layers.0.weight": sum(M0[i] @ sds[i]["layers.0.weight"] for i in (0, 1)),
        "layers.0.bias": sum(M0[i] @ sds[i]["layers.0.bias"] for i in (0, 1)),
        "layers.1.weight": sum(M1[i] @ sds[i]["layers.1.weight"] @ U0[i] for i in (0, 1)),
        "layers.1.bias": sum(M1[i] @ sds[i]["layers.1.bias"] for i in (0, 1)),
        "head.weight": sum(sds[i]["head.weight"] @ U1[i] for i in (0, 1)) / 2,
        "head.bias": (sds[0]["head.bias"] + sds[1]["head.bias"]) / 2,
    }
    assert set(out) == set(exp)
    for k, v in exp.items():
        torch.testing.assert_close(out[k], v, rtol=1e-6, atol=1e-6, msg=k)
    # the permutation special case: B = permuted A, matched by the inverse permutation -> A back
    planted = random_permutation(spec, gen(6))
    sd_b = apply_permutation(spec, planted, a.state_dict())
    zm = {k: ZipMatch.from_permutation(torch.argsort(p)) for k, p in planted.items()}
    back = zip_merge_state_dicts(spec, a.state_dict(), sd_b, zm)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=1e-6, msg=k)
    with pytest.raises(KeyError, match="missing from the state dict"):
        zip_merge_state_dicts(spec, {k: v for k, v in a.state_dict().items() if k != "head.bias"}, sd_b, zm)
