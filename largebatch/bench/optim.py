"""``optim``: LARS and LAMB step time against ``torch.optim.SGD(momentum=0.9, foreach=True)``.

The model's real parameter tensors (ResNet-50: 161 tensors, 25.6M values) with fixed random
gradients, split into the usual two groups (weights with a trust ratio; biases and normalization
weights without). Target: LARS and LAMB multi-tensor steps at most 2x SGD's.
"""

from __future__ import annotations

import torch

from largebatch.bench.timing import alternate, median, spread
from largebatch.models import create_model
from largebatch.optim import LAMB, LARS, param_groups

TARGET = 2.0


def run(ctx) -> dict:
    dev = ctx.device
    model = create_model(ctx.args.optim_model, 1000).to(dev)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dev)
    opts = {
        "sgd (foreach)": torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=True),
        "lars (foreach)": LARS(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=True),
        "lars (single)": LARS(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=False),
        "lamb (foreach)": LAMB(param_groups(model, 1e-4), lr=1e-3, foreach=True),
        "lamb (single)": LAMB(param_groups(model, 1e-4), lr=1e-3, foreach=False),
    }
    with torch.no_grad():
        times = alternate({k: o.step for k, o in opts.items()}, ctx.args.rounds, warmup=3, device=dev)
    base = median(times["sgd (foreach)"])
    n = sum(p.numel() for p in model.parameters())
    rows = []
    for name, ts in times.items():
        q1, q3 = spread(ts)
        rows.append({"optimizer": name, "median_ms": median(ts) * 1e3, "p25_ms": q1 * 1e3, "p75_ms": q3 * 1e3,
                     "vs_sgd": median(ts) / base})
    lines = [f"{ctx.args.optim_model}: {len(list(model.parameters()))} tensors, {n / 1e6:.1f}M parameters, "
             f"one worker, {torch.get_num_threads()} threads",
             f"{'optimizer':<16} {'median step':>12} {'p25-p75 (ms)':>16} {'vs SGD':>8}"]
    for r in rows:
        lines.append(f"{r['optimizer']:<16} {r['median_ms']:>9.2f} ms {r['p25_ms']:>7.2f}-{r['p75_ms']:<8.2f} "
                     f"{r['vs_sgd']:>7.2f}x")
    worst = max(r["vs_sgd"] for r in rows if "foreach" in r["optimizer"] and "sgd" not in r["optimizer"])
    lines.append(f"target: multi-tensor LARS and LAMB <= {TARGET:g}x SGD: "
                 f"{'met' if worst <= TARGET else 'NOT met'} (worst {worst:.2f}x)")
    return {"rows": rows, "target": TARGET, "met": worst <= TARGET, "lines": lines}
