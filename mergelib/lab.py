"""Check cells of the lab copies: compare a student's answer with the reference solution's.

The lab copy of a notebook (``lab/<name>.ipynb``, made by ``tools/make_lab_copies.py``) replaces each
exercise's solution by a scaffold and adds a check cell::

    import mergelib.lab
    mergelib.lab.check("1", ["acc_digits"], reference="eJy...")

``check`` runs the reference solution (stored compressed in the cell, so that it is not read by
accident) on a copy of the notebook's namespace, evaluates each checked expression in both
namespaces, and compares the values: numbers, booleans, strings, tensors, arrays, and dicts, lists,
tuples or objects made of them (floats with ``rtol``/``atol``, like ``ml.check_close``). It prints one
line per expression and raises ``AssertionError`` when an answer differs; an exercise not attempted
yet (a name still undefined or ``...``) is reported without raising, so "Run all" goes on.
"""
from __future__ import annotations

import base64
import contextlib
import inspect
import io
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check", "encode", "decode", "compare"]


def encode(source: str) -> str:
    """Compress a solution's source into the ASCII string a check cell stores."""
    return base64.b64encode(zlib.compress(source.encode("utf-8"), 9)).decode("ascii")


def decode(blob: str) -> str:
    return zlib.decompress(base64.b64decode(blob)).decode("utf-8")


def compare(mine: Any, ref: Any, rtol: float = 1e-4, atol: float = 1e-6, path: str = "") -> list[str]:
    """Differences between two values (empty list: they match)."""
    import numpy as np
    import torch

    where = path or "value"
    if isinstance(ref, torch.nn.Module):
        ref = ref.state_dict()
        mine = mine.state_dict() if isinstance(mine, torch.nn.Module) else mine
    if isinstance(ref, (torch.Tensor, np.ndarray)) or isinstance(mine, (torch.Tensor, np.ndarray)):
        try:
            a, b = torch.as_tensor(mine).detach().cpu(), torch.as_tensor(ref).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            return [f"{where}: a {type(mine).__name__}, expected a tensor/array"]
        if a.shape != b.shape:
            return [f"{where}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"]
        if a.dtype == torch.bool or b.dtype == torch.bool:
            return [] if torch.equal(a.bool(), b.bool()) else [f"{where}: {int((a.bool() != b.bool()).sum())} entries differ"]
        a, b = a.double(), b.double()
        if torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            return []
        return [f"{where}: max-diff {float((a - b).abs().max()):.3g}"]
    if isinstance(ref, bool) or isinstance(ref, str) or ref is None:
        return [] if mine == ref else [f"{where}: {mine!r}, expected {ref!r}"]
    if isinstance(ref, (int, float)) and not isinstance(mine, bool) and isinstance(mine, (int, float)):
        return [] if math.isclose(mine, ref, rel_tol=rtol, abs_tol=atol) or (mine != mine and ref != ref) else [
            f"{where}: {mine:.6g}, expected {ref:.6g}"]
    if isinstance(ref, Mapping):
        if not isinstance(mine, Mapping):
            return [f"{where}: a {type(mine).__name__}, expected a mapping"]
        if set(mine) != set(ref):
            return [f"{where}: keys {sorted(map(str, mine))}, expected {sorted(map(str, ref))}"]
        return [d for k in ref for d in compare(mine[k], ref[k], rtol, atol, f"{where}[{k!r}]")]
    if isinstance(ref, Sequence):
        if not isinstance(mine, Sequence) or isinstance(mine, str):
            return [f"{where}: a {type(mine).__name__}, expected a sequence"]
        if len(mine) != len(ref):
            return [f"{where}: length {len(mine)}, expected {len(ref)}"]
        return [d for i, (x, y) in enumerate(zip(mine, ref)) for d in compare(x, y, rtol, atol, f"{where}[{i}]")]
    if hasattr(ref, "__dict__") and type(mine) is type(ref) and not callable(ref):
        return compare(vars(mine), vars(ref), rtol, atol, where)
    try:
        return [] if bool(mine == ref) else [f"{where}: {mine!r}, expected {ref!r}"]
    except Exception:  # noqa: BLE001 - values without a usable ==
        return [f"{where}: cannot compare a {type(mine).__name__}"]


@contextlib.contextmanager
def _quiet():
    """Run the reference solution without printing or showing figures in the student's notebook."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        plt = None
    before = set(plt.get_fignums()) if plt else set()
    show = plt.show if plt else None
    if plt:
        plt.show = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if plt:
            plt.show = show
            for num in set(plt.get_fignums()) - before:
                plt.close(num)


def check(exercise: str, expressions: Sequence[str], reference: str, namespace: dict | None = None,
          rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Compare the student's values of ``expressions`` with the reference solution's.

    ``reference``: the reference solution, as made by :func:`encode`. ``namespace``: where the
    student's answer lives (default: the caller's globals, i.e. the notebook). Returns True when every
    expression matches, False when the exercise has not been attempted; raises ``AssertionError``
    naming the differences otherwise.
    """
    ns = inspect.currentframe().f_back.f_globals if namespace is None else namespace
    label = f"exercise {exercise}"
    todo, mine = [], {}
    for expr in expressions:
        try:
            value = eval(expr, ns)  # noqa: S307 - the notebook's own expressions
        except NameError as e:
            todo.append(f"{expr} ({e})")
            continue
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{label}: evaluating `{expr}` with your solution raised "
                                 f"{type(e).__name__}: {e}") from e
        if value is Ellipsis:
            todo.append(f"{expr} (still `...`)")
            continue
        mine[expr] = value
    if todo:
        print(f"{label}: not attempted yet: " + "; ".join(todo))
        return False
    ref_ns = dict(ns)
    with _quiet():
        exec(compile(decode(reference), f"<reference solution of {label}>", "exec"), ref_ns)  # noqa: S102
    failures = []
    for expr in expressions:
        diffs = compare(mine[expr], eval(expr, ref_ns), rtol, atol, expr)  # noqa: S307
        status = "matches the reference solution" if not diffs else "differs: " + "; ".join(diffs[:3])
        print(f"{label} | {expr[:40]:40s} | {'ok  ' if not diffs else 'FAIL'} {status}")
        failures += diffs
    if failures:
        raise AssertionError(f"{label}: your answer differs from the reference solution: " + "; ".join(failures[:5]))
    print(f"{label}: all {len(expressions)} checked value(s) match.")
    return True
