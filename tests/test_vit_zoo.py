"""The ViT zoo recipe on a tiny configuration: two pretraining sources, frozen-head fine-tunes, variants."""
import copy

import numpy as np
import pytest
import torch

from mergelib import data as mdata
from mergelib import glyphs
from mergelib import zoo as mzoo
from mergelib.models import ViT
from mergelib.training import evaluate, train_multitask


def test_glyphs_are_seeded_balanced_and_have_no_digits():
    x1, y1 = glyphs.render(340, seed=3)
    x2, y2 = glyphs.render(340, seed=3)
    assert x1.dtype == np.uint8 and x1.shape == (340, 32, 32) and y1.dtype == np.int64
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.bincount(y1, minlength=len(glyphs.CHARACTERS)).tolist() == [4] * len(glyphs.CHARACTERS)
    assert not set("0123456789") & set(glyphs.CHARACTERS)
    assert len(set(glyphs.CHARACTERS)) == len(glyphs.CHARACTERS) == 85
    x3, _ = glyphs.render(340, seed=4)
    assert not np.array_equal(x1, x3)
    assert 20 < x1.mean() < 120  # dark background, bright strokes, not blank
    with pytest.raises(ValueError, match="positive"):
        glyphs.render(0, seed=0)


def test_glyph_task_in_the_registry_is_disjoint_from_downstream():
    assert "glyphs" in mdata.PRETRAIN_TASKS and "glyphs" not in mdata.DOWNSTREAM_TASKS
    assert mdata.TASKS["glyphs"].classes == glyphs.CHARACTERS


def _tiny_task(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (torch.rand(n, 3, 16, 16, generator=g) * 60).to(torch.uint8)
    for c in range(classes):  # class-dependent bright square: learnable
        x[y == c, :, c:c + 4, c:c + 4] = 250
    return mdata.TaskData("toy", "train", x, y, tuple(str(i) for i in range(classes)))


def test_train_multitask_learns_both_sources():
    torch.manual_seed(0)
    bb = ViT(image_size=16, patch_size=4, dim=32, depth=1, heads=2)
    data = {"a": _tiny_task(64, 3, 0), "b": _tiny_task(64, 4, 1)}
    heads = {k: torch.nn.Linear(32, d.num_classes) for k, d in data.items()}
    hist = train_multitask(bb, heads, data, steps=60, lr=3e-3, batch_size=16, eval_data=data, eval_every=30,
                           progress=False)
    assert len(hist["eval_acc_per_source"]) == 2 and set(hist["eval_acc_per_source"][-1]) == {"a", "b"}
    for k, d in data.items():
        assert evaluate(torch.nn.Sequential(bb, heads[k]), d)["acc"] > 0.6
    with pytest.raises(ValueError, match="same sources"):
        train_multitask(bb, {"a": heads["a"]}, data, steps=1, progress=False)


TINY = {
    "model": dict(image_size=32, patch_size=8, dim=32, depth=1, heads=2, mlp_ratio=2),
    "pretrain": dict(tasks=("cifar_pretrain", "glyphs"), steps=20, batch_size=16, lr=2e-3, weight_decay=0.05,
                     augment={"cifar_pretrain": {"pad": 4, "flip": True}}, label_smoothing=0.1, max_samples=400),
    "probe": dict(steps=20, lr=0.1, weight_decay=1e-4, max_samples=200),
    "finetune": dict(steps=10, batch_size=16, lr=2e-4, weight_decay=0.0, max_samples=200, freeze_head=True),
    "eval": dict(val_samples=100, test_samples=100),
}


@pytest.mark.slow
def test_tiny_vit_zoo_recipe(tmp_path, data_root):
    kw = dict(tasks=["usps", "digits"], device="cpu", data_root=data_root, zoo_root=str(tmp_path), progress=False,
              verbose=False, config=TINY)
    z = mzoo.vit_zoo("quick", **kw)
    rec = z.records["pretrained"]
    assert set(rec["metrics"]["test_acc"]) == {"cifar_pretrain", "glyphs"}
    assert list(rec["config"]["tasks"]) == ["cifar_pretrain", "glyphs"]
    for t in z.tasks:  # fine-tuning kept the probe head frozen, and moved the backbone
        assert all(torch.equal(z.heads[t][k], z.probe_heads[t][k]) for k in z.heads[t])
        assert any(not torch.equal(z.finetuned[t][k], z.pretrained[k]) for k in z.pretrained)
    assert z.evaluate(z.pretrained) == z.evaluate(z.pretrained, probe=True)
    again = mzoo.vit_zoo("quick", **kw)  # second call loads the same weights
    assert all(torch.equal(again.finetuned[t][k], z.finetuned[t][k]) for t in z.tasks for k in z.pretrained)


def test_backbone_variants_differ_only_in_pretraining():
    base = mzoo.VIT_PROFILES["quick"]
    steps = base["pretrain"]["steps"]
    v = mzoo.vit_backbone_variants("quick", fractions=(3, 10))  # any order: weakest first
    assert list(v) == ["1/10 of the pretraining", "1/3 of the pretraining", "whole pretraining (the zoo)"]
    assert v["whole pretraining (the zoo)"] == base
    for cfg in v.values():
        assert {k: cfg[k] for k in cfg if k != "pretrain"} == {k: base[k] for k in base if k != "pretrain"}
        assert {k: x for k, x in cfg["pretrain"].items() if k != "stop_at"} == base["pretrain"]  # same schedule
    assert [c["pretrain"].get("stop_at") for c in v.values()] == [steps // 10, steps // 3, None]
    assert "stop_at" not in base["pretrain"] and base is not v["whole pretraining (the zoo)"]  # copies, not aliases


def test_backbone_variants_default_to_the_profiles_fractions_which_the_zoo_caches():
    for profile, fractions in mzoo.BACKBONE_VARIANT_FRACTIONS.items():
        assert set(fractions) <= set(mzoo.EARLY_PRETRAIN_FRACTIONS), "a default variant the zoo does not cache"
        steps = mzoo.VIT_PROFILES[profile]["pretrain"]["steps"]
        v = mzoo.vit_backbone_variants(profile)
        assert [c["pretrain"].get("stop_at") for c in v.values()] == sorted(steps // f for f in fractions) + [None]
    assert list(mzoo.vit_backbone_variants("quick")) == ["1/10 of the pretraining", "whole pretraining (the zoo)"]
    for bad in ([1], [0], [2.5], [True]):
        with pytest.raises(ValueError, match="integers > 1"):
            mzoo.vit_backbone_variants("quick", bad)


def _pretrain_entries(root):
    return {p.name for p in (root / "quick").glob("vit-pretrained-*.safetensors")}


@pytest.mark.slow
def test_whole_pretraining_caches_its_early_checkpoints_equal_to_runs_stopped_there(tmp_path, data_root):
    tiny = copy.deepcopy(TINY)
    tiny["pretrain"]["steps"] = 30  # early checkpoints after 3 and 10 steps
    kw = dict(tasks=["usps"], device="cpu", data_root=data_root, progress=False, verbose=False)
    whole = mzoo.vit_zoo("quick", zoo_root=str(tmp_path / "a"), config=tiny, **kw)
    assert len(_pretrain_entries(tmp_path / "a")) == 3  # the whole run and its two early checkpoints
    for frac in mzoo.EARLY_PRETRAIN_FRACTIONS:
        early = copy.deepcopy(tiny)
        early["pretrain"]["stop_at"] = 30 // frac
        cached = mzoo.vit_zoo("quick", zoo_root=str(tmp_path / "a"), config=early, **kw)
        rec = cached.records["pretrained"]
        assert rec["early_checkpoint_of"] == whole.records["pretrained"]["config_hash"]
        assert rec["history"]["step"][-1] <= 30 // frac
        stopped = mzoo.vit_zoo("quick", zoo_root=str(tmp_path / f"b{frac}"), config=early, **kw)  # trained here
        assert len(_pretrain_entries(tmp_path / f"b{frac}")) == 1  # a stopped run caches nothing more
        assert stopped.records["pretrained"]["config_hash"] == rec["config_hash"]
        for k, x in stopped.pretrained.items():
            assert torch.equal(x, cached.pretrained[k]), k
        assert not torch.equal(cached.pretrained["pos_embed"], whole.pretrained["pos_embed"])
    plain = copy.deepcopy(tiny)  # the whole schedule without caching early checkpoints on the way
    plain["pretrain"]["stop_at"] = 30
    plain = mzoo.vit_zoo("quick", zoo_root=str(tmp_path / "d"), config=plain, **kw)
    assert all(torch.equal(x, whole.pretrained[k]) for k, x in plain.pretrained.items())  # the hooks change nothing
    with pytest.raises(ValueError, match="stop_at"):
        bad = copy.deepcopy(tiny)
        bad["pretrain"]["stop_at"] = 31
        mzoo.vit_zoo("quick", zoo_root=str(tmp_path / "c"), config=bad, **kw)


def test_profiles_change_sizes_not_procedure():
    q, f = mzoo.VIT_PROFILES["quick"], mzoo.VIT_PROFILES["full"]
    for stage in ("pretrain", "finetune", "probe"):
        for k in ("lr", "weight_decay", "tasks", "augment", "label_smoothing", "freeze_head"):
            assert q[stage].get(k) == f[stage].get(k), (stage, k)
