"""Lab copies (``lab/``, ``make lab``): in sync with the notebooks, scaffolded, and their checks work.

* ``lab/`` is committed and must equal what ``tools/make_lab_copies.py`` generates now;
* every solution became a scaffold + a check cell, outputs are cleared, no give-away markdown is left;
* ``mergelib.lab.check`` accepts the right answer, rejects a wrong one, reports a missing one (unit
  test, and once end to end through a generated lab copy of a toy notebook in a real kernel);
* each lab copy, with its scaffolds filled by the reference solutions, passes its own check cells.
  Only the exercise cells and the statements they need run (``tools/nbslice.py``). By default this
  runs for the notebooks in ``LAB_DEFAULT`` (00: its exercises take ≈ 35 s); ``MERGELIB_LAB_TESTS=all`` runs every
  notebook (``make test-lab``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_lab_copies as mlc  # noqa: E402
from explorers import Kernel  # noqa: E402
from nbslice import slice_notebook  # noqa: E402

import mergelib.lab as lab  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LAB_DEFAULT = {"00_model_zoo.ipynb"}
KERNEL_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_lab_copies_in_sync():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_lab_copies.py"), "--check", *map(str, NOTEBOOKS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + "\nthe committed lab/ copies are stale: run `make lab` and commit lab/"
    assert sorted(p.name for p in (ROOT / "lab").glob("*.ipynb")) == [p.name for p in NOTEBOOKS], \
        "lab/ holds a copy of every notebook and nothing else"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lab_copy_structure(path):
    orig = json.loads(path.read_text(encoding="utf-8"))
    copy = mlc.lab_copy(orig, path.name)
    cells = copy["cells"]
    assert "lab-note" in _tags(cells[0])
    sol = [c for c in orig["cells"] if "solution" in _tags(c)]
    ex = [c for c in cells if "exercise" in _tags(c)]
    ck = [c for c in cells if "check" in _tags(c)]
    assert len(sol) == len(ex) == len(ck) > 0
    assert len(cells) == len(orig["cells"]) + 1 + len(sol)
    for c in cells:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None
            assert "solution" not in _tags(c) and "lab" not in c["metadata"] and "explorer" not in c["metadata"]
        else:
            assert "lab:hide" not in c["source"] and "lab:show" not in c["source"]
    for s, e, k in zip(sol, ex, ck):
        assert "..." in e["source"] or "nothing automatically" in e["source"], e["source"]
        assert e["source"] != mlc.src(s)
        assert "mergelib.lab.check(" in k["source"]
        blob = k["source"].split('reference="')[1].split('"')[0]
        assert lab.decode(blob) == mlc.reference_solution(s)
    # every other code cell is unchanged, every markdown cell too unless it carried lab markers
    rest_o = [c for c in orig["cells"] if "solution" not in _tags(c)]
    rest_l = [c for c in cells[1:] if not {"exercise", "check"} & set(_tags(c))]
    for a, b in zip(rest_o, rest_l):
        if a["cell_type"] == "code" or "lab:" not in mlc.src(a):
            assert mlc.src(a) == b["source"]


def test_give_away_markdown_is_hidden():
    text = "It works.<!-- lab:hide --> Exercise 3 shows 83 %.<!-- /lab:hide --><!-- lab:show Does it? --> End."
    assert mlc.lab_markdown(text) == "It works.Does it? End."


def test_check_compares_values():
    ref = lab.encode("total = sum(v * 2 for v in data)\nhist = {'a': torch.ones(3)}\n")
    ns = {"data": [1.0, 2.0], "torch": torch, "total": 6.0, "hist": {"a": torch.ones(3)}}
    assert lab.check("1", ["total", "hist"], ref, namespace=ns) is True
    ns["total"] = 6.5
    with pytest.raises(AssertionError, match="total"):
        lab.check("1", ["total"], ref, namespace=ns)
    ns["total"] = ...
    assert lab.check("1", ["total"], ref, namespace=ns) is False      # not attempted: reported, no error
    assert lab.check("1", ["undefined_name"], ref, namespace=ns) is False
    assert lab.compare({"a": [1, 2.0]}, {"a": [1, 2.0 + 1e-9]}) == []
    assert lab.compare(torch.zeros(2), torch.zeros(3)) == ["value: shape (2,), expected (3,)"]


def _toy_notebook():
    md = lambda s: {"cell_type": "markdown", "metadata": {}, "source": s}  # noqa: E731
    code = lambda s, **meta: {"cell_type": "code", "metadata": meta, "source": s, "outputs": [],  # noqa: E731
                              "execution_count": 1}
    return {"nbformat": 4, "nbformat_minor": 4, "metadata": {}, "cells": [
        code("SEED = 0\n", tags=["parameters"]),
        code("import torch\nimport mergelib as ml\ndata = torch.arange(6.0)\nunused = data.sum()\n"),
        md("The mean is 2.5.<!-- lab:hide --> Exercise 1 gives 5.0.<!-- /lab:hide -->\n\n**Exercise 1.** Double it."),
        code("def double(v):\n    \"\"\"Twice v.\"\"\"\n    return 2 * v\n\ntwice = double(data).mean()\nprint(twice)\n",
             tags=["solution"]),
    ]}


def test_lab_copy_end_to_end_in_a_kernel():
    """A generated lab copy in a real kernel: reference fill passes, a wrong answer fails, empty is reported."""
    nb = mlc.lab_copy(_toy_notebook(), "toy.ipynb")
    ex = next(c for c in nb["cells"] if "exercise" in _tags(c))
    ck = next(c for c in nb["cells"] if "check" in _tags(c))
    assert "def double(v):" in ex["source"] and "twice = ..." in ex["source"] and "return" not in ex["source"]
    assert "5.0" not in "".join(c["source"] for c in nb["cells"] if c["cell_type"] == "markdown")
    k = Kernel(env=KERNEL_ENV)
    try:
        for c in nb["cells"]:
            if c["cell_type"] == "code" and not {"exercise", "check"} & set(_tags(c)):
                assert k.run(c["source"]).error is None
        r = k.run(ex["source"] + "\n" + ck["source"])                     # the scaffold as handed out
        assert r.error is None and "not attempted yet" in r.text, r.text
        r = k.run("def double(v):\n    return 3 * v\ntwice = double(data).mean()\n" + ck["source"])
        assert r.error is not None and "differs from the reference" in r.error, r
        r = k.run(mlc.src(_toy_notebook()["cells"][3]) + "\n" + ck["source"])
        assert r.error is None and "all 1 checked value(s) match" in r.text, r.text
    finally:
        k.shutdown()




def filled_lab_copy(path: Path) -> tuple[dict, list[int]]:
    """The lab copy with each scaffold replaced by its reference solution; indices of the cells to check."""
    orig = json.loads(path.read_text(encoding="utf-8"))
    nb = mlc.lab_copy(orig, path.name)
    refs = iter(mlc.reference_solution(c) for c in orig["cells"] if "solution" in _tags(c))
    targets = []
    for i, c in enumerate(nb["cells"]):
        if "exercise" in _tags(c):
            c["source"] = next(refs)
            targets.append(i)
        elif "check" in _tags(c):
            targets.append(i)
    return nb, targets


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lab_copy_passes_its_checks_with_the_reference_solutions(path, data_root):
    if path.name not in LAB_DEFAULT and os.environ.get("MERGELIB_LAB_TESTS") != "all":
        pytest.skip("exercise run of this lab copy is opt-in: MERGELIB_LAB_TESTS=all (make test-lab)")
    nb, targets = filled_lab_copy(path)
    k = Kernel(env=KERNEL_ENV)
    try:
        n_checks = 0
        for cell, code in slice_notebook(nb, targets):
            r = k.run(code)
            assert r.error is None, f"lab copy of {path.name}, cell {cell}: {r.error}"
            if "check" in _tags(nb["cells"][cell]):
                n_checks += 1
                assert "match." in r.text and "not attempted" not in r.text, r.text
        assert n_checks == sum("check" in _tags(c) for c in nb["cells"])
    finally:
        k.shutdown()
