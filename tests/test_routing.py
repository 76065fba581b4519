"""FREE-Merging routing: oracle and learned routers, the routed multi-task model."""
import pytest
import torch
from torch.func import functional_call

from mergelib.experts import LowRankExpert, extract_expert, free_params
from mergelib.models import ViT
from mergelib.routing import (FreeMergedModel, MLPRouter, OracleRouter, RoutedOutput, merged_features,
                              routing_accuracy, train_router)

TASKS = ("a", "b", "c")
CLASSES = {"a": 3, "b": 5, "c": 2}
LAM_B, LAM_E = 0.3, 0.5


def _vit(dim=16):
    torch.manual_seed(0)  # module construction only; everything else uses explicit generators
    return ViT(image_size=8, patch_size=4, dim=dim, depth=1, heads=2)


@pytest.fixture(scope="module")
def zoo():
    vit = _vit()
    theta0 = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    keys = [k for k in theta0 if "attn" in k or "mlp" in k]
    tvs = {t: {k: torch.randn(theta0[k].shape, generator=g) * 0.05 for k in keys} for t in TASKS}
    s = {k: sum(tvs[t][k] for t in TASKS) for k in keys}  # stand-in for sum_j FR(tau_j)
    merged = {k: theta0[k] + LAM_B * s[k] if k in s else theta0[k] for k in theta0}
    experts = {t: extract_expert(tvs[t], 0.25, rescale="official", filtered_tv=tvs[t]) for t in TASKS}
    torch.manual_seed(2)
    heads = {t: torch.nn.Linear(16, CLASSES[t]) for t in TASKS}
    x = torch.randn(10, 3, 8, 8, generator=g)
    return dict(vit=vit, theta0=theta0, s=s, merged=merged, experts=experts, heads=heads, x=x)


def _reference(z, expert, task, x, mode="add"):
    params = free_params(z["theta0"], z["s"], LAM_B, expert, LAM_E, mode)
    with torch.no_grad():
        return z["heads"][task](functional_call(z["vit"], params, (x,)))


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_oracle_router_gives_each_task_its_own_expert(zoo, mode):
    z = zoo
    model = FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], OracleRouter(TASKS),
                            mode=mode, lam_e=LAM_E, pretrained_sd=z["theta0"])
    for t in TASKS:
        out = model(z["x"], task=t)
        c = CLASSES[t]
        assert out.task_ids.tolist() == [TASKS.index(t)] * 10 and out.num_classes.tolist() == [c] * 10
        torch.testing.assert_close(out.logits[:, :c], _reference(z, z["experts"][t], t, z["x"], mode),
                                   rtol=1e-5, atol=1e-6)
        assert bool(torch.isneginf(out.logits[:, c:]).all())
        for u in TASKS:  # another task's expert gives other outputs: the test can tell them apart
            if u != t:
                assert not torch.allclose(out.logits[:, :c], _reference(z, z["experts"][u], t, z["x"], mode),
                                          atol=1e-4)
    # the in-place patches were undone exactly
    assert all(torch.equal(model.merged[k], z["merged"][k]) for k in z["merged"])
    ref_params = free_params(z["theta0"], z["s"], LAM_B, z["experts"]["b"], LAM_E, mode)
    assert all(torch.equal(v, ref_params[k]) for k, v in model.task_params("b").items())
    with pytest.raises(ValueError, match="OracleRouter needs the task"):
        model(z["x"])
    assert routing_accuracy(OracleRouter(TASKS), torch.zeros(3, 16), ["c", "a", "b"]) == 1.0


def test_mixed_batch_equals_each_task_run_separately(zoo):
    z = zoo
    lowrank = LowRankExpert({"blocks.0.mlp.fc1.weight": (torch.randn(64, 2, generator=torch.Generator().manual_seed(3)),
                                                         torch.randn(2, 16, generator=torch.Generator().manual_seed(4)) * 0.1)},
                            {"blocks.0.mlp.fc1.weight": (64, 16)})
    experts = dict(z["experts"], c=lowrank)  # the buffer path (low-rank) next to the in-place path
    model = FreeMergedModel(z["vit"], z["merged"], experts, z["heads"], lam_e=LAM_E)
    names = ["b", "a", "c", "b", "b", "c", "a", "a", "c", "b"]
    out = model(z["x"], task=names)
    assert isinstance(out, RoutedOutput) and out.logits.shape == (10, 5)
    assert out.task_ids.tolist() == [TASKS.index(n) for n in names]
    for t in TASKS:
        sel = torch.tensor([i for i, n in enumerate(names) if n == t])
        alone = model(z["x"][sel], task=t).logits
        assert alone.shape == (len(sel), CLASSES[t])
        torch.testing.assert_close(out.logits[sel, :CLASSES[t]], alone, rtol=1e-5, atol=1e-6)
        assert bool(torch.isneginf(out.logits[sel, CLASSES[t]:]).all())
    rows = out.per_sample()
    assert [len(r) for r in rows] == [CLASSES[n] for n in names]
    ref_c = _reference(dict(z, theta0=z["merged"], s={}), lowrank, "c", z["x"][2:3])
    torch.testing.assert_close(rows[2][None], ref_c, rtol=1e-5, atol=1e-6)
    labels, ids = model.predict(z["x"], task=out.task_ids.clone())
    assert torch.equal(ids, out.task_ids) and bool((labels < out.num_classes).all())


def _task_images(n, seed):
    """Images whose task is visible: task i has a brighter colour channel i."""
    g = torch.Generator().manual_seed(seed)
    x, y = [], []
    for i, t in enumerate(TASKS):
        xi = torch.randn(n, 3, 8, 8, generator=g) * 0.5
        xi[:, i] += 2.0
        x.append(xi)
        y += [t] * n
    return torch.cat(x), y


def test_learned_router_routes_and_model_uses_it(zoo):
    z = zoo
    x_train, y_train = _task_images(12, 5)
    feats = merged_features(z["vit"], z["merged"], x_train)
    per_task = {t: feats[[i for i, n in enumerate(y_train) if n == t]] for t in TASKS}
    router = train_router(per_task, hidden=32, steps=50, lr=1e-2, batch_size=16, seed=0, progress=False)
    assert isinstance(router, MLPRouter) and router.tasks == list(TASKS)
    x_test, y_test = _task_images(20, 6)
    f_test = merged_features(z["vit"], z["merged"], x_test)
    acc = routing_accuracy(router, f_test, y_test)
    assert acc >= 0.9, acc
    assert acc <= routing_accuracy(OracleRouter(TASKS), f_test, y_test)
    assert routing_accuracy(router, {t: f_test[[i for i, n in enumerate(y_test) if n == t]] for t in TASKS}) == acc
    # a router over the tasks in another order is remapped to the model's order
    router_rev = train_router({t: per_task[t] for t in reversed(TASKS)}, hidden=32, steps=50, lr=1e-2,
                              batch_size=16, seed=0, progress=False)
    for r in (router, router_rev):
        model = FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], r, lam_e=LAM_E)
        out = model(x_test)
        routed = [r.tasks[i] for i in r.route(f_test).indices.tolist()]
        assert [TASKS[i] for i in out.task_ids.tolist()] == routed
        torch.testing.assert_close(out.logits, model(x_test, task=routed).logits, rtol=1e-5, atol=1e-6)


def test_soft_routing_mixes_expert_parameters(zoo):
    z = zoo
    g = torch.Generator().manual_seed(7)
    per_task = {t: torch.randn(6, 16, generator=g) + 2 * i for i, t in enumerate(TASKS)}
    router = train_router(per_task, hidden=8, steps=5, lr=1e-3, soft=True, temperature=4.0, seed=0,
                          progress=False)
    model = FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], router, lam_e=LAM_E)
    x = z["x"][:4]
    r = router.route(model.features(x))
    assert r.weights is not None and bool((r.weights.min(1).values > 0.01).all())  # a real mixture
    torch.testing.assert_close(r.weights.sum(1), torch.ones(4))
    out = model(x)
    per_task = {t: model.task_params(t) for t in TASKS}
    for b in range(4):
        w = r.weights[b]
        params = {k: v + sum(w[i] * (per_task[t][k] - v) for i, t in enumerate(TASKS))
                  for k, v in z["merged"].items()}
        t = TASKS[int(w.argmax())]
        with torch.no_grad():
            ref = z["heads"][t](functional_call(z["vit"], params, (x[b:b + 1],)))
        assert out.task_ids[b] == TASKS.index(t)
        torch.testing.assert_close(out.logits[b:b + 1, :CLASSES[t]], ref, rtol=1e-5, atol=1e-6)
        hard = model(x[b:b + 1], task=t).logits[:, :CLASSES[t]]
        assert not torch.allclose(hard, ref, atol=1e-4)  # the mixture is not the top-1 expert
    assert all(torch.equal(model.merged[k], z["merged"][k]) for k in z["merged"])


def test_moving_the_model_moves_everything(zoo):
    z = zoo
    model = FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], lam_e=LAM_E)
    ref = model(z["x"], task="b").logits
    model.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in model.merged.values())
    out = model(z["x"].double(), task="b").logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)
    model.to(torch.float32)


def test_error_cases(zoo):
    z = zoo
    model = FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], lam_e=LAM_E)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        model(z["x"], task="nope")
    with pytest.raises(ValueError, match="unknown task 'd'"):
        model(z["x"][:2], task=["a", "d"])
    with pytest.raises(ValueError, match="no router"):
        model(z["x"])
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\]"):
        model(z["x"][:2], task=torch.tensor([0, 3]))
    # experts built for another backbone (dim 32) name the offending tensor
    big = {k: v.detach() for k, v in _vit(dim=32).state_dict().items() if "attn" in k or "mlp" in k}
    other = dict(z["experts"], b=extract_expert(big, 0.25, rescale=None))
    with pytest.raises(ValueError, match=r"expert for task 'b': tensor 'blocks.0.attn.qkv.weight' has shape \(96, 32\)"):
        FreeMergedModel(z["vit"], z["merged"], other, z["heads"])
    stray = dict(z["experts"], a=extract_expert({"encoder.weight": torch.ones(4, 4)}, 0.5, rescale=None))
    with pytest.raises(ValueError, match="'encoder.weight' is not in the merged state dict"):
        FreeMergedModel(z["vit"], z["merged"], stray, z["heads"])
    with pytest.raises(ValueError, match=r"tensor 'norm.weight' has shape \(15,\)"):
        FreeMergedModel(z["vit"], dict(z["merged"], **{"norm.weight": torch.ones(15)}), z["experts"], z["heads"])
    with pytest.raises(ValueError, match=r"heads and experts must cover the same tasks.*\['c'\]"):
        FreeMergedModel(z["vit"], z["merged"], z["experts"], {t: z["heads"][t] for t in ("a", "b")})
    with pytest.raises(ValueError, match="head for task 'a' expects 8 features"):
        FreeMergedModel(z["vit"], z["merged"], z["experts"], dict(z["heads"], a=torch.nn.Linear(8, 3)))
    with pytest.raises(ValueError, match="needs pretrained_sd"):
        FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], mode="replace")
    with pytest.raises(ValueError, match="router tasks"):
        FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], OracleRouter(["a", "b"]))
    with pytest.raises(ValueError, match="non-empty"):
        train_router({"a": torch.zeros(0, 4)})


def test_model_is_an_ordinary_module_whose_state_dict_round_trips(zoo):
    z = zoo
    router = train_router({t: torch.randn(6, 16, generator=torch.Generator().manual_seed(i))
                           for i, t in enumerate(TASKS)}, steps=3, progress=False)
    caller = {"vit": {k: v.clone() for k, v in z["vit"].state_dict().items()},
              "heads": {t: {k: v.clone() for k, v in h.state_dict().items()} for t, h in z["heads"].items()},
              "router": {k: v.clone() for k, v in router.state_dict().items()}}
    model = FreeMergedModel(z["vit"], z["merged"], z["experts"], z["heads"], router, lam_e=LAM_E)
    sd = model.state_dict()
    assert any(k.startswith("backbone.") for k in sd) and any(k.startswith("experts.") for k in sd)
    assert any(k.startswith("router.") for k in sd) and any(k.startswith("heads.") for k in sd)
    assert all(torch.equal(sd[f"backbone.{k}"], v) for k, v in z["merged"].items())
    out = model(z["x"])
    model.to(torch.float64)  # moves and casts the model's own copies only
    assert all(h.weight.dtype == torch.float32 for h in z["heads"].values())
    assert all(p.dtype == torch.float32 for p in router.parameters())
    assert all(torch.equal(v, caller["vit"][k]) for k, v in z["vit"].state_dict().items())
    assert all(torch.equal(v, caller["heads"][t][k]) for t, h in z["heads"].items() for k, v in h.state_dict().items())
    model.to(torch.float32)
    # a model built from other weights and experts of the same structure becomes this one
    other_experts = {t: extract_expert({k: -v for k, v in
                                        {k: e.to_dense()[k] for k in e.keys}.items()}, 0.25, rescale=1.0)
                     for t, e in z["experts"].items()}
    other = FreeMergedModel(z["vit"], z["theta0"], other_experts, z["heads"], router, lam_e=2.0)
    assert not torch.allclose(other(z["x"], task="a").logits, model(z["x"], task="a").logits)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(z["x"], task="a").logits, model(z["x"], task="a").logits)
    again = other(z["x"])
    torch.testing.assert_close(again.logits, out.logits)
    assert torch.equal(again.task_ids, out.task_ids)
