"""merge() over state dicts (mergelib.merging)."""
import math

import pytest
import torch

from mergelib.competition import dare_seed, pcb_merge
from mergelib.hparams import HyperparameterError
from mergelib.merging import METHODS, REGISTRY, merge
from mergelib.models import ViT
from mergelib.task_vectors import NonFiniteError, StateDictKeyError, StateDictShapeError, flatten


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    pre = ViT(dim=32, depth=2, heads=2).state_dict()
    fts = []
    for s in range(3):
        g = torch.Generator().manual_seed(s + 1)
        fts.append({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.items()})
    return pre, fts


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def test_every_method_runs_and_keeps_unselected_keys(vit):
    pre, fts = vit
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [pre] + fts]
    for method in METHODS:
        out = merge(pre, fts, method, exclude=r"norm")
        assert set(out) == set(pre)
        for k, v in out.items():
            assert v.dtype == pre[k].dtype and v.shape == pre[k].shape and torch.isfinite(v).all()
            if "norm" in k:
                assert v is pre[k], (method, k)
        moved = sum(float((out[k] - pre[k]).abs().sum()) for k in pre)
        assert moved > 0, method
    fr = merge(pre, fts, "fr")  # FR on a ViT: only attn/mlp keys take part (FREE rule)
    assert all(fr[k] is pre[k] for k in pre if ".attn." not in k and ".mlp." not in k)
    assert not torch.equal(fr["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])
    for sd, snap in zip([pre] + fts, snapshot):  # inputs never mutated
        assert all(torch.equal(sd[k], snap[k]) for k in sd)


def test_single_task_scale_one_returns_finetuned(vit):
    pre, fts = vit
    for method, hp in [("task_arithmetic", {}), ("ties", {"density": 1.0}), ("dare_ta", {"p": 0.0}),
                       ("dare_ties", {"p": 0.0}), ("fr", {"ratio": 10.0, "align": "none"})]:
        out = merge(pre, fts[:1], method, scale=1.0, rules=None, **hp)
        for k in pre:
            _close(out[k], fts[0][k])


def test_identical_models_merge_to_themselves(vit):
    pre, fts = vit
    same = [fts[0]] * 3
    for method, scale, hp in [("average", None, {}), ("task_arithmetic", 1 / 3, {}),
                              ("ties", 1.0, {"density": 1.0}), ("fr", 1 / 3, {"ratio": 10.0})]:
        out = merge(pre, same, method, scale=scale, rules=None, **hp)
        for k in pre:
            _close(out[k], fts[0][k])
    # PCB gives tau' = sign(tau) * clamp(|tau|, lo, hi), lo and hi the order statistics of |tau| over the whole
    # model at 0-based ranks int(D * 1e-4) and int(D * (1 - 1e-4) - 1). At density 1, q is beta's minimum, so
    # the entry where beta is smallest (the smallest |tau|) gets weight 0 and stays theta_0, off by |tau| <= lo.
    # Here D = 29152 and lo ~ 5e-7: only the 3 entries clipped at the top (|tau| > hi) differ from the
    # fine-tuned model by 1e-6 or more, each by |tau| - hi.
    out = merge(pre, same, "pcb", scale=1.0, rules=None, density=1.0)
    keys = sorted(pre)
    a = torch.cat([(fts[0][k] - pre[k]).reshape(-1) for k in keys]).abs()
    D = a.numel()
    lo, hi = a.kthvalue(int(D * 1e-4) + 1).values, a.kthvalue(int(D * (1 - 1e-4) - 1) + 1).values
    assert lo < 1e-6
    off, differ = 0, 0
    for k in keys:
        tau = fts[0][k] - pre[k]
        ak = a[off:off + tau.numel()].view_as(tau)
        off += tau.numel()
        _close(out[k], pre[k] + torch.sign(tau) * ak.clamp(lo, hi))  # everywhere, to 1e-6
        d = (out[k] - fts[0][k]).abs()
        big = d >= 1e-6
        assert (ak[big] > hi).all() and (d[big] <= ak[big] - hi + 1e-6).all(), k
        differ += int(big.sum())
    assert differ == D - (int(D * (1 - 1e-4) - 1) + 1) == 3  # the entries above hi, and no other


def test_average_equals_task_arithmetic_and_lambda_zero(vit):
    pre, fts = vit
    avg = merge(pre, fts, "average")
    ta = merge(pre, fts, "task_arithmetic", scale=1 / 3)
    mean = {k: sum(f[k] for f in fts) / 3 for k in pre}
    for k in pre:
        _close(avg[k], ta[k])
        _close(avg[k], mean[k])
    zero = merge(pre, fts, "ties", scale=0.0)
    assert all(torch.equal(zero[k], pre[k]) for k in pre)


def test_per_task_scales(vit):
    pre, fts = vit
    lams = [0.1, 0.5, -0.2]
    out = merge(pre, fts, "task_arithmetic", scale=lams)
    k = "blocks.1.mlp.fc2.weight"
    _close(out[k], pre[k] + sum(l * (f[k] - pre[k]) for l, f in zip(lams, fts)))
    pcb = merge(pre, fts, "pcb", scale=[0.9, 1.1, 1.2], density=0.1)
    x, layout = flatten(fts, sorted(pre), subtract=pre)
    ref = pcb_merge(x, 0.1, lambdas=[0.9, 1.1, 1.2])
    _close(pcb[k], pre[k] + ref[layout.segment(k)].view_as(pre[k]))
    with pytest.raises(ValueError, match="scale for method 'ties'"):
        merge(pre, fts, "ties", scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale has 2 per-task values for 3"):
        merge(pre, fts, "task_arithmetic", scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="scale must be None for method 'average'"):
        merge(pre, fts, "average", scale=0.5)


def test_ties_by_hand_through_merge():
    pre = {"w": torch.zeros(2), "n": torch.ones(1)}
    fts = [{"w": torch.tensor([3.0, 1.0]), "n": torch.ones(1) * 2},
           {"w": torch.tensor([-1.0, 1.0]), "n": torch.ones(1) * 3},
           {"w": torch.tensor([-1.0, -4.0]), "n": torch.ones(1) * 4}]
    out = merge(pre, fts, "ties", density=1.0, scale=1.0, include="^w$")
    assert out["w"].tolist() == [3.0, -4.0] and out["n"] is pre["n"]


def test_dare_is_seeded_by_task_name_not_order(vit):
    pre, fts = vit
    a = merge(pre, {"a": fts[0], "b": fts[1]}, "dare_ta", p=0.5, seed=1)
    b = merge(pre, {"b": fts[1], "a": fts[0]}, "dare_ta", p=0.5, seed=1)
    c = merge(pre, {"a": fts[0], "b": fts[1]}, "dare_ta", p=0.5, seed=2)
    k = "blocks.0.attn.qkv.weight"
    _close(a[k], b[k])
    assert not torch.allclose(a[k], c[k])


def _dare_reference(pre, ft, task, p, seed):
    """DARE of one fine-tuned model, from its documented definition (competition.dare, dare_seed):
    tensor k keeps the entries where u >= p, u = torch.rand(numel) of a CPU generator seeded
    dare_seed(seed, task, k); kept entries are rescaled by 1 / (1 - p). Returns {key: flat delta}."""
    out = {}
    for k in sorted(pre):
        g = torch.Generator().manual_seed(dare_seed(seed, task, k))
        keep = torch.rand(pre[k].numel(), generator=g) >= p
        tau = (ft[k] - pre[k]).reshape(-1)
        out[k] = torch.where(keep, tau / (1 - p), torch.zeros_like(tau))
    return out


@pytest.mark.parametrize("method", [m for m in ("dare_ta", "dare_ties") if m in REGISTRY])
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_one_task_drops_or_rescales_every_entry(vit, method, p):
    """One fine-tuned model, lambda = 1 (dare_ties: density 1, so TIES keeps the single task as it is):
    every merged entry is either theta_0 exactly (dropped) or theta_0 + tau / (1 - p) (kept and
    rescaled), the kept entries are those of DARE's seeded mask, and about 1 - p of them are kept."""
    pre, fts = vit
    out = merge(pre, {"cars": fts[0]}, method, scale=1.0, rules=None, p=p, seed=5)
    ref = _dare_reference(pre, fts[0], "cars", p, seed=5)
    kept = total = 0
    for k in pre:
        o, base = out[k].reshape(-1), pre[k].reshape(-1)
        tau = (fts[0][k] - pre[k]).reshape(-1)
        dropped = o == base
        rescaled = base + tau / (1 - p)
        assert not torch.equal(rescaled[tau != 0], fts[0][k].reshape(-1)[tau != 0]), k  # the rescale shows
        torch.testing.assert_close(o[~dropped], rescaled[~dropped], rtol=1e-6, atol=1e-7, msg=k)
        assert torch.equal(~dropped, (ref[k] != 0) & (tau != 0)), k  # DARE's mask, entry for entry
        kept += int((~dropped).sum())
        total += o.numel()
    sigma = math.sqrt(total * p * (1 - p))  # binomial: 29152 entries
    assert abs(kept - total * (1 - p)) < 5 * sigma, (kept, total)


def test_dare_two_tasks_equal_their_reference(vit):
    """Two named tasks: dare_ta with per-task lambdas is sum_i lambda_i DARE(tau_i), each task masked
    by its own name; dare_ties (density 1) is the TIES disjoint mean of the two DARE'd task vectors
    (sign of the sum, zero sums taking the majority sign; the agreeing nonzero entries averaged),
    computed here by hand over the whole model."""
    pre, fts = vit
    named = {"mnist": fts[1], "svhn": fts[2]}
    p, seed, lams = 0.6, 2, [0.5, -1.5]
    refs = [_dare_reference(pre, ft, name, p, seed) for name, ft in named.items()]
    ta = merge(pre, named, "dare_ta", scale=lams, rules=None, p=p, seed=seed)
    for k in pre:
        want = pre[k] + (lams[0] * refs[0][k] + lams[1] * refs[1][k]).view_as(pre[k])
        _close(ta[k], want)
    if "dare_ties" not in REGISTRY:
        return
    keys = sorted(pre)
    d = torch.stack([torch.cat([r[k] for k in keys]) for r in refs])  # 2 x D
    gamma = torch.sign(d.sum(0))
    gamma[gamma == 0] = torch.sign(gamma.sum())
    agree = (torch.sign(d) == gamma) & (d != 0)
    tau_m = (d * agree).sum(0) / agree.sum(0).clamp_min(1)
    assert (agree.sum(0) == 1).any() and (agree.sum(0) == 2).any()  # both cases occur
    ties = merge(pre, named, "dare_ties", scale=1.0, rules=None, p=p, seed=seed)
    off = 0
    for k in keys:
        n = pre[k].numel()
        _close(ties[k], pre[k] + tau_m[off:off + n].view_as(pre[k]))
        off += n


def test_low_precision_models_keep_dtype(vit):
    pre, fts = vit
    pre16 = {k: v.to(torch.bfloat16) for k, v in pre.items()}
    fts16 = [{k: v.to(torch.bfloat16) for k, v in f.items()} for f in fts]
    out = merge(pre16, fts16, "ties")
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    ref = merge({k: v.float() for k, v in pre16.items()}, [{k: v.float() for k, v in f.items()} for f in fts16],
                "ties")
    k = "blocks.0.mlp.fc1.weight"
    assert torch.equal(out[k], ref[k].to(torch.bfloat16))  # computed in float32, cast once


def test_errors_name_the_parameter(vit):
    pre, fts = vit
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        merge(pre, fts, "magic")
    for hp, msg in [({"density": 0.0}, "density=0.0"), ({"density": 1.5}, "density=1.5"),
                    ({"granularity": "row"}, "granularity='row'")]:
        with pytest.raises(ValueError, match=msg):
            merge(pre, fts, "ties", **hp)
    with pytest.raises(HyperparameterError, match="method 'pcb': density=0 is out of range"):
        merge(pre, fts, "pcb", density=0)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['ratio'\] for method 'pcb'"):
        merge(pre, fts, "pcb", ratio=0.1)  # renamed to density
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['trim'\] for method 'ties'"):
        merge(pre, fts, "ties", trim="tensor")  # renamed to granularity
    with pytest.raises(HyperparameterError, match=r"method 'fr': ratio=-0.1 is out of range"):
        merge(pre, fts, "fr", ratio=-0.1)
    with pytest.raises(ValueError, match="p=1.0"):
        merge(pre, fts, "dare_ta", p=1.0)
    with pytest.raises(ValueError, match="p=-0.5"):
        merge(pre, fts, "dare_ties", p=-0.5)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['densty'\]"):
        merge(pre, fts, "ties", densty=0.2)
    with pytest.raises(TypeError, match="'ratio'"):
        merge(pre, fts, "task_arithmetic", ratio=0.2)
    with pytest.raises(ValueError, match="no tensor selected"):
        merge(pre, fts, "ties", include="nothing-matches")
    missing = dict(fts[1])
    del missing["norm.weight"]
    with pytest.raises(StateDictKeyError, match=r"missing in finetuned\[1\]: 'norm.weight'"):
        merge(pre, [fts[0], missing], "ties")
    bad = dict(fts[0], **{"blocks.0.attn.proj.weight": torch.zeros(3, 3)})
    with pytest.raises(StateDictShapeError, match="'blocks.0.attn.proj.weight'"):
        merge(pre, {"cars": bad}, "task_arithmetic")
    nan = dict(fts[0], **{"blocks.1.attn.qkv.bias": torch.full((96,), float("nan"))})
    with pytest.raises(NonFiniteError, match="'blocks.1.attn.qkv.bias' of dtd"):
        merge(pre, {"dtd": nan}, "pcb")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method,hp", [("ties", {}), ("ties", {"granularity": "tensor"}),
                                       ("ties", {"density": 1.0}), ("ties", {"sign_rule": "count"}),
                                       ("ties", {"trim_rule": "exact"}), ("task_arithmetic", {}),
                                       ("dare_ties", {}), ("pcb", {}), ("fr", {})])
def test_one_non_finite_entry_anywhere_is_named(method, hp, bad):
    """One NaN or +-inf in one fine-tuned tensor, in a model long enough for the column-block TIES
    (which checks finiteness on the merged vector), is reported with the tensor and the model."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (400, 300), "b.weight": (64, 10)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = {f"t{i}": {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for i in range(3)}
    for key, pos in (("a.weight", (399, 299)), ("b.weight", (0, 0)), ("a.weight", (17, 5))):
        broken = {name: dict(sd) for name, sd in fts.items()}
        t = broken["t1"][key].clone()
        t[pos] = bad
        broken["t1"][key] = t
        with pytest.raises(NonFiniteError, match=f"'{key}' of t1"):
            merge(pre, broken, method, rules=None, **hp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,scale", [("task_arithmetic", 0.3), ("task_arithmetic", [0.2, -0.5, 0.7]),
                                          ("average", None)])
def test_sums_through_merge_equal_their_flat_definition_bit_for_bit(method, scale, dtype):
    """Task arithmetic and the average sum the task vectors per tensor, ``merging._SUM_CHUNK`` entries
    at a time: the same bits as theta_0 + lambda * (flat N x D weighted sum), for tensors of several
    chunks and odd sizes, in float32 and bfloat16."""
    from mergelib.merging import _SUM_CHUNK, _weighted_sum
    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (300, 251), "b.weight": (2 * _SUM_CHUNK + 5,), "c.bias": (77,), "d.weight": (513, 129)}
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in pre.items()}
           for _ in range(3)]
    out = merge(pre, fts, method, scale=scale, rules=None)
    x, layout = flatten(fts, sorted(pre), subtract=pre)
    lam = 1 / 3 if method == "average" else (1.0 if isinstance(scale, list) else scale)
    total = _weighted_sum(x, scale if isinstance(scale, list) else None)
    for k in pre:
        want = torch.add(pre[k].float(), total[layout.segment(k)].view(pre[k].shape), alpha=lam).to(dtype)
        assert out[k].dtype == dtype and torch.equal(out[k].view(torch.uint8), want.view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_sum_of_the_gpu_path_adds_as_the_per_tensor_path(dtype):
    """merge()'s sums on CUDA (_sum_foreach: torch._foreach_* over all tensors, one host sync) do the
    float operations of the CPU path: on the CPU, where torch's multi-tensor ops loop over the tensors,
    the same bits as _sum_per_tensor's torch code, with and without per-task scales and theta_0 + scale *
    sum; a non-finite sum is named."""
    from mergelib import kernels
    from mergelib.merging import _sum_foreach, _sum_per_tensor
    from mergelib.task_vectors import NonFiniteError
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(300, 70, generator=g).to(dtype), "b": torch.randn(5000, generator=g).to(dtype)}
    models = [{k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in pre.items()}
              for _ in range(3)]
    for lams in (None, [0.3, 1.0, 2.0]):
        for scale in (None, 0.7):
            got = _sum_foreach(pre, models, ["a", "b"], lams, True, None, scale)
            with kernels.use(False):
                want = _sum_per_tensor(pre, models, ["a", "b"], lams, True, scale=scale)
            for k in ("a", "b"):
                assert got[k].dtype == torch.float32 and got[k].shape == pre[k].shape
                assert torch.equal(got[k], want[k]), (lams, scale, k)
    models[1]["b"][7] = float("inf")
    with pytest.raises(NonFiniteError, match="'b'"):
        _sum_foreach(pre, models, ["a", "b"], None, True, None, None)
