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
    # notebook 06's browser test last: its notebook is the last to start (its cached results come from it)
    assert rank(item(browser, "06_reproduction")) == max(ranks)
    assert rank(item(browser, "07_real_checkpoints")) < rank(item(browser, "03_fourier_merging"))
    last_notebook = max(rank(item(f"notebooks/{nb}.ipynb")) for nb in notebooks)
    assert rank(item("notebooks/00_model_zoo.ipynb")) == min(rank(item(f"notebooks/{nb}.ipynb")) for nb in notebooks)
    assert last_notebook < min(ranks) and max(ranks) < rank(item("tests/test_lab.py"))
    assert rank(item("tests/test_merging.py")) < last_notebook
