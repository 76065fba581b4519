"""A per-test timeline of a ``make test`` run, and its summary per work unit.

As a pytest plugin it appends one JSON line per test to ``$CI_TIMELINE_LOG`` (default
``runs/ci_timeline.jsonl``): the node id, the xdist worker, the start and end times. Record a run of the
CI's suite with it::

    PYTHONPATH=tools PYTEST_ADDOPTS="-p ci_timeline" CI_TIMELINE_LOG=/tmp/timeline.jsonl .ci/run

then read it per work unit (a notebook, a test module, one browser test), in the order the units started::

    python tools/ci_timeline.py /tmp/timeline.jsonl [--cells 30]

``--cells S`` also lists every test (a notebook cell, under nbval) that took S seconds or more.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

_started: dict[str, float] = {}
_controller = False


def pytest_configure(config):
    # under pytest-xdist the controller is told of every worker's tests too: only the process that ran a
    # test writes its line
    global _controller
    _controller = not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"


def _log_path() -> Path:
    return Path(os.environ.get("CI_TIMELINE_LOG", "runs/ci_timeline.jsonl"))


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid, location):
    start = _started.pop(nodeid, None)
    if start is None or _controller:
        return
    path = _log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"id": nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                       "start": start, "end": time.time()})
    with open(path, "a", encoding="utf-8") as f:   # one short append per test: lines do not interleave
        f.write(line + "\n")


def _work_unit():
    """The repository's ``conftest._work_unit``: the unit a worker takes at once under ``make test`` (a
    notebook, a test module, one browser test), so that the summary groups as the scheduler does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest._work_unit


def summarise(rows: list[dict]) -> tuple[list[dict], dict[str, float], float]:
    """``(units, busy seconds per worker, run length)``; each unit: worker, start and end (seconds from the
    run's first test), duration and number of tests, in the order the units started."""
    if not rows:
        raise ValueError("the timeline is empty: was the plugin loaded (-p ci_timeline) and the log path right?")
    t0 = min(r["start"] for r in rows)
    work_unit = _work_unit()
    units: dict[tuple[str, str], dict] = {}
    for r in rows:
        unit = work_unit(r["id"])
        u = units.setdefault((unit, r["worker"]),
                             {"unit": unit, "worker": r["worker"], "start": r["start"], "end": r["end"], "tests": 0})
        u["start"], u["end"], u["tests"] = min(u["start"], r["start"]), max(u["end"], r["end"]), u["tests"] + 1
    out = sorted(units.values(), key=lambda u: u["start"])
    busy: dict[str, float] = defaultdict(float)
    for u in out:
        u["start"], u["end"] = u["start"] - t0, u["end"] - t0
        u["duration"] = u["end"] - u["start"]
        busy[u["worker"]] += u["duration"]
    return out, dict(busy), max(r["end"] for r in rows) - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--cells", type=float, default=None, metavar="S", help="also list the tests of S seconds or more")
    args = ap.parse_args(argv)
    if not args.log.is_file():
        ap.error(f"no timeline at {args.log}")
    rows = [json.loads(line) for line in args.log.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        units, busy, length = summarise(rows)
    except ValueError as e:
        ap.error(f"{args.log}: {e}")
    print(f"{'worker':8s} {'start':>7s} {'end':>7s} {'seconds':>8s} {'tests':>6s}  unit")
    for u in units:
        print(f"{u['worker']:8s} {u['start']:7.0f} {u['end']:7.0f} {u['duration']:8.0f} {u['tests']:6d}  {u['unit']}")
    print(f"run: {length:.0f} s; busy per worker: " + ", ".join(f"{w} {s:.0f} s" for w, s in sorted(busy.items())))
    if args.cells is not None:
        t0 = min(r["start"] for r in rows)
        print(f"\ntests of {args.cells:g} s or more:")
        for r in sorted(rows, key=lambda r: r["start"]):
            if r["end"] - r["start"] >= args.cells:
                print(f"{r['worker']:8s} {r['start'] - t0:7.0f} {r['end'] - r['start']:8.0f}  {r['id']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
