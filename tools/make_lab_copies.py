#!/usr/bin/env python3
"""Generate the lab copy of each notebook: outputs cleared, cells tagged ``solution`` emptied.

Students open ``notebooks/lab/<name>.ipynb`` and fill in the exercises; instructors keep the
executed originals. Usage::

    python tools/make_lab_copies.py [--out notebooks/lab] notebooks/*.ipynb
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PLACEHOLDER = "# Your solution here: see the exercise above.\n"


def lab_copy(nb: dict) -> dict:
    out = json.loads(json.dumps(nb))
    for cell in out["cells"]:
        if cell["cell_type"] != "code":
            continue
        cell["outputs"], cell["execution_count"] = [], None
        if "solution" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = PLACEHOLDER
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("notebooks/lab"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        n_sol = sum("solution" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
        if n_sol == 0:
            print(f"{path}: no cell tagged 'solution' (every notebook ends with exercises)", file=sys.stderr)
            return 1
        dest = args.out / path.name
        dest.write_text(json.dumps(lab_copy(nb), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{dest}: {n_sol} solution cell(s) emptied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
