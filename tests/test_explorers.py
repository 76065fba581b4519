"""Every notebook's explorer, at the Python level: move its main control, check what it shows.

For each notebook, a fresh Jupyter kernel runs only the statements the explorer cell needs
(``tools/nbslice.py``; the zoo and the protocol's results come from the cache), then the explorer cell
itself, then sets the control named by the cell's ``explorer`` metadata to another value. The widget's
callback must not raise, and what the explorer prints or draws (figure texts, recorded at ``plt.show``)
must contain the strings that the notebook's own pure function gives for the new value, which were
absent before the move. The browser version of this test is ``tests/browser/`` (``make test-browser``).
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import explorers  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Notebooks whose explorer cell has no spec yet (their authors add one, see docs/NOTEBOOK_GUIDE.md).
PENDING = {}  # notebooks whose explorer cell has no spec yet: name -> reason




@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_explorer_has_a_spec(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    ex = explorers.find_explorer(nb)
    if ex is None and path.name in PENDING:
        pytest.xfail(PENDING[path.name])
    assert ex is not None, (f"{path.name}: the explorer cell (one of cells {explorers.explorer_like_cells(nb)}) needs "
                            "an 'explorer' spec in its metadata (docs/NOTEBOOK_GUIDE.md)")
    assert ex.cell in explorers.explorer_like_cells(nb), "the spec sits on a cell that builds no widget"
    compile(ex.expect, "<expect>", "eval"), compile(ex.control, "<control>", "eval")


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in PENDING], ids=lambda p: p.name)
def test_explorer_callback(path, data_root):
    if os.environ.get("MERGELIB_BROWSER_TESTS") == "1" and os.environ.get("MERGELIB_REQUIRE_BROWSER") == "1":
        # CI: tests/browser runs the same slice, the same explorer cell and the same expected strings in
        # JupyterLab's kernel, and moves the control in Chromium; running both would double the time
        pytest.skip("checked end to end in the browser (tests/browser/test_browser_explorers.py)")
    r = explorers.run_python_check(path)
    print(f"{r['notebook']}: {r['control']} {r['old']!r} -> {r['new']!r}; {len(r['expected'])} expected strings; "
          f"prepared in {r['prep_s']:.0f} s, total {r['total_s']:.0f} s")
    assert r["new"] != r["old"], "the control did not move"
    assert not r["missing_after"], (f"after the move the explorer does not show what the pure function gives: "
                                    f"{r['missing_after']}\nshown:\n{r['shown'][-3000:]}")
    assert len(r["present_before"]) < len(r["expected"]), "the explorer already showed this before the move"
