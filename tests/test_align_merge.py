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
