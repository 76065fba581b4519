"""Fingerprints of ``mergelib.merge`` outputs: check that a refactor changed no bit.

Runs every merge method and variant (117 configurations: fp32 / bf16 / fp16 state dicts, normal
task vectors and ones full of ties and zeros, long rows through the flat TIES / PCB functions) and
writes the SHA-256 of every output's bytes to a JSON file. Run it in two checkouts and compare:

    python tools/merge_fingerprints.py /tmp/before.json          # in the old checkout
    python tools/merge_fingerprints.py /tmp/after.json           # in the new one
    python tools/merge_fingerprints.py --compare /tmp/before.json /tmp/after.json

The fingerprints cover the raw bytes, so even the sign of a zero counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings

import torch


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprints() -> dict[str, str]:
    from mergelib.competition import pcb_merge, ties_merge, trim
    from mergelib.merging import merge
    from mergelib.task_vectors import FlatLayout

    warnings.filterwarnings("ignore")
    out = {}
    shapes = {"a.weight": (300, 250), "b.weight": (64, 1100), "c.bias": (77,), "d.weight": (513, 129)}
    configs = [("task_arithmetic", {}), ("average", {}), ("ties", {}), ("ties", {"granularity": "tensor"}),
               ("ties", {"trim_rule": "exact"}), ("ties", {"sign_rule": "count"}), ("ties", {"density": 0.5}),
               ("ties", {"density": 1.0}),
               ("ties", {"granularity": "tensor", "trim_rule": "exact", "sign_rule": "count"}),
               ("dare_ta", {}), ("dare_ties", {"density": 0.3}), ("pcb", {}), ("pcb", {"density": 0.3}),
               ("pcb", {"mode": "paper"}), ("fr", {}), ("fr", {"align": "paper"}),
               ("fr", {"mode": "paper", "align": "none"})]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            pre = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
            fts = []
            for i in range(5):
                ft = {}
                for k, s in shapes.items():
                    d = torch.randn(s, generator=g) * 1e-3 * (i + 1)
                    if seed == 1:  # many exact zeros and ties
                        d = (d * 1e4).round() / 1e4 * (torch.rand(s, generator=g) > 0.3)
                    ft[k] = (pre[k].float() + d).to(dtype)
                fts.append(ft)
            for method, hp in configs:
                out[f"{dtype} s{seed} {method} {hp}"] = _digest(merge(pre, fts, method, rules=None, **hp))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300_000, generator=g) * 1e-3
    x[:, ::7] = 0.0
    x[1, ::3] = 1e-3
    layout = FlatLayout.from_shapes({"p": (1000, 200), "q": (100_000,)})
    for density in (0.1, 0.2, 0.9):
        out[f"flat ties {density}"] = _digest({"o": ties_merge(x, density)})
        out[f"flat ties tensor {density}"] = _digest({"o": ties_merge(x, density, granularity="tensor", layout=layout)})
        out[f"flat ties exact {density}"] = _digest({"o": ties_merge(x, density, trim_rule="exact")})
        out[f"flat trim {density}"] = _digest({"o": trim(x, density)})
        out[f"flat pcb {density}"] = _digest({"o": pcb_merge(x, density)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="OUT.json, or with --compare: A.json B.json")
    ap.add_argument("--compare", action="store_true", help="compare two fingerprint files")
    args = ap.parse_args(argv)
    if args.compare:
        if len(args.paths) != 2:
            ap.error("--compare needs two files")
        a, b = (json.load(open(p)) for p in args.paths)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        print(f"{len(a)} and {len(b)} configurations; {len(differ)} differ" + "".join(f"\n  {k}" for k in differ))
        return 1 if differ else 0
    torch.set_num_threads(1)
    res = fingerprints()
    with open(args.paths[0], "w") as f:
        json.dump(res, f, indent=0)
    print(f"{len(res)} configurations -> {args.paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
