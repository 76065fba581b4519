"""The load-or-train cache: second call loads, changed config retrains, damage is detected."""
import json

import pytest
import torch

from mergelib import zoo


def _counter_train(calls, value=1.0):
    def train():
        calls.append(1)
        return {"w": torch.full((3, 2), value), "b": torch.arange(3.0)}, {"metrics": {"acc": 0.5}}
    return train


def test_second_call_loads_without_training(tmp_path):
    calls = []
    cfg = {"lr": 0.1, "steps": 3}
    t1, r1 = zoo.load_or_train("m", cfg, _counter_train(calls), "quick", root=tmp_path, verbose=False)
    t2, r2 = zoo.load_or_train("m", cfg, _counter_train(calls), "quick", root=tmp_path, verbose=False)
    assert len(calls) == 1
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert r2["config"] == cfg and r2["metrics"] == {"acc": 0.5} and "versions" in r2 and "train_time_s" in r2
    assert r1["sha256"] == r2["sha256"]
    files = sorted(p.name for p in (tmp_path / "quick").iterdir() if not p.name.endswith(".lock"))
    assert files == [f"m-{zoo.config_hash(cfg)}.json", f"m-{zoo.config_hash(cfg)}.safetensors"]


def test_changed_config_retrains(tmp_path):
    calls = []
    zoo.load_or_train("m", {"lr": 0.1}, _counter_train(calls), "quick", root=tmp_path, verbose=False)
    t, r = zoo.load_or_train("m", {"lr": 0.2}, _counter_train(calls, 2.0), "quick", root=tmp_path, verbose=False)
    assert len(calls) == 2 and float(t["w"][0, 0]) == 2.0
    assert zoo.config_hash({"lr": 0.1}) != zoo.config_hash({"lr": 0.2})
    assert zoo.config_hash({"a": 1, "b": 2}) == zoo.config_hash({"b": 2, "a": 1})


def test_profiles_are_separate(tmp_path):
    calls = []
    zoo.load_or_train("m", {}, _counter_train(calls), "quick", root=tmp_path, verbose=False)
    zoo.load_or_train("m", {}, _counter_train(calls), "full", root=tmp_path, verbose=False)
    assert len(calls) == 2


def test_an_unknown_profile_is_named_with_the_closest():
    from mergelib.utils import resolve_profile
    assert resolve_profile("quick") == "quick" and resolve_profile("full") == "full"
    with pytest.raises(ValueError, match=r"unknown profile 'Full' \(did you mean 'full'\?\); expected 'auto' or one "
                                         r"of \('quick', 'full'\)"):
        resolve_profile("Full")
    with pytest.raises(ValueError, match=r"unknown profile 'gpu'; expected"):
        resolve_profile("gpu")


def test_truncated_file_is_detected(tmp_path):
    calls = []
    cfg = {"x": 1}
    zoo.load_or_train("m", cfg, _counter_train(calls), "quick", root=tmp_path, verbose=False)
    path = tmp_path / "quick" / f"m-{zoo.config_hash(cfg)}.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(zoo.CorruptCheckpointError, match="damaged"):
        zoo.load_or_train("m", cfg, _counter_train(calls), "quick", root=tmp_path, verbose=False)
    assert len(calls) == 1
    # explicitly asking for a retrain repairs it
    t, _ = zoo.load_or_train("m", cfg, _counter_train(calls), "quick", root=tmp_path, on_corrupt="retrain",
                             verbose=False)
    assert len(calls) == 2 and zoo.load_checkpoint(path)[0]["w"].shape == (3, 2)


def test_flipped_byte_and_bad_record_are_detected(tmp_path):
    path = tmp_path / "c.safetensors"
    zoo.save_checkpoint(path, {"w": torch.ones(4)}, {"config": {}})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(zoo.CorruptCheckpointError, match="SHA-256"):
        zoo.load_checkpoint(path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(zoo.CorruptCheckpointError, match="unreadable"):
        zoo.load_checkpoint(path)
    path.unlink()
    path.with_suffix(".json").write_text(json.dumps({"sha256": "0"}))
    with pytest.raises(zoo.CorruptCheckpointError, match="missing"):
        zoo.load_checkpoint(path)


def test_interrupted_write_leaves_nothing_valid(tmp_path, monkeypatch):
    """A crash while writing must leave no checkpoint that loads, and no temp files."""
    import os

    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_record(src, dst):
        calls["n"] += 1
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("simulated crash before the record is in place")
        return real_replace(src, dst)

    monkeypatch.setattr(zoo.os, "replace", crash_on_record)
    with pytest.raises(KeyboardInterrupt):
        zoo.save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(2)}, {})
    monkeypatch.setattr(zoo.os, "replace", real_replace)
    with pytest.raises(FileNotFoundError):
        zoo.load_checkpoint(tmp_path / "c.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp" or p.name.endswith(".tmp.json")]


def test_existing_checkpoint_is_not_overwritten_by_failed_training(tmp_path):
    calls = []
    cfg = {"y": 1}
    zoo.load_or_train("m", cfg, _counter_train(calls), "quick", root=tmp_path, verbose=False)

    def failing():
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        zoo.load_or_train("m", cfg, failing, "quick", root=tmp_path, retrain=True, verbose=False)
    t, _ = zoo.load_or_train("m", cfg, failing, "quick", root=tmp_path, verbose=False)
    assert torch.equal(t["w"], torch.ones(3, 2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_corrupt"):
        zoo.load_or_train("m", {}, lambda: ({}, {}), "quick", on_corrupt="ignore")
    with pytest.raises(ValueError, match=".safetensors"):
        zoo.save_checkpoint("x.pt", {}, {})
    with pytest.raises(TypeError, match="not a tensor"):
        zoo.save_checkpoint("/tmp/never.safetensors", {"a": 1}, {})


def test_vit_zoo_rejects_unknown_task():
    with pytest.raises(KeyError, match="unknown downstream tasks"):
        zoo.vit_zoo("quick", tasks=["mnist", "svhn"], device="cpu")


def test_classifier_zoo_trains_then_loads(tmp_path, data_root):
    train = dict(steps=3, batch_size=16, lr=1e-3, weight_decay=0.0, max_samples=64, test_samples=32,
                 image_size=28, channels=1)
    kw = dict(arch="mlp", arch_kwargs={"in_features": 784, "hidden": [16]}, task="mnist", train=train, seed=1,
              profile="quick", device="cpu", zoo_root=tmp_path, progress=False, verbose=False)
    m1, r1 = zoo.classifier("mlp-test", **kw)
    m2, r2 = zoo.classifier("mlp-test", **kw)
    assert r1["sha256"] == r2["sha256"] and "acc" in r1["metrics"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(KeyError, match="unknown architecture"):
        zoo.classifier("x", **{**kw, "arch": "vgg"})


def test_atomic_files_all_or_nothing(tmp_path):
    from mergelib.utils import atomic_files

    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    a.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_files(a, b) as (ta, tb):
            open(ta, "w").write("new a")
            raise RuntimeError("boom")
    assert a.read_text() == "old" and not b.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt"]  # no temp files left
    with atomic_files(a, b) as (ta, tb):
        open(ta, "w").write("new a")
        open(tb, "w").write("new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert oct(a.stat().st_mode & 0o777) != oct(0o600)  # ordinary permissions, not mkstemp's 0600


@pytest.mark.parametrize("record", ["[1, 2]", "\"text\"", "3", "null"])
def test_record_that_is_valid_json_but_not_an_object_is_corrupt(tmp_path, record):
    path = tmp_path / "c.safetensors"
    zoo.save_checkpoint(path, {"w": torch.ones(4)}, {"config": {}})
    path.with_suffix(".json").write_text(record)
    with pytest.raises(zoo.CorruptCheckpointError, match="is not a JSON object"):
        zoo.load_checkpoint(path)


def test_stale_temporaries_of_killed_saves_are_swept(tmp_path):
    import os
    import time
    calls = []
    zoo.load_or_train("m", {}, _counter_train(calls), "quick", root=tmp_path, verbose=False)
    folder = tmp_path / "quick"
    stale, fresh = folder / ".m-abc.safetensors.x1.tmp", folder / ".m-abc.safetensors.x2.tmp"
    stale.write_bytes(b"\0" * 1000)  # what a SIGKILL during save_file leaves behind
    fresh.write_bytes(b"\0" * 10)  # may belong to a save in progress in another process
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    zoo.load_or_train("m", {}, _counter_train(calls), "quick", root=tmp_path, verbose=False)  # a cache hit
    assert not stale.exists() and fresh.exists() and len(calls) == 1


_PARALLEL_CHILD = r"""
import sys, time, torch
from mergelib import zoo
root, log = sys.argv[1], sys.argv[2]
def train():
    with open(log, "a") as f:
        f.write("trained\n")
    time.sleep(1.5)
    return {"w": torch.ones(3)}, {"metrics": {}}
t, r = zoo.load_or_train("shared", {"a": 1}, train, "quick", root=root, verbose=False)
assert torch.equal(t["w"], torch.ones(3))
"""


def test_parallel_processes_train_a_cache_entry_once(tmp_path):
    # Two notebooks executed in parallel (make test runs pytest-xdist) that need the same model: the
    # second process waits on the entry's lock and loads what the first saved.
    import subprocess
    import sys

    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-c", _PARALLEL_CHILD, str(tmp_path), str(log)]
    procs = [subprocess.Popen(cmd) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert log.read_text().count("trained") == 1
