"""Run only what some cells of a notebook need: a backward slice over top-level statements.

Executing a whole course notebook takes minutes; an explorer or an exercise usually needs a small part
of it (the zoo, a few functions, one tuned configuration). ``slice_notebook(nb, targets)`` returns, in
notebook order, the code to execute: every target cell whole, and from the cells before them only the
top-level statements whose names the targets need, transitively. No notebook edits, no conventions
beyond the course's own (a ``parameters`` cell; randomness seeded by a call such as
``ml.seed_everything``).

How a statement is read (``symtable`` + ``ast``; over-approximating where unsure):

* it *defines* the names it binds (assignments, ``def``/``class``, imports, ``for`` targets) and the
  names it may mutate: ``d[k] = v``, ``obj.attr = v``, ``x += 1``, and ``name.method(...)`` called as
  a statement of its own (its result unused, so called for its effect; ``name`` not a module);
* it *uses* every name it reads at module level, including the globals read inside its functions,
  lambdas and comprehensions (a function's own locals are not uses);
* a plain top-level assignment *kills* the names it binds (earlier bindings are not needed);
* a statement that names a function also uses the globals the function's body reads (transitively),
  since they must be bound by the time it is called, even when bound after the ``def``;
* it is always kept when it configures the process: the ``parameters`` cell, calls such as
  ``seed_everything``/``manual_seed``/``set_num_threads``, and stores into a module (``plt.rcParams[...]``).

Usage::

    python tools/nbslice.py notebooks/01_task_vectors.ipynb 27   # print the code that cell 27 needs
"""
from __future__ import annotations

import ast
import json
import re
import sys
import symtable
from dataclasses import dataclass, field
from pathlib import Path

ALWAYS_CALL = re.compile(r"(seed|set_num_threads|set_default_dtype|filterwarnings|use_deterministic|set_grad_enabled)")


@dataclass
class Stmt:
    cell: int
    source: str
    defs: set[str] = field(default_factory=set)
    uses: set[str] = field(default_factory=set)
    kills: set[str] = field(default_factory=set)
    always: bool = False
    function: str | None = None     # the name a ``def``/``class`` statement binds


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _global_uses(table: symtable.SymbolTable, top: bool) -> set[str]:
    out = set()
    for sym in table.get_symbols():
        if top and sym.is_referenced():
            out.add(sym.get_name())
        elif not top and sym.is_global() and sym.is_referenced():
            out.add(sym.get_name())
    for child in table.get_children():
        out |= _global_uses(child, False)
    return out


def _walk_top(node: ast.AST):
    """Nodes of a statement, not descending into function/class/lambda bodies."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        stack = list(node.decorator_list)
        if not isinstance(node, ast.ClassDef):
            stack += [d for d in node.args.defaults + node.args.kw_defaults if d is not None]
    else:
        stack = [node]
    while stack:
        n = stack.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                # decorators and defaults are evaluated at module level
                for d in getattr(child, "decorator_list", []):
                    stack.append(d)
                continue
            stack.append(child)


def analyse(stmt: ast.stmt, source: str, cell: int, modules: set[str]) -> Stmt:
    s = Stmt(cell, source)
    table = symtable.symtable(source, f"<cell {cell}>", "exec")
    for sym in table.get_symbols():
        if sym.is_assigned() or sym.is_imported() or sym.is_namespace():
            s.defs.add(sym.get_name())
    s.uses = _global_uses(table, True)
    for n in _walk_top(stmt):
        targets = []
        if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
        elif isinstance(n, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
            targets = [n.target] if isinstance(n, (ast.For, ast.AsyncFor)) else [i.optional_vars for i in n.items if i.optional_vars]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, (ast.Subscript, ast.Attribute)) and isinstance(sub.ctx, ast.Store):
                    root = _root_name(sub)
                    if root in modules:
                        s.always = True
                    elif root:
                        s.defs.add(root)
                        s.uses.add(root)
        if isinstance(n, ast.Call):
            fname = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            if ALWAYS_CALL.search(fname or ""):
                s.always = True
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Attribute):
            root = _root_name(n.value.func.value)
            if root and root not in modules:
                s.defs.add(root)            # obj.method(...) as a statement: called for its effect on obj
                s.uses.add(root)
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        tgts = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        if all(isinstance(x, ast.Name) or (isinstance(x, ast.Tuple) and all(isinstance(e, ast.Name) for e in x.elts))
               for x in tgts):
            s.kills = {e.id for x in tgts for e in ast.walk(x) if isinstance(e, ast.Name)}
    elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        s.kills = {stmt.name}
        s.function = stmt.name
    elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
        s.kills = set(s.defs)
    return s


def statements(nb: dict) -> list[Stmt]:
    """Top-level statements of every code cell, analysed (cells that do not parse are kept whole)."""
    modules: set[str] = set()
    parsed = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = cell_source(cell)
        try:
            tree = ast.parse(src)
        except SyntaxError:
            parsed.append((i, src, None))
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules |= {a.asname or a.name for a in node.names if a.name[:1].islower() and "." not in a.name
                            and a.name in {"pyplot", "functional", "nn"}}
        parsed.append((i, src, tree))
    out = []
    for i, src, tree in parsed:
        params = "parameters" in nb["cells"][i].get("metadata", {}).get("tags", [])
        if tree is None:
            out.append(Stmt(i, src, always=True))
            continue
        lines = src.splitlines(keepends=True)
        for node in tree.body:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            seg = "".join(lines[start - 1:node.end_lineno])
            st = analyse(node, seg, i, modules)
            st.always |= params
            out.append(st)
    return out


def slice_notebook(nb: dict, targets, extra_uses=()) -> list[tuple[int, str]]:
    """The code to run so that the target cells (indices into ``nb["cells"]``) run as in the notebook.

    Returns ``[(cell_index, code), ...]`` in notebook order: target cells whole, other cells reduced to
    the statements the targets need. ``extra_uses``: names the caller will read after the targets.
    """
    targets = set(targets)
    stmts = statements(nb)
    last = max(targets)
    # A function's body runs when it is *called*, not where it is defined: the globals it reads must
    # exist by the time of the call, even if they are bound after the ``def`` (a cell may define a
    # function and then the dict it reads). So a statement that names a function also uses, transitively,
    # the globals of that function's body.
    body_uses: dict[str, set[str]] = {}
    for st in stmts:
        if st.function:
            body_uses.setdefault(st.function, set()).update(st.uses)

    def with_callees(names: set[str]) -> set[str]:
        out, todo = set(names), [n for n in names if n in body_uses]
        while todo:
            for n in body_uses[todo.pop()] - out:
                out.add(n)
                if n in body_uses:
                    todo.append(n)
        return out

    needed = with_callees(set(extra_uses))
    keep: list[Stmt] = []
    for st in reversed([s for s in stmts if s.cell <= last]):
        if st.cell in targets or st.always or (st.defs & needed):
            keep.append(st)
            needed -= st.kills
            needed |= with_callees(st.uses)
    keep.reverse()
    chunks: list[tuple[int, str]] = []
    for st in keep:
        if chunks and chunks[-1][0] == st.cell:
            chunks[-1] = (st.cell, chunks[-1][1] + ("" if chunks[-1][1].endswith("\n") else "\n") + st.source)
        else:
            chunks.append((st.cell, st.source))
    return chunks


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    nb = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    for cell, code in slice_notebook(nb, [int(a) for a in argv[1:]]):
        print(f"# ---- cell {cell}\n{code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
