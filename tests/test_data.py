"""The task registry: shapes, label ranges, disjointness, carved splits, offline errors."""
import numpy as np
import pytest
import torch

from mergelib import data as mdata


@pytest.mark.parametrize("task", mdata.DOWNSTREAM_TASKS)
def test_downstream_task_shapes_and_labels(data_root, task):
    spec = mdata.TASKS[task]
    sizes = {}
    for split in ("train", "val", "test"):
        d = mdata.load_task(task, split, data_root, verbose=False)
        assert d.x.dtype == torch.uint8 and d.y.dtype == torch.int64
        assert tuple(d.x.shape[1:]) == (3, 32, 32)
        assert len(d.x) == len(d.y) > 0
        assert int(d.y.min()) == 0 and int(d.y.max()) == len(spec.classes) - 1
        sizes[split] = len(d)
    # val is ~10% of the training split, carved out of it
    assert abs(sizes["val"] / (sizes["train"] + sizes["val"]) - mdata.VAL_FRACTION) < 0.01


def test_at_least_six_tasks_from_five_sources():
    sources = {mdata.TASKS[t].source for t in mdata.DOWNSTREAM_TASKS}
    assert len(mdata.DOWNSTREAM_TASKS) >= 6 and len(sources) >= 5


def test_pretraining_is_disjoint_from_downstream(data_root):
    pre = mdata.TASKS[mdata.PRETRAIN_TASK]
    c4 = mdata.TASKS["cifar4"]
    assert set(pre.keep_labels).isdisjoint(c4.keep_labels)
    assert set(pre.classes).isdisjoint(c4.classes)
    # no image of the pretraining set appears in the CIFAR downstream task (any split)
    pre_x = mdata.load_task(mdata.PRETRAIN_TASK, "train", data_root, verbose=False).x
    pre_keys = {bytes(v) for v in pre_x.flatten(1)[:, ::7].numpy()}
    for split in ("train", "val", "test"):
        x = mdata.load_task("cifar4", split, data_root, verbose=False).x
        assert not pre_keys & {bytes(v) for v in x.flatten(1)[:, ::7].numpy()}
    # the other sources are different datasets altogether
    assert all(mdata.TASKS[t].source != "CIFAR-10" for t in mdata.DOWNSTREAM_TASKS if t != "cifar4")


def test_train_val_test_are_disjoint_and_deterministic(data_root):
    a = mdata.load_task("kmnist", "train", data_root, verbose=False)
    b = mdata.load_task("kmnist", "train", data_root, verbose=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    keys = {s: {bytes(v) for v in mdata.load_task("kmnist", s, data_root, verbose=False).x.flatten(1).numpy()}
            for s in ("train", "val", "test")}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"] and not keys["train"] & keys["val"]


def test_carved_split_is_announced(data_root, capsys):
    d = mdata.load_task("kmnist", "train", data_root, use_cache=False)
    out = capsys.readouterr().out
    if not (data_root / "KMNIST" / "raw" / "train-images-idx3-ubyte").exists():
        assert "carved a fixed split" in out and str(mdata.CARVE_SEED) in out
        assert d.notes


def test_subset_is_seeded():
    d = mdata.TaskData("t", "train", torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2),
                       torch.arange(100) % 3, ("a", "b", "c"))
    s1, s2, s3 = d.subset(10, seed=1), d.subset(10, seed=1), d.subset(10, seed=2)
    assert torch.equal(s1.y, s2.y) and not torch.equal(s1.x, s3.x)
    assert d.subset(None) is d and len(d.subset(1000)) == 100
    with pytest.raises(ValueError, match="subset size"):
        d.subset(0)


def test_missing_dataset_error_names_files_and_fix(tmp_path):
    with pytest.raises(mdata.DatasetNotFoundError) as err:
        mdata.load_task("mnist", "train", root=tmp_path, download=False, use_cache=False)
    msg = str(err.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
    assert mdata.DATA_ROOT_ENV in msg and mdata.DOWNLOAD_ENV in msg
    with pytest.raises(mdata.DatasetNotFoundError, match="CIFAR10-jpg"):
        mdata.load_task("cifar4", "test", root=tmp_path, download=False, use_cache=False)


def test_no_download_when_not_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv(mdata.DOWNLOAD_ENV, "0")
    assert not mdata.download_allowed()
    called = []
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd.utils, "download_url", lambda *a, **k: called.append(a))
    with pytest.raises(mdata.DatasetNotFoundError):
        mdata.load_task("usps", "train", root=tmp_path, use_cache=False)
    assert not called


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(mdata.DATA_ROOT_ENV, str(tmp_path))
    assert mdata.data_root() == tmp_path.resolve()
    assert mdata.data_root(tmp_path / "x") == (tmp_path / "x").resolve()
    monkeypatch.delenv(mdata.DATA_ROOT_ENV)
    assert mdata.data_root() == (mdata.PROJECT_ROOT / "data").resolve()


def test_cifar_pickle_layout_is_supported(tmp_path, monkeypatch):
    """Online torchvision gives the pickle layout; the same task reads it (tiny fake batches)."""
    import pickle

    import torchvision.datasets as tvd

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [n for n, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list]:
        labels = list(range(10)) * 2
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8), "labels": labels}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(mdata.CIFAR10_CLASSES)}, f)
    # fake files cannot match the published md5s: skip torchvision's integrity checks only
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    d = mdata.load_task("cifar4", "test", root=tmp_path, use_cache=False, verbose=False)
    assert len(d) == 8 and sorted(d.y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_normalize_and_augment():
    x = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    z = mdata.normalize(x)
    assert torch.allclose(z[:, 0], torch.tensor((1 - mdata.MEAN[0]) / mdata.STD[0]))
    with pytest.raises(TypeError, match="uint8"):
        mdata.normalize(x.float())
    g = torch.Generator().manual_seed(0)
    img = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).expand(5, 3, 8, 8).contiguous()
    a = mdata.augment(img, g, pad=0, flip=True)
    assert all(torch.equal(a[i], img[i]) or torch.equal(a[i], img[i].flip(2)) for i in range(5))
    b = mdata.augment(img, torch.Generator().manual_seed(1), pad=2, flip=False)
    assert b.shape == img.shape
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    for i in range(5):
        assert any(torch.equal(b[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
