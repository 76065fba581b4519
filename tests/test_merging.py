"""merge() over state dicts (mergelib.merging)."""
import pytest
import torch

from mergelib.competition import pcb_merge
from mergelib.hparams import HyperparameterError
from mergelib.merging import METHODS, merge
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
                              ("ties", 1.0, {"density": 1.0}), ("fr", 1 / 3, {"ratio": 10.0}),
                              ("pcb", 1.0, {"density": 1.0})]:
        out = merge(pre, same, method, scale=scale, rules=None, **hp)
        for k in pre:
            if method == "pcb":  # tau' (clipped): equal to tau except at the clipped extremes
                d = (out[k] - fts[0][k]).abs()
                assert (d < 1e-6).float().mean() > 0.99
            else:
                _close(out[k], fts[0][k])


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
