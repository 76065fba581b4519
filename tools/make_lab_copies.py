#!/usr/bin/env python3
"""Generate the lab copy of each notebook: what a student gets in a classroom.

For every notebook ``notebooks/NN_name.ipynb`` this writes ``lab/NN_name.ipynb`` (committed, so an
instructor can hand the files out as they are; ``tests/test_lab.py`` checks they are in sync):

* outputs and execution counts cleared; a short note on top says it is the lab copy;
* each cell tagged ``solution`` becomes a **scaffold** cell (tagged ``exercise``) and a **check** cell
  (tagged ``check``) that compares the student's answer with the reference solution
  (``mergelib.lab.check``; the reference travels compressed inside the check cell);
* markdown that gives away an exercise's result is left out: text between ``<!-- lab:hide -->`` and
  ``<!-- /lab:hide -->`` is removed, and ``<!-- lab:show TEXT -->`` becomes ``TEXT`` (both are HTML
  comments, invisible in the executed notebook).

The scaffold and the checked expressions come from the solution cell's metadata when given::

    "lab": {"scaffold": "def f(x):\\n    ...\\n", "check": ["f(torch.ones(3))", "acc"],
            "atol": 0.005,                # optional tolerances of the comparison (rtol too)
            "reference": "..."}           # optional: the solution rewritten to bind what is checked

and are otherwise derived from the solution: the signature and docstring of every function it
defines, ``name = ...`` for every name it assigns at top level, which are also the names checked.
Usage::

    python tools/make_lab_copies.py [--out lab] notebooks/*.ipynb
    python tools/make_lab_copies.py --check notebooks/*.ipynb    # exit 1 if lab/ is out of date
"""
from __future__ import annotations

import argparse
import ast
import base64
import json
import re
import sys
import zlib
from pathlib import Path

HIDE = re.compile(r"<!--\s*lab:hide\s*-->.*?<!--\s*/lab:hide\s*-->", re.S)
SHOW = re.compile(r"<!--\s*lab:show\s+(.*?)\s*-->", re.S)
EXERCISE_MD = re.compile(r"\*\*(?:Exercise\s+)?(\d+)[.:)\s]|^\s*(\d+)\.\s+\*\*", re.M)


def encode(source: str) -> str:   # the same encoding as mergelib.lab.encode (no torch import needed here)
    return base64.b64encode(zlib.compress(source.encode("utf-8"), 9)).decode("ascii")


def src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def lab_markdown(text: str) -> str:
    text = HIDE.sub("", text)
    return SHOW.sub(lambda m: m.group(1), text)


def top_level_names(solution: str) -> tuple[list[str], list[ast.FunctionDef]]:
    """Names the solution assigns at top level (in order, no duplicates, no ``_`` names) and its functions."""
    tree = ast.parse(solution)
    names, funcs = [], []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append(node)
            continue
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                   if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name) and not n.id.startswith("_") and n.id not in names:
                    names.append(n.id)
    return names, funcs


def derived_scaffold(solution: str, checked: list[str]) -> str:
    names, funcs = top_level_names(solution)
    lines = solution.splitlines()
    parts = []
    for f in funcs:
        head = "\n".join(lines[(f.decorator_list[0].lineno if f.decorator_list else f.lineno) - 1:f.body[0].lineno - 1])
        doc = ast.get_docstring(f)
        indent = " " * (f.body[0].col_offset)
        body = (f'{indent}"""{doc}"""\n' if doc else "") + f"{indent}...\n"
        parts.append(f"{head}\n{body}")
    assigned = [n for n in names if n in checked]
    if assigned:
        parts.append("".join(f"{n} = ...\n" for n in assigned))
    return "\n".join(parts)


def exercise_numbers(cells: list[dict]) -> list[str]:
    """The exercise number of each solution cell: from the markdown above it, else its rank."""
    out, last = [], None
    for cell in cells:
        if cell["cell_type"] == "markdown":
            found = EXERCISE_MD.findall(src(cell))
            if found:
                last = next(a or b for a, b in reversed(found) if a or b)
        elif "solution" in cell.get("metadata", {}).get("tags", []):
            out.append(last if last and last not in out else str(len(out) + 1))
    return out


def reference_solution(cell: dict) -> str:
    """The code the check compares with: ``lab.reference`` (the solution rewritten to bind the checked
    names, where the notebook's solution only prints them) or the solution itself."""
    return cell.get("metadata", {}).get("lab", {}).get("reference") or src(cell)


def scaffold_and_check(cell: dict, number: str) -> tuple[dict, dict]:
    solution = src(cell)
    meta = cell.get("metadata", {}).get("lab", {})
    names, _ = top_level_names(solution)
    checked = list(meta.get("check", names))
    scaffold = meta.get("scaffold") or derived_scaffold(solution, checked)
    header = (f"# Exercise {number}: your solution. Replace each `...`; the next cell checks "
              + (", ".join(f"`{c}`" for c in checked) if checked else "nothing automatically") + ".\n")
    sc = {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["exercise"]}, "outputs": [],
          "source": header + scaffold}
    tol = "".join(f", {k}={meta[k]!r}" for k in ("rtol", "atol") if k in meta)
    check_src = (f"# Check exercise {number}: compares your values with the reference solution's (it runs the "
                 "reference once more).\n"
                 "import mergelib.lab\n"
                 f"mergelib.lab.check({number!r}, {json.dumps(checked, ensure_ascii=False)}{tol},\n"
                 f"                   reference=\"{encode(reference_solution(cell))}\")\n")
    ck = {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["check"]}, "outputs": [],
          "source": check_src}
    return sc, ck


def lab_copy(nb: dict, name: str) -> dict:
    out = json.loads(json.dumps(nb))
    cells, numbers = [], iter(exercise_numbers(nb["cells"]))
    note = {"cell_type": "markdown", "metadata": {"tags": ["lab-note"]}, "source":
            f"> **Lab copy** of `notebooks/{name}`: outputs cleared, each exercise's solution replaced by a "
            "scaffold (fill in the `...`) and a check cell that tells you whether your answer matches the "
            "reference solution. Run the notebook from the top first (the exercises use its results); "
            "the executed original with the solutions is `notebooks/" + name + "`.\n"}
    cells.append(note)
    for cell in out["cells"]:
        md = cell.setdefault("metadata", {})
        if cell["cell_type"] == "markdown":
            cell["source"] = lab_markdown(src(cell))
            cells.append(cell)
            continue
        if cell["cell_type"] != "code":
            cells.append(cell)
            continue
        cell["outputs"], cell["execution_count"] = [], None
        cell["source"] = src(cell)
        md.pop("explorer", None)
        if "solution" in md.get("tags", []):
            cells.extend(scaffold_and_check(cell, next(numbers)))
        else:
            cells.append(cell)
    out["cells"] = cells
    return out


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "lab")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a lab copy is missing or stale")
    args = ap.parse_args(argv)
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
    bad = []
    for path in args.notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        n_sol = sum("solution" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
        if n_sol == 0:
            print(f"{path}: no cell tagged 'solution' (every notebook ends with exercises)", file=sys.stderr)
            return 1
        text, dest = dumps(lab_copy(nb, path.name)), args.out / path.name
        if args.check:
            if not dest.exists() or dest.read_text(encoding="utf-8") != text:
                bad.append(f"{dest}: out of date (run `make lab`)")
            continue
        dest.write_text(text, encoding="utf-8")
        print(f"{dest}: {n_sol} exercise(s) with scaffold and check")
    for b in bad:
        print(b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
