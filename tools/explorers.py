"""Find a notebook's explorer, run what it needs in a Jupyter kernel, move its main control, check it.

Every notebook of the course has an ipywidgets *explorer* over a pure function (docs/NOTEBOOK_GUIDE.md).
Its code cell carries a small spec in its cell **metadata** (metadata changes no output, so the
committed notebooks stay as executed)::

    "explorer": {
      "control": "slider",          # expression: the main control widget, in the notebook's namespace
      "value": 0.5,                 # another value for it (the Python-level test sets exactly this)
      "expect": "[f'average {100 * ml.evaluation.mean(evaluate_lambda(value)):.1f}%']"
    }

``expect`` is an expression over the notebook's namespace (and ``value``, the control's new value)
that calls the notebook's pure function and gives the strings the explorer must show for that value:
in its printed text or in the texts of its figures (titles, labels, legends), which a recorder
installed in the kernel collects whenever the explorer calls ``plt.show()``. The tests check that
the strings are *absent* before the move and *present* after it.

Used by ``tests/test_explorers.py`` (kernel only, fast: only the statements the explorer needs run,
see ``tools/nbslice.py``) and ``tests/browser/`` (the same kernel driven by JupyterLab in Chromium).
"""
from __future__ import annotations

import json
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

from nbslice import cell_source, slice_notebook

ROOT = Path(__file__).resolve().parent.parent

# Installed in the kernel before anything runs: every plt.show() records the texts of the figures it
# shows (and, when _EXPLORER_PNG is true, the PNG that the inline backend sends to the frontend).
RECORDER = r'''
import matplotlib.pyplot as _plt_rec
_EXPLORER_REC, _EXPLORER_PNG = [], False
def _explorer_texts(fig):
    out = [fig._suptitle.get_text()] if getattr(fig, "_suptitle", None) is not None else []
    for ax in fig.axes:
        out += [ax.get_title(loc) for loc in ("left", "center", "right")]
        out += [ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.texts]
        leg = ax.get_legend()
        if leg is not None:
            out += [t.get_text() for t in leg.get_texts()]
    return [t for t in out if t]
def _explorer_show(*args, _orig=_plt_rec.show, **kwargs):
    for num in _plt_rec.get_fignums():
        fig = _plt_rec.figure(num)
        png = None
        if _EXPLORER_PNG:
            from IPython.core.pylabtools import print_figure
            import base64
            png = base64.b64encode(print_figure(fig, "png", bbox_inches="tight")).decode()
        _EXPLORER_REC.append({"texts": _explorer_texts(fig), "png": png})
    return _orig(*args, **kwargs)
_plt_rec.show = _explorer_show
'''


@dataclass
class Explorer:
    cell: int                       # index into nb["cells"]
    control: str
    value: object
    expect: str
    source: str


def find_explorer(nb: dict) -> Explorer | None:
    """The code cell whose metadata holds an ``explorer`` spec (None if the notebook has none)."""
    for i, cell in enumerate(nb["cells"]):
        spec = cell.get("metadata", {}).get("explorer")
        if cell["cell_type"] == "code" and spec:
            return Explorer(i, spec["control"], spec.get("value"), spec["expect"], cell_source(cell))
    return None


def explorer_like_cells(nb: dict) -> list[int]:
    """Cells that build a widget explorer (an ``interact``/``interactive`` call or a value observer)."""
    out = []
    for i, cell in enumerate(nb["cells"]):
        src = cell_source(cell) if cell["cell_type"] == "code" else ""
        if "interact(" in src or "interactive(" in src or ".observe(" in src:
            out.append(i)
    return out


@dataclass
class Result:
    text: str = ""                                  # stdout/stderr/text/plain of one execution
    images: list = field(default_factory=list)      # base64 PNGs displayed
    error: str | None = None
    value: object = None                            # JSON printed by `evaluate`


class Kernel:
    """A Jupyter kernel driven through jupyter_client: a new one, or one a JupyterLab server runs."""

    def __init__(self, connection_file: str | None = None, cwd: str | os.PathLike | None = None,
                 env: dict | None = None):
        from jupyter_client import BlockingKernelClient, KernelManager
        self.km = None
        if connection_file is None:
            self.km = KernelManager(kernel_name="python3")
            self.km.start_kernel(cwd=str(cwd or ROOT / "notebooks"), env={**os.environ, **(env or {})})
            self.kc = self.km.client()
        else:
            self.kc = BlockingKernelClient(connection_file=connection_file)
            self.kc.load_connection_file()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 900) -> Result:
        res = Result()

        def hook(msg):
            t, c = msg["header"]["msg_type"], msg["content"]
            if t == "stream":
                res.text += c["text"]
            elif t in ("display_data", "execute_result"):
                res.text += c["data"].get("text/plain", "") + "\n"
                if "image/png" in c["data"]:
                    res.images.append(c["data"]["image/png"])
            elif t == "error":
                res.error = f"{c['ename']}: {c['evalue']}\n" + "\n".join(c.get("traceback", []))

        # drain messages of earlier executions (e.g. the browser's) that we are not waiting for
        try:
            while True:
                self.kc.get_iopub_msg(timeout=0.01)
        except queue.Empty:
            pass
        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=timeout, allow_stdin=False)
        if reply["content"]["status"] != "ok" and res.error is None:
            res.error = f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}"
        return res

    def evaluate(self, expr: str, timeout: float = 900):
        """The JSON-able value of an expression in the kernel."""
        r = self.run(f"import json as _j\nprint('@@' + _j.dumps({expr}, default=str))", timeout)
        if r.error:
            raise RuntimeError(f"{expr!r} failed in the kernel: {r.error}")
        line = [ln for ln in r.text.splitlines() if ln.startswith("@@")][-1]
        return json.loads(line[2:])

    def shutdown(self):
        self.kc.stop_channels()
        if self.km is not None:
            self.km.shutdown_kernel(now=True)


def prepare(nb: dict, ex: Explorer) -> list[tuple[int, str]]:
    """The chunks to run before the explorer cell (the explorer cell itself is not included)."""
    return [(c, code) for c, code in slice_notebook(nb, [ex.cell]) if c != ex.cell]


def expected_strings(kernel: Kernel, ex: Explorer, value_expr: str) -> list[str]:
    return kernel.evaluate(f"(lambda value: [str(s) for s in ({ex.expect})])({value_expr})")


def recorded_texts(kernel: Kernel, since: int = 0) -> list[str]:
    return kernel.evaluate(f"[t for r in _EXPLORER_REC[{since}:] for t in r['texts']]")


def missing(expected: list[str], shown: str) -> list[str]:
    """Expected strings that do not occur in what the explorer showed."""
    return [e for e in expected if e not in shown]


def run_python_check(nb_path: Path, log=print) -> dict:
    """The Python-level check: slice + explorer cell in a fresh kernel, set the control, compare."""
    nb = json.loads(Path(nb_path).read_text(encoding="utf-8"))
    ex = find_explorer(nb)
    if ex is None:
        raise LookupError(f"{nb_path.name}: no code cell has an 'explorer' spec in its metadata")
    t0 = time.perf_counter()
    k = Kernel(env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    try:
        r = k.run(RECORDER)
        assert r.error is None, r.error
        for cell, code in prepare(nb, ex):
            r = k.run(code)
            assert r.error is None, f"cell {cell} (sliced) failed: {r.error}"
        t_prep = time.perf_counter() - t0
        r0 = k.run(ex.source)
        assert r0.error is None, f"explorer cell {ex.cell} failed: {r0.error}"
        n0 = k.evaluate("len(_EXPLORER_REC)")
        before = r0.text + "\n" + "\n".join(recorded_texts(k))
        old = k.evaluate(f"({ex.control}).value")
        r1 = k.run(f"({ex.control}).value = {ex.value!r}")
        assert r1.error is None, f"moving {ex.control} to {ex.value!r} raised in the callback: {r1.error}"
        now = k.evaluate(f"({ex.control}).value")
        shown = r1.text + "\n" + "\n".join(recorded_texts(k, n0))
        expected = expected_strings(k, ex, f"({ex.control}).value")
        return {"notebook": nb_path.name, "cell": ex.cell, "control": ex.control, "old": old, "new": now,
                "expected": expected, "missing_after": missing(expected, shown),
                "present_before": [e for e in expected if e in before], "shown": shown,
                "prep_s": t_prep, "total_s": time.perf_counter() - t0}
    finally:
        k.shutdown()
