"""Repository-wide pytest configuration (unit tests and nbval on the notebooks)."""
import os

# Tests never download: a missing dataset must raise mergelib.data.DatasetNotFoundError instead.
os.environ["MERGELIB_DOWNLOAD"] = "0"
# Quiet, deterministic progress output when notebooks run under nbval.
os.environ.setdefault("TQDM_MININTERVAL", "5")


def pytest_collectstart(collector):
    # nbval: compare stdout/results of marked cells, never stderr (warnings, progress bars).
    if hasattr(collector, "skip_compare"):
        collector.skip_compare += ("stderr",)
