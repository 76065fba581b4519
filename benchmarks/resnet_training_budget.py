"""Does weight matching start to help the quick profile's ResNet-20 pairs if they are trained longer?

Notebook 05 trains its ResNet-20 pairs for 400 steps (quick profile, 16 px CIFAR-10): endpoints of
45-51 %, and weight matching + BN reset is no better than the naive average + BN reset. This script
trains the same pair (same recipe, names, seeds and evaluation data as notebook 05, so the 400-step
models come from the notebook's cache) for more steps and prints the midpoint accuracy of the naive
average, weight matching and activation matching, each without and with BN reset.

    python benchmarks/resnet_training_budget.py --steps 400 1200 --widths 1 2 --markdown out.md

Only the number of steps changes; every other setting is notebook 05's quick profile.
"""
from __future__ import annotations

import argparse
import copy

import torch

import mergelib as ml
import mergelib.align as al

QUICK_TRAIN = dict(steps=400, batch_size=64, lr=3e-3, weight_decay=0.01, augment_pad=2, flip=True,
                   label_smoothing=0.0, max_samples=None, test_samples=1000, image_size=16, channels=3)


def run(steps: int, width: int, data_root=None, zoo_root=None, seed: int = 0) -> dict:
    train = {**QUICK_TRAIN, "steps": steps}
    pair = [ml.zoo.classifier(f"align-r20x{width}-cifar10-s{s}", "resnet20", dict(width_multiplier=width), "cifar10",
                              train, seed=s, profile="quick", device="cpu", data_root=data_root,
                              zoo_root=zoo_root, progress=False, verbose=False) for s in (seed + 1, seed + 2)]
    models = [m for m, _ in pair]
    train_s = sum(rec["train_time_s"] for _, rec in pair)  # as recorded when trained (cached runs load them)

    def load(split, n):
        return ml.data.load_task("cifar10", split, data_root, image_size=16, max_samples=n, seed=seed, device="cpu",
                                 verbose=False)

    test = load("test", 1000)
    match = [ml.data.normalize(x) for x in load("train", 1024).x.split(256)]
    a, b = models
    spec = al.permutation_spec(a)
    sd = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731

    def acc(m):
        return 100 * ml.training.evaluate(m, test)["acc"]

    def midpoint(perm, reset):
        m = copy.deepcopy(a)
        m.load_state_dict(al.merge_aligned(spec, sd(a), sd(b), perm))
        if reset:
            al.reset_bn_stats(m, match)
        return acc(m)

    perms = {"naive": None, "weight matching": al.weight_matching(spec, sd(a), sd(b), seed=seed),
             "activation matching": al.activation_matching(a, b, match, spec=spec)}
    row = {"steps": steps, "width": width, "train_s": train_s, "endpoints": (acc(a) + acc(b)) / 2}
    for name, p in perms.items():
        row[name] = (midpoint(p, False), midpoint(p, True))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 1200])
    ap.add_argument("--widths", type=int, nargs="+", default=[1])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--zoo-root", default=None, help="zoo cache (default: the notebooks' data/zoo)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args()
    lines = ["| width | steps | endpoints (mean) | naive / + BN reset | weight matching / + BN reset | "
             "activation matching / + BN reset | training time of the pair (s, as recorded) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for w in args.widths:
        for s in args.steps:
            r = run(s, w, args.data_root, args.zoo_root)
            cells = " | ".join(f"{r[k][0]:.1f} / {r[k][1]:.1f}" for k in ("naive", "weight matching",
                                                                         "activation matching"))
            lines.append(f"| ×{w} | {s} | {r['endpoints']:.1f} | {cells} | {r['train_s']:.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
