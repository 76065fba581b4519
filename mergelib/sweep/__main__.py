"""``python -m mergelib.sweep {run,report}``: parameter sweeps over notebooks (see ``mergelib.sweep``)."""
from __future__ import annotations

import argparse
import sys

from . import SweepError, parse_grid, parse_value, report, run_sweep

EPILOG = """\
examples:
  python -m mergelib.sweep run notebooks/02_parameter_competition.ipynb --out runs/pcb \\
      -p PROFILE quick --grid LAMBDA=0.3,0.5,1.0 --seeds 0 1 2 --workers 2
  python -m mergelib.sweep report runs/pcb

Runs go to OUT/<run-id>/ (params.json, the executed notebook, metrics.json, error.txt on failure).
Notebooks record results with mergelib.sweep.record({...}). Re-running the same command skips the
finished runs and retries the failed ones. Exit status: 0 all runs ok, 1 some run failed, 2 invalid
request (nothing was run).
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mergelib.sweep",
                                 description="Parameter sweeps over notebooks: run every combination with papermill, "
                                             "then aggregate the recorded metrics.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute every combination of parameters with papermill",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    run.add_argument("--out", required=True, metavar="DIR", help="folder of the run folders")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="fixed parameter (parsed as papermill -p: int, float, True/False/None, else string)")
    run.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                     help="parameter to sweep (repeatable: the cartesian product is run)")
    run.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED",
                     help="values of the SEED parameter (default: 0)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1, metavar="N",
                       help="notebooks run at a time on this machine (default: 1)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler, e.g. tcp://host:8786")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = sub.add_parser("report", help="aggregate: results.csv, summary.md, summary.png")
    rep.add_argument("out", metavar="DIR")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            for path in report(args.out).values():
                print(path)
            return 0
        params = {}
        for name, value in args.parameter:
            if not name.isidentifier():
                raise SweepError(f"malformed -p {name!r}: not a Python identifier")
            params[name] = parse_value(value)
        results = run_sweep(args.notebooks, args.out, params=params, grid=parse_grid(args.grid), seeds=args.seeds,
                            workers=args.workers, scheduler=args.scheduler, kernel=args.kernel,
                            progress=not args.no_progress)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    print(f"{len(results)} runs: {counts['ok']} ok, {counts['skipped']} skipped (done before), "
          f"{counts['failed']} failed -> {args.out}")
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.run_id}: {r.error}", file=sys.stderr)
    print(f"next: python -m mergelib.sweep report {args.out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
