"""Model shapes, parameter counts, and the five shared ResNet-20 checkpoints."""
import pytest
import torch

from mergelib import data as mdata
from mergelib.models import MLP, Classifier, ResNet20, ViT, count_parameters, load_resnet20_checkpoint
from mergelib.training import evaluate


def test_vit_shapes_and_matrix_shapes():
    vit = ViT(image_size=32, patch_size=4, dim=48, depth=2, heads=3)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 48)
    sd = vit.state_dict()
    d = 48
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["blocks.0.attn.proj.weight"].shape == (d, d)
    assert sd["blocks.1.mlp.fc1.weight"].shape == (4 * d, d)
    assert sd["blocks.1.mlp.fc2.weight"].shape == (d, 4 * d)
    assert sd["pos_embed"].shape == (1, 65, d) and sd["cls_token"].shape == (1, 1, d)
    assert not any(k.startswith("head") for k in sd)  # heads live outside the backbone
    # the default ViT: 2.69M parameters (hand count: embed + 6 blocks + final norm)
    d, depth, p = 192, 6, 4
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    expected = (3 * p * p * d + d) + d + 65 * d + depth * per_block + 2 * d
    assert count_parameters(ViT()) == expected == 2_691_648


def test_vit_rejects_bad_config():
    with pytest.raises(ValueError, match="divisible by heads"):
        ViT(dim=50, heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        ViT(image_size=30, patch_size=4)


@pytest.mark.parametrize("w", [1, 2, 4])
def test_resnet20_shapes(w):
    m = ResNet20(width_multiplier=w, num_classes=7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert m.layer3[0].conv1.weight.shape == (64 * w, 32 * w, 3, 3)
    assert not any("shortcut" in k for k in m.state_dict())  # option A: no shortcut parameters


def test_resnet20_parameter_count():
    assert count_parameters(ResNet20()) == 269_722  # as documented for the shared checkpoints


def test_mlp_shapes():
    m = MLP(784, (64, 32), 10)
    assert m(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert count_parameters(m) == 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10


def test_classifier_composes():
    c = Classifier(ViT(dim=16, depth=1, heads=2), torch.nn.Linear(16, 3))
    assert c(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_resnet20_checkpoint(tmp_path / "nope.th")
    sd = {f"module.{k}": v for k, v in ResNet20().state_dict().items()}
    sd["module.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.th")
    with pytest.raises(KeyError, match="extra.weight"):
        load_resnet20_checkpoint(tmp_path / "bad.th")
    sd.pop("module.extra.weight")
    torch.save({"state_dict": sd}, tmp_path / "wide.th")
    with pytest.raises(ValueError, match="conv1.weight.*shape"):
        load_resnet20_checkpoint(tmp_path / "wide.th", width_multiplier=2)


def test_shared_resnet20_checkpoints_score_about_81(pretrained_dir, data_root):
    files = sorted(pretrained_dir.glob("*.th"))
    assert len(files) == 5
    full = mdata.load_task("cifar10", "test", data_root, verbose=False)  # all 10 classes, JPEG copy
    assert len(full) == 10000
    # a seeded 2,000-image sample: the standard error of an ~81 % accuracy is 0.9 points, far inside the
    # band (the whole test set costs 2.5 CPU minutes for five checkpoints)
    sample = full.subset(2000, seed=0)
    accs = {}
    for f in files:
        model = load_resnet20_checkpoint(f).eval()
        accs[f.name] = evaluate(model, sample, batch_size=1000)["acc"]
    print(accs)
    assert all(0.76 <= a <= 0.86 for a in accs.values()), accs
    assert len(mdata.load_task("cifar4", "test", data_root, verbose=False)) == 4000
