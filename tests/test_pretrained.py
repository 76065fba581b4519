"""Pinned third-party checkpoints: offline directory, checksums, clear errors (no network)."""
import os
import shutil
from pathlib import Path

import pytest

from mergelib import pretrained as pt


def test_missing_files_name_both_ways(tmp_path):
    with pytest.raises(pt.PretrainedNotFoundError) as e:
        pt.resnet20_checkpoints(tmp_path, download=False)
    msg = str(e.value)
    assert "5 of 5" in msg and "MERGELIB_DOWNLOAD=1" in msg and "MERGELIB_PRETRAINED" in msg
    assert all(ck.url in msg and ck.sha256 in msg for ck in pt.RESNET20_CHECKPOINTS)


def test_corrupt_file_is_refused(tmp_path):
    folder = tmp_path / pt.SUBDIR
    folder.mkdir()
    for ck in pt.RESNET20_CHECKPOINTS:
        (folder / ck.filename).write_bytes(b"not a checkpoint")
    with pytest.raises(pt.ChecksumError, match="akamaster-resnet20.th has SHA-256"):
        pt.resnet20_checkpoints(tmp_path, download=False)


def test_directory_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(pt.PRETRAINED_ENV, str(tmp_path))
    assert pt.pretrained_dir() == tmp_path.resolve()
    assert pt.pretrained_dir(tmp_path / "x") == (tmp_path / "x").resolve()
    monkeypatch.delenv(pt.PRETRAINED_ENV)
    assert pt.pretrained_dir() == (pt.PROJECT_ROOT / "data" / "pretrained").resolve()


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(pt.urllib.request, "urlopen", boom)
    with pytest.raises(pt.PretrainedNotFoundError, match="could not download"):
        pt.resnet20_checkpoints(tmp_path, download=True)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_offline_copy_verifies(tmp_path):
    src = os.environ.get(pt.PRETRAINED_ENV)
    if not src or not (Path(src) / pt.SUBDIR).is_dir():
        if os.environ.get("MERGELIB_REQUIRE_DATA") == "1":
            pytest.fail("MERGELIB_PRETRAINED does not hold cifar10-resnet20/")
        pytest.skip("no offline copy of the pretrained checkpoints (set MERGELIB_PRETRAINED)")
    paths = pt.resnet20_checkpoints(src, download=False)
    assert [p.name for p in paths] == [ck.filename for ck in pt.RESNET20_CHECKPOINTS]
