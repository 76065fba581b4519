"""Notebooks are committed executed, in normal form, with parameters, checks and exercises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name.startswith("00_")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    tags = [c.get("metadata", {}).get("tags", []) for c in code]
    assert sum("parameters" in t for t in tags) == 1, "exactly one cell tagged 'parameters'"
    assert any("solution" in t for t in tags), "exercises with cells tagged 'solution'"
    assert all(c.get("execution_count") is not None for c in code), "committed executed"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    src = ["".join(c["source"]) for c in code]
    assert any(s.startswith("# NBVAL_CHECK_OUTPUT") for s in src), "a checked summary cell"
    assert any("assert " in s for s in src), "expected results are asserted"
    params = "".join(code[[i for i, t in enumerate(tags) if "parameters" in t][0]]["source"])
    for knob in ("PROFILE", "DEVICE", "SEED", "DATA_ROOT"):
        assert knob in params, f"parameters cell lacks {knob}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_sees_every_parameter(path):
    """papermill's own inspection of the parameters cell (``papermill --help-notebook``, and its check of
    ``-p NAME`` against the notebook) finds every name the cell assigns: a line it cannot parse (e.g. a
    comment holding '=' or an apostrophe) hides that parameter and warns "Passed unknown parameter"."""
    import ast

    from papermill.translators import PythonTranslator

    nb = json.loads(path.read_text())
    src = "".join(next(c["source"] for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])))
    assigned = {t.id for n in ast.parse(src).body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    seen = {p.name for p in PythonTranslator.inspect({"source": src})}
    assert assigned and seen == assigned, sorted(assigned - seen)


def test_notebooks_are_in_normal_form():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "normalize_notebooks.py"), "--check",
                        *map(str, NOTEBOOKS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

# The lab copies (lab/, tools/make_lab_copies.py) are tested in tests/test_lab.py.
