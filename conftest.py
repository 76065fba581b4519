"""Repository-wide pytest configuration (unit tests and nbval on the notebooks)."""
import functools
import os
from pathlib import Path

import pytest
import torch

# tests/test_gpu_kernels.py runs the Triton kernels in Triton's interpreter, which must be chosen before
# triton is imported (torchvision imports it); where there is no CUDA nothing else runs Triton (on a GPU
# the kernels compile)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never download: a missing dataset must raise mergelib.data.DatasetNotFoundError instead.
os.environ["MERGELIB_DOWNLOAD"] = "0"
# Quiet, deterministic progress output when notebooks run under nbval.
os.environ.setdefault("TQDM_MININTERVAL", "5")


def _nbval_kernel_start_with_retries():
    """nbval starts each notebook's kernel with ``nbval.kernel.start_new_kernel``, open to the same port
    race as papermill's (see ``mergelib/nbexec.py``): a kernel that dies before its first reply would
    fail every cell of its notebook. Start such a kernel again, with a new manager and so new ports, up
    to ``KERNEL_START_ATTEMPTS`` times, as ``papermill --engine mergelib`` does."""
    try:
        import nbval.kernel
    except ImportError:
        return
    from mergelib.nbexec import KERNEL_START_ATTEMPTS

    start = nbval.kernel.start_new_kernel
    if getattr(start, "retried", False):
        return

    @functools.wraps(start)
    def start_new_kernel(*args, **kwargs):
        for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
            try:
                return start(*args, **kwargs)
            except RuntimeError:  # died or did not answer before its first reply; nbval shut it down
                if attempt == KERNEL_START_ATTEMPTS:
                    raise

    start_new_kernel.retried = True
    nbval.kernel.start_new_kernel = start_new_kernel


_nbval_kernel_start_with_retries()


def pytest_collectstart(collector):
    # nbval: compare stdout/results of marked cells, never stderr (warnings, progress bars).
    if hasattr(collector, "skip_compare"):
        collector.skip_compare += ("stderr",)


# The notebooks that load the ViT zoo, longest first (the fresh-clone run of `293db75`, a slow hour: 06 622 s,
# 01 524, 03 420, 04 277, 02 243): the longest start while the other worker still has work, so that the run
# does not end on one worker with a long notebook left (that run, in file order, ended with notebook 06 on
# one worker while the other had been idle for 190 s). Notebook 06 tunes every method of notebooks 02 and 03
# under the same cache keys: started first, it computes them once and 03 and 02 load them.
_ZOO_NOTEBOOK_ORDER = ("06_reproduction", "01_task_vectors", "03_fourier_merging", "04_lightweight_experts",
                       "02_parameter_competition")

# The browser tests of these notebooks, about longest first (the fresh-clone run of `6ebe77e`, 2 cores: 06
# 56 s, 07 40, 05 44, 01 40, 00 30, 04 31, 03 33, 02 41): they are the last units, so the longest go while
# the other worker still has work, and the run does not end on one worker with a long unit left. Notebook
# 02's comes last all the same: its notebook is the last to start, and a browser test that starts beside its
# notebook computes what the notebook has not cached yet (a fresh-clone run that put notebook 06's browser
# test beside notebook 06 took 168 s for it instead of 85).
_BROWSER_ORDER = ("06_reproduction", "07_real_checkpoints", "05_permutation_alignment", "01_task_vectors",
                  "00_model_zoo", "04_lightweight_experts", "03_fourier_merging", "02_parameter_competition")


def _schedule_rank(item) -> tuple[int, int]:
    """Order in which ``make test``'s workers (pytest-xdist, ``--dist loadfile``) pick up the files.

    Notebook 00 builds the ViT zoo that notebooks 01-04 and 06 load, so it starts first; the
    notebooks that train or load their own models (05 alignment, 07 real checkpoints) and the unit
    tests keep the other worker busy meanwhile; the zoo notebooks follow (in ``_ZOO_NOTEBOOK_ORDER``),
    then the tests that execute notebook cells on the zoo (explorers in the browser, in ``_BROWSER_ORDER``;
    in Python; lab copies). (A notebook that starts before its models exist waits on the cache lock,
    ``mergelib.utils.cache_lock``, so any order is correct; this one keeps both cores busy.)
    """
    path = str(item.fspath)
    name = os.path.basename(path)
    if name == "test_browser_explorers.py":
        stem = Path(item.callspec.params["path"]).stem if hasattr(item, "callspec") else ""
        return 4, _BROWSER_ORDER.index(stem) if stem in _BROWSER_ORDER else len(_BROWSER_ORDER)
    if name in ("test_explorers.py", "test_lab.py"):
        return 4, len(_BROWSER_ORDER) + 1   # they run notebook cells on the zoo: after the notebooks
    if not path.endswith(".ipynb"):
        return 2, 0
    first = {"00": 0, "05": 1, "07": 1}   # the zoo; the notebooks with models of their own
    if name[:2] in first:
        return first[name[:2]], 0
    stem = Path(path).stem
    return 3, _ZOO_NOTEBOOK_ORDER.index(stem) if stem in _ZOO_NOTEBOOK_ORDER else len(_ZOO_NOTEBOOK_ORDER)


def _work_unit(nodeid: str) -> str:
    """The unit of work a worker takes at once under ``make test``: a file, as with xdist's ``loadfile``
    (a notebook's cells share one kernel; a module's fixtures are built once), except the browser
    tests, one unit per notebook: as one file they were a ten-minute block at the end of the run that
    could leave the other worker idle."""
    path = nodeid.split("::", 1)[0]
    return nodeid if path.endswith("test_browser_explorers.py") else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the work units of :func:`_work_unit` (pytest-xdist's ``xdist_group``
    marks cannot do this: with pytest 9 they do not reach the scheduler)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class CourseScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return CourseScheduling(config, log)


def pytest_collection_modifyitems(session, config, items):
    items[:] = [it for _, _, it in sorted((_schedule_rank(it), i, it) for i, it in enumerate(items))]
