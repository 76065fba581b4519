"""merge_files / python -m mergelib.merge: streamed merges equal in-memory merge() bit for bit; errors."""
import ctypes
import errno
import gc
import importlib
import json
import os
import re
import runpy
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelib as ml
import mergelib.merging
from mergelib import streaming as st

from bits import same_bytes

SHAPES = {"blocks.0.attn.qkv.weight": (96, 32), "blocks.0.attn.qkv.bias": (96,), "blocks.0.mlp.fc1.weight": (64, 32),
          "blocks.1.attn.qkv.weight": (96, 32), "blocks.1.mlp.fc1.weight": (64, 32), "norm.weight": (32,),
          "embeddings.position_ids": None}


def _models(n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {k: (torch.randn(s, generator=g).to(dtype) if s else torch.arange(16)[None]) for k, s in SHAPES.items()}
    fts = [{k: ((v.float() + torch.randn(v.shape, generator=g) * 0.01).to(dtype) if v.is_floating_point() else v)
            for k, v in pre.items()} for _ in range(n)]
    return pre, fts


def _write(tmp_path, pre, fts, sharded=False):
    def one(sd, name):
        if not sharded:
            p = tmp_path / f"{name}.safetensors"
            save_file(sd, str(p))
            return p
        d = tmp_path / name
        d.mkdir()
        keys = sorted(sd)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        wm = {}
        for i, ks in enumerate(halves):
            fn = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in ks}, str(d / fn))
            wm.update({k: fn for k in ks})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return d / "model.safetensors.index.json"
    return one(pre, "base"), [one(ft, f"ft{i}") for i, ft in enumerate(fts)]


def _load_dir(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for fn in sorted(set(idx["weight_map"].values())):
        out.update(load_file(str(d / fn)))
    assert set(out) == set(idx["weight_map"])
    return out


def _record_reads(monkeypatch) -> list[tuple[str, str]]:
    """(file stem, key) of every tensor read from a checkpoint from now on, in order."""
    reads = []
    real = st.Checkpoint.read_into
    monkeypatch.setattr(st.Checkpoint, "read_into",
                        lambda self, key, t: reads.append((self.path.stem, key)) or real(self, key, t))
    return reads


CASES = [("task_arithmetic", {}), ("task_arithmetic", {"scale": [0.2, 0.3, 0.4]}), ("average", {}),
         ("dare_ta", {"p": 0.5}), ("ties", {}), ("ties", {"trim_rule": "exact"}), ("ties", {"sign_rule": "count"}),
         ("ties", {"granularity": "tensor", "density": 0.1}), ("dare_ties", {"density": 0.3})]
CASES += [("fr", {}), ("fr", {"align": "none", "ratio": 0.3}), ("fr", {"compat_official": True}),
          ("fr", {"mode": "paper", "base": "max"}), ("fr", {"compat_double_ring": True}),
          ("pcb", {}), ("pcb", {"density": 0.3}), ("pcb", {"scale": [0.5, 1.0, 1.5]})]
CASES = [(m, hp, torch.float32) for m, hp in CASES] + [
    ("task_arithmetic", {}, torch.bfloat16), ("ties", {}, torch.bfloat16),
    ("ties", {"trim_rule": "exact", "granularity": "tensor"}, torch.bfloat16),
    ("fr", {}, torch.bfloat16), ("fr", {"align": "none", "compat_official": True}, torch.bfloat16),
    ("pcb", {}, torch.bfloat16), ("pcb", {"density": 0.3}, torch.bfloat16),
    ("ties", {}, torch.float16), ("pcb", {}, torch.float16), ("ties", {}, torch.float64),
    ("ties", {"trim_rule": "exact", "granularity": "tensor"}, torch.float64), ("pcb", {}, torch.float64)]


@pytest.mark.parametrize("method,hp,dtype", CASES)
def test_streamed_equals_in_memory_bit_for_bit(tmp_path, monkeypatch, method, hp, dtype):
    """Every streamed method gives merge()'s bits; the model-wide k-th values come from their sample and
    one counting pass (the histogram fallback, exact but slower, is not needed on these inputs)."""
    pre, fts = _models(dtype=dtype)
    base, ftp = _write(tmp_path, pre, fts, sharded=(dtype == torch.bfloat16))
    fallbacks = []
    real = st._stream_kth_hist
    monkeypatch.setattr(st, "_stream_kth_hist", lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    out = ml.merge_files(base, ftp, tmp_path / "out", method, quiet=True, shard_bytes=20_000, **hp)
    assert not fallbacks
    got = _load_dir(out)
    want = ml.merge(pre, fts, method, **hp)
    assert set(got) == set(want)
    for k in want:
        assert same_bytes(got[k], want[k].contiguous()), (method, k)
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded output


@pytest.mark.parametrize("method,hp", [("ties", {}), ("ties", {"trim_rule": "exact"}), ("dare_ties", {"density": 0.2, "p": 0.5}), ("pcb", {})])
def test_model_wide_statistics_come_from_their_sample(tmp_path, monkeypatch, method, hp):
    """On tensors large enough for a bounded bracket, the sample of the streamed k-th values (taken from
    the inputs at the sampled positions, or from the blocks for dare_ties) brackets every rank: no
    histogram fallback, and the bits of merge()."""
    g = torch.Generator().manual_seed(3)
    pre = {"a.weight": torch.randn(512, 256, generator=g), "b.weight": torch.randn(300, 100, generator=g),
           "b.bias": torch.randn(300, generator=g)}
    fts = [{k: (v + torch.randn(v.shape, generator=g) * 0.01 * (i + 1)).bfloat16() for k, v in pre.items()}
           for i in range(3)]
    pre = {k: v.bfloat16() for k, v in pre.items()}
    base, ftp = _write(tmp_path, pre, fts)
    fallbacks, passes = [], []
    real = st._stream_kth_hist
    monkeypatch.setattr(st, "_stream_kth_hist", lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    real_kth = st._stream_kth
    monkeypatch.setattr(st, "_stream_kth", lambda *a, **k: passes.append(k.get("samples_fn")) or real_kth(*a, **k))
    got = _load_dir(ml.merge_files(base, ftp, tmp_path / "out", method, quiet=True, **hp))
    want = ml.merge(pre, fts, method, **hp)
    assert passes and not fallbacks
    assert all((s is None) == (method == "dare_ties") for s in passes)  # dare_ties samples its blocks
    for k in want:
        assert same_bytes(got[k], want[k].contiguous()), k


def _ties_zero_sum_models(sign: int, dtype):
    """A base with +-0 entries and 3 fine-tunes on a grid of exact values (task vectors computed
    without rounding): task 1 is the negative of task 0 on a quarter of the entries (their kept
    values cancel exactly), task 2 small and of sign ``sign``, which it gives the model's majority."""
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (64, 48), "b.weight": (40, 30), "b.bias": (40,)}
    pre, fts = {}, [{}, {}, {}]
    for k, sh in shapes.items():
        p = torch.randint(-20, 21, sh, generator=g) / 8
        p.view(-1)[1::7] = -0.0
        d = torch.randint(1, 41, sh, generator=g) / 16 * sign
        cancel = torch.rand(sh, generator=g) < 0.25
        small = torch.randint(1, 4, sh, generator=g) / 64 * sign
        pre[k] = p.to(dtype)
        fts[0][k] = (p + d).to(dtype)
        fts[1][k] = torch.where(cancel, p - d, p).to(dtype)
        fts[2][k] = (p + small).to(dtype)
    return pre, fts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("hp,compiled", [
    (hp, c) for hp in ({}, {"granularity": "tensor"}, {"granularity": "tensor", "scale": 0.7}, {"trim_rule": "exact"},
                       {"granularity": "tensor", "trim_rule": "exact", "scale": 0.7}) for c in (True, False)])
def test_the_majority_sign_is_known_after_the_write_pass(tmp_path, monkeypatch, compiled, dtype, sign, hp):
    """TIES's mass sign rule gives zero-sum columns the majority sign of the whole model, known only when
    every tensor is merged: the streamed merge writes as for a negative majority, then patches the
    entries a positive one changes (cancelling entries; trimmed zeros over a base of +-0) or, past its
    limit of kept entries, writes the merge again. On inputs full of both, either way: the bits of
    merge(), and the per-tensor trim reads every input tensor once (one pass) unless it writes again.
    ``compiled``: the write pass with mergelib.kernels (its sweep and its positive-majority values; for
    the exact trim also its ties at the threshold, taken as the sweep goes) or with the torch code."""
    pre, fts = _ties_zero_sum_models(sign, dtype)
    base, ftp = _write(tmp_path, pre, fts)
    want = ml.merge(pre, fts, "ties", **hp)
    delta = {k: want[k].float() - pre[k].float() for k in want}
    assert sum(int((v == 0).sum()) for v in delta.values()) > 1000  # zero-sum columns everywhere
    for overflow in (False, True):
        patched, reads, sweeps = [], _record_reads(monkeypatch), []
        real_patch, real_keep, real_sweep = st._Deferred.patch, st._Deferred._keep, st.kernels.ties_sweep
        monkeypatch.setattr(st._Deferred, "patch", lambda self, *a: patched.append(len(self.entries)) or real_patch(self, *a))
        monkeypatch.setattr(st.kernels, "ties_sweep", lambda *a, **k: sweeps.append(1) or real_sweep(*a, **k))
        if overflow:
            monkeypatch.setattr(st._Deferred, "_keep", lambda self, *a: setattr(self, "limit", 10) or real_keep(self, *a))
        with ml.kernels.use(compiled):
            out = ml.merge_files(base, ftp, tmp_path / f"out{overflow}", "ties", quiet=True, **hp)
        got = _load_dir(out)
        assert all(same_bytes(got[k], want[k].contiguous()) for k in want), (overflow, "bits")
        assert bool(sweeps) == (compiled and ml.kernels.available(torch.empty(0)))
        rewrote = sign > 0 and overflow
        assert (patched == [] if sign < 0 or overflow else patched[0] > 0)
        if hp.get("granularity") == "tensor":  # one pass; two when it writes again
            assert reads.count(("ft0", "a.weight")) == (2 if rewrote else 1), reads
        monkeypatch.undo()


def test_fr_mixed_ranks_warning_and_no_2d_error(tmp_path):
    """FR over 1-D, 2-D and 4-D tensors (rules=None: every float tensor): the same bits and the same
    FRFilterWarning as in memory; no 2-D tensor at all: the same ValueError, before any output."""
    g = torch.Generator().manual_seed(1)
    shapes = {"conv.weight": (4, 3, 3, 3), "fc.weight": (6, 10), "fc.bias": (6,), "head.weight": (5, 6),
              "norm.weight": (10,)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    base, ftp = _write(tmp_path, pre, fts)
    for hp in ({}, {"align": "none", "compat_official": True}):
        with pytest.warns(ml.FRFilterWarning, match=r"conv.weight \(4, 3, 3, 3\)") as rec:
            out = ml.merge_files(base, ftp, tmp_path / "out", "fr", rules=None, quiet=True, overwrite=True, **hp)
        assert len([w for w in rec if w.category is ml.FRFilterWarning]) == 1
        with pytest.warns(ml.FRFilterWarning):
            want = ml.merge(pre, fts, "fr", rules=None, **hp)
        got = _load_dir(out)
        assert all(same_bytes(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="none of the 2 selected tensors is 2-D"):
        ml.merge(pre, fts, "fr", rules=None, include=["conv", "norm"])
    with pytest.raises(ValueError, match="none of the 2 selected tensors is 2-D"):
        ml.merge_files(base, ftp, tmp_path / "o2", "fr", rules=None, include=["conv", "norm"], quiet=True)
    assert not (tmp_path / "o2").exists()


def test_pcb_ties_at_the_streamed_thresholds(tmp_path):
    """Task vectors from a few values, so that the clip ranks of |tau| and the drop rank of beta fall
    inside runs of equal values: the streamed order statistics are sorted(row)[k - 1] (checked by
    hand here) and the merge equals merge() bit for bit."""
    from mergelib.competition import _pcb_official_beta, _pcb_official_ks, _pcb_q_k, _row_sum
    vals = torch.tensor([-2.0, -1.0, 0.0, 1.0, 1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(2)
    shapes = {"a.weight": (40, 30), "b.weight": (700,), "c.weight": (50, 40)}
    pre = {k: torch.zeros(s) for k, s in shapes.items()}
    fts = [{k: vals[torch.randint(0, 7, s, generator=g)] for k, s in shapes.items()} for _ in range(3)]
    base, ftp = _write(tmp_path, pre, fts)
    keys = sorted(shapes)
    x = torch.cat([torch.stack([ft[k].reshape(-1) for ft in fts]) for k in keys], 1)  # N x D, pre = 0
    n, D = x.shape
    blocks = lambda: (torch.stack([ft[k].reshape(-1) for ft in fts]) for k in keys)  # noqa: E731
    ks = _pcb_official_ks(D)
    clip = st._stream_kth(blocks, n, [ks] * n)
    total = _row_sum(x)
    for i in range(n):
        srt = sorted(x[i].abs().tolist())
        assert clip[i].tolist() == [srt[ks[0] - 1], srt[ks[1] - 1]]
        assert srt.count(srt[ks[1] - 1]) > 100  # the rank falls on a tie
    for density in (0.05, 0.5):
        k = _pcb_q_k(D, density)
        betas = lambda: (torch.stack([_pcb_official_beta(b[i], _row_sum(b), n, clip[i, 0], clip[i, 1])  # noqa: E731
                                      for i in range(n)]) for b in blocks())
        q = st._stream_kth(betas, n, [[k]] * n, absolute=False)
        for i in range(n):
            beta = _pcb_official_beta(x[i], total, n, clip[i, 0], clip[i, 1])
            srt = sorted(beta.tolist())
            assert q[i, 0].item() == srt[k - 1] and srt.count(srt[k - 1]) > 1
        out = ml.merge_files(base, ftp, tmp_path / f"out{density}", "pcb", density=density, rules=None, quiet=True)
        got, want = _load_dir(out), ml.merge(pre, fts, "pcb", density=density, rules=None)
        assert all(same_bytes(got[k], want[k]) for k in want)


def test_missing_integer_buffer_taken_from_base_missing_float_is_error(tmp_path, capsys):
    pre, fts = _models(n=2)
    del fts[1]["embeddings.position_ids"]
    base, ftp = _write(tmp_path, pre, fts)
    out = ml.merge_files(base, ftp, tmp_path / "out", "task_arithmetic")
    assert "position_ids" in capsys.readouterr().err
    assert torch.equal(_load_dir(out)["embeddings.position_ids"], pre["embeddings.position_ids"])
    del fts[0]["norm.weight"]
    base, ftp = _write(tmp_path / "x" if (tmp_path / "x").mkdir() is None else None, pre, fts)
    with pytest.raises(st.CheckpointKeyError, match="norm.weight"):
        ml.merge_files(base, ftp, tmp_path / "out2", "task_arithmetic", quiet=True)
    assert not (tmp_path / "out2").exists()


def test_shape_dtype_corrupt_and_existing_output(tmp_path):
    pre, fts = _models(n=1)
    bad = dict(fts[0])
    bad["norm.weight"] = torch.zeros(33)
    base, (ftp,) = _write(tmp_path, pre, [bad])
    with pytest.raises(st.CheckpointShapeError):
        ml.merge_files(base, [ftp], tmp_path / "o", "ties", quiet=True)
    bad["norm.weight"] = torch.zeros(32, dtype=torch.float16)
    save_file(bad, str(ftp))
    with pytest.raises(st.CheckpointDtypeError):
        ml.merge_files(base, [ftp], tmp_path / "o", "ties", quiet=True)
    save_file(fts[0], str(ftp))
    data = ftp.read_bytes()
    ftp.write_bytes(data[: len(data) - 100])  # truncated shard
    with pytest.raises(st.CorruptCheckpointError):
        ml.merge_files(base, [ftp], tmp_path / "o", "ties", quiet=True)
    ftp.write_bytes(b"\x00" * 16)  # garbage header
    with pytest.raises(st.CorruptCheckpointError):
        ml.merge_files(base, [ftp], tmp_path / "o", "ties", quiet=True)
    ftp.write_bytes(data)
    (tmp_path / "o").mkdir()
    with pytest.raises(st.OutputExistsError):
        ml.merge_files(base, [ftp], tmp_path / "o", "ties", quiet=True)
    ml.merge_files(base, [ftp], tmp_path / "o", "ties", quiet=True, overwrite=True)
    assert (tmp_path / "o" / "model.safetensors.index.json").exists()
    for m, hp, what in (("pcb", {"mode": "paper"}, "mode='paper'.*mode='official'"),
                        ("fr", {"align": "paper"}, "align='paper'.*align='official' or align='none'")):
        with pytest.raises(st.StreamingNotSupportedError, match=f"{m} with {what}.*mergelib.merge()"):
            ml.merge_files(base, [ftp], tmp_path / "p", m, quiet=True, **hp)
    assert not (tmp_path / "p").exists()
    assert ftp.read_bytes() == data  # inputs untouched


def test_a_missing_input_is_named_and_nothing_is_written(tmp_path, capsys):
    pre, fts = _models(n=1)
    base, (ftp,) = _write(tmp_path, pre, fts)
    missing = tmp_path / "nowhere" / "model.safetensors"
    assert issubclass(st.CheckpointNotFoundError, FileNotFoundError)
    for pretrained, finetuned in ((missing, [ftp]), (base, [ftp, missing]), (base, [tmp_path / "no-dir"])):
        bad = missing if pretrained == missing or missing in finetuned else tmp_path / "no-dir"
        with pytest.raises(st.CheckpointNotFoundError, match=f"{re.escape(str(bad))}: no such file or directory"):
            ml.merge_files(pretrained, finetuned, tmp_path / "out", "ties", quiet=True)
    assert st.main([str(base), str(missing), "--out", str(tmp_path / "out"), "--method", "ties", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: CheckpointNotFoundError: {missing}: no such file or directory" in err
    with pytest.raises(ValueError, match=r"unknown method 'tie' \(did you mean 'ties'\?\)"):
        ml.merge_files(base, [ftp], tmp_path / "out", "tie", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([base.name, ftp.name])


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    before = {p: p.read_bytes() for p in [base, *ftp]}
    calls = {"n": 0}
    real = st._ShardWriter._write

    def flaky(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            calls["thread"] = threading.current_thread().name
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(st._ShardWriter, "_write", flaky)
    with pytest.raises(st.DiskFullError):
        ml.merge_files(base, ftp, tmp_path / "out", "ties", quiet=True, shard_bytes=10_000)
    assert calls["thread"].startswith("mergelib-write")  # raised in the writer thread, reported by the merge
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert all(p.read_bytes() == b for p, b in before.items())


def _hf_dir(folder, sd):
    """A Hugging Face / sentence-transformers model directory around the weights ``sd``, with files that are
    copied and files that are not."""
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    files = {"config.json": '{"model_type": "bert"}', "tokenizer.json": '{"version": "1.0"}', "vocab.txt": "[PAD]\nx\n",
             "LICENSE": "MIT", "modules.json": json.dumps([{"idx": 0, "name": "0", "path": ""},
                                                          {"idx": 1, "name": "1", "path": "1_Pooling"},
                                                          {"idx": 2, "name": "2", "path": "2_Dense"},
                                                          {"idx": 3, "name": "3", "path": "../outside"}]),
             "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}', "2_Dense/config.json": "{}"}
    for name, text in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    (folder / "tokenizer_config.json").symlink_to(folder / "tokenizer.json")  # as in the Hub's cache
    not_copied = {"README.md": "# the base's card", ".gitattributes": "*.bin lfs", "pytorch_model.bin": "w",
                  "model.safetensors.index.json.bak.index.json": "{}", "2_Dense/model.safetensors": "w",
                  "logs/run.txt": "not named by modules.json", "1_Pooling/.hidden": "x"}
    for name, text in not_copied.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    (folder.parent / "outside").mkdir(exist_ok=True)
    (folder.parent / "outside" / "secret.txt").write_text("outside the model directory")
    return {**files, "tokenizer_config.json": files["tokenizer.json"]}


def test_a_model_directory_gets_its_config_and_tokenizer_files(tmp_path, capsys):
    """From a Hugging Face model directory, the output is one too: config.json, the tokenizer's files, licence
    and the sentence-transformers modules' folders copied (not weights, indices, hidden files, the model card,
    folders modules.json does not name or that lie outside the directory), listed in the index and reported;
    the same whether the base is given as the directory or its file; none with copy_files=False or from a
    folder without config.json."""
    pre, fts = _models(n=2)
    copied = _hf_dir(tmp_path / "base", pre)
    _, ftp = _write(tmp_path, pre, fts)
    for i, base in enumerate([tmp_path / "base", tmp_path / "base" / "model.safetensors"]):
        out = ml.merge_files(base, ftp, tmp_path / f"out{i}", "ties", density=0.5)
        files = {f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file()}
        assert files == {*copied, "model-00001-of-00001.safetensors", "model.safetensors.index.json", "README.md"}
        assert all((out / name).read_text() == text for name, text in copied.items())
        assert "# A merged checkpoint" in (out / "README.md").read_text()  # the merge's card, not the base's
        assert not (out / "tokenizer_config.json").is_symlink()  # a copy of the file, not of the link
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(index["metadata"]["copied_from_pretrained"]) == sorted(copied)
        note = capsys.readouterr().err.split("mergelib.merge_files: copied ")[1]
        assert all(name in note for name in copied) and "copy_files=False" in note
        got, want = _load_dir(out), ml.merge(pre, fts, "ties", density=0.5)
        assert all(same_bytes(got[k], want[k]) for k in want)
    out = ml.merge_files(tmp_path / "base", ftp, tmp_path / "none", "ties", quiet=True, copy_files=False)
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "model-00001-of-00001.safetensors",
                                                     "model.safetensors.index.json"]
    argv = [str(tmp_path / "base"), *map(str, ftp), "--out", str(tmp_path / "cli"), "--method", "ties", "--quiet"]
    assert st.main([*argv, "--no-copy-files"]) == 0
    assert sorted(f.name for f in (tmp_path / "cli").iterdir()) == sorted(f.name for f in out.iterdir())
    (tmp_path / "plain").mkdir()  # a folder that is not a model directory: nothing beside the weights is copied
    save_file(pre, str(tmp_path / "plain" / "base.safetensors"))
    (tmp_path / "plain" / "notes.txt").write_text("not a model file")
    out = ml.merge_files(tmp_path / "plain" / "base.safetensors", ftp, tmp_path / "plain_out", "ties", quiet=True)
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "model-00001-of-00001.safetensors",
                                                     "model.safetensors.index.json"]


def test_overwrite_never_replaces_a_directory_that_holds_an_input(tmp_path, capsys):
    """--out naming an input's directory, one above it, or one holding a link to an input's file is refused even
    with overwrite (the old output is deleted when the merge is swapped in): nothing written, the inputs kept."""
    pre, fts = _models(n=2)
    _hf_dir(tmp_path / "base", pre)
    (tmp_path / "in").mkdir()
    _, ftp = _write(tmp_path / "in", pre, fts, sharded=True)  # in/ft0/model.safetensors.index.json, ...
    (tmp_path / "links").mkdir()
    for f in ftp[0].parent.iterdir():  # links to the index and its shards, as in the Hugging Face Hub's cache
        (tmp_path / "links" / ("ft0.json" if f == ftp[0] else f.name)).symlink_to(f)
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    for out, ft, what in [(tmp_path / "base", ftp, "model.safetensors, a file of the pretrained checkpoint"),
                          (tmp_path, ftp, "a file of the pretrained checkpoint"),
                          (ftp[1].parent, ftp, "a file of the finetuned.1. checkpoint"),
                          (tmp_path / "links", [tmp_path / "links" / "ft0.json", ftp[1]],
                           "ft0.json, a file of the finetuned.0. checkpoint")]:
        with pytest.raises(st.OutputHoldsInputError, match=what):
            ml.merge_files(tmp_path / "base", ft, out, "ties", quiet=True, overwrite=True)
    argv = [str(tmp_path / "base"), *map(str, ftp), "--out", str(tmp_path / "base"), "--method", "ties", "--quiet",
            "--overwrite"]
    assert st.main(argv) == 2 and "OutputHoldsInputError" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before
    (tmp_path / "elsewhere").mkdir()  # an existing directory that holds no input is replaced, as before
    out = ml.merge_files(tmp_path / "base", ftp, tmp_path / "elsewhere", "ties", quiet=True, overwrite=True)
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize("method, kwargs", [
    ("ties", {"density": 0.3, "trim_rule": "exact", "scale": 0.8}),
    ("dare_ta", {"p": 0.5, "seed": 3, "scale": [0.25, 0.5]}),
    ("fr", {"align": "none", "compat_official": True, "rules": None, "exclude": ["norm", "bias$"]}),
    ("pcb", {"include": re.compile("blocks"), "shard_bytes": 10_000, "scale": torch.tensor([1.0, 0.5])}),
    ("average", {}),
])
def test_the_model_card_says_how_to_merge_again(tmp_path, method, kwargs):
    """Every merge writes a README.md with the method, lambda, every hyperparameter and the command line that
    merges the same inputs the same way: run, it writes the same tensors, bit for bit."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    out = ml.merge_files(base, ftp, tmp_path / "first", method, quiet=True, **kwargs)
    card = (out / "README.md").read_text()
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    hp = ml.REGISTRY[method].check_hparams({k: v for k, v in kwargs.items() if k in ml.REGISTRY[method].defaults})
    assert meta["hyperparameters"] == hp and f"`{method}` ({ml.REGISTRY[method].paper})" in card
    assert all(f"`{k}={v!r}`" in card for k, v in hp.items())
    command = card.split("```bash\n")[1].split("\n```")[0]
    assert command == meta["command"] and command.startswith("python -m mergelib.merge ")
    import shlex
    argv = shlex.split(command)[3:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert st.main([*argv, "--quiet"]) == 0
    first, again = _load_dir(out), _load_dir(tmp_path / "again")
    assert first.keys() == again.keys() and all(same_bytes(first[k], again[k]) for k in first)
    assert (tmp_path / "again" / "README.md").read_text() == card.replace(str(out), str(tmp_path / "again"))
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in (tmp_path / "again").iterdir())  # shards


@pytest.mark.parametrize("layout", ["file", "directory", "index"])
def test_other_checkpoint_formats_are_named(tmp_path, layout, capsys):
    """A PyTorch .bin (a file, a directory holding one, or its .bin.index.json) is not read as a corrupt
    safetensors file: UnsupportedCheckpointError says what it is and how to convert it; nothing is written."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    (tmp_path / "bin").mkdir()
    torch.save(pre, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    given = {"file": tmp_path / "bin" / "pytorch_model.bin", "directory": tmp_path / "bin",
             "index": tmp_path / "bin" / "pytorch_model.bin.index.json"}[layout]
    with pytest.raises(st.UnsupportedCheckpointError, match=r"not a safetensors checkpoint|but no safetensors") as e:
        ml.merge_files(base, [given, ftp[1]], tmp_path / "out", "ties", quiet=True)
    assert "safetensors.torch.save_file" in str(e.value) and "pytorch_model.bin" in str(e.value)
    assert st.main([str(given), *map(str, ftp), "--out", str(tmp_path / "out"), "--method", "ties", "--quiet"]) == 2
    assert "UnsupportedCheckpointError" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_failed_copy_of_the_model_files_leaves_nothing(tmp_path, monkeypatch):
    pre, fts = _models(n=2)
    _hf_dir(tmp_path / "base", pre)
    _, ftp = _write(tmp_path, pre, fts)
    real = st.shutil.copyfile

    def full(src, dst, *a, **k):
        if Path(src).name == "vocab.txt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(st.shutil, "copyfile", full)
    with pytest.raises(st.DiskFullError):
        ml.merge_files(tmp_path / "base", ftp, tmp_path / "out", "ties", quiet=True)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_merged_real_model_directory_loads_with_transformers(tmp_path):
    """The real MiniLM and its third-party fine-tune (skipped where they are not installed): the merged
    directory loads with transformers' AutoModel and AutoTokenizer, with the merged weights."""
    transformers = pytest.importorskip("transformers")
    try:
        base = ml.pretrained.locate_model(ml.pretrained.MINILM, download=False)
        ft = ml.pretrained.locate_model(ml.pretrained.SRE_FINETUNE, download=False)
    except ml.pretrained.PretrainedNotFoundError as e:
        pytest.skip(str(e))
    out = ml.merge_files(base, [ft], tmp_path / "merged", "task_arithmetic", scale=0.5, quiet=True)
    model = transformers.AutoModel.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    merged, loaded = dict(st.Checkpoint(out)), model.state_dict()
    assert set(loaded) <= set(merged) and all(torch.equal(loaded[k], merged[k]) for k in loaded)
    raw_base = load_file(str(base / "model.safetensors"))
    assert sum(not torch.equal(loaded[k], raw_base[k]) for k in loaded) > 50  # merged, not the base's
    with torch.no_grad():
        hidden = model(**tokenizer(["disk latency alert on the primary"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == model.config.hidden_size and torch.isfinite(hidden).all()


def test_a_failed_fsync_in_the_background_is_the_merges_error(tmp_path, monkeypatch):
    """A finished shard is flushed to disk in a background thread while the next one is merged: a full
    disk reported by its fsync (as delayed allocation can) is the merge's DiskFullError, with no output,
    no temporary directory and the inputs untouched; without the failure the same merge succeeds and
    fsyncs every shard in that thread."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    before = {p: p.read_bytes() for p in [base, *ftp]}
    real, threads = os.fsync, []

    def recorded(fd):
        threads.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(st.os, "fsync", recorded)
    out = ml.merge_files(base, ftp, tmp_path / "ok", "ties", quiet=True, shard_bytes=10_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert sum(t.startswith("mergelib-sync") for t in threads) == len(shards)

    def failing(fd):
        if threading.current_thread().name.startswith("mergelib-sync"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(st.os, "fsync", failing)
    with pytest.raises(st.DiskFullError):
        ml.merge_files(base, ftp, tmp_path / "out", "ties", quiet=True, shard_bytes=10_000)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert all(p.read_bytes() == b for p, b in before.items())


@pytest.mark.parametrize("dtype,hp", [(torch.float32, {}), (torch.float32, {"scale": [0.5, 2.0, -1.0]}),
                                      (torch.bfloat16, {"density": 0.3}), (torch.float32, {"density": 1.0})])
def test_streamed_pcb_compiled_sweeps_same_bits_as_the_torch_code(tmp_path, monkeypatch, dtype, hp):
    """merge_files's PCB through kernels.pcb_scores / pcb_weighted_sum (the statistics pass's beta and the
    write pass) and through the torch code give the same bytes, on task vectors whose cross terms reach
    tanh's range in some chunks and not in others."""
    pre, fts = _models(dtype=dtype)
    for ft in fts:  # one tensor's cross terms below 2**-12 (tanh skipped), the others' partly above
        ft["norm.weight"] = (pre["norm.weight"].float() + 1e-3 * (ft["norm.weight"].float() - pre["norm.weight"].float())
                             ).to(dtype)
    base, ftp = _write(tmp_path, pre, fts)
    calls = []
    real = ml.kernels.pcb_scores
    monkeypatch.setattr(ml.kernels, "pcb_scores", lambda *a: calls.append(real(*a)) or calls[-1])
    fast = _load_dir(ml.merge_files(base, ftp, tmp_path / "fast", "pcb", quiet=True, **hp))
    with ml.kernels.use(False):
        slow = _load_dir(ml.merge_files(base, ftp, tmp_path / "slow", "pcb", quiet=True, **hp))
    assert set(fast) == set(slow) and all(same_bytes(fast[k], slow[k]) for k in fast)
    # both passes compiled, one call per floating-point tensor each; every column sum finite
    assert len(calls) == 2 * sum(v.is_floating_point() for v in pre.values()) and all(bad == 0 for bad, _ in calls)
    assert any(big for _, big in calls) and not all(big for _, big in calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loud", [None, "blocks.0.mlp.fc1.weight"])
def test_streamed_pcb_takes_exp_only_where_the_bound_reaches(tmp_path, monkeypatch, dtype, loud):
    """Streamed PCB's counting pass takes exp and tanh only where a bound of the score reaches the floor of
    q's bracket, its write pass only where it reaches q (kernels.ScoreCandidates): merge()'s bits, with cross
    terms in tanh's range in a few entries, and (``loud``) in most entries of one tensor, whose chunks take
    every score. Its sample of beta comes from the one of |tau|, with no pass of its own."""
    g = torch.Generator().manual_seed(3)  # weights of 0.05: bf16 rounds no task vector entry to 0
    pre = {k: ((torch.randn(s, generator=g) * 0.05).to(dtype) if s else torch.arange(16)[None])
           for k, s in SHAPES.items()}
    fts = [{k: ((v.float() + torch.randn(v.shape, generator=g) * 1e-2 * (1 + 9 * (k == loud))).to(dtype)
                if v.is_floating_point() else v) for k, v in pre.items()} for _ in range(4)]
    base, ftp = _write(tmp_path, pre, fts)
    seen, real = [], ml.kernels.ScoreCandidates.fill
    monkeypatch.setattr(ml.kernels.ScoreCandidates, "fill",
                        lambda self, z, p, thr, *a: seen.append(thr.copy()) or real(self, z, p, thr, *a))
    routes, bounded = [], st._comp._bounded_chunk
    monkeypatch.setattr(st._comp, "_bounded_chunk", lambda *a: routes.append(bounded(*a)) or routes[-1])
    reads = _record_reads(monkeypatch)
    got = _load_dir(ml.merge_files(base, ftp, tmp_path / "out", "pcb", quiet=True, rules=None))
    want = ml.merge(pre, fts, "pcb", rules=None)
    assert all(same_bytes(got[k], want[k].contiguous()) for k in want)
    distinct = {tuple(t) for t in seen}
    assert len(distinct) == 2  # the floors of q's brackets, then q
    floors, q = seen[0], seen[-1]
    assert (0 < floors).all() and (floors < q).all()
    assert True in routes and (loud is None or False in routes)
    assert reads.count(("ft0", "blocks.0.mlp.fc1.weight")) == 4  # no pass for beta's sample


def test_streamed_pcb_sample_miss_takes_every_score(tmp_path, monkeypatch):
    """Where the sample of beta misses q (forced: a bracket above every score), the counting pass that held
    -inf below the floor gives way to the exact histogram passes, which see every score (and beta's maximum):
    merge()'s bits."""
    pre, fts = _models(n=4)
    base, ftp = _write(tmp_path, pre, fts)
    real = st._sel._brackets
    monkeypatch.setattr(st._sel, "_brackets", lambda s, n, ks, signed=[]: (
        [(torch.tensor(1e30), None, None)] if len(ks) == 1 and not signed.append(1) else real(s, n, ks)))
    fallbacks, hist = [], st._stream_kth_hist
    monkeypatch.setattr(st, "_stream_kth_hist", lambda *a, **k: fallbacks.append(1) or hist(*a, **k))
    got = _load_dir(ml.merge_files(base, ftp, tmp_path / "out", "pcb", quiet=True, rules=None))
    want = ml.merge(pre, fts, "pcb", rules=None)
    assert fallbacks == [1] and all(same_bytes(got[k], want[k].contiguous()) for k in want)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("method,hp", [("ties", {}), ("ties", {"granularity": "tensor"}), ("task_arithmetic", {}),
                                       ("pcb", {}), ("fr", {})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_task_vectors_are_an_error_with_nothing_written(tmp_path, compiled, method, hp, bad):
    """A NaN or inf weight in one fine-tune: merge_files raises NonFiniteError as merge() does (with the
    compiled TIES sweep, which counts the non-finite results, and with the torch code), and leaves no
    output, no temporary directory and the inputs as they were."""
    pre, fts = _models(n=2)
    fts[1]["blocks.1.mlp.fc1.weight"][3, 5] = bad
    base, ftp = _write(tmp_path, pre, fts)
    before = {p: p.read_bytes() for p in [base, *ftp]}
    with ml.kernels.use(compiled):
        with pytest.raises(ml.NonFiniteError):
            ml.merge(pre, fts, method, **hp)
        with pytest.raises(ml.NonFiniteError):
            ml.merge_files(base, ftp, tmp_path / "out", method, quiet=True, **hp)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert all(p.read_bytes() == b for p, b in before.items())


@pytest.mark.parametrize("method, ahead", [("task_arithmetic", True), ("average", True), ("ties", False)])
def test_a_read_error_in_the_read_ahead_thread_is_the_merges_error(tmp_path, monkeypatch, method, ahead):
    """The per-tensor sums read the next key's tensors in a background thread (the other methods read on
    demand, in the merge's thread): a shard that fails there (here: as if it had been truncated after
    the merge started) raises CorruptCheckpointError from merge_files, with nothing written and the
    inputs untouched."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    before = {p: p.read_bytes() for p in [base, *ftp]}
    real = st.Checkpoint.read_into
    seen = {"threads": set()}

    def failing(self, key, t):
        seen["threads"].add(threading.current_thread().name.split("_")[0])
        if key == "blocks.1.mlp.fc1.weight" and self.path == ftp[1]:
            raise st.CorruptCheckpointError(f"{self.path}: cannot read {key!r} (end of file)")
        return real(self, key, t)

    monkeypatch.setattr(st.Checkpoint, "read_into", failing)
    with pytest.raises(st.CorruptCheckpointError, match="blocks.1.mlp.fc1.weight"):
        ml.merge_files(base, ftp, tmp_path / "out", method, quiet=True)
    assert ("mergelib-read" in seen["threads"]) == ahead
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert all(p.read_bytes() == b for p, b in before.items())


def test_read_into_checks_its_buffer(tmp_path):
    pre, _ = _models(n=1)
    base, _ = _write(tmp_path, pre, [])
    ck = st.Checkpoint(base)
    t = ck.read_into("norm.weight", ck.empty("norm.weight"))
    assert torch.equal(t, pre["norm.weight"])
    for bad in (torch.empty(31), torch.empty(32, dtype=torch.float64), torch.empty(64)[::2]):
        with pytest.raises(ValueError, match="read_into\\('norm.weight'\\): needs a contiguous CPU tensor"):
            ck.read_into("norm.weight", bad)


def test_tensors_that_are_not_merged_are_read_from_the_base_only(tmp_path, monkeypatch):
    """The read-ahead reads a fine-tune's tensor only where the merge uses it: excluded keys and integer
    buffers come from the base alone, merged keys from every checkpoint exactly once per pass."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    reads = _record_reads(monkeypatch)
    out = ml.merge_files(base, ftp, tmp_path / "out", "task_arithmetic", exclude=["norm"], quiet=True)
    merged = [k for k in SHAPES if k != "norm.weight" and k != "embeddings.position_ids"]
    for name in ("ft0", "ft1"):
        assert sorted(k for f, k in reads if f == name) == sorted(merged)
    assert sorted(k for f, k in reads if f == "base") == sorted(SHAPES)
    assert torch.equal(_load_dir(out)["norm.weight"], pre["norm.weight"])


def _peak_rss_mb():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_returns_freed_blocks() -> bool:
    """Make glibc's malloc serve every block of 64 kB or more with its own mmap (returned to the system
    when freed), so that the resident set follows the live memory: by default the mmap threshold grows
    with use and freed heap blocks stay resident, and how many of them a merge re-touches depends on
    the heap's history (the same TIES merge measured 1 to 50 MB of growth from run to run). False
    where malloc is not glibc's. The setting lasts for the process (it only changes where blocks live)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD (also stops its dynamic adjustment)
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_memory_is_bounded_by_a_few_tensors(tmp_path):
    """64 tensors of 256 kB (fp32) per model, 5 models: the inputs are 84 MB; loading them all (or keeping
    every memory-mapped page of the inputs resident) would grow the peak RSS by 80 MB or more. The
    streamed TIES merge (several passes; a few copies of one tensor at a time; these task vectors are
    constant, so its exact trim takes the histogram fallback), and so the PCB (five passes) and FR
    merges, must grow it by less than 40 MB (about 18 MB for TIES). In process: the peak resident set
    (VmHWM, which counts memory-mapped file pages too) is reset just before each merge, with malloc
    returning freed blocks (:func:`_malloc_returns_freed_blocks`)."""
    if not _malloc_returns_freed_blocks():
        pytest.skip("needs glibc's mallopt to measure live memory through the resident set")
    g = torch.Generator().manual_seed(0)
    shapes = {f"blocks.{i}.mlp.fc1.weight": (256, 256) for i in range(64)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.01 * (i + 1) for k, v in pre.items()} for i in range(4)]
    base, ftp = _write(tmp_path, pre, fts)
    del pre, fts
    (tmp_path / "w").mkdir()
    wbase, wft = _write(tmp_path / "w", *_models(n=4))
    ml.merge_files(wbase, wft, tmp_path / "w" / "out", "ties", quiet=True)  # one-time allocations (~20 MB)
    for method in ("pcb", "fr"):
        ml.merge_files(wbase, wft, tmp_path / "w" / method, method, quiet=True)
    for method in ("ties", "pcb", "fr"):
        gc.collect()
        if not _reset_peak_rss():
            pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
        r0 = _peak_rss_mb()
        ml.merge_files(base, ftp, tmp_path / method, method, quiet=True)
        grew_mb = _peak_rss_mb() - r0
        assert grew_mb < 40, f"{method}: peak RSS grew by {grew_mb:.0f} MB; all inputs are 84 MB"


def test_cli(tmp_path, capsys):
    """The command line in process: streaming.main(argv), and the python -m shim through runpy."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    argv = [str(base), *map(str, ftp), "--out", str(tmp_path / "cli"), "--method", "ties", "--density", "0.3",
            "--granularity", "tensor", "--quiet"]
    assert st.main(argv) == 0
    got = _load_dir(tmp_path / "cli")
    want = ml.merge(pre, fts, "ties", density=0.3, granularity="tensor")
    assert all(same_bytes(got[k], want[k]) for k in want)
    capsys.readouterr()
    assert st.main(argv) == 2 and "OutputExistsError" in capsys.readouterr().err
    # python -m mergelib.merge runs the module as __main__: same code, exit status 0
    argv[argv.index("--out") + 1] = str(tmp_path / "cli2")
    with mock.patch.object(sys, "argv", ["mergelib.merge", *argv]), pytest.raises(SystemExit) as e:
        runpy.run_module("mergelib.merge", run_name="__main__", alter_sys=True)
    assert e.value.code == 0
    assert all(same_bytes(a, b) for a, b in zip(_load_dir(tmp_path / "cli").values(),
                                                 _load_dir(tmp_path / "cli2").values()))
    argv = [str(base), *map(str, ftp), "--out", str(tmp_path / "fr"), "--method", "fr", "--align", "none",
            "--compat-official", "true", "--quiet"]
    assert st.main(argv) == 0
    got, want = _load_dir(tmp_path / "fr"), ml.merge(pre, fts, "fr", align="none", compat_official=True)
    assert all(same_bytes(got[k], want[k]) for k in want)
    argv = [str(base), *map(str, ftp), "--out", str(tmp_path / "pcb"), "--method", "pcb", "--mode", "paper"]
    assert st.main(argv) == 2 and "StreamingNotSupportedError: pcb with mode='paper'" in capsys.readouterr().err


def test_cli_help_lists_every_method_and_hyperparameter(capsys):
    """--help renders the registry: every method, and every hyperparameter as it is typed, with its default."""
    with pytest.raises(SystemExit) as e:
        st.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for m in ml.REGISTRY.values():
        assert f"  {m.name}: {m.doc}" in text
        for h in m.hparams:
            default = str(h.default).lower() if isinstance(h.default, bool) else str(h.default)
            assert f"--{h.name.replace('_', '-')} {default} (" in text, (m.name, h.name)
    assert st._STREAMING in " ".join(text.split())
    for option in ("--out", "--scale", "--rules", "--include", "--exclude", "--overwrite", "--shard-size-gb"):
        assert option in text


@pytest.mark.parametrize("args, message", [
    (["--method", "ties", "--scale", "abc"], "argument --scale: expected a number or comma-separated numbers"),
    (["--method", "ties", "--scale", "0.5,x"], "got '0.5,x'"),
    (["--method", "ties", "--density"], "hyperparameter --density needs a value"),
    (["--method", "ties", "--density", "--granularity", "tensor"], "hyperparameter --density needs a value"),
    (["--method", "ties", "0.2"], "hyperparameters must be given as --NAME VALUE or --NAME=VALUE, got '0.2'"),
    (["--method", "fr", "--rules", "bogus"], "argument --rules: invalid choice: 'bogus'"),
    (["--method", "bogus"], "argument --method: invalid choice: 'bogus' (choose from average, task_arithmetic, "
     "ties, dare_ta, dare_ties, pcb, fr)"),
    (["--method", "tie"], "argument --method: invalid choice: 'tie' (did you mean 'ties'?) (choose from "),
    (["--method", "DARE-TIES"], "invalid choice: 'DARE-TIES' (did you mean 'dare_ties'?)"),
    (["--method", "ties", "--rules", "resnets"], "argument --rules: invalid choice: 'resnets' (did you mean "
     "'resnet'?) (choose from auto, none, vit, "),
    (["--method", "ties", "--densty", "0.2"], "unknown hyperparameter(s) --densty for method ties (did you mean "
     "--density for --densty?); allowed: --density, --granularity, --sign-rule, --trim-rule"),
    (["--method", "ties", "--sign_rul=count", "--p", "0.5"], "unknown hyperparameter(s) --sign-rul, --p for method "
     "ties (did you mean --sign-rule for --sign-rul?)"),
    (["--method", "average", "--density", "0.2"], "unknown hyperparameter(s) --density for method average; "
     "allowed: none"),
])
def test_cli_bad_arguments_exit_2_name_the_problem_and_write_nothing(tmp_path, capsys, args, message):
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    with pytest.raises(SystemExit) as e:
        st.main([str(base), *map(str, ftp), "--out", str(tmp_path / "out"), "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([base.name, *(p.name for p in ftp)])


def test_cli_name_equals_value_include_and_exclude(tmp_path, capsys):
    """--NAME=VALUE, and --include / --exclude (repeatable) as merge_files' include= / exclude=."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    keys = sorted(k for k, v in pre.items() if v.is_floating_point())
    inc, exc = [re.escape(keys[0]), re.escape(keys[1])], re.escape(keys[1])
    argv = [str(base), *map(str, ftp), "--out", str(tmp_path / "cli"), "--method", "ties", "--density=0.3",
            "--trim-rule=exact", "--quiet", "--scale", "0.8"]
    for pattern in inc:
        argv += ["--include", pattern]
    assert st.main([*argv, "--exclude", exc]) == 0
    got = _load_dir(tmp_path / "cli")
    want = ml.merge(pre, fts, "ties", scale=0.8, density=0.3, trim_rule="exact", include=inc, exclude=exc)
    assert all(same_bytes(got[k], want[k]) for k in want)
    assert not same_bytes(got[keys[0]], pre[keys[0]])  # merged
    assert all(same_bytes(got[k], pre[k]) for k in keys[1:])  # excluded, or not included: the base's


def test_growing_sample_buffers_keep_their_columns():
    """_with_room: the buffer itself while the columns fit, else one at least twice as wide with the first
    ``used`` columns (2-D samples, 1-D positions); _KeptSample, grown from a tiny buffer, hands back each key's
    kept columns at its positions, and computes the others."""
    buf = torch.arange(12.0).view(2, 6)
    assert st._with_room(buf, 4, 2) is buf
    grown = st._with_room(buf, 4, 3)
    assert grown.shape == (2, 12) and torch.equal(grown[:, :4], buf[:, :4])
    assert st._with_room(buf, 4, 30).shape == (2, 34)
    pos = torch.arange(5)
    assert torch.equal(st._with_room(pos, 5, 1)[:5], pos) and st._with_room(pos, 5, 1).dtype == torch.int64
    kept = st._KeptSample(2)
    kept.x, kept.pos = torch.empty(2, 1), torch.empty(1, dtype=torch.int64)  # grows on every add below
    g = torch.Generator().manual_seed(0)
    data = {f"k{i}": (torch.randperm(50, generator=g)[:7 + i].sort().values, torch.randn(2, 7 + i, generator=g))
            for i in range(6)}
    for k, (pos, x) in data.items():
        kept.add(k, pos, x)
    computed = []
    sampler = kept.samples([*data, "other"], lambda k: 50, lambda x: x * 2,
                           lambda k, pos: computed.append(k) or torch.zeros(2, len(pos)))
    for (numel, take), k in zip(sampler, [*data, "other"]):
        pos = data[k][0] if k in data else torch.arange(3)
        assert numel == 50 and torch.equal(take(pos), data[k][1] * 2 if k in data else torch.zeros(2, 3))
    assert computed == ["other"]


def test_cli_module_is_not_importable_and_merge_stays_a_function():
    with pytest.raises(ImportError, match="command line"):
        importlib.import_module("mergelib.merge")
    assert "mergelib.merge" not in sys.modules
    assert ml.merge is mergelib.merging.merge


@pytest.fixture(params=["compiled", "numpy"])
def counting(request):
    """The streamed counting pass compiled (kernels.count_brackets) or in NumPy (kernels switched off)."""
    with ml.kernels.use(request.param == "compiled"):
        yield request.param


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
@pytest.mark.parametrize("absolute", [True, False])
def test_stream_kth_equals_kth_smallest_and_falls_back(monkeypatch, counting, kind, absolute):
    """The streamed order statistic (sample, then count) is kth_smallest on the concatenated rows, with
    ties and signed zeros too, counted compiled or in NumPy; a missed bracket falls back to the exact
    histogram passes."""
    from mergelib import selection as sel

    g = torch.Generator().manual_seed(7)
    sizes = [70_000, 5, 1024, 40_000]
    blocks = [torch.randn(3, m, generator=g) for m in sizes]
    if kind == "ties":
        blocks = [(b * 2).round() / 4 for b in blocks]
    elif kind == "zeros":
        for b in blocks:
            b[:, ::2] = 0.0
            b[:, 1::4] = -0.0
    whole = torch.cat(blocks, 1)
    D = whole.shape[1]
    ks = [[1, 17, D // 3, D - 5, D]] * 3
    want = torch.stack([sel.kth_smallest(whole, k, dim=1, absolute=absolute) for k in ks[0]], 1)
    got = st._stream_kth(lambda: iter(blocks), 3, ks, absolute=absolute)
    assert torch.equal(got, want)
    vals, above = st._stream_kth(lambda: iter(blocks), 3, ks, absolute=absolute, count_above=True)
    w = whole.abs() if absolute else whole
    assert torch.equal(vals, want)
    assert above is not None or kind != "normal"  # None: the fallback answered (rows half zeros)
    assert above is None or torch.equal(above, (w[:, None, :] > want[:, :, None]).sum(2))
    assert torch.equal(st._stream_kth_hist(lambda: iter(blocks), 3, ks, absolute=absolute), want)
    calls = []
    real = st._stream_kth_hist
    monkeypatch.setattr(st, "_stream_kth_hist", lambda *a, **k: calls.append(1) or real(*a, **k))
    top = whole.abs().max() if absolute else whole.max()
    monkeypatch.setattr(sel, "_brackets", lambda s, n, kk: [(top, top, top)] * len(kk))  # every bracket misses
    assert torch.equal(st._stream_kth(lambda: iter(blocks), 3, ks, absolute=absolute), want) and calls
    assert st._stream_kth(lambda: iter(blocks), 3, ks, absolute=absolute, count_above=True)[1] is None


def test_exact_trim_streams_through_the_histogram_fallback_too(tmp_path, monkeypatch):
    """The exact rule's tie budget comes from the threshold's counting pass; where the histogram
    fallback answers instead, one more pass counts it: the same bits as merge() either way."""
    from mergelib import selection as sel

    g = torch.Generator().manual_seed(4)
    pre = {"a.weight": torch.randn(512, 256, generator=g), "b.weight": torch.randn(200, 90, generator=g)}
    fts = [{k: (v + torch.randn(v.shape, generator=g) * 0.01).bfloat16() for k, v in pre.items()} for _ in range(3)]
    pre = {k: v.bfloat16() for k, v in pre.items()}
    base, ftp = _write(tmp_path, pre, fts)
    want = ml.merge(pre, fts, "ties", trim_rule="exact")
    for miss in (False, True):
        if miss:
            monkeypatch.setattr(sel, "_brackets", lambda s, n, kk: [(s.max(), s.max(), s.max())] * len(kk))
        got = _load_dir(ml.merge_files(base, ftp, tmp_path / f"out{miss}", "ties", quiet=True, trim_rule="exact"))
        assert all(same_bytes(got[k], want[k].contiguous()) for k in want), miss


def test_stream_kth_bracket_full_of_ties_falls_back_with_bounded_memory(monkeypatch, counting):
    """Rows of two values with the rank at their boundary: the bracket holds both values, so nearly
    every entry is a candidate; past 1/16 of a row the counter stops keeping them and the exact
    histogram passes answer."""
    from mergelib import selection as sel

    n, m = 2, 1 << 21
    x = torch.ones(n, m)
    x[:, 1::2] = 2.0
    blocks = [x[:, : m // 2], x[:, m // 2:]]
    ks = [[m // 2, m // 2 + 1]] * n
    calls = []
    real = st._stream_kth_hist
    monkeypatch.setattr(st, "_stream_kth_hist", lambda *a, **k: calls.append(1) or real(*a, **k))
    counted = []
    real_count = ml.kernels.count_brackets
    monkeypatch.setattr(ml.kernels, "count_brackets", lambda *a, **k: counted.append(k) or real_count(*a, **k))
    got = st._stream_kth(lambda: iter(blocks), n, ks, absolute=False)
    assert calls and got.tolist() == [[1.0, 2.0]] * n
    assert counted == ([{"limit": m // 16}] if counting == "compiled" else [])  # stopped past 1/16 of a row
    assert torch.equal(got, torch.stack([sel.kth_smallest(x, k, dim=1) for k in ks[0]], 1))


def test_the_merge_imports_only_the_merging_core():
    """`python -m mergelib.merge` and `import mergelib` load neither torchvision, matplotlib nor scipy
    (about 0.27 GB of resident memory, a fifth of the peak of a streamed 5 GB merge); the other modules
    load on first use, as attributes of the package."""
    heavy = ("torchvision", "matplotlib", "scipy", "PIL")
    code = ("import sys, mergelib, mergelib.streaming\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))\n"
            "mergelib.zoo, mergelib.align\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))\n"
            "print('zoo' in dir(mergelib), type(mergelib.zoo).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, later, listed = r.stdout.splitlines()
    assert first == "[]" and "torchvision" in later, r.stdout
    assert listed == "True module"
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        mergelib.nonexistent  # noqa: B018


@pytest.mark.parametrize("method,hp,passes", [
    ("task_arithmetic", {}, 1), ("average", {}, 1), ("dare_ta", {"p": 0.5}, 1), ("fr", {}, 1),
    ("ties", {"granularity": "tensor"}, 1), ("dare_ties", {"granularity": "tensor", "p": 0.5}, 1),
    ("ties", {}, 3), ("ties", {"trim_rule": "exact"}, 3), ("pcb", {}, 4)])
def test_every_pass_reads_each_input_tensor_once(tmp_path, monkeypatch, method, hp, passes):
    """The number of passes the module docstring gives, counted: every merged tensor of the base and of
    each fine-tune is read exactly once per pass (the write pass reuses the base's tensor it read for the
    task vectors), the integer buffer once, from the base. With sign_rule="count" TIES never writes again."""
    pre, fts = _models(n=2)
    base, ftp = _write(tmp_path, pre, fts)
    reads = _record_reads(monkeypatch)
    if method in ("ties", "dare_ties"):
        hp = {**hp, "sign_rule": "count"}
    out = ml.merge_files(base, ftp, tmp_path / "out", method, quiet=True, **hp)
    merged = ml.merging._selected_keys(ml.merging.REGISTRY[method], pre, "auto", None, None)
    assert 0 < len(merged) < len(SHAPES)
    tail = set()
    if method in ("task_arithmetic", "average"):  # the flat sum's last partial block of 1024 entries spans
        layout = ml.FlatLayout.from_shapes({k: pre[k].shape for k in merged})  # the last keys: each is read
        tail = {k for k, s, e in layout.segments() if e > layout.D // 1024 * 1024}  # again for the others
        assert 1 < len(tail) < len(merged)
    for name in ("base", "ft0", "ft1"):
        count = {k: reads.count((name, k)) for k in merged}
        assert {k: c for k, c in count.items() if k not in tail} == {k: passes for k in merged if k not in tail}, name
        assert all(1 <= count[k] <= len(tail) for k in tail), (name, count)
    for k in set(SHAPES) - set(merged):  # not merged (a norm for the sums, the integer buffer): the base's, once
        assert (reads.count(("base", k)), reads.count(("ft0", k))) == (1, 0), k
    want = ml.merge(pre, fts, method, **hp)
    got = _load_dir(out)
    assert all(same_bytes(got[k], want[k].contiguous()) for k in want)


@pytest.mark.parametrize("absolute", [True, False])
def test_stream_kth_counts_the_zeros_of_unchanged_weights(monkeypatch, absolute):
    """Task vectors of fine-tunes that left 40 % of their weights exactly unchanged (the course's MiniLM
    fine-tunes: 42-44 %): PCB's clip ranks and drop thresholds fall in or next to the block of zeros.
    The zeros are counted, not kept, so no bracket holds more than 1/16 of a row and the two passes
    answer without the histogram fallback; the values and the counts above them are exact."""
    from mergelib import selection as sel

    g = torch.Generator().manual_seed(11)
    blocks = []
    for m in (90_000, 33, 50_000):
        b = torch.randn(3, m, generator=g) * 1e-3
        zero = torch.rand(3, m, generator=g) < 0.4
        b[zero] = 0.0
        b[zero & (torch.rand(3, m, generator=g) < 0.3)] = -0.0
        blocks.append(b)
    whole = torch.cat(blocks, 1)
    D = whole.shape[1]
    ks = [[int(D * 1e-4) + 1, D // 4, D // 2, int(D * 0.6), int(D * 0.95) + 1, D - 2]] * 3
    calls = []
    real = st._stream_kth_hist
    monkeypatch.setattr(st, "_stream_kth_hist", lambda *a, **k: calls.append(1) or real(*a, **k))
    vals, above = st._stream_kth(lambda: iter(blocks), 3, ks, absolute=absolute, count_above=True)
    assert not calls
    want = torch.stack([sel.kth_smallest(whole, k, dim=1, absolute=absolute) for k in ks[0]], 1)
    assert torch.equal(vals, want)
    w = whole.abs() if absolute else whole
    assert torch.equal(above, (w[:, None, :] > want[:, :, None]).sum(2))


def test_the_shard_writer_queues_tensors_in_its_ring_without_overwriting_one_in_flight(tmp_path, monkeypatch):
    """Tensors wait in the writer's ring (twice the largest tensor's bytes) while a slow thread writes the
    earlier ones: many small ones behind a large one, the ring wrapping around, dtypes of 2, 4 and 8 bytes
    at odd byte counts (each placed at an aligned offset), an empty tensor. The file holds every tensor's
    bytes, converted to its dtype, as safetensors reads them; the caller's tensors may be reused at once."""
    g = torch.Generator().manual_seed(3)
    sizes = [1000, 3, 5, 1, 0, 777, 2, 1000, 999, 7, 11, 13, 500, 1000, 1, 3]
    dtypes = [torch.bfloat16, torch.float32, torch.int64, torch.float16]
    keys = [f"t{i:02d}" for i in range(len(sizes))]
    meta = {k: ((n,), dtypes[i % 4]) for i, (k, n) in enumerate(zip(keys, sizes))}
    want = {k: (torch.randn(n, generator=g) * 100).to(dt) for k, ((n,), dt) in meta.items()}
    real, in_flight = st._ShardWriter._write, []

    def slow(self, data):
        in_flight.append(len(self.pending))
        threading.Event().wait(0.002)
        real(self, data)

    monkeypatch.setattr(st._ShardWriter, "_write", slow)
    w = st._ShardWriter(tmp_path / "s.safetensors", keys, meta)
    assert w.ring.numel() == 2 * 1000 * 4  # twice the largest tensor (1,000 float32)
    scratch = torch.empty(1000)
    for k in keys:
        src = scratch[:want[k].numel()]
        src.copy_(want[k].float())  # float32, as a merge hands its tensors over
        w.add(k, src)
        src.fill_(float("nan"))  # reused by the caller at once
    w.close()
    got = load_file(tmp_path / "s.safetensors")
    assert set(got) == set(keys)
    for k in keys:
        assert got[k].dtype == want[k].dtype and same_bytes(got[k], want[k]), k
    assert max(in_flight) >= 2  # writes did queue behind one another


def test_the_shard_writer_reports_a_failed_write_that_was_queued(tmp_path, monkeypatch):
    """A write that fails while later tensors wait behind it is the error of a later add() or of close()."""
    meta = {f"t{i}": ((10,), torch.float32) for i in range(6)}
    real = st._ShardWriter._write

    def failing(self, data):
        if len(data) == 40 and getattr(self, "_n", 0) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._n = getattr(self, "_n", 0) + (len(data) == 40)
        real(self, data)

    monkeypatch.setattr(st._ShardWriter, "_write", failing)
    w = st._ShardWriter(tmp_path / "s.safetensors", list(meta), meta)
    with pytest.raises(OSError, match="No space"):
        for k in meta:
            w.add(k, torch.ones(10))
        w.close()
    w.abort()
