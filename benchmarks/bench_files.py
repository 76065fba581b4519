"""Benchmark streamed merges of checkpoints on disk (:func:`mergelib.merge_files`).

Synthetic set: a pretrained checkpoint and ``--n`` fine-tunes (default 4), each about ``--mb`` MB
(default 250) of ``--dtype`` (default bf16) weights shaped like a transformer's (blocks of qkv / proj /
fc1 / fc2 matrices of width ``--width``, plus biases and norms, and an integer ``position_ids`` buffer),
the fine-tunes as Hugging Face sharded checkpoints (``model.safetensors.index.json``).

In one process, interleaved so that the ratios hold under load: a read pass (every tensor of every
input read once with the same reader as the merge, :class:`mergelib.streaming.Checkpoint`), a write
pass (a fresh file of the base's size, the size of a merge's output, written from one buffer and
flushed with ``fsync``: what writing the output costs on this disk, a floor of every merge next to
the read), then each method, then the read pass again, ...; median wall time per row. Columns: wall time, GB/s of
checkpoint input (total input bytes / time; the multi-pass methods read the inputs several times),
the ratio to the read pass, the peak resident set of the process during the run (VmHWM, reset before
each run through ``/proc/self/clear_refs``; Linux) and its growth above the resident set before the
run, both also as a fraction of the total checkpoint bytes. The inputs are in the page cache (they
were just written) unless ``--cold``: then every input file is dropped from the cache
(``posix_fadvise(DONTNEED)``) before each timed run, reads come from the disk.

    OMP_NUM_THREADS=1 python benchmarks/bench_files.py --mb 250 --markdown /tmp/files.md   # --markdown overwrites its file
    OMP_NUM_THREADS=1 python benchmarks/bench_files.py --set /tmp/set5g --cold --methods task_arithmetic

``--set DIR`` runs on a set written before (by ``make_set``, e.g. ``peak_rss_files.py --make-mb``)
instead of writing a new one, and keeps it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import mergelib as ml
from mergelib.streaming import Checkpoint

METHODS = [("task_arithmetic", {}), ("ties", {"granularity": "tensor"}), ("ties", {}),
           ("ties", {"trim_rule": "exact"}), ("dare_ties", {"density": 0.2}), ("fr", {}), ("pcb", {})]


def _status(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_set(root: Path, n: int, mb: float, dtype: torch.dtype, width: int, seed: int = 0) -> list[Path]:
    """Write the base (one file) and n sharded fine-tunes; returns the files of the set."""
    esize = torch.empty((), dtype=dtype).element_size()
    per_block = (3 * width * width + width * width + 8 * width * width) * esize
    blocks = max(1, round(mb * 1e6 / per_block))
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for b in range(blocks):
        shapes.update({f"blocks.{b}.attn.qkv.weight": (3 * width, width), f"blocks.{b}.attn.qkv.bias": (3 * width,),
                       f"blocks.{b}.attn.proj.weight": (width, width), f"blocks.{b}.mlp.fc1.weight": (4 * width, width),
                       f"blocks.{b}.mlp.fc2.weight": (width, 4 * width), f"blocks.{b}.norm1.weight": (width,)})
    files = []
    pre = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    pre["embeddings.position_ids"] = torch.arange(512)[None]
    save_file(pre, str(root / "base.safetensors"))
    files.append(root / "base.safetensors")
    for i in range(n):
        d = root / f"ft{i}"
        d.mkdir()
        keys = sorted(pre)
        half = len(keys) // 2
        wm = {}
        for j, ks in enumerate((keys[:half], keys[half:])):
            fn = f"model-{j + 1:05d}-of-00002.safetensors"
            sd = {k: ((pre[k].float() + torch.randn(pre[k].shape, generator=g) * 1e-3 * (i + 1)).to(dtype)
                      if pre[k].is_floating_point() else pre[k]) for k in ks}
            save_file(sd, str(d / fn))
            files.append(d / fn)
            wm.update({k: fn for k in ks})
            del sd
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return files


def read_pass(base: Path, fts: list[Path]) -> int:
    total = 0
    for p in [base, *fts]:
        ck = Checkpoint(p)
        for k in ck:
            total += ck[k].numel()
    return total


def write_pass(out: Path, nbytes: int, chunk: int = 1 << 26) -> int:
    """Write ``nbytes`` (a merge's output: the base's size) into a fresh file from one reused buffer,
    ``fsync`` it and remove it: the floor of writing a merge's output on this disk, next to the read."""
    buf = memoryview(bytearray(chunk))
    with open(out, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[:min(chunk, left)])
        os.fsync(f.fileno())
    out.unlink()
    return nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4, help="fine-tuned checkpoints")
    ap.add_argument("--mb", type=float, default=250, help="size of each checkpoint, MB")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each run")
    ap.add_argument("--dir", default=None, help="where to write the set (default: a temporary directory)")
    ap.add_argument("--set", default=None, help="use this existing set (base.safetensors and ft0, ft1, ... as "
                                                "written by make_set) instead of writing one; it is kept")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--methods", default="all",
                    help="comma-separated method names to run (default all: " + ", ".join(dict(METHODS)) + ")")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    root = Path(tempfile.mkdtemp(prefix="bench_files_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        if args.set:  # an existing set: its files, as make_set lists them
            setdir = Path(args.set)
            fts = sorted(setdir.glob("ft*"), key=lambda p: int(p.name[2:]))
            if not (setdir / "base.safetensors").is_file() or not fts:
                raise SystemExit(f"--set {setdir}: expected base.safetensors and ft0, ft1, ... there")
            files = [setdir / "base.safetensors"] + [f for d in fts for f in sorted(d.iterdir())]
            args.n, args.dtype = len(fts), "dtype as stored"
        else:
            setdir = root
            files = make_set(root, args.n, args.mb, dtype, args.width)
            fts = [root / f"ft{i}" for i in range(args.n)]
        base = setdir / "base.safetensors"
        t_write = time.perf_counter() - t0
        total = sum(f.stat().st_size for f in files)
        gc.collect()
        can_peak = _reset_peak()

        def run(fn):
            if args.cold:
                _drop_cache(files)
            gc.collect()
            rss0 = _status("VmRSS")
            _reset_peak()
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            return dt, _status("VmHWM"), _status("VmHWM") - rss0

        rows = {"read all inputs once": [], "write one output (the base's bytes, fsync)": []}
        wanted = set(dict(METHODS)) if args.methods == "all" else {m.strip() for m in args.methods.split(",")}
        unknown = wanted - set(dict(METHODS))
        if unknown:
            raise SystemExit(f"--methods: unknown {sorted(unknown)}; expected some of {sorted(set(dict(METHODS)))}")
        rows.update({f"{m} {hp}" if hp else m: [] for m, hp in METHODS if m in wanted})
        for rep in range(args.repeats):
            for (name, res) in list(rows.items()):
                if name == "read all inputs once":
                    res.append(run(lambda: read_pass(base, fts)))
                    continue
                if name.startswith("write one output"):
                    res.append(run(lambda: write_pass(root / "write_pass.bin", base.stat().st_size)))
                    continue
                m, hp = next((m, hp) for m, hp in METHODS if (f"{m} {hp}" if hp else m) == name)
                out = root / "out"
                res.append(run(lambda: ml.merge_files(base, fts, out, m, quiet=True, overwrite=True, **hp)))
                print(f"rep {rep}: {name}: {res[-1][0]:.2f} s", flush=True)
        load = os.getloadavg()
        med = {k: (statistics.median(r[0] for r in v), max(r[1] for r in v), max(r[2] for r in v))
               for k, v in rows.items()}
        t_read = med["read all inputs once"][0]
        lines = [f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}); "
                 f"torch {torch.__version__}; set: 1 base + {args.n} fine-tunes (sharded), {args.dtype}, "
                 f"{total / 1e9:.2f} GB on disk in all ({total / (args.n + 1) / 1e6:.0f} MB each); inputs "
                 f"{'dropped from the page cache before each run (--cold)' if args.cold else 'in the page cache'}; "
                 f"{'the existing set ' + args.set + '; ' if args.set else ''}"
                 f"median of {args.repeats} interleaved runs; load average {load[0]:.1f} / {load[1]:.1f} / "
                 f"{load[2]:.1f} (1/5/15 min) at the end"
                 f"{'' if args.set else f'; writing the set took {t_write:.1f} s'}.",
                 "", "| run | wall s | GB/s (input bytes / time; the write: its bytes) | x read pass | peak RSS GB "
                 "| x total bytes "
                 "| peak RSS growth GB | x total bytes |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, (t, peak, grow) in med.items():
            nbytes = base.stat().st_size if k.startswith("write") else total
            lines.append(f"| {k} | {t:.2f} | {nbytes / t / 1e9:.2f} | {t / t_read:.2f} | {peak / 1e9:.2f} | "
                         f"{peak / total:.2f} | {grow / 1e9:.3f} | {grow / total:.3f} |")
        if not can_peak:
            lines.append("\n(peak RSS could not be reset: the peak columns are the process's peak so far)")
        md = "\n".join(lines)
        print(md)
        if args.markdown:
            Path(args.markdown).write_text(md + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
