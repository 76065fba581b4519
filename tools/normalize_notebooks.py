#!/usr/bin/env python3
"""Put executed notebooks into the committed normal form (or check that they are in it).

Kept: cells, outputs and execution counts (nbval needs them). Removed: noisy metadata only:
papermill's per-cell and notebook metadata, per-cell execution timings, widget state, and the
kernel's version details. Usage::

    python tools/normalize_notebooks.py notebooks/*.ipynb          # rewrite in place
    python tools/normalize_notebooks.py --check notebooks/*.ipynb  # exit 1 if any is not normal
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CELL_KEYS_DROP = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")
NB_KEYS_DROP = ("papermill", "widgets", "toc", "vscode")


def normalize(nb: dict) -> dict:
    for k in NB_KEYS_DROP:
        nb.get("metadata", {}).pop(k, None)
    nb.setdefault("metadata", {})["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    li = nb["metadata"].get("language_info")
    if li:
        nb["metadata"]["language_info"] = {"name": li.get("name", "python")}
    for cell in nb.get("cells", []):
        md = cell.get("metadata", {})
        for k in CELL_KEYS_DROP:
            md.pop(k, None)
        tags = [t for t in md.get("tags", []) if t != "injected-parameters"]
        if tags:
            md["tags"] = tags
        else:
            md.pop("tags", None)
        cell.pop("id", None)
        if cell["cell_type"] == "code":
            for out in cell.get("outputs", []):
                out.get("metadata", {}).pop("papermill", None)
    nb["nbformat"], nb["nbformat_minor"] = 4, 4
    return nb


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if a notebook is not normal")
    args = ap.parse_args(argv)
    bad = []
    for path in args.notebooks:
        text = path.read_text(encoding="utf-8")
        nb = json.loads(text)
        if any(c.get("metadata", {}).get("tags", []).count("injected-parameters") for c in nb["cells"]):
            bad.append(f"{path}: contains a papermill 'injected-parameters' cell (re-run without -p to commit)")
        new = dumps(normalize(nb))
        if new != text:
            if args.check:
                bad.append(f"{path}: not in normal form (run tools/normalize_notebooks.py {path})")
            else:
                path.write_text(new, encoding="utf-8")
                print(f"normalised {path}")
    for b in bad:
        print(b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
