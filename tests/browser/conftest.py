"""Browser tests are opt-in (``make test-browser``); see browserenv.py."""
import os

import pytest

from browserenv import browser_missing


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MERGELIB_BROWSER_TESTS") == "1":
        return                      # opted in: the fixtures skip (or fail, under MERGELIB_REQUIRE_BROWSER=1)
    for item in items:
        if "tests/browser" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=browser_missing()))
