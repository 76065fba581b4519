"""``python -m mergelib.fetch`` (``make data``): everything the notebooks read, checked by file names and
checksums, downloaded where allowed, and every missing item named when it is not."""
from pathlib import Path

import pytest

from mergelib import data as mdata
from mergelib import fetch as mfetch
from mergelib import pretrained as mpre

IMAGE_SOURCES = ("CIFAR-10", "MNIST", "Fashion-MNIST", "KMNIST", "USPS")


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


def test_source_present_by_file_names(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    assert not mdata.source_present("MNIST", tmp_path)
    _touch(raw / "t10k-images-idx3-ubyte")
    assert not mdata.source_present("MNIST", tmp_path)          # half of a split
    _touch(raw / "t10k-labels-idx1-ubyte")
    assert mdata.source_present("MNIST", tmp_path)              # one complete split, as the loader needs
    assert not mdata.source_present("KMNIST", tmp_path)
    _touch(tmp_path / "USPS" / "usps.t.bz2")
    assert mdata.source_present("USPS", tmp_path)
    assert not mdata.source_present("CIFAR-10", tmp_path)
    (tmp_path / "CIFAR10-jpg").mkdir()
    assert mdata.source_present("CIFAR-10", tmp_path)
    assert mdata.source_present("scikit-learn digits", tmp_path) and mdata.source_present("synthetic glyphs", tmp_path)
    with pytest.raises(KeyError, match="unknown image source 'SVHN'"):
        mdata.source_present("SVHN", tmp_path)


def test_every_image_source_of_the_tasks_is_known():
    assert set(mfetch._image_sources()) == set(IMAGE_SOURCES) | set(mdata.FILELESS_SOURCES)
    assert set(mfetch._image_sources()) <= set(mdata.SOURCE_FOLDERS)


def test_fetch_names_every_missing_input_and_writes_nothing(tmp_path, monkeypatch):
    root, pre = tmp_path / "data", tmp_path / "pretrained"
    root.mkdir(), pre.mkdir()
    monkeypatch.setenv(mpre.PRETRAINED_ENV, str(pre))
    called = []
    monkeypatch.setattr(mfetch, "_fetch_source", lambda spec, r: called.append(spec.source))
    with pytest.raises(mfetch.CourseDataMissingError) as info:
        mfetch.fetch(root, download=False)
    err = info.value
    assert len(err.problems) == len(IMAGE_SOURCES) + 1                 # the five sources and the checkpoints
    for name in ("CIFAR-10", "MNIST", "FashionMNIST", "KMNIST", "USPS", "ResNet-20 checkpoints"):
        assert sum(name in p for p in err.problems) >= 1, name
    assert "MERGELIB_DOWNLOAD=1" in str(err) and "MERGELIB_DATA_ROOT" in str(err)
    assert "scikit-learn digits: needs no files" in err.report
    assert isinstance(err, FileNotFoundError)
    assert called == []                                                # no download attempted
    assert _files(root) == [] and _files(pre) == []                    # nothing written


def test_fetch_downloads_only_what_is_missing(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _touch(root / "USPS" / "usps.bz2")                                 # present: not downloaded again
    before = (root / "USPS" / "usps.bz2").stat().st_mtime_ns
    fetched, asked = [], []

    def fake_download(spec, r):                                        # torchvision's files, as it writes them
        fetched.append(spec.source)
        assert Path(r) == root.resolve()
        if spec.source == "CIFAR-10":
            (r / "cifar-10-batches-py").mkdir()
        else:
            for f in mdata.IDX_FILES["train"] + mdata.IDX_FILES["test"]:
                _touch(r / mdata.SOURCE_FOLDERS[spec.source] / f)

    monkeypatch.setattr(mfetch, "_fetch_source", fake_download)
    monkeypatch.setattr(mpre, "resnet20_checkpoints", lambda download=None: asked.append(download) or [tmp_path / "x"])
    report = mfetch.fetch(root, download=True)
    assert sorted(fetched) == sorted(set(IMAGE_SOURCES) - {"USPS"})
    assert asked == [True]
    for s in fetched:
        assert f"{s}: downloaded into {root.resolve()}" in report
    assert f"USPS: present in {root.resolve()}" in report
    assert (root / "USPS" / "usps.bz2").stat().st_mtime_ns == before


def test_a_failed_download_is_reported_with_the_loaders_message(tmp_path, monkeypatch):
    def offline(spec, r):
        raise OSError("no route to host")

    monkeypatch.setattr(mfetch, "_fetch_source", offline)
    monkeypatch.setattr(mpre, "resnet20_checkpoints", lambda download=None: [tmp_path / "x"])
    with pytest.raises(mfetch.CourseDataMissingError) as info:
        mfetch.fetch(tmp_path, download=True)
    assert len(info.value.problems) == len(IMAGE_SOURCES)
    assert any("MNIST not found under the data root" in p for p in info.value.problems)


def test_the_command_exits_1_with_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(mpre.PRETRAINED_ENV, str(tmp_path / "pretrained"))
    monkeypatch.delenv(mdata.DOWNLOAD_ENV, raising=False)
    assert mfetch.main(["--data-root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "synthetic glyphs: needs no files" in out
    assert "6 of the course's inputs missing" in err and "downloads were not allowed" in err
    with pytest.raises(SystemExit):
        mfetch.main(["--download", "--no-download"])                # mutually exclusive


def test_the_offline_copy_holds_everything(data_root, pretrained_dir, capsys):
    report = mfetch.fetch(data_root, download=False)
    assert any(r.startswith("ResNet-20 checkpoints") for r in report)
    assert sum("present in" in r for r in report) == len(IMAGE_SOURCES)
    assert mfetch.main(["--data-root", str(data_root), "--no-download"]) == 0
    assert "all-MiniLM-L6-v2 (notebook 07): present" in capsys.readouterr().out
