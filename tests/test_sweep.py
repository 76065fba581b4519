"""mergelib.sweep: grids, papermill runs (local and Dask), resume, failures, the report, record().

The notebooks are generated toys (two or three cells). Their kernels start from this process's
environment, so ``PYTHONPATH`` is set to this checkout for them (``kernel_env``): the venv may hold an
editable install of another checkout, and the kernels must import *this* ``mergelib``.
Kernel executions are the slow part (a kernel start and ``import mergelib``, a few seconds each on
a loaded CPU); they are shared through the module-scoped ``swept`` fixture.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from mergelib import sweep
from mergelib.sweep import SweepError, expand_grid, parse_grid, parse_value, record, run_sweep
from mergelib.sweep.__main__ import main
from mergelib.sweep.summary import load_runs, summarize

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "python3"  # shipped by ipykernel into the venv that `make setup` creates

pytestmark = pytest.mark.timeout(600)


def _notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("SEED = 0\nX = 1.0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def kernel_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        mp.delenv(sweep.RECORD_ENV, raising=False)
        yield


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    d = tmp_path_factory.mktemp("nbs")
    toy = _notebook(d / "toy.ipynb", 'import mergelib\nmergelib.sweep.record({"y": X * 2 + SEED})')
    fail = _notebook(d / "fail.ipynb", 'if X > 1:\n    raise ValueError(f"X too big: {X}")',
                     'import mergelib\nmergelib.sweep.record({"y": -X, "ok": True})')
    return toy, fail


@pytest.fixture(scope="module")
def swept(notebooks, kernel_env, tmp_path_factory):
    """toy: X in {1, 2} x seeds {0, 1} (in this process); fail: X in {1, 2}, seed 0 (pool of 2)."""
    toy, fail = notebooks
    out = tmp_path_factory.mktemp("sweep") / "out"
    res_toy = run_sweep([toy], out, grid={"X": [1.0, 2.0]}, seeds=[0, 1], kernel=KERNEL, progress=False)
    res_fail = run_sweep([fail], out, grid={"X": [1.0, 2.0]}, seeds=[0], workers=2, kernel=KERNEL, progress=False)
    return out, res_toy, res_fail


# ------------------------------------------------------------------------------------ pure functions
def test_expand_grid_is_the_cartesian_product_seed_slowest():
    runs = expand_grid({"PROFILE": "quick"}, {"A": [1, 2], "B": ["x", "y", "z"]}, seeds=[0, 1])
    assert len(runs) == 12
    assert runs[0] == {"SEED": 0, "A": 1, "B": "x", "PROFILE": "quick"}
    assert [(r["SEED"], r["A"], r["B"]) for r in runs[:4]] == [(0, 1, "x"), (0, 1, "y"), (0, 1, "z"), (0, 2, "x")]
    assert runs[6]["SEED"] == 1 and list(runs[0]) == ["SEED", "A", "B", "PROFILE"]
    assert expand_grid({"A": 1}, None, seeds=None) == [{"A": 1}]
    assert expand_grid(None, None, seeds=[3, 4]) == [{"SEED": 3}, {"SEED": 4}]
    with pytest.raises(ValueError, match="A"):
        expand_grid({"A": 1}, {"A": [1, 2]})
    with pytest.raises(ValueError, match="SEED"):
        expand_grid({"SEED": 1}, None, seeds=[0])


def test_values_are_parsed_like_papermill():
    assert [parse_value(v) for v in ("1", "-2", "0.3", "1e-3", "True", "False", "None", "abc", "1.0.0")] == \
        [1, -2, 0.3, 0.001, True, False, None, "abc", "1.0.0"]
    assert type(parse_value("1")) is int and type(parse_value("1.0")) is float
    assert parse_grid(["LAMBDA=0.3,0.5", "METHOD=ties, dare", "K=1"]) == \
        {"LAMBDA": [0.3, 0.5], "METHOD": ["ties", "dare"], "K": [1]}


@pytest.mark.parametrize("spec", [["X"], ["=1,2"], ["X="], ["X=1,,2"], ["X=1,1"], ["1X=2"], ["X=1", "X=2"]])
def test_malformed_grid(spec):
    with pytest.raises(SweepError, match="malformed --grid"):
        parse_grid(spec)


def test_parameters_cell_is_parsed_with_ast(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("%matplotlib inline\nA = 1\nB: int = 2\nC, (D, E) = 3, (4, 5)\n"
                                     "def f():\n    G = 1\nif True:\n    H = 2\n")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_code_cell("Z = 0"), cell]
    nbformat.write(nb, tmp_path / "p.ipynb")
    assert sweep.notebook_parameters(tmp_path / "p.ipynb") == {"A", "B", "C", "D", "E"}


def test_run_ids_are_readable_stable_and_distinct():
    a = sweep.run_id("nbs/02_pcb.ipynb", {"SEED": 0, "LAMBDA": 0.3, "ROOT": "/a b"}, ["SEED", "LAMBDA"])
    assert a.startswith("02_pcb__SEED=0__LAMBDA=0.3__") and "/" not in a and " " not in a
    assert a == sweep.run_id("elsewhere/02_pcb.ipynb", {"ROOT": "/a b", "LAMBDA": 0.3, "SEED": 0}, ["SEED", "LAMBDA"])
    assert a != sweep.run_id("nbs/02_pcb.ipynb", {"SEED": 0, "LAMBDA": 0.3, "ROOT": "/c"}, ["SEED", "LAMBDA"])


# -------------------------------------------------------------------------------------------- record
def test_record_outside_a_sweep_returns_the_metrics_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(sweep.RECORD_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    got = record({"acc": np.float32(0.5), "n": np.int64(3), "ok": np.bool_(True), "name": "ties", "i": 2})
    assert got == {"acc": 0.5, "n": 3, "ok": True, "name": "ties", "i": 2}
    assert type(got["n"]) is int and type(got["ok"]) is bool and type(got["acc"]) is float
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, exc", [(float("nan"), ValueError), (math.inf, ValueError),
                                        (np.float64("nan"), ValueError), ([1, 2], TypeError), (None, TypeError),
                                        (np.ones(2), TypeError)])
def test_record_rejects_non_finite_and_other_types_naming_the_key(value, exc, tmp_path, monkeypatch):
    monkeypatch.setenv(sweep.RECORD_ENV, str(tmp_path / "metrics.json"))
    with pytest.raises(exc, match="'bad'"):
        record({"fine": 1.0, "bad": value})
    assert not (tmp_path / "metrics.json").exists()


def test_record_in_a_sweep_merges_successive_calls_atomically(tmp_path, monkeypatch):
    dest = tmp_path / "run" / "metrics.json"
    monkeypatch.setenv(sweep.RECORD_ENV, str(dest))
    record({"a": 1.0, "b": 2})
    record({"b": 3, "c": "x"})
    assert json.loads(dest.read_text()) == {"a": 1.0, "b": 3, "c": "x"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["metrics.json"]  # no temporary files left


# ---------------------------------------------------------------------------------------- local runs
def test_every_run_gets_its_folder_parameters_and_metrics(swept):
    out, res_toy, _ = swept
    assert [r.status for r in res_toy] == ["ok"] * 4
    assert [(r.params["SEED"], r.params["X"]) for r in res_toy] == [(0, 1.0), (0, 2.0), (1, 1.0), (1, 2.0)]
    for r in res_toy:
        d = Path(r.path)
        assert d.parent == out and d.name == r.run_id and r.run_id.startswith(f"toy__SEED={r.params['SEED']}__X=")
        assert json.loads((d / "params.json").read_text())["parameters"] == r.params
        assert json.loads((d / "metrics.json").read_text()) == {"y": r.params["X"] * 2 + r.params["SEED"]}
        assert r.metrics == {"y": r.params["X"] * 2 + r.params["SEED"]}
        executed = nbformat.read(d / "toy.ipynb", as_version=4)
        assert "injected-parameters" in executed.cells[1].metadata.get("tags", [])
        assert not (d / "error.txt").exists()


def test_a_failing_run_keeps_its_notebook_and_error_and_does_not_stop_the_others(swept):
    out, _, res_fail = swept
    ok, bad = res_fail
    assert (ok.params["X"], ok.status, ok.metrics) == (1.0, "ok", {"y": -1.0, "ok": True}), ok.error
    assert bad.params["X"] == 2.0 and bad.status == "failed" and "ValueError: X too big: 2.0" in bad.error
    d = Path(bad.path)
    assert "ValueError: X too big: 2.0" in (d / "error.txt").read_text()
    partial = nbformat.read(d / "fail.ipynb", as_version=4)
    assert any(o.get("output_type") == "error" for c in partial.cells for o in c.get("outputs", []))
    assert not (d / "metrics.json").exists()


def test_resume_executes_nothing_that_is_done(swept, notebooks, kernel_env):
    out, res_toy, _ = swept
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_sweep([notebooks[0]], out, grid={"X": [1.0, 2.0]}, seeds=[0, 1], kernel=KERNEL, progress=False)
    assert [r.status for r in again] == ["skipped"] * 4
    assert [r.metrics for r in again] == [r.metrics for r in res_toy]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_retries_a_failed_run_and_keeps_the_earlier_attempt(swept, notebooks, kernel_env, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    bad = Path(swept[2][1].path).name
    again = run_sweep([notebooks[1]], out, grid={"X": [2.0]}, seeds=[0], kernel=KERNEL, progress=False)
    assert [r.status for r in again] == ["failed"] and again[0].run_id == bad
    assert (out / bad / "attempt-1" / "error.txt").read_text() == (swept[0] / bad / "error.txt").read_text()
    assert (out / bad / "attempt-1" / "fail.ipynb").exists() and (out / bad / "error.txt").exists()


def test_nothing_existing_is_overwritten(notebooks, tmp_path):
    toy = notebooks[0]
    rid = sweep.run_id(toy, {"SEED": 0, "X": 3.0}, ["SEED", "X"])
    d = tmp_path / rid
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"notebook": str(toy), "parameters": {"SEED": 0, "X": 4.0}}))
    (d / "toy.ipynb").write_text("precious")
    with pytest.raises(SweepError, match=rid):
        run_sweep([toy], tmp_path, grid={"X": [3.0]}, kernel=KERNEL, progress=False)
    (d / "params.json").unlink()
    with pytest.raises(SweepError, match=f"{rid} exists without params.json"):
        run_sweep([toy], tmp_path, grid={"X": [3.0]}, kernel=KERNEL, progress=False)
    with pytest.raises(SweepError, match="JSON"):
        run_sweep([toy], tmp_path, params={"X": tmp_path}, kernel=KERNEL, progress=False)
    assert (d / "toy.ipynb").read_text() == "precious" and sorted(p.name for p in tmp_path.rglob("*")) == \
        sorted([rid, "toy.ipynb"])


# -------------------------------------------------------------------------------------------- report
def _fake_run(out: Path, name: str, params: dict, status: str | None, metrics: dict | None = None,
              error: str | None = None) -> None:
    d = out / name
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps({"notebook": "/x/nb.ipynb", "parameters": params}))
    if status:
        (d / "status.json").write_text(json.dumps({"status": status}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if error:
        (d / "error.txt").write_text(error + "\ntraceback ...\n")


def test_report_aggregates_mean_sample_std_and_n(tmp_path):
    for seed, acc in enumerate([1.0, 2.0, 4.0]):
        _fake_run(tmp_path, f"a{seed}", {"SEED": seed, "LAM": 0.5, "P": "q"}, "ok", {"acc": acc, "tag": "t"})
    _fake_run(tmp_path, "b0", {"SEED": 0, "LAM": 1.0, "P": "q"}, "ok", {"acc": 7.0})
    _fake_run(tmp_path, "b1", {"SEED": 1, "LAM": 1.0, "P": "q"}, "failed", {}, error="KeyError: 'boom'")
    _fake_run(tmp_path, "b2", {"SEED": 2, "LAM": 1.0, "P": "q"}, None)
    varying, metrics, groups = summarize(load_runs(tmp_path))
    assert varying == ["LAM"] and metrics == ["acc"]
    a, b = groups
    assert (a["params"], a["n"], b["n"]) == ({"LAM": 0.5, "P": "q"}, 3, 1)
    assert a["mean"]["acc"] == pytest.approx(7 / 3)
    assert a["std"]["acc"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert math.isnan(b["std"]["acc"])
    paths = sweep.report(tmp_path)
    md = paths["markdown"].read_text()
    assert "| nb | 0.5 | 3 | 2.333 ± 1.5 |" in md and "| nb | 1.0 | 1 | 7 ± – |" in md
    assert "Fixed parameters: `P=q`" in md and "6 runs: 4 ok, 1 failed, 1 unfinished" in md
    failed = md.split("## Failed runs")[1].split("## Unfinished")[0]
    assert "`b1`" in failed and "KeyError: 'boom'" in failed and "`b2`" in md.split("## Unfinished")[1]
    rows = list(__import__("csv").DictReader(paths["csv"].open()))
    assert list(rows[0]) == ["run_id", "notebook", "status", "SEED", "LAM", "P", "metric", "value", "error"]
    assert len(rows) == 3 * 2 + 1 + 1 + 1
    assert [(r["run_id"], r["status"], r["metric"], r["error"]) for r in rows[-2:]] == \
        [("b1", "failed", "", "KeyError: 'boom'"), ("b2", "incomplete", "", "")]
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_orders_configurations_numerically(tmp_path):
    for name, x in [("a", 10), ("b", 2), ("c", "s"), ("d", 2.5)]:
        _fake_run(tmp_path, name, {"SEED": 0, "X": x}, "ok", {"m": 1.0})
    assert [g["params"]["X"] for g in summarize(load_runs(tmp_path))[2]] == [2, 2.5, 10, "s"]


def test_report_of_a_real_sweep(swept):
    out = swept[0]
    paths = sweep.report(out)
    md = paths["markdown"].read_text()
    assert "| toy | 1.0 | 2 | 2.5 ± 0.71 |" in md and "| toy | 2.0 | 2 | 4.5 ± 0.71 |" in md
    assert "ValueError: X too big: 2.0" in md.split("## Failed runs")[1]
    assert paths["figure"].stat().st_size > 1000


# ------------------------------------------------------------------------------------- CLI and Dask
def _cli(capsys, *args):
    code = main(list(map(str, args)))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_errors_exit_2_and_name_the_problem(notebooks, tmp_path, capsys):
    toy = notebooks[0]
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "run", tmp_path / "missing.ipynb", "--out", out)
    assert code == 2 and "notebook not found" in err and "missing.ipynb" in err
    code, _, err = _cli(capsys, "run", toy, "--out", out, "-p", "LAMBDA", "0.3")
    assert code == 2 and "LAMBDA" in err and "not defined" in err and "toy.ipynb" in err and "SEED, X" in err
    code, _, err = _cli(capsys, "run", toy, "--out", out, "--grid", "Y=1,2")
    assert code == 2 and "Y" in err and "not defined" in err
    code, _, err = _cli(capsys, "run", toy, "--out", out, "--grid", "X:1,2")
    assert code == 2 and "malformed --grid 'X:1,2'" in err
    code, _, err = _cli(capsys, "run", toy, "--out", out, "--kernel", "no-such-kernel")
    assert code == 2 and "no-such-kernel" in err
    code, _, err = _cli(capsys, "report", tmp_path / "nothing")
    assert code == 2 and "nothing" in err
    assert not out.exists()


def test_cli_unreachable_scheduler(notebooks, tmp_path, capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    code, _, err = _cli(capsys, "run", notebooks[0], "--out", tmp_path / "out", "--scheduler", address)
    assert code == 2 and address in err and "cannot reach" in err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_entry_point_and_a_light_import(tmp_path):
    """One interpreter (importing torch costs seconds): ``-m`` semantics via runpy, then sys.modules."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['mergelib.sweep', 'run', {str(tmp_path / 'nope.ipynb')!r}, '--out', {str(tmp_path)!r}]\n"
            "try:\n    runpy.run_module('mergelib.sweep', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print(sorted(m for m in ('dask', 'distributed', 'papermill') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.splitlines() == ["exit 2", "[]"], r.stderr
    assert "error: notebook not found" in r.stderr and "nope.ipynb" in r.stderr and "Warning" not in r.stderr


@pytest.mark.slow
def test_dask_scheduler_runs_a_grid(notebooks, kernel_env, tmp_path, capsys):
    from distributed import LocalCluster

    out = tmp_path / "out"
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        code, stdout, _ = _cli(capsys, "run", *notebooks, "--out", out, "--grid", "X=0.5,2.0", "--seeds", "3",
                               "--scheduler", cluster.scheduler_address, "--no-progress")
    assert code == 1 and "4 runs: 3 ok, 0 skipped (done before), 1 failed" in stdout
    runs = {r["run_id"].split("__")[0] + str(r["params"]["X"]): r for r in load_runs(out)}
    assert runs["toy0.5"]["metrics"] == {"y": 4.0} and runs["toy2.0"]["metrics"] == {"y": 7.0}
    assert runs["fail0.5"]["status"] == "ok" and runs["fail2.0"]["status"] == "failed"
    assert "X too big" in runs["fail2.0"]["error"]
