"""tools/nbslice.py on small hand-built notebooks: what a target cell needs is kept, the rest is not."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from nbslice import slice_notebook  # noqa: E402


def nb(*sources, params=None):
    cells = [{"cell_type": "code", "metadata": {"tags": ["parameters"]} if i == params else {}, "source": s}
             for i, s in enumerate(sources)]
    return {"cells": cells}


def run(notebook, target):
    ns = {}
    code = slice_notebook(notebook, [target])
    for _, c in code:
        exec(c, ns)
    return ns, "\n".join(c for _, c in code)


def test_keeps_only_what_the_target_needs():
    book = nb("A = 1\nB = 2\nUNUSED = 1 / 0 if False else 3", "C = A + 1", "print_me = C * 10")
    ns, code = run(book, 2)
    assert ns["print_me"] == 20
    assert "B = 2" not in code and "UNUSED" not in code


def test_a_later_plain_assignment_kills_earlier_bindings():
    book = nb("X = 1 / 0", "X = 5", "Y = X")
    ns, code = run(book, 2)
    assert ns["Y"] == 5 and "1 / 0" not in code


def test_mutations_are_definitions():
    book = nb("D = {}", "D['a'] = 1", "D.update(b=2)", "OUT = sorted(D)")
    ns, _ = run(book, 3)
    assert ns["OUT"] == ["a", "b"]


def test_globals_read_by_a_function_may_be_bound_after_its_def():
    # the function is defined first and the dict it reads afterwards (in the same cell), then filled in a
    # later cell: all of it is needed when a later cell calls the function
    book = nb("def lookup(k):\n    return helper(TABLE[k])\n\ndef helper(v):\n    return v + OFFSET\n\n"
              "TABLE = {'a': 1}\nOFFSET = 100",
              "TABLE['b'] = 2",
              "NOISE = 0",
              "RESULT = lookup('b')")
    ns, code = run(book, 3)
    assert ns["RESULT"] == 102
    assert "NOISE" not in code


def test_parameters_cell_is_always_kept():
    book = nb("SEED = 0\nPROFILE = 'quick'", "Z = 1", params=0)
    ns, _ = run(book, 1)
    assert ns["PROFILE"] == "quick"
