"""Peak resident memory of one streamed merge in a fresh process (:func:`mergelib.merge_files`).

``bench_files.py`` runs every merge in one process, where each run's memory growth depends on what
earlier runs left in the allocator. This script runs one merge and reports the process's peak
resident set (``getrusage().ru_maxrss``, Linux: kB) against the total checkpoint bytes. Run it once
per method, each in its own process, on one set (``--make-mb`` writes it first if ``SETDIR`` has none,
with ``bench_files.make_set``: a base and 4 sharded bf16 fine-tunes of that many MB each; that
call's peak includes the writing, so measure with the calls after it):

    python benchmarks/peak_rss_files.py /tmp/set5g task_arithmetic --make-mb 1000
    python benchmarks/peak_rss_files.py /tmp/set5g ties                    # hyperparameters as k=v:
    python benchmarks/peak_rss_files.py /tmp/set5g ties trim_rule=exact
    python benchmarks/peak_rss_files.py /tmp/set5g dare_ties density=0.2

``SETDIR`` holds ``base.safetensors`` and the fine-tunes as directories ``ft*``; the merge is written
to a temporary directory that is removed afterwards.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import mergelib as ml
from mergelib.streaming import _parse_value  # values parsed as `python -m mergelib.merge` parses them


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setdir")
    ap.add_argument("method")
    ap.add_argument("hparams", nargs="*", help="hyperparameters as name=value")
    ap.add_argument("--make-mb", type=float, default=None, help="write a set of this size per checkpoint first")
    args = ap.parse_args(argv)
    root = Path(args.setdir)
    if args.make_mb and not (root / "base.safetensors").exists():
        import torch
        from bench_files import make_set  # this folder is on sys.path when the script runs

        root.mkdir(parents=True, exist_ok=True)
        make_set(root, 4, args.make_mb, torch.bfloat16, 1024)
    fts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ft"))
    hp = {k: _parse_value(v) for k, v in (kv.split("=", 1) for kv in args.hparams)}
    total = (root / "base.safetensors").stat().st_size + sum(f.stat().st_size for d in fts
                                                             for f in d.glob("*.safetensors"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = Path(tempfile.mkdtemp(dir=root)) / "merged"
    try:
        t = time.perf_counter()
        ml.merge_files(root / "base.safetensors", fts, out, args.method, quiet=True, **hp)
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(out.parent)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{args.method} {hp}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB (before the merge {before / 1e9:.2f} GB)"
          f" = {peak / total:.3f} of the {total / 1e9:.2f} GB of checkpoints")
    return {"wall_s": wall, "peak_rss": peak, "before": before, "total_bytes": total}


if __name__ == "__main__":
    main()
