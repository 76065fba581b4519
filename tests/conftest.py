"""Fixtures shared by the unit tests."""
import os

import pytest

from mergelib import data as mdata


def _require_data() -> bool:
    return os.environ.get("MERGELIB_REQUIRE_DATA", "0") == "1"


@pytest.fixture(scope="session")
def data_root():
    """The configured data root, if it holds the offline datasets.

    Tests that need real data are skipped (with the reason) when it is absent, except where
    ``MERGELIB_REQUIRE_DATA=1`` (as in ``.ci/run``): then a missing dataset fails the run.
    """
    root = mdata.data_root()
    if not (root / "MNIST" / "raw").is_dir():
        msg = (f"offline datasets not found under {root}; set MERGELIB_DATA_ROOT "
               "(e.g. to ../shared/datasets) to run the data tests")
        if _require_data():
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def pretrained_dir():
    """Folder of the five CIFAR-10 ResNet-20 checkpoints, where the library looks for them
    (``$MERGELIB_PRETRAINED``, else ``data/pretrained``: :func:`mergelib.pretrained.pretrained_dir`)."""
    from mergelib.pretrained import pretrained_dir as library_dir

    d = library_dir() / "cifar10-resnet20"
    if not d.is_dir():
        msg = (f"the CIFAR-10 ResNet-20 checkpoints are not in {d} (mergelib.pretrained.resnet20_checkpoints("
               "download=True) fetches them there); or set MERGELIB_PRETRAINED to the folder that holds them")
        if _require_data():
            pytest.fail(msg)
        pytest.skip(msg)
    return d
