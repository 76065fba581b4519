"""Permutation specs: permuted networks compute the same function; errors name what is wrong.

``gen``, ``make_resnet`` and ``make_vit`` are shared with the other ``test_align_*`` files.
"""
import copy

import pytest
import torch
from torch import nn

from mergelib.align import (apply_permutation, check_permutation, identity_permutation, invert_permutation,
                            permutation_spec, random_permutation)
from mergelib.models import MLP, Classifier, ResNet20, ViT


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_resnet(width=1, seed=0):
    """A ResNet20 in eval mode with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = ResNet20(width)
    g = gen(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8, generator=g) * 2 + 0.3)
    return model.eval()


def make_vit(seed=0):
    torch.manual_seed(seed)
    model = ViT(image_size=8, patch_size=4, dim=32, depth=2, heads=4).eval()
    with torch.no_grad():  # non-zero biases and norm parameters so that every member matters
        for k, p in model.named_parameters():
            if k.endswith("bias") or "norm" in k:
                p.add_(0.1 * torch.randn(p.shape, generator=gen(len(k))))
    return model


def _permuted_copy(model, spec, perm):
    clone = copy.deepcopy(model)
    clone.load_state_dict(apply_permutation(spec, perm, model.state_dict()))
    return clone.eval()


@pytest.mark.parametrize("width", [1, 2])
def test_resnet20_permuted_copy_has_identical_outputs(width):
    model = make_resnet(width)
    spec = permutation_spec(model)
    perm = random_permutation(spec, gen(1))
    other = _permuted_copy(model, spec, perm)
    x = torch.randn(4, 3, 8, 8, generator=gen(2))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)
    # the permutation is not trivial and running statistics moved with their channels
    sd, sdp = model.state_dict(), other.state_dict()
    assert not torch.equal(sd["layer2.0.bn2.running_mean"], sdp["layer2.0.bn2.running_mean"])
    assert torch.equal(sd["layer3.1.bn1.running_var"][perm["layer3.1.conv1"]], sdp["layer3.1.bn1.running_var"])


def test_resnet20_option_a_stream_groups():
    w = 2
    spec = permutation_spec(ResNet20(w))
    assert {g: spec.groups[g].size for g in ("stream1", "stream2", "stream3")} == {
        "stream1": 16 * w, "stream2": 16 * w, "stream3": 32 * w}
    # stage-3 stream channels: stream1 at [24w, 40w), stream2 at [16w,24w)+[40w,48w), stream3 elsewhere
    owner = {}
    for g in ("stream1", "stream2", "stream3"):
        for m in spec.groups[g].members:
            if m.key == "layer3.2.bn2.weight":
                owner.update({int(i): g for i in m.index})
    assert [owner[c] for c in (0, 16 * w, 24 * w, 40 * w - 1, 40 * w, 48 * w, 64 * w - 1)] == [
        "stream3", "stream2", "stream1", "stream1", "stream2", "stream3", "stream3"]


def test_resnet20_one_permutation_for_the_whole_stage_breaks_the_function():
    """Why the streams are split: permuting all stage-2 channels freely does not keep the output."""
    model = make_resnet(1)
    spec = permutation_spec(model)
    perm = identity_permutation(spec)
    swap = torch.arange(16)
    swap[[0, 8]] = swap[[8, 0]]  # exchange a stream2 channel with a stream1 channel of stage 2 ...
    sd = dict(model.state_dict())
    for k in list(sd):  # ... in every stage-2 tensor that touches the stream, as one "stage" group would
        if k.startswith("layer2.") and (".bn2." in k or ".conv2." in k) and sd[k].dim() >= 1:
            sd[k] = sd[k].clone()
            sd[k][[0, 8]] = sd[k][[8, 0]]
    broken = _permuted_copy(model, spec, perm)
    broken.load_state_dict(sd)
    x = torch.randn(4, 3, 8, 8, generator=gen(3))
    with torch.no_grad():
        assert (broken(x) - model(x)).abs().max() > 1e-3


def test_mlp_permuted_copy_has_identical_outputs():
    torch.manual_seed(0)
    model = MLP(20, (32, 24, 16), 5)
    spec = permutation_spec(model)
    perm = random_permutation(spec, gen(1))
    other = _permuted_copy(model, spec, perm)
    x = torch.randn(8, 20, generator=gen(2))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(other.layers[0](x), model.layers[0](x))


def test_vit_permuted_copy_permutes_features_and_keeps_classifier_outputs():
    model = make_vit()
    spec = permutation_spec(model)
    perm = random_permutation(spec, gen(1))
    assert any(not torch.equal(perm[f"blocks.{i}.attn.qk"] // 8, torch.arange(32) // 8) for i in range(2))
    other = _permuted_copy(model, spec, perm)
    x = torch.randn(3, 3, 8, 8, generator=gen(2))
    with torch.no_grad():
        # the backbone returns residual-stream features, so they come out permuted
        torch.testing.assert_close(other(x), model(x)[:, perm["residual"]], rtol=1e-4, atol=1e-5)
    clf = Classifier(model, nn.Linear(32, 7)).eval()
    cspec = permutation_spec(clf)
    assert "head.weight" in cspec.shapes and "backbone.blocks.0.attn.qkv.weight" in cspec.shapes
    cperm = random_permutation(cspec, gen(4))
    cother = _permuted_copy(clf, cspec, cperm)
    with torch.no_grad():
        torch.testing.assert_close(cother(x), clf(x), rtol=1e-4, atol=1e-5)


def test_vit_untied_heads_are_a_different_function():
    """The official MuDSC grouping (q/k and v matched independently) does not keep the function."""
    model = make_vit()
    spec = permutation_spec(model, tie_heads=False)
    assert spec.groups["blocks.0.attn.v"].head_tie is None
    perm = identity_permutation(spec)
    perm["blocks.0.attn.v"] = torch.cat([torch.arange(8, 16), torch.arange(8), torch.arange(16, 32)])
    other = _permuted_copy(model, spec, perm)
    x = torch.randn(3, 3, 8, 8, generator=gen(2))
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="moves heads differently"):
        check_permutation(permutation_spec(model), perm)


def test_random_permutation_is_valid_and_inverse_undoes_it():
    model = make_vit()
    spec = permutation_spec(model)
    perm = random_permutation(spec, gen(5))
    check_permutation(spec, perm)
    sd = model.state_dict()
    back = apply_permutation(spec, invert_permutation(perm), apply_permutation(spec, perm, sd))
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_unsupported_module_is_named():
    with pytest.raises(TypeError, match="unsupported module type 'Sequential'"):
        permutation_spec(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_state_dict_mismatch_errors_name_the_tensor():
    model = MLP(6, (5,), 3)
    spec = permutation_spec(model)
    perm = identity_permutation(spec)
    sd = dict(model.state_dict())
    with pytest.raises(KeyError, match=r"does not cover: \['extra.weight'\]"):
        apply_permutation(spec, perm, {**sd, "extra.weight": torch.zeros(2)})
    missing = {k: v for k, v in sd.items() if k != "head.bias"}
    with pytest.raises(KeyError, match=r"missing from the state dict: \['head.bias'\]"):
        apply_permutation(spec, perm, missing)
    with pytest.raises(ValueError, match="'layers.0.bias' has shape"):
        apply_permutation(spec, perm, {**sd, "layers.0.bias": torch.zeros(4)})
    # integer buffers are not float tensors and pass through untouched
    rn = ResNet20(1)
    out = apply_permutation(permutation_spec(rn), identity_permutation(permutation_spec(rn)), rn.state_dict())
    assert out["bn1.num_batches_tracked"].dtype == torch.long


def test_invalid_permutation_errors():
    spec = permutation_spec(make_vit())
    perm = identity_permutation(spec)
    perm["blocks.1.attn.qk"] = torch.cat([torch.tensor([8]), torch.arange(1, 8), torch.tensor([0]),
                                          torch.arange(9, 32)])
    with pytest.raises(ValueError, match="splits an attention head"):
        check_permutation(spec, perm)
    perm = identity_permutation(spec)
    perm["residual"] = torch.zeros(32, dtype=torch.long)
    with pytest.raises(ValueError, match=r"perm\['residual'\] is not a permutation"):
        check_permutation(spec, perm)
