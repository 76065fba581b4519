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


# ------------------------------------------------------------------------ a kernel that dies at start
# The kernel below loses the port race of papermill #511 on purpose: before its first ``fails``
# launches, the launcher itself holds the kernel's shell port, so ipykernel dies with "Address already
# in use" before its first reply, exactly as when another process took the port in between.
_RACY_LAUNCHER = r'''
import json, os, socket, subprocess, sys
from pathlib import Path
count, fails, conn = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", conn]
if n > fails:
    os.execv(sys.executable, kernel)
info = json.loads(Path(conn).read_text())
held = socket.socket()
held.bind((info["ip"], info["shell_port"]))
held.listen()
sys.exit(subprocess.call(kernel))
'''


def _racy_kernel(tmp_path, monkeypatch, fails):
    """A kernelspec 'racy' (in a private JUPYTER_PATH) whose first ``fails`` launches lose the port race."""
    import sys

    launcher, count = tmp_path / "launcher.py", tmp_path / "launches.txt"
    launcher.write_text(_RACY_LAUNCHER)
    spec = tmp_path / "jupyter" / "kernels" / "racy"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(launcher), str(count), str(fails), "{connection_file}"],
        "display_name": "racy", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x = 1", "outputs": [],
                     "execution_count": None, "id": "p"},
                    {"cell_type": "code", "metadata": {}, "source": "print('ran', x)", "outputs": [],
                     "execution_count": None, "id": "c"}],
          "metadata": {"kernelspec": {"name": "racy", "display_name": "racy", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    src = tmp_path / "in.ipynb"
    src.write_text(json.dumps(nb))
    return src, count


def test_a_kernel_that_loses_the_port_race_is_started_again(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    from mergelib.nbexec import KERNEL_START_ATTEMPTS

    src, count = _racy_kernel(tmp_path, monkeypatch, fails=KERNEL_START_ATTEMPTS - 1)
    dst = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(src), str(dst), parameters={"x": 7}, engine_name="mergelib",
                               kernel_name="racy", progress_bar=False, execution_timeout=120)
    assert count.read_text() == str(KERNEL_START_ATTEMPTS)       # it died twice, the third start ran
    outputs = json.loads(dst.read_text())["cells"][-1]["outputs"]
    assert "ran 7" in "".join("".join(o.get("text", "")) for o in outputs)


def test_a_kernel_that_never_starts_is_a_named_error(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    from mergelib.nbexec import KERNEL_START_ATTEMPTS

    src, count = _racy_kernel(tmp_path, monkeypatch, fails=10 ** 6)
    with pytest.raises(RuntimeError, match=f"kernel 'racy' failed to start {KERNEL_START_ATTEMPTS} times"):
        papermill.execute_notebook(str(src), str(tmp_path / "out.ipynb"), engine_name="mergelib",
                                   kernel_name="racy", progress_bar=False, execution_timeout=120)
    assert count.read_text() == str(KERNEL_START_ATTEMPTS)


def test_nbval_kernels_are_started_again(tmp_path, monkeypatch):
    """conftest.py gives nbval's kernel start the same retries (nbval runs the course notebooks in CI)."""
    nbval_kernel = pytest.importorskip("nbval.kernel")
    from mergelib.nbexec import KERNEL_START_ATTEMPTS

    assert getattr(nbval_kernel.start_new_kernel, "retried", False)
    _, count = _racy_kernel(tmp_path, monkeypatch, fails=KERNEL_START_ATTEMPTS - 1)
    kernel = nbval_kernel.RunningKernel("racy", cwd=str(tmp_path))
    try:
        assert kernel.is_alive() and count.read_text() == str(KERNEL_START_ATTEMPTS)
    finally:
        kernel.stop()
