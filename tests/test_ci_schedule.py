"""The work units of ``make test``'s two workers (the repository's conftest.py)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
root_conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(root_conftest)


def test_a_file_is_one_unit_except_the_browser_tests():
    unit = root_conftest._work_unit
    assert unit("notebooks/00_model_zoo.ipynb::Cell 5") == unit("notebooks/00_model_zoo.ipynb::Cell 6") \
        == "notebooks/00_model_zoo.ipynb"
    assert unit("tests/test_sweep.py::test_resume[a]") == "tests/test_sweep.py"
    b0 = "tests/browser/test_browser_explorers.py::test_explorer_in_the_browser[00_model_zoo.ipynb]"
    b5 = "tests/browser/test_browser_explorers.py::test_explorer_in_the_browser[05_permutation_alignment.ipynb]"
    assert unit(b0) == b0 and unit(b5) == b5 and unit(b0) != unit(b5)


def test_other_dist_modes_keep_xdist_scheduler():
    class Config:
        def getvalue(self, name):
            return "load" if name == "dist" else None

    assert root_conftest.pytest_xdist_make_scheduler(Config(), None) is None


def test_the_browser_tests_come_last_in_their_order_and_name_every_notebook():
    from types import SimpleNamespace

    notebooks = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(root_conftest._BROWSER_ORDER) == notebooks

    def item(path, nb=None):
        it = SimpleNamespace(fspath=path)
        if nb is not None:
            it.callspec = SimpleNamespace(params={"path": Path("/x/notebooks") / f"{nb}.ipynb"})
        return it

    rank = root_conftest._schedule_rank
    browser = "tests/browser/test_browser_explorers.py"
    ranks = [rank(item(browser, nb)) for nb in root_conftest._BROWSER_ORDER]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    zoo_notebooks = [nb for nb in notebooks if nb[:2] not in ("00", "05", "07")]
    assert sorted(root_conftest._ZOO_NOTEBOOK_ORDER) == zoo_notebooks
    nb_ranks = {nb: rank(item(f"notebooks/{nb}.ipynb")) for nb in notebooks}
    assert [nb_ranks[nb] for nb in root_conftest._ZOO_NOTEBOOK_ORDER] == sorted(nb_ranks[nb] for nb in zoo_notebooks)
    assert len(set(nb_ranks[nb] for nb in zoo_notebooks)) == len(zoo_notebooks)
    # the browser test of the zoo notebook that starts last comes last (its cached results come from it)
    last_started = max(zoo_notebooks, key=nb_ranks.get)
    assert rank(item(browser, last_started)) == max(ranks)
    assert rank(item(browser, "07_real_checkpoints")) < rank(item(browser, "03_fourier_merging"))
    last_notebook = max(nb_ranks.values())
    assert nb_ranks["00_model_zoo"] == min(nb_ranks.values())
    assert last_notebook < min(ranks) and max(ranks) < rank(item("tests/test_lab.py"))
    assert rank(item("tests/test_merging.py")) < last_notebook


def _timeline():
    spec = importlib.util.spec_from_file_location("ci_timeline", Path(__file__).resolve().parents[1] / "tools" / "ci_timeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_timeline_plugin_writes_a_line_per_test_on_the_worker_only(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    tl = _timeline()
    log = tmp_path / "t.jsonl"
    monkeypatch.setenv("CI_TIMELINE_LOG", str(log))

    def config(dist, worker=False):
        c = SimpleNamespace(getoption=lambda name, default=None: dist if name == "dist" else default)
        if worker:
            c.workerinput = {"workerid": "gw1"}
        return c

    tl.pytest_configure(config("loadfile"))               # the xdist controller: no line
    tl.pytest_runtest_logstart("a.py::t", None)
    tl.pytest_runtest_logfinish("a.py::t", None)
    assert not log.exists()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    tl.pytest_configure(config("loadfile", worker=True))  # a worker
    tl.pytest_runtest_logstart("a.py::t", None)
    tl.pytest_runtest_logfinish("a.py::t", None)
    tl.pytest_runtest_logfinish("never-started", None)    # no start recorded: ignored
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    tl.pytest_configure(config("no"))                     # a run without xdist
    tl.pytest_runtest_logstart("b.py::t", None)
    tl.pytest_runtest_logfinish("b.py::t", None)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["id"], r["worker"]) for r in rows] == [("a.py::t", "gw1"), ("b.py::t", "main")]
    assert all(r["end"] >= r["start"] for r in rows)


def test_the_timeline_summary_per_work_unit():
    import pytest

    tl = _timeline()
    b = "tests/browser/test_browser_explorers.py::test_explorer_in_the_browser"
    rows = [{"id": "notebooks/00_model_zoo.ipynb::Cell 0", "worker": "gw0", "start": 100.0, "end": 101.0},
            {"id": "notebooks/00_model_zoo.ipynb::Cell 1", "worker": "gw0", "start": 101.0, "end": 150.0},
            {"id": "tests/test_x.py::a", "worker": "gw1", "start": 100.5, "end": 110.0},
            {"id": f"{b}[01.ipynb]", "worker": "gw1", "start": 110.0, "end": 130.0},
            {"id": f"{b}[02.ipynb]", "worker": "gw1", "start": 130.0, "end": 131.0}]
    units, busy, length = tl.summarise(rows)
    assert [(u["unit"], u["tests"]) for u in units] == [("notebooks/00_model_zoo.ipynb", 2), ("tests/test_x.py", 1),
                                                        (f"{b}[01.ipynb]", 1), (f"{b}[02.ipynb]", 1)]
    assert units[0]["start"] == 0 and units[0]["duration"] == 50 and units[2]["start"] == 10
    assert busy == {"gw0": 50, "gw1": 30.5} and length == 50
    with pytest.raises(ValueError, match="empty"):
        tl.summarise([])
