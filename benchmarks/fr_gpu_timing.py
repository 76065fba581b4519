"""Where FR-Merging's time goes on a GPU: ``fr_merge`` on the ViT-B/32-sized task set of ``bench_merge.py``
(8 task vectors, 12 blocks, 48 matrices), with and without its input check, each matrix shape's transforms
and reductions on their own (and in a transposed layout), and the GPU's idle time in one call from a
torch.profiler trace: how long the GPU was busy, the span from its first kernel to its last, and the
largest gaps between kernels with the kernels on either side.

    python benchmarks/fr_gpu_timing.py                 # on a GPU machine: JSON on stdout
    python benchmarks/fr_gpu_timing.py --device cpu    # the script's own dry run (1 block, no trace)

The third GPU session's findings (``results_gpu.md``) come from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
from bench_merge import make_task_set  # noqa: E402

from mergelib import fourier  # noqa: E402
from mergelib.fourier import fr_merge  # noqa: E402


def median_ms(fn, sync, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def shape_timings(x: torch.Tensor, layout, sync) -> dict[str, float]:
    """Each distinct matrix shape's forward and inverse transforms, the copy of a spectrum, the L1 norms
    of the filtered rows, all 8 tasks at once, in the layout FR uses and transposed."""
    out = {}
    seen = set()
    for shape, (_, s, e) in zip(layout.shapes, layout.segments()):
        if len(shape) != 2 or shape in seen:
            continue
        seen.add(shape)
        seg = x[:, s:e].view(x.shape[0], *shape)
        name = "x".join(map(str, shape))
        spec = torch.fft.rfft2(seg)
        seg_t = seg.transpose(-1, -2).contiguous()
        spec_t = torch.fft.rfft2(seg_t)
        filtered = torch.fft.irfft2(spec, s=shape).reshape(x.shape[0], -1)
        out[f"{name} rfft2"] = median_ms(lambda: torch.fft.rfft2(seg), sync)
        out[f"{name} irfft2 (unscaled)"] = median_ms(lambda: torch.fft.irfft2(spec, s=shape, norm="forward"), sync)
        out[f"{name} copy of the spectrum"] = median_ms(lambda: spec.clone(), sync)
        out[f"{name} transposed rfft2"] = median_ms(lambda: torch.fft.rfft2(seg_t), sync)
        out[f"{name} transposed irfft2"] = median_ms(
            lambda: torch.fft.irfft2(spec_t, s=shape[::-1], norm="forward"), sync)
        out[f"{name} transposed copy of the input"] = median_ms(lambda: seg.transpose(-1, -2).contiguous(), sync)
        out[f"{name} L1 norms of the rows"] = median_ms(lambda: torch.linalg.vector_norm(filtered, 1, dim=1), sync)
    return out


def idle_time(x: torch.Tensor, layout) -> dict:
    """The kernels of one fr_merge from a torch.profiler trace: busy time, span, gaps over 5 us."""
    from torch.profiler import ProfilerActivity, profile

    fr_merge(x, layout, 0.7)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fr_merge(x, layout, 0.7)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    gaps = [(round(b["ts"] - a["ts"] - a["dur"], 1), a["name"][:60], b["name"][:60])
            for a, b in zip(kernels, kernels[1:]) if b["ts"] - a["ts"] - a["dur"] > 5]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"][:70], []).append(e["dur"])
    return {"kernels": len(kernels), "busy_us": round(sum(e["dur"] for e in kernels)),
            "span_us": round(kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]),
            "idle_us": round(sum(g[0] for g in gaps)), "largest_gaps": sorted(gaps, reverse=True)[:10],
            "kernel_us": {k: [round(sum(v)), len(v)] for k, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    x, layout = make_task_set(8, 12 if on_gpu else 1, dev)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    out = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
           "read pass (tvs.sum())": median_ms(lambda: x.sum(), sync),
           "fr_merge": median_ms(lambda: fr_merge(x, layout, 0.7), sync)}
    with mock.patch.object(fourier, "_check_matrix", lambda tvs, *a, **k: tuple(tvs.shape)):
        out["fr_merge without its input check"] = median_ms(lambda: fr_merge(x, layout, 0.7), sync)
    out.update(shape_timings(x, layout, sync))
    if on_gpu:
        out["one fr_merge under the profiler"] = idle_time(x, layout)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
