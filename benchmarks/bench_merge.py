"""Benchmark the flat task-vector merges of mergelib on a ViT-B/32-sized task set.

Task set: N task vectors (default 8) over the 4 matrices of each of ``--blocks`` transformer blocks
of width 768: qkv 2304x768, proj 768x768, fc1 3072x768, fc2 768x3072 (12 blocks = 48 matrices,
~85M parameters per task, 2.7 GB fp32 for 8 tasks). ``--blocks auto``: 12 on CUDA, 2 on the CPU.

Every method is timed end to end from the ``N x D`` float32 task-vector matrix to the merged ``D``
vector (inputs untouched, so the non-in-place code paths): median of ``--repeats`` runs after
``--warmup`` runs, with ``torch.cuda.synchronize()`` on GPU, every run right after a read pass.
Columns:

* ms, and GB/s of task-vector input read (N*D*4 bytes / time);
* the ratio to one read pass of the input: the time of ``tvs.sum()``, every entry read once and
  nothing written (the memory-bandwidth baseline), the median of the read passes timed alternately
  with that method, so that drifting machine load cancels. Tables before 2026-12-01 used
  ``tvs.sum(0)``, which allocates its ``D`` output on every call; on the CPU half of its time was
  faulting that output in, so their ratios are about 2.7x too small. Its row, and ``tvs.sum(0)`` into
  an output already mapped, are kept for comparison;
* peak extra memory (CUDA: ``max_memory_allocated`` above the allocation before the call; CPU: peak
  RSS above the start, sampled every ~1 ms by a thread -- approximate);
* the minor page faults of a run (median; fresh memory faulted in page by page).

A naive per-tensor TIES written like the widely used per-model/per-tensor implementations (stack,
topk + scatter mask per task, sign election, disjoint mean) is included for comparison, and, where peft
is installed, peft's own ``ties`` tensor by tensor from the state dicts (the result of the row
``merge(): TIES per tensor, trim_rule=exact``; ``--skip-naive`` skips both references).

    python benchmarks/bench_merge.py                     # auto: full on CUDA, 2 blocks on CPU
    python benchmarks/bench_merge.py --blocks 12 --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from typing import Callable

import torch

from mergelib.competition import dare_flat, pcb_merge, ties_merge
from mergelib.fourier import fr_merge
from mergelib.task_vectors import FlatLayout, flatten, unflatten

MATRICES = {"attn.qkv.weight": (2304, 768), "attn.proj.weight": (768, 768), "mlp.fc1.weight": (3072, 768),
            "mlp.fc2.weight": (768, 3072)}


def make_task_set(n: int, blocks: int, device: torch.device, seed: int = 0, width_scale: float = 1.0):
    """N x D float32 task vectors (Gaussian, std 1e-3, with a per-task scale) and their layout."""
    shapes = {f"blocks.{b}.{k}": tuple(int(s * width_scale) for s in shp)
              for b in range(blocks) for k, shp in MATRICES.items()}
    layout = FlatLayout.from_shapes(shapes)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, layout.D, generator=g, device=device)
    x.mul_(torch.linspace(0.5e-3, 2e-3, n, device=device)[:, None])
    return x, layout


# ---------------------------------------------------------------------------------------------
# naive per-tensor TIES (the style of the widely used implementations), for comparison
# ---------------------------------------------------------------------------------------------
def naive_ties_per_tensor(task_dicts: list[dict[str, torch.Tensor]], density: float) -> dict[str, torch.Tensor]:
    out = {}
    for key in task_dicts[0]:
        stacked = torch.stack([td[key] for td in task_dicts])  # N x shape (a copy per tensor)
        masked = []
        for t in stacked:
            k = int(density * t.numel())
            _, idx = torch.topk(t.abs().flatten(), k)
            mask = torch.zeros_like(t).flatten().scatter_(0, idx, 1.0).view_as(t)
            masked.append(t * mask)
        trimmed = torch.stack(masked)
        sign = torch.sign(trimmed.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
        num = (trimmed * agree).sum(0)
        out[key] = num / agree.sum(0).clamp(min=1)
    return out


def peft_merge_utils():
    """``peft.utils.merge_utils`` loaded from its file (it imports only torch; importing the peft package
    would import transformers), or None when peft is not installed."""
    import importlib.util
    import pathlib
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "utils" / "merge_utils.py"
    mod_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def peft_ties_per_tensor(pm, pretrained: dict[str, torch.Tensor], finetuned: list[dict[str, torch.Tensor]],
                         density: float) -> dict[str, torch.Tensor]:
    """peft's ``ties`` (exactly ``int(density * numel)`` entries per task tensor, the ``"total"`` sign
    rule) on every tensor's task vectors, added to the base: what ``merge(..., "ties", scale=1.0,
    granularity="tensor", trim_rule="exact")`` computes (tests/test_selection.py checks the bits)."""
    ones = torch.ones(len(finetuned), device=next(iter(pretrained.values())).device)
    return {k: p + pm.ties([ft[k] - p for ft in finetuned], ones, density, majority_sign_method="total")
            for k, p in pretrained.items()}


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_against(fn: Callable, ref: Callable, device: torch.device, warmup: int, repeats: int,
                 stats: dict | None = None) -> tuple[float, float]:
    """(median ms of ``fn``, median ms of ``ref``) with the two timed alternately, ``ref`` right before
    each run of ``fn``: the ratio then compares runs made under the same machine load (a shared VM's
    memory bandwidth drifts by 20-30 % within minutes). ``stats`` (a dict) receives ``"faults"``: the
    median number of minor page faults of a run of ``fn`` (fresh memory faulted in page by page; a
    merge that allocates a block per tensor or chunk pays them again on every call, because glibc
    returns freed blocks of a few MB to the kernel), None where it cannot be read."""
    for _ in range(warmup):
        ref()
        fn()
    _sync(device)
    t_fn, t_ref, faults = [], [], []
    for _ in range(repeats):
        for f, out in ((ref, t_ref), (fn, t_fn)):
            f0 = _minor_faults()
            t0 = time.perf_counter()
            f()
            _sync(device)
            out.append(time.perf_counter() - t0)
            if f is fn and f0 is not None:
                faults.append(_minor_faults() - f0)
    if stats is not None:
        stats["faults"] = statistics.median(faults) if faults else None
    return statistics.median(t_fn) * 1e3, statistics.median(t_ref) * 1e3


def peak_extra_bytes(fn: Callable, device: torch.device) -> float | None:
    """Peak memory above the level before the call (bytes); None if it cannot be measured."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return float(peak)
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out = fn()
    done.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    del out
    return float(peak[0] - base)


def write_profiles(methods: dict[str, Callable], device: torch.device, path: str, rows: int = 15) -> None:
    """torch.profiler's operator table of one (warm) run of each method, into the text file ``path``:
    where a merge spends its time beyond the read passes (device kernels, host synchronisations)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f, torch.no_grad():
        for name, fn in methods.items():
            fn()
            _sync(device)
            with profile(activities=acts) as prof:
                fn()
                _sync(device)
            f.write(f"## {name}\n\n{prof.key_averages().table(sort_by=key, row_limit=rows)}\n\n")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--blocks", default="auto", help="number of 768-wide blocks (auto: 12 on CUDA, 2 on CPU)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 10 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default="all", help="comma-separated subset of the method names")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive per-tensor TIES")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--markdown", default=None, help="write the markdown table to this path")
    ap.add_argument("--skip-merge", action="store_true", help="skip the public merge() rows")
    ap.add_argument("--profile", default=None,
                    help="write torch.profiler's table of one run of each method (the operators by self time on "
                         "the device, or on the CPU without CUDA) to this path")
    ap.add_argument("--kth", default="auto", choices=("auto", "torch"),
                    help="order statistics: 'auto' (mergelib.selection) or 'torch' (the old torch.kthvalue path)")
    ap.add_argument("--kernels", default="auto", choices=("auto", "torch"),
                    help="'auto': mergelib.kernels' fused loops where they apply (Numba); 'torch': the eager torch code")
    ap.add_argument("--tv-scale", type=float, default=1.0,
                    help="multiply the task vectors (std 0.5e-3..2e-3) by this: at 3, PCB's cross terms reach "
                         "tanh's range (|p| >= 2**-12) in 0.7 %% of the entries, at 5 in 8 %%")
    args = ap.parse_args(argv)

    if args.kth != "auto":
        from mergelib import selection  # absent before issue 13 (the old code always used kthvalue)
        selection.set_backend(args.kth)
    if args.kernels != "auto":
        from mergelib import kernels  # absent before issue 13's twelfth session
        kernels._enabled = False
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    blocks = (12 if device.type == "cuda" else 2) if args.blocks == "auto" else int(args.blocks)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    x, layout = make_task_set(args.tasks, blocks, device)
    if args.tv_scale != 1.0:
        x.mul_(args.tv_scale)
    n, D = x.shape
    in_bytes = x.numel() * x.element_size()
    tasks = [f"task{i}" for i in range(n)]
    resident = torch.zeros(D, device=device)  # an output whose pages are already mapped

    methods: dict[str, Callable] = {
        "read pass (tvs.sum())": lambda: x.sum(),
        "tvs.sum(0) into a fresh D vector (the read pass of tables before 2026-12-01)": lambda: x.sum(0),
        "tvs.sum(0) into a resident D vector": lambda: torch.sum(x, 0, out=resident),
        "task arithmetic": lambda: x.sum(0).mul_(0.3),
        "TIES global top-k (k=20%)": lambda: ties_merge(x, 0.2),
        "TIES per tensor (k=20%)": lambda: ties_merge(x, 0.2, granularity="tensor", layout=layout),
        "DARE-TA (p=0.9)": lambda: dare_flat(x, 0.9, layout, seed=0, tasks=tasks).sum(0),
        "PCB official (r=0.05)": lambda: pcb_merge(x, 0.05, mode="official"),
        "PCB paper (r=0.05)": lambda: pcb_merge(x, 0.05, mode="paper"),
        "FR official (r=0.7, align)": lambda: fr_merge(x, layout, 0.7, mode="official", align="official"),
        "flatten (N dicts -> N x D)": None,  # filled below
    }
    views = [unflatten(x[i], layout) for i in range(n)]
    methods["flatten (N dicts -> N x D)"] = lambda: flatten(views, layout.keys)[0]
    if not args.skip_naive:
        methods["naive per-tensor TIES (reference)"] = lambda: naive_ties_per_tensor(views, 0.2)
    if not args.skip_merge:
        from mergelib.merging import merge
        gen = torch.Generator(device=device).manual_seed(1)
        pre = {k: torch.randn(shp, generator=gen, device=device) * 0.02
               for k, shp in zip(layout.keys, layout.shapes)}
        fts = [{k: pre[k] + v for k, v in views[i].items()} for i in range(n)]
        for label, meth, hp in (("task arithmetic", "task_arithmetic", {}),
                                ("TIES global (k=20%)", "ties", {}),
                                ("TIES global, trim_rule=exact (k=20%)", "ties", {"trim_rule": "exact"}),
                                ("TIES per tensor (k=20%)", "ties", {"granularity": "tensor"}),
                                ("TIES per tensor, trim_rule=exact (k=20%; peft's ties)", "ties",
                                 {"granularity": "tensor", "trim_rule": "exact"}),
                                ("DARE-TA (p=0.9)", "dare_ta", {}),
                                ("PCB official (r=0.05)", "pcb", {}),
                                ("FR official (r=0.7, align)", "fr", {})):
            methods[f"merge(): {label}"] = (lambda meth=meth, hp=hp: merge(pre, fts, meth, rules=None, **hp))
        pm = None if args.skip_naive else peft_merge_utils()
        if pm is not None:  # the same merge by peft's merge utilities, tensor by tensor (a reference)
            methods["peft's ties per tensor (reference; k=20%)"] = lambda: peft_ties_per_tensor(pm, pre, fts, 0.2)
    if args.methods != "all":
        wanted = [m.strip() for m in args.methods.split(",")]
        methods = {k: v for k, v in methods.items() if k.startswith("read pass") or any(w in k for w in wanted)}

    rows = []
    read = next(iter(methods.values()))  # the read pass
    with torch.no_grad():
        for name, fn in methods.items():
            # every method alternates with a read pass; its ratio is to the read passes of its own runs
            stats = {}
            ms, base_ms = time_against(fn, read, device, args.warmup, repeats, stats)
            mem = peak_extra_bytes(fn, device)
            rows.append({"method": name, "ms": ms, "gb_per_s": in_bytes / (ms * 1e-3) / 1e9,
                         "x_read_pass": ms / base_ms, "read_pass_ms": base_ms, "page_faults": stats["faults"],
                         "peak_extra_gb": None if mem is None else mem / 1e9,
                         "peak_extra_x_input": None if mem is None else mem / in_bytes})
            print(f"  {name:38s} {ms:10.2f} ms  ({ms / base_ms:.1f}x its read passes, {base_ms:.1f} ms)", flush=True)

    if args.profile:
        write_profiles(methods, device, args.profile)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    meta = {"device": dev_name, "torch": torch.__version__, "tasks": n, "blocks": blocks, "D": D,
            "tv_scale": args.tv_scale, "input_gb": in_bytes / 1e9, "repeats": repeats, "warmup": args.warmup}
    mem_label = "peak extra (CUDA allocator)" if device.type == "cuda" else "peak extra RSS (sampled)"
    scaled = "" if args.tv_scale == 1.0 else f", task vectors x{args.tv_scale:g}"
    lines = [f"Device: {dev_name}; torch {torch.__version__}; N={n} task vectors{scaled}, {blocks} blocks "
             f"({4 * blocks} matrices), D={D:,} ({in_bytes / 1e9:.2f} GB fp32 input); median of {repeats} "
             f"runs after {args.warmup} warm-up, each run right after a read pass (the ratio is to those).", "",
             f"| method | ms | GB/s (input read) | x read pass | {mem_label} GB | x input | page faults / run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "n/a" if r["peak_extra_gb"] is None else f"{r['peak_extra_gb']:.2f}"
        memx = "n/a" if r["peak_extra_x_input"] is None else f"{r['peak_extra_x_input']:.2f}"
        flt = "n/a" if r["page_faults"] is None else f"{r['page_faults']:,.0f}"
        lines.append(f"| {r['method']} | {r['ms']:.1f} | {r['gb_per_s']:.1f} | {r['x_read_pass']:.1f} | "
                     f"{mem} | {memx} | {flt} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
