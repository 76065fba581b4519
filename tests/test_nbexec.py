"""mergelib.nbexec: papermill's engine with the shell channel polled in slices (no hang after widget cells)."""
import asyncio
import json
import time
from queue import Empty

import pytest

from mergelib.nbexec import sliced_get_msg


class FakeChannel:
    """get_msg that misses its wake-up: the reply is only seen by the call after ``misses`` time-outs."""

    def __init__(self, misses, reply="reply"):
        self.misses, self.reply, self.timeouts = misses, reply, []

    async def get_msg(self, timeout=None):
        self.timeouts.append(timeout)
        if len(self.timeouts) <= self.misses:
            await asyncio.sleep(min(timeout, 0.01) if timeout is not None else 0.01)
            raise Empty
        return self.reply


def test_a_missed_wake_up_is_retried_in_slices():
    ch = FakeChannel(misses=3)
    get = sliced_get_msg(ch.get_msg, poll_s=0.05)
    assert asyncio.run(get(timeout=None)) == "reply"
    assert ch.timeouts == [0.05] * 4               # every wait is one slice, never "forever"


def test_the_overall_timeout_still_raises_empty():
    ch = FakeChannel(misses=10 ** 6)
    get = sliced_get_msg(ch.get_msg, poll_s=0.02)
    t0 = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(get(timeout=0.1))
    assert 0.09 <= time.monotonic() - t0 < 1.0
    assert all(0 <= t <= 0.02 for t in ch.timeouts)


def test_bad_slice_is_refused():
    with pytest.raises(ValueError, match="poll_s"):
        sliced_get_msg(lambda timeout=None: None, poll_s=0)


def test_papermill_runs_a_widget_notebook_with_the_engine(tmp_path):
    papermill = pytest.importorskip("papermill")
    pytest.importorskip("ipywidgets")
    nb = {"cells": [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x = 1", "outputs": [],
         "execution_count": None},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "import ipywidgets as w\nout = w.Output()\nwith out:\n    print('inside', x)\n"
                   "w.VBox([w.IntSlider(value=x), out])"},
        {"cell_type": "code", "metadata": {}, "source": "print('done', x * 2)", "outputs": [],
         "execution_count": None}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"cell-{i}"
    src, dst = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    src.write_text(json.dumps(nb))
    papermill.execute_notebook(str(src), str(dst), parameters={"x": 21}, engine_name="mergelib",
                               kernel_name="python3", progress_bar=False, execution_timeout=120)
    cells = json.loads(dst.read_text())["cells"]
    text = lambda o: "".join(o.get("text", ""))
    assert "done 42" in "".join(text(o) for o in cells[-1]["outputs"])
