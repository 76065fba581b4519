"""Where the browser tests find Chromium, its driver and selenium; why they skip.

The browser tests are opt-in: ``make test-browser`` (sets MERGELIB_BROWSER_TESTS=1).

They need Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and the
``selenium`` package (the ``test`` extra). Without them they skip with a message saying what is missing,
unless ``MERGELIB_REQUIRE_BROWSER=1`` (CI), which turns that into a failure.
"""
import os
import shutil

CHROMIUM = os.environ.get("MERGELIB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
    or shutil.which("google-chrome")
CHROMEDRIVER = os.environ.get("MERGELIB_CHROMEDRIVER") or shutil.which("chromedriver")


def browser_missing() -> str | None:
    if os.environ.get("MERGELIB_BROWSER_TESTS") != "1":
        return "browser tests are opt-in: run `make test-browser` (MERGELIB_BROWSER_TESTS=1)"
    missing = []
    if not (CHROMIUM and os.path.exists(CHROMIUM)):
        missing.append("chromium (apt-get install chromium)")
    if not (CHROMEDRIVER and os.path.exists(CHROMEDRIVER)):
        missing.append("chromedriver (apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    return ("no browser to drive: missing " + ", ".join(missing)) if missing else None


