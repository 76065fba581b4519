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
