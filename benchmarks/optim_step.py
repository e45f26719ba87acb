"""Optimizer step time of LARS and LAMB against torch.optim.SGD(momentum=0.9, foreach=True).

    python benchmarks/optim_step.py [--model resnet50] [--repeats 30] [--device cpu]

Uses the model's real parameter tensors (ResNet-50: 161 tensors, 25.6M values) with random
gradients, split into the usual two groups (weights with a trust ratio; biases and BatchNorm
without). Steps of the optimizers are interleaved, round after round (the order rotating from round
to round), so that the ratios hold on a noisy machine; reports the median step time of each, its
interquartile range and the ratio of medians to SGD.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from largebatch.models import create_model
from largebatch.optim import LAMB, LARS, param_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    model = create_model(args.model, 1000).to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dev)
    make = {
        "sgd (foreach)": lambda: torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=True),
        "lars (foreach)": lambda: LARS(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=True),
        "lars (single)": lambda: LARS(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=False),
        "lamb (foreach)": lambda: LAMB(param_groups(model, 1e-4), lr=1e-3, foreach=True),
        "lamb (single)": lambda: LAMB(param_groups(model, 1e-4), lr=1e-3, foreach=False),
    }
    opts = {k: f() for k, f in make.items()}
    times: dict[str, list[float]] = {k: [] for k in opts}
    names = list(opts)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        for rnd in range(args.repeats + 3):
            # Rotate the order so that no optimizer always runs first or right after the same one.
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                opt = opts[name]
                sync()
                t0 = time.perf_counter()
                opt.step()
                sync()
                if rnd >= 3:  # the first rounds allocate state
                    times[name].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {len(list(model.parameters()))} tensors, {n / 1e6:.1f}M parameters, "
          f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    base = statistics.median(times["sgd (foreach)"])
    print(f"{'optimizer':<16} {'median step':>12} {'p25-p75 (ms)':>16} {'vs SGD':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        q1, _, q3 = statistics.quantiles(ts, n=4)
        print(f"{name:<16} {med * 1e3:>9.2f} ms {q1 * 1e3:>7.2f}-{q3 * 1e3:<8.2f} {med / base:>7.2f}x")


if __name__ == "__main__":
    main()
