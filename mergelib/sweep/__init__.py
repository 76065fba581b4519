"""Parameter sweeps over the course notebooks: run every combination with papermill, then aggregate.

Command line (``python -m mergelib.sweep --help``)::

    python -m mergelib.sweep run notebooks/02_parameter_competition.ipynb --out runs/pcb \\
        -p PROFILE quick --grid LAMBDA=0.3,0.5,1.0 --seeds 0 1 2 [--workers 2 | --scheduler tcp://HOST:8786]
    python -m mergelib.sweep report runs/pcb      # results.csv, summary.md, summary.png

Python API, the same: :func:`expand_grid`, :func:`run_sweep`, :func:`report`. A notebook records its
results with one call, which needs nothing declared in the notebook::

    import mergelib as ml
    ml.sweep.record({"acc_avg": 0.81, "acc_mnist": 0.97})

Outside a sweep ``record`` only validates and returns the metrics. Inside one, the sweep sets the
environment variable ``MERGELIB_SWEEP_RECORD`` (the run's ``metrics.json``) for the notebook's kernel;
``record`` merges successive calls into that file (later keys override), written atomically.

One run per (notebook, seed, grid point) goes to ``OUT/<run-id>/``, e.g.
``02_parameter_competition__SEED=1__LAMBDA=0.5__3f2a9c1e`` (notebook stem, the seed and the grid
values, and a hash of *all* parameters so that runs with other fixed ``-p`` values get other folders).
It holds ``params.json`` (written first), the executed notebook ``<stem>.ipynb``, ``metrics.json``,
``error.txt`` on failure and ``status.json`` (written last: ``ok`` or ``failed``).

Resume and safety: a run whose ``status.json`` says ``ok`` and whose ``params.json`` holds the same
parameters is skipped, so re-running the same command completes an interrupted sweep (an edited
notebook is not detected: write to another folder). A failed or
interrupted run is executed again; its earlier files move to ``<run-id>/attempt-<k>/``. A folder whose
``params.json`` differs from the requested parameters is an error (nothing is overwritten). Unknown
notebooks, parameters the notebook's ``parameters`` cell does not assign, malformed ``--grid`` values
and unreachable schedulers are errors before anything runs (exit status 2). A failing notebook does
not stop the others (exit status 1 at the end).

Where to run: ``workers=N`` runs N notebooks at a time in a local process pool (default 1: in this
process). ``scheduler="tcp://HOST:PORT"`` (or a ``distributed.Client``) submits one task per run to a
Dask distributed cluster; each worker runs papermill with its own kernel. The output folder and the
notebooks must be at the same paths on the workers (a shared file system), and workers should run one
thread each (``--nthreads 1``; papermill changes the process's working directory and environment, so
runs within one worker process are serialised anyway). On a SLURM or PBS cluster, dask-jobqueue
provides the scheduler (not tested here)::

    from dask_jobqueue import SLURMCluster          # or PBSCluster
    cluster = SLURMCluster(cores=4, processes=1, memory="32GB", walltime="04:00:00",
                           job_extra_directives=["--gres=gpu:1"],
                           worker_extra_args=["--nthreads", "1"])
    cluster.scale(jobs=8)                           # eight jobs, one notebook at a time each
    ml.sweep.run_sweep(["notebooks/02_parameter_competition.ipynb"], "runs/pcb",
                       grid={"LAMBDA": [0.3, 0.5, 1.0]}, seeds=[0, 1, 2], scheduler=cluster)

(or start ``dask scheduler`` and ``dask worker --nthreads 1 tcp://…`` in job scripts and pass
``--scheduler tcp://…`` on the command line).

Kernels inherit the environment of the process that executes the notebook: for a checkout that is not
installed (``pip install -e .``) in the kernel's environment, set ``PYTHONPATH`` to the checkout.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import numbers
import os
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..utils import atomic_files, progress_bar

__all__ = ["RECORD_ENV", "RunResult", "SweepError", "expand_grid", "parse_grid", "parse_value", "record",
           "report", "run_sweep"]

RECORD_ENV = "MERGELIB_SWEEP_RECORD"
PARAMS_FILE, METRICS_FILE, ERROR_FILE, STATUS_FILE = "params.json", "metrics.json", "error.txt", "status.json"
SEED = "SEED"
CONNECT_TIMEOUT_S = 5.0


class SweepError(Exception):
    """A sweep that cannot start as asked (the CLI exits with status 2 and this message)."""


# --------------------------------------------------------------------------------------------- record
def _check_value(key: str, value: Any) -> bool | int | float | str:
    if not isinstance(value, (bool, str, int, float)) and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # NumPy scalars, 0-d arrays and tensors
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"record: metric {key!r} is {value}; metrics must be finite numbers")
        return float(value)
    raise TypeError(f"record: metric {key!r} has type {type(value).__name__}; expected a finite number, a bool "
                    f"or a string")


def record(metrics: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Record a run's results: merged into the sweep's ``metrics.json``; outside a sweep, nothing is written.

    ``metrics`` maps names (``str``) to finite numbers (Python, NumPy or 0-d torch scalars, stored as
    ``int``/``float``), bools or strings. Raises ``TypeError`` (wrong type) or ``ValueError`` (NaN, inf)
    naming the offending key. Successive calls merge, later keys overriding earlier ones; each write is
    atomic. Returns the validated metrics (plain Python values).
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"record: expected a dict of metrics, got {type(metrics).__name__}")
    clean: dict[str, bool | int | float | str] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"record: metric names must be non-empty strings, got {key!r}")
        clean[key] = _check_value(key, value)
    dest = os.environ.get(RECORD_ENV)
    if dest:
        path = Path(dest)
        merged = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        merged.update(clean)
        _write_json(path, merged)
    return clean


def _write_json(path: Path, obj: Any) -> None:
    with atomic_files(path) as (tmp,):
        Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------- parameters, grid
def parse_value(text: str) -> Any:
    """Parse a command-line value as papermill's ``-p`` does: True/False/None, int, float, else str."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_grid(specs: Iterable[str]) -> dict[str, list[Any]]:
    """``["LAMBDA=0.3,0.5", "K=10,20"]`` -> ``{"LAMBDA": [0.3, 0.5], "K": [10, 20]}`` (order kept).

    Raises :class:`SweepError` for a spec without ``=``, a name that is not an identifier, an empty or
    repeated value, or a name given twice.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise SweepError(f"malformed --grid {spec!r}: expected NAME=V1,V2,... with NAME a Python identifier")
        texts = [v.strip() for v in values.split(",")]
        if any(not t for t in texts):
            raise SweepError(f"malformed --grid {spec!r}: empty value (expected NAME=V1,V2,...)")
        if len(set(texts)) != len(texts):
            raise SweepError(f"malformed --grid {spec!r}: a value is repeated")
        if name in grid:
            raise SweepError(f"malformed --grid: {name!r} is given twice")
        grid[name] = [parse_value(t) for t in texts]
    return grid


def expand_grid(params: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
                seeds: Sequence[int] | None = (0,)) -> list[dict[str, Any]]:
    """Every combination of ``seeds`` and the ``grid`` values, each merged with the fixed ``params``.

    The order is that of ``itertools.product(seeds, *grid.values())``: the seed varies slowest, the
    last grid name fastest (so one complete seed comes first). Each dict holds ``SEED`` (unless ``seeds``
    is None), then the grid names, then the fixed parameters. ``SEED`` and the grid names must not
    repeat a fixed parameter (``ValueError``).
    """
    params, grid = dict(params or {}), {k: list(v) for k, v in (grid or {}).items()}
    clash = (set(grid) | ({SEED} if seeds is not None else set())) & set(params)
    if clash:
        raise ValueError(f"parameters given both as fixed values and as a grid or seed: {sorted(clash)}")
    if SEED in grid and seeds is not None:
        raise ValueError("SEED is set by seeds; do not put it in the grid (or pass seeds=None)")
    for name, values in grid.items():
        if not values:
            raise ValueError(f"grid {name!r} has no values")
    seed_list = [None] if seeds is None else list(seeds)
    out = []
    for seed, *values in itertools.product(seed_list, *grid.values()):
        run = {} if seed is None else {SEED: seed}
        run.update(zip(grid, values))
        run.update(params)
        out.append(run)
    return out


def notebook_parameters(path: str | os.PathLike) -> set[str]:
    """Names assigned at top level in the notebook's cell tagged ``parameters`` (empty if none)."""
    nb = _read_json(Path(path))
    names: set[str] = set()
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code" or "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        tree = ast.parse("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        names.add(sub.id)
        break
    return names


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)[:60]


def run_id(notebook: str | os.PathLike, params: Mapping[str, Any], shown: Sequence[str]) -> str:
    """``<stem>__SEED=0__LAMBDA=0.3__<8 hex>``: the names in ``shown``, then a hash of all parameters."""
    stem = Path(notebook).stem
    digest = hashlib.sha256(json.dumps({"notebook": stem, "parameters": params}, sort_keys=True)
                            .encode()).hexdigest()[:8]
    parts = [_sanitize(stem)] + [_sanitize(f"{k}={params[k]}") for k in shown if k in params] + [digest]
    return "__".join(parts)


# ------------------------------------------------------------------------------------------- running
@dataclass
class RunResult:
    """One run of a sweep: ``status`` is ``ok``, ``failed`` or ``skipped`` (done before, same params)."""

    run_id: str
    path: str
    notebook: str
    params: dict[str, Any]
    status: str
    error: str | None = None
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


_EXECUTE_LOCK = threading.Lock()  # papermill chdirs and we set os.environ: one run per process at a time


def _execute_run(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Execute one run (in this process; also the task that Dask workers import and run).

    ``spec`` holds ``run_id``, ``path`` (the run folder), ``notebook`` (absolute), ``params`` and
    ``kernel``. Writes the executed notebook, ``metrics.json`` (by the notebook's ``record`` calls),
    ``error.txt`` on failure and ``status.json`` last. Never raises for a failing notebook: returns a
    dict of :class:`RunResult`'s fields.
    """
    import papermill

    run_dir, notebook = Path(spec["path"]), Path(spec["notebook"])
    t0 = time.time()
    error = None
    with _EXECUTE_LOCK:
        old = os.environ.get(RECORD_ENV)
        os.environ[RECORD_ENV] = str(run_dir / METRICS_FILE)
        try:
            papermill.execute_notebook(str(notebook), str(run_dir / notebook.name), parameters=dict(spec["params"]),
                                       kernel_name=spec["kernel"], cwd=str(notebook.parent), progress_bar=False,
                                       log_output=False, engine_name="mergelib")   # mergelib/nbexec.py
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this run only
            ename = getattr(exc, "ename", type(exc).__name__)
            evalue = getattr(exc, "evalue", str(exc))
            where = f" (cell {exc.cell_index}, In [{exc.exec_count}])" if hasattr(exc, "cell_index") else ""
            error = f"{ename}: {evalue}{where}"
            detail = str(exc) if hasattr(exc, "traceback") else traceback.format_exc()
            with atomic_files(run_dir / ERROR_FILE) as (tmp,):
                Path(tmp).write_text(error + "\n" + detail + "\n", encoding="utf-8")
        finally:
            if old is None:
                os.environ.pop(RECORD_ENV, None)
            else:
                os.environ[RECORD_ENV] = old
    seconds = time.time() - t0
    status = "failed" if error else "ok"
    _write_json(run_dir / STATUS_FILE, {"status": status, "error": error, "seconds": round(seconds, 3),
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    metrics_path = run_dir / METRICS_FILE
    metrics = _read_json(metrics_path) if metrics_path.exists() else {}
    return {"run_id": spec["run_id"], "path": str(run_dir), "notebook": str(notebook), "params": dict(spec["params"]),
            "status": status, "error": error, "seconds": seconds, "metrics": metrics}


def _plan(notebooks: Sequence[str | os.PathLike], out: Path, params: Mapping[str, Any] | None,
          grid: Mapping[str, Sequence[Any]] | None, seeds: Sequence[int] | None, kernel: str) -> list[dict]:
    """Validate everything and list the runs; raises SweepError before anything is written."""
    if not notebooks:
        raise SweepError("no notebook given")
    paths = []
    for nb in notebooks:
        p = Path(nb).expanduser().resolve()
        if not p.is_file():
            raise SweepError(f"notebook not found: {nb}")
        if p.suffix != ".ipynb":
            raise SweepError(f"not a notebook (.ipynb): {nb}")
        paths.append(p)
    try:
        combos = expand_grid(params, grid, seeds)
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    try:
        json.dumps(combos)
    except (TypeError, ValueError) as exc:
        raise SweepError(f"parameter values must be JSON values (numbers, strings, bools, None, lists, dicts): "
                         f"{exc}") from None
    wanted = set(combos[0]) if combos else set()
    for p in paths:
        try:
            defined = notebook_parameters(p)
        except (ValueError, SyntaxError) as exc:
            raise SweepError(f"cannot read the parameters cell of {p}: {exc}") from None
        undefined = sorted(wanted - defined)
        if undefined:
            raise SweepError(f"parameter(s) {', '.join(undefined)} not defined in the 'parameters' cell of {p} "
                             f"(it defines: {', '.join(sorted(defined)) or 'nothing'})")
    shown = ([SEED] if seeds is not None else []) + list(grid or {})
    specs, seen = [], {}
    for p in paths:
        for combo in combos:
            rid = run_id(p, combo, shown)
            if rid in seen:
                raise SweepError(f"run id {rid} twice: notebooks {seen[rid]} and {p} have the same name")
            seen[rid] = p
            specs.append({"run_id": rid, "path": str(out / rid), "notebook": str(p), "params": combo,
                          "kernel": kernel})
    for spec in specs:  # nothing is overwritten: an existing run folder must hold the same parameters
        run_dir = Path(spec["path"])
        if not run_dir.exists():
            continue
        pfile = run_dir / PARAMS_FILE
        if not pfile.is_file():
            if any(run_dir.iterdir()):
                raise SweepError(f"run folder {run_dir} exists without {PARAMS_FILE}; move it away")
            continue
        old = _read_json(pfile)
        new = json.loads(json.dumps({"notebook": Path(spec["notebook"]).name, "parameters": spec["params"]}))
        if {"notebook": Path(old.get("notebook", "")).name, "parameters": old.get("parameters")} != new:
            raise SweepError(f"run folder {run_dir} holds other parameters ({pfile}: {old.get('parameters')}, "
                             f"requested: {spec['params']}); use another --out or move it away")
    return specs


def _status(run_dir: Path) -> str | None:
    sfile = run_dir / STATUS_FILE
    return _read_json(sfile).get("status") if sfile.is_file() else None


def _prepare(spec: Mapping[str, Any]) -> None:
    """Claim the run folder: move an earlier failed or interrupted attempt aside, write params.json."""
    run_dir = Path(spec["path"])
    leftovers = [c for c in run_dir.iterdir() if not c.name.startswith("attempt-")] if run_dir.exists() else []
    if any(c.name != PARAMS_FILE for c in leftovers):
        k = 1 + sum(1 for c in run_dir.iterdir() if c.name.startswith("attempt-"))
        dest = run_dir / f"attempt-{k}"
        dest.mkdir()
        for c in leftovers:
            if c.name != PARAMS_FILE:
                shutil.move(str(c), dest / c.name)
            else:
                shutil.copy2(c, dest / c.name)
    _write_json(run_dir / PARAMS_FILE, {"notebook": spec["notebook"], "parameters": spec["params"],
                                        "kernel": spec["kernel"]})


def _connect(scheduler: Any):
    if not isinstance(scheduler, str):
        if hasattr(scheduler, "submit"):
            return scheduler, False  # a distributed.Client
        if hasattr(scheduler, "scheduler_address"):  # a cluster object (LocalCluster, SLURMCluster, ...)
            scheduler = scheduler.scheduler_address
        else:
            raise SweepError(f"scheduler must be an address, a distributed.Client or a cluster, got {scheduler!r}")
    try:
        from distributed import Client
    except ImportError:
        raise SweepError("--scheduler needs dask.distributed: pip install 'mergelib[notebooks]' "
                         "(or pip install distributed)") from None
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False), True
    except (OSError, TimeoutError, ValueError) as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {scheduler} within {CONNECT_TIMEOUT_S:g} s: "
                         f"{exc}") from None


def _check_kernel(kernel: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        names = sorted(KernelSpecManager().find_kernel_specs())
        raise SweepError(f"no Jupyter kernel named {kernel!r} (installed: {', '.join(names)})") from None


def run_sweep(notebooks: Sequence[str | os.PathLike], out: str | os.PathLike,
              params: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
              seeds: Sequence[int] | None = (0,), workers: int = 1, scheduler: Any = None,
              kernel: str = "python3", progress: bool = True) -> list[RunResult]:
    """Execute every (notebook, seed, grid point) with papermill into ``out/<run-id>/``.

    ``params`` are fixed parameters, ``grid`` maps names to the values to sweep, ``seeds`` are given to
    ``SEED`` (``None``: no seed parameter). ``workers`` notebooks run at a time in a local process pool
    (1: in this process); ``scheduler`` (an address such as ``"tcp://host:8786"``, a
    ``distributed.Client`` or a cluster object) sends them to Dask instead. Raises :class:`SweepError`
    before running anything when the request is invalid. Returns one :class:`RunResult` per run, in
    the order of :func:`expand_grid` (notebooks outermost); failures are results, not exceptions.
    """
    out = Path(out).expanduser().resolve()
    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    specs = _plan(notebooks, out, params, grid, seeds, kernel)
    client, own_client = _connect(scheduler) if scheduler is not None else (None, False)
    try:
        if client is None:
            _check_kernel(kernel)  # with a cluster, the workers' kernels are what counts
        results: dict[str, RunResult] = {}
        todo = []
        for spec in specs:
            run_dir = Path(spec["path"])
            if _status(run_dir) == "ok":
                mfile = run_dir / METRICS_FILE
                results[spec["run_id"]] = RunResult(spec["run_id"], str(run_dir), spec["notebook"], spec["params"],
                                                    "skipped", metrics=_read_json(mfile) if mfile.exists() else {})
            else:
                todo.append(spec)
        for spec in todo:
            _prepare(spec)
        bar = progress_bar(total=len(specs), initial=len(specs) - len(todo), desc="sweep", unit="run",
                           disable=not progress)
        try:
            for res in _dispatch(todo, workers, client):
                results[res["run_id"]] = RunResult(**res)
                bar.update(1)
                bar.set_postfix(failed=sum(r.status == "failed" for r in results.values()), refresh=False)
        finally:
            bar.close()
    finally:
        if own_client:
            client.close()
    return [results[s["run_id"]] for s in specs]


def _failure(spec: Mapping[str, Any], exc: BaseException) -> dict[str, Any]:
    """A run whose task itself failed (a worker died, a pickling error): recorded like a notebook failure."""
    error = f"{type(exc).__name__}: {exc} (the task failed outside the notebook)"
    run_dir = Path(spec["path"])
    try:
        with atomic_files(run_dir / ERROR_FILE) as (tmp,):
            Path(tmp).write_text(error + "\n" + "".join(traceback.format_exception(exc)), encoding="utf-8")
        _write_json(run_dir / STATUS_FILE, {"status": "failed", "error": error})
    except OSError:
        pass
    return {"run_id": spec["run_id"], "path": spec["path"], "notebook": spec["notebook"], "params": spec["params"],
            "status": "failed", "error": error}


def _dispatch(specs: list[dict], workers: int, client: Any):
    """Yield the result dict of each run as it finishes."""
    if not specs:
        return
    if client is not None:
        from distributed import as_completed

        futures = {client.submit(_execute_run, spec, pure=False, key=f"sweep-{spec['run_id']}"): spec
                   for spec in specs}
        for fut in as_completed(futures, loop=client.loop):  # the client is not the global default
            try:
                yield fut.result()
            except Exception as exc:  # noqa: BLE001
                yield _failure(futures[fut], exc)
    elif workers == 1:
        for spec in specs:
            yield _execute_run(spec)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent holds torch's thread pools, which a forked child must not inherit
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_execute_run, spec): spec for spec in specs}
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except Exception as exc:  # noqa: BLE001
                    yield _failure(futures[fut], exc)


def report(out: str | os.PathLike) -> dict[str, Path]:
    """Aggregate a sweep folder into ``results.csv``, ``summary.md`` and ``summary.png``; returns their paths.

    Keys ``csv``, ``markdown`` and ``figure`` (no figure without numeric metrics). See
    :mod:`mergelib.sweep.summary` for what each file holds.
    """
    from .summary import write_report

    return write_report(Path(out))
