"""The cost floors of PCB and FR-Merging on the CPU: the parts of their official arithmetic that no
rearrangement of mergelib's code removes, timed on the task set of ``bench_merge.py`` as ratios to a
read pass of the input, in the same process.

* PCB (``pcb-merging.py``): ``exp`` of every entry of the ``N x D`` task vectors (its intra score) and
  its inter score ``tanh(tau_i * sum_j tau_j)`` as ``pcb_merge`` computes it (``competition._tanh_``:
  blocks whose products are all below 2**-12, where tanh(x) == x in float32, skip the ``tanh``; for
  comparison, ``torch.tanh`` of every entry), in cache-sized column chunks; the exact order statistics
  of every row (two ranks of |tau| for the clip values, one rank of the balancing scores for the drop
  threshold: ``mergelib.selection.kth_smallest``).
* For scale: one eager elementwise operation (``abs``) of every entry, chunk by chunk into a buffer in
  cache, as the merges' own operations run: each further operation a merge makes costs about that.
* FR-Merging: the 2-D real FFT and its inverse of every task's matrix (one task at a time, as
  ``fr_merge`` filters matrices of 2**20 entries or more on the CPU).

Changing these (a cheaper ``tanh``, another transform) would change the bits of the official
arithmetic that ``pcb_merge`` and ``fr_merge`` reproduce. Each row alternates with a read pass
(``tvs.sum()``: every entry read once, nothing written), as in ``bench_merge.py``; the merges' own rows are timed the same way.

    OMP_NUM_THREADS=1 python benchmarks/cost_floors.py [--blocks 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import platform

import torch

from bench_merge import make_task_set, time_against
from mergelib import selection
from mergelib.competition import _column_chunks, _pcb_official_ks, _pcb_q_k, _tanh_, pcb_merge
from mergelib.fourier import fr_merge


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", default=None, help="write the table to this path")
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    x, layout = make_task_set(args.tasks, args.blocks, cpu)
    n, D = x.shape
    chunks = _column_chunks(n, D, cpu)
    buf = torch.empty(n, chunks[0][1] - chunks[0][0])

    def chunked(op):  # op of every entry, chunk by chunk into one reused buffer (in cache)
        def run():
            for c0, c1 in chunks:
                op(x[:, c0:c1], out=buf[:, : c1 - c0])
        return run

    lo_k, hi_k = _pcb_official_ks(D)
    q_k = _pcb_q_k(D, 0.05)
    matrices = [(s, e, shape) for shape, (_, s, e) in zip(layout.shapes, layout.segments()) if len(shape) == 2]

    def ffts():
        for s, e, shape in matrices:
            for i in range(n):
                torch.fft.irfft2(torch.fft.rfft2(x[i, s:e].view(shape)), s=shape)

    def pcb_tanh():  # tanh(tau_i * sum_j tau_j) as pcb_merge computes it, chunk by chunk
        for c0, c1 in chunks:
            _tanh_(torch.mul(x[:, c0:c1], x[:, c0:c1].sum(0), out=buf[:, : c1 - c0]))

    pieces = {
        "(one eager elementwise op, abs, of every entry, for scale)": chunked(torch.abs),
        "(torch.tanh of every entry, for comparison)": chunked(torch.tanh),
        "PCB: tanh(tau * sum tau), column sums included": pcb_tanh,
        "PCB: exp of every entry": chunked(torch.exp),
        "PCB: clip values (2 ranks of abs(tau) per row)":
            lambda: [selection.kth_smallest(x[i], [lo_k, hi_k], absolute=True) for i in range(n)],
        "PCB: drop threshold (1 rank per row; timed on tau)": lambda: [selection.kth_smallest(x[i], q_k) for i in range(n)],
        "PCB official, whole merge": lambda: pcb_merge(x, 0.05),
        "FR: rfft2 + irfft2 of every matrix": ffts,
        "FR official, whole merge": lambda: fr_merge(x, layout, 0.7),
    }
    rows = []
    with torch.no_grad():
        for name, fn in pieces.items():
            ms, base = time_against(fn, lambda: x.sum(), cpu, 1, args.repeats)
            rows.append({"piece": name, "ms": ms, "x_read_pass": ms / base, "read_pass_ms": base})
            print(f"  {name:46s} {ms:9.1f} ms  {ms / base:5.1f}x its read passes ({base:.1f} ms)", flush=True)
    floor = sum(r["x_read_pass"] for r in rows if r["piece"].startswith("PCB:"))
    lines = [f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
             f"capability {torch.backends.cpu.get_cpu_capability()}; N={n}, D={D:,} ({args.blocks} blocks); "
             f"median of {args.repeats} runs, each right after a read pass.", "",
             "| piece | ms | x read pass |", "|---|---:|---:|"]
    lines += [f"| {r['piece']} | {r['ms']:.1f} | {r['x_read_pass']:.1f} |" for r in rows]
    lines += ["", f"PCB's floor (the four PCB pieces): {floor:.1f}x a read pass."]
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
