"""Hyperparameter declarations and their validation.

A hyperparameter is declared once as an :class:`HParam` (name, kind, range or choices, default, doc);
:meth:`HParam.check` validates a value against it and raises :class:`HyperparameterError` with a
message that names the method, the parameter, the value and what is allowed. The merge-method
registry (:mod:`mergelib.merging`) is built from these declarations, and the public tensor functions
(:mod:`mergelib.competition`, :mod:`mergelib.fourier`, :mod:`mergelib.experts`) validate their
arguments with :func:`check_number` / :func:`check_choice`, so that a bad value fails loudly wherever
it enters.

Rules: numbers must be real and finite; ``bool`` is never accepted as a number (``True`` is an
``int`` in Python), strings never are (``"0.3"`` is rejected, not parsed); an ``int`` parameter
rejects floats. A 0-d non-boolean tensor counts as its number.
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["HyperparameterError", "HParam", "check_number", "check_choice", "check_flag", "closest", "did_you_mean",
           "did_you_mean_each"]


class HyperparameterError(ValueError):
    """A hyperparameter has the wrong kind (bool, string, ...), is NaN/inf, or is out of range."""


def _where(name: str, method: str | None) -> str:
    return f"{name}" if method is None else f"method {method!r}: {name}"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    return f"{lo}, {hi}"


def check_number(value: Any, name: str, *, kind: type = float, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 method: str | None = None) -> float | int:
    """Return ``value`` as a ``float`` (``kind=float``) or ``int`` (``kind=int``) after checking it.

    Raises :class:`HyperparameterError` when ``value`` is a bool, a string or anything that is not a
    real number (``int`` also rejects floats), NaN or infinite, or outside ``[low, high]`` (ends open
    with ``low_open`` / ``high_open``; ``None`` means unbounded).
    """
    interval = _interval(low, high, low_open, high_open)
    what = "an int" if kind is int else "a finite real number"
    if isinstance(value, Tensor) and value.ndim == 0 and value.dtype != torch.bool and not value.dtype.is_complex:
        value = value.item()
    ok_type = (isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real))
    if isinstance(value, bool) or not ok_type:
        raise HyperparameterError(f"{_where(name, method)}={value!r} ({type(value).__name__}) is not allowed: "
                                  f"expected {what} in {interval}")
    v = int(value) if kind is int else float(value)
    if not math.isfinite(v):
        raise HyperparameterError(f"{_where(name, method)}={value!r} is not allowed: expected {what} in "
                                  f"{interval} (NaN and inf are rejected)")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise HyperparameterError(f"{_where(name, method)}={value!r} is out of range: expected {what} in "
                                  f"{interval}")
    return v


def closest(value: Any, choices: Sequence[str]) -> str | None:
    """The one of ``choices`` closest to a mistyped string ``value`` (``difflib``'s similarity of at least
    0.75, case and ``-`` / ``_`` ignored: ``"densty"``, ``"TIES"``, ``"sign-rule"``), else None."""
    if not isinstance(value, str):
        return None
    def norm(s: str) -> str:
        return s.lower().replace("-", "_")
    by_norm = {norm(c): c for c in choices}
    close = difflib.get_close_matches(norm(value), list(by_norm), n=1, cutoff=0.75)
    return by_norm[close[0]] if close else None


def did_you_mean(value: Any, choices: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` with :func:`closest`'s choice, else ``""``: the hint that the errors for
    unknown names and values end with."""
    c = closest(value, choices)
    return "" if c is None else f" (did you mean {c!r}?)"


def did_you_mean_each(names: Sequence[str], choices: Sequence[str], spell=repr) -> str:
    """``" (did you mean 'density' for 'densty', ...?)"`` for those of the unknown ``names`` that have a
    :func:`closest` choice, each written by ``spell`` (``repr``; the command line writes ``--density``),
    else ``""``."""
    pairs = [f"{spell(c)} for {spell(n)}" for n in names if (c := closest(n, choices))]
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


def check_choice(value: Any, name: str, choices: Sequence[str], method: str | None = None) -> str:
    """Return ``value`` if it is one of ``choices`` (strings), else raise :class:`HyperparameterError`
    (naming the closest choice to a mistyped string, :func:`did_you_mean`)."""
    if not isinstance(value, str) or value not in choices:
        raise HyperparameterError(f"{_where(name, method)}={value!r} is not allowed: expected one of "
                                  f"{tuple(choices)}{did_you_mean(value, choices)}")
    return value


def check_flag(value: Any, name: str, method: str | None = None) -> bool:
    """Return ``value`` if it is a ``bool``, else raise :class:`HyperparameterError` (no truthiness)."""
    if not isinstance(value, bool):
        raise HyperparameterError(f"{_where(name, method)}={value!r} is not allowed: expected True or False")
    return value


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a merge method.

    ``kind``: ``"float"``, ``"int"``, ``"choice"`` or ``"flag"``. Numbers have a range
    ``[low, high]`` (``low_open`` / ``high_open`` make an end open; ``None`` is unbounded); a choice
    has ``choices``. ``default`` is used when the caller does not pass the parameter; ``doc`` is one
    line for the README's method table (which value is the paper's, which the official code's).
    """

    name: str
    kind: str
    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("float", "int", "choice", "flag"):
            raise ValueError(f"HParam {self.name!r}: unknown kind {self.kind!r}")
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError(f"HParam {self.name!r}: choices go with kind='choice' only")
        self.check(self.default, "<declaration>")

    def check(self, value: Any, method: str | None = None):
        """The validated value (``float``/``int``/``str``/``bool``) or :class:`HyperparameterError`."""
        if self.kind == "choice":
            return check_choice(value, self.name, self.choices, method)
        if self.kind == "flag":
            return check_flag(value, self.name, method)
        return check_number(value, self.name, kind=int if self.kind == "int" else float, low=self.low,
                            high=self.high, low_open=self.low_open, high_open=self.high_open, method=method)

    @property
    def allowed(self) -> str:
        """What is allowed, in words: ``float in (0, 1]``, ``one of 'mass', 'count'``, ``True/False``."""
        if self.kind == "choice":
            return "one of " + ", ".join(f"`{c}`" for c in self.choices)
        if self.kind == "flag":
            return "True/False"
        return f"{self.kind} in {_interval(self.low, self.high, self.low_open, self.high_open)}"
