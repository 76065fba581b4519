"""Timings of the alignment library at the widths of the course (prints a small table).

    python benchmarks/bench_align.py [--device cpu|cuda] [--threads N] [--batches 4]

Cases: Git Re-Basin weight matching and MuDSC (align, alpha=0.5) on two independently initialised
ResNet-20x8 (512 channels in stage 3) and on a 784-1024-1024-1024-10 MLP; the LAP alone at n=1024.
MuDSC is timed without the BN reset; the activation pass over ``--batches`` random batches of
``--batch-size`` inputs (two forward passes, float64 moments) is timed on its own as well, since on a
CPU the forward passes of ResNet-20x8 (2.6 GFLOP per 32x32 image) dominate.
"""
from __future__ import annotations

import argparse
import time

import torch

import mergelib.align as al
from mergelib.models import MLP, ResNet20


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")
    _, t = timed(lambda: al.solve_lap(torch.rand(1024, 1024, generator=g)))
    print(f"{'LAP 1024x1024':40s} {t:7.2f} s")
    cases = [("ResNet20x8", lambda: ResNet20(8), (3, 32, 32)),
             ("MLP 784-1024x3-10", lambda: MLP(784, (1024, 1024, 1024), 10), (784,))]
    for name, make, shape in cases:
        torch.manual_seed(0)
        a, b = make().to(dev).eval(), make().to(dev).eval()
        spec = al.permutation_spec(a)
        data = [torch.randn(args.batch_size, *shape, generator=g).to(dev) for _ in range(args.batches)]
        perm, t = timed(lambda: al.weight_matching(spec, a.state_dict(), b.state_dict()))
        print(f"{name + ' weight_matching':40s} {t:7.2f} s")
        _, t_act = timed(lambda: al.collect_moments(a, b, spec, data))
        print(f"{name + ' activation moments':40s} {t_act:7.2f} s")
        res, t = timed(lambda: al.mudsc(a, b, data, alpha=0.5, variant="align", spec=spec, reset_bn=False))
        print(f"{name + ' mudsc align (%d iters)' % len(res.history):40s} {t:7.2f} s"
              f"  (matching part ~{t - t_act:.2f} s)")


if __name__ == "__main__":
    main()
