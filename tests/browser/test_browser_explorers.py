"""Every notebook's explorer in a real browser: JupyterLab on loopback, headless Chromium, Selenium.

One JupyterLab server (the project's environment, a random port, a random token) serves the checkout.
For each notebook with an explorer spec (``tools/explorers.py``):

1. Chromium opens the notebook in JupyterLab, which starts its kernel;
2. the statements the explorer needs run headlessly *in that kernel* (``tools/nbslice.py``, through a
   second client on the kernel's connection file): the zoo and the protocol's results come from the
   cache, so this takes seconds instead of the minutes of a full run;
3. the browser runs the explorer cell (click, Shift+Enter): JupyterLab's widget manager renders it;
4. the browser moves the main control (drags a slider's handle, picks the next dropdown option, clicks
   another toggle button); the value reaches the kernel through the widget's comm, the callback runs,
   and the browser renders its output;
5. the test checks that the control's value changed, that what the explorer shows now contains what
   the notebook's pure function gives for the new value (text outputs: the page's text; figures: the
   texts of the figure drawn by the callback, and the image on the page is that figure's PNG), and
   that the output changed. Screenshots before/after go to ``runs/browser/`` (and, with
   ``MERGELIB_UPDATE_DOCS_IMG=1``, the "after" one to ``docs/img/<notebook>_explorer.png``).
"""
import base64
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from browserenv import CHROMEDRIVER, CHROMIUM, browser_missing  # noqa: E402
import explorers  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SHOTS = ROOT / "runs" / "browser"
DOCS_IMG = ROOT / "docs" / "img"
TIMEOUT = float(os.environ.get("MERGELIB_BROWSER_TIMEOUT", "300"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def lab():
    reason = browser_missing()
    if reason:
        if os.environ.get("MERGELIB_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="mergelib-browser-"))
    settings = tmp / "settings"
    # JupyterLab serves a copy of the checkout: the notebooks copied (the browser edits and runs them, and
    # JupyterLab may save them), everything else linked. The committed notebooks are never written.
    site = tmp / "site"
    site.mkdir()
    for entry in ROOT.iterdir():
        if entry.name == "notebooks":
            shutil.copytree(entry, site / entry.name, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        elif not entry.name.startswith("."):
            (site / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for path, value in {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
                        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
                        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                            {"fetchNews": "false", "checkForUpdates": False}}.items():
        (settings / path).parent.mkdir(parents=True, exist_ok=True)
        (settings / path).write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={site}", "--ServerApp.port_retries=0",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
         f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}"],
        cwd=site, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            _get(f"{base}/api/status?token={token}")
            break
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab did not start: {(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    SHOTS.mkdir(parents=True, exist_ok=True)
    committed = {p: p.read_bytes() for p in NOTEBOOKS}
    try:
        yield {"base": base, "token": token, "driver": driver, "runtime": tmp / "runtime", "tmp": tmp}
        changed = [p.name for p, b in committed.items() if p.read_bytes() != b]
        assert not changed, f"the browser session wrote the committed notebooks {changed}"
    finally:
        driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(pred, timeout=TIMEOUT, what="condition", poll=0.25):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _kernel_for(lab, rel_path: str):
    def find():
        for s in _get(f"{lab['base']}/api/sessions?token={lab['token']}"):
            if s.get("path") == rel_path and s.get("kernel"):
                k = s["kernel"]
                cf = lab["runtime"] / f"kernel-{k['id']}.json"
                if k.get("execution_state") == "idle" and cf.exists():
                    return k["id"], cf
        return None
    return _wait(find, 120, f"the kernel of {rel_path}")


def _kernel_state(lab, kid):
    return _get(f"{lab['base']}/api/kernels/{kid}?token={lab['token']}")["execution_state"]


def _output_state(driver, cell):
    return driver.execute_script("""
        const out = arguments[0].querySelector('.jp-Cell-outputArea');
        if (!out) return null;
        const w = out.querySelector('.widget-output') || out;
        return {text: w.innerText, imgs: Array.from(w.querySelectorAll('img')).map(i => i.src),
                widgets: out.querySelectorAll('.jupyter-widgets').length, all: out.innerText};""", cell)


def _move_control(driver, cell, description: str, kind: str):
    """Move the control whose label is `description` the way a user would. Returns what was done."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    box = driver.execute_script("""
        const labels = Array.from(arguments[0].querySelectorAll('.widget-label'));
        const l = labels.find(x => x.innerText.trim() === arguments[1]);
        return l ? l.closest('.widget-inline-hbox, .widget-hbox, .jupyter-widgets') : null;""", cell, description)
    assert box is not None, f"no control labelled {description!r} is rendered"
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    if "Slider" in kind:
        handle = box.find_element(By.CSS_SELECTOR, ".noUi-handle")
        track = box.find_element(By.CSS_SELECTOR, ".noUi-target, .slider")
        dx = int(track.size["width"] * 0.15)
        ActionChains(driver).click_and_hold(handle).move_by_offset(dx // 2, 0).move_by_offset(dx - dx // 2, 0) \
            .release().perform()
        return f"dragged the {kind} handle {dx} px to the right"
    if kind in ("Dropdown", "Select"):
        sel = Select(box.find_element(By.CSS_SELECTOR, "select"))
        i = [o.get_attribute("selected") is not None for o in sel.options].index(True)
        sel.select_by_index((i + 1) % len(sel.options))
        return f"picked option {(i + 1) % len(sel.options)} of the {kind}"
    if kind == "ToggleButtons":
        buttons = [b for b in box.find_elements(By.CSS_SELECTOR, "button") if "mod-active" not in b.get_attribute("class")]
        buttons[0].click()
        return "clicked another toggle button"
    raise NotImplementedError(f"moving a {kind} control")


def _shoot(driver, cell, dest: Path):
    """Screenshot of the explorer as rendered: the cell's output area (widget + what it shows)."""
    from selenium.webdriver.common.by import By
    area = cell.find_element(By.CSS_SELECTOR, ".jp-Cell-outputArea")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", area)
    time.sleep(0.3)
    area.screenshot(str(dest))


def _same_png(a_b64: str, b_b64: str) -> bool:
    if a_b64 == b_b64:
        return True
    from PIL import Image, ImageChops
    a, b = (Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB") for x in (a_b64, b_b64))
    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_explorer_in_the_browser(lab, path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    ex = explorers.find_explorer(nb)
    if ex is None:
        pytest.skip(f"{path.name}: its explorer cell has no 'explorer' metadata spec yet")
    driver, t0 = lab["driver"], time.perf_counter()
    rel = f"notebooks/{path.name}"
    driver.get(f"{lab['base']}/lab/tree/{rel}?token={lab['token']}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.common.action_chains import ActionChains
    kid, cf = _kernel_for(lab, rel)
    k = explorers.Kernel(connection_file=str(cf))
    try:
        # 2. what the explorer needs, headlessly in JupyterLab's kernel
        r = k.run(explorers.RECORDER + "\n_EXPLORER_PNG = True\n")
        assert r.error is None, r.error
        for cell_i, code in explorers.prepare(nb, ex):
            r = k.run(code)
            assert r.error is None, f"{path.name}: sliced cell {cell_i} failed: {r.error}"
        t_prep = time.perf_counter() - t0
        # 3. the browser runs the explorer cell
        cells = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell"),
                      60, "the notebook's cells")
        cell = cells[ex.cell]
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", cell)
        cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-prompt").click()
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        # rendered: the widgets are on the page and the cell has shown something (an explorer whose Output
        # widget stays empty until the first move shows its initial state in the cell's own output)
        first = _wait(lambda: (s := _output_state(driver, cell)) and s["widgets"] and (s["imgs"] or s["all"].strip())
                      and _kernel_state(lab, kid) == "idle" and s, what="the explorer to render")
        time.sleep(1.0)
        before = _output_state(driver, cell)
        _shoot(driver, cell, SHOTS / f"{path.stem}_before.png")
        # 4. the browser moves the main control
        info = k.evaluate(f"[type({ex.control}).__name__, ({ex.control}).description, ({ex.control}).value, "
                          "len(_EXPLORER_REC)]")
        kind, description, old, n0 = info
        how = _move_control(driver, cell, description, kind)
        after = _wait(lambda: (s := _output_state(driver, cell)) and (s["imgs"], s["text"]) != (before["imgs"], before["text"])
                      and (s["imgs"] or s["text"].strip()) and _kernel_state(lab, kid) == "idle" and s,
                      what="the explorer's output to change")
        time.sleep(1.5)
        after = _output_state(driver, cell)
        _shoot(driver, cell, SHOTS / f"{path.stem}_after.png")
        # 5. compare with the notebook's pure function at the new value
        new = k.evaluate(f"({ex.control}).value")
        expected = explorers.expected_strings(k, ex, f"({ex.control}).value")
        rec = k.evaluate(f"_EXPLORER_REC[{n0}:]")
        fig_texts = "\n".join(t for r_ in rec for t in r_["texts"])
        shown = after["text"] + "\n" + fig_texts
        elapsed = time.perf_counter() - t0
        print(f"{path.name}: {how}: {description} {old!r} -> {new!r}; prepared in {t_prep:.0f} s, "
              f"{elapsed:.0f} s in all; {len(expected)} expected strings, {len(after['imgs'])} image(s) on the page")
        assert new != old, "the browser did not change the control's value in the kernel"
        assert not explorers.missing(expected, shown), \
            f"the explorer does not show what the pure function gives: {explorers.missing(expected, shown)}"
        assert sum(e in before["text"] for e in expected) < len(expected), "nothing changed on the page"
        if after["imgs"]:
            assert rec and rec[-1]["png"], "the page shows a figure but the callback drew none"
            page_png = after["imgs"][-1].split("base64,", 1)[-1]
            assert _same_png(page_png, rec[-1]["png"]), "the figure on the page is not the one the callback drew"
            assert after["imgs"] != before["imgs"]
        if os.environ.get("MERGELIB_UPDATE_DOCS_IMG") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copy(SHOTS / f"{path.stem}_after.png", DOCS_IMG / f"{path.stem}_explorer.png")
    finally:
        k.kc.stop_channels()
        try:   # free the kernel's memory before the next notebook
            req = urllib.request.Request(f"{lab['base']}/api/kernels/{kid}?token={lab['token']}", method="DELETE")
            urllib.request.urlopen(req, timeout=20)
        except OSError:
            pass
