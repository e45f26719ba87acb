"""``optim``: LARS and LAMB step time against ``torch.optim.SGD(momentum=0.9, foreach=True)``.

The model's real parameter tensors (ResNet-50: 161 tensors, 25.6M values) with fixed random
gradients, split into the usual two groups (weights with a trust ratio; biases and normalization
weights without). Beside them, where torch has the fused kernels for the device, torch's
``SGD(fused=True)`` and ``AdamW(fused=True)``; every ratio is against SGD(foreach). Target for the
multi-tensor LARS and LAMB steps: on CUDA, LARS <= 1.3x and LAMB <= 1.5x SGD(foreach); elsewhere
both <= 2x.
"""

from __future__ import annotations

import torch

from largebatch.bench.timing import alternate, median, spread
from largebatch.models import create_model
from largebatch.optim import LAMB, LARS, has_fused_kernel, param_groups

TARGETS = {"cuda": {"lars": 1.3, "lamb": 1.5}}
DEFAULT_TARGET = {"lars": 2.0, "lamb": 2.0}


def run(ctx) -> dict:
    dev = ctx.device
    model = create_model(ctx.args.optim_model, 1000).to(dev)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dev)
    opts = {"sgd (foreach)": torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=True)}
    if has_fused_kernel("_fused_sgd_", dev.type):
        opts["sgd (fused)"] = torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9, fused=True)
    if has_fused_kernel("_fused_adamw_", dev.type):
        opts["adamw (fused)"] = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-3, fused=True)
    opts.update({
        "lars (foreach)": LARS(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=True),
        "lars (single)": LARS(param_groups(model, 1e-4), lr=0.1, momentum=0.9, foreach=False),
        "lamb (foreach)": LAMB(param_groups(model, 1e-4), lr=1e-3, foreach=True),
        "lamb (single)": LAMB(param_groups(model, 1e-4), lr=1e-3, foreach=False),
    })
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
    target = TARGETS.get(dev.type, DEFAULT_TARGET)
    ratio = {k: next(r["vs_sgd"] for r in rows if r["optimizer"] == f"{k} (foreach)") for k in target}
    met = all(ratio[k] <= target[k] for k in target)
    lines.append(f"target: CUDA: LARS <= {TARGETS['cuda']['lars']:g}x and LAMB <= {TARGETS['cuda']['lamb']:g}x "
                 f"SGD(foreach); CPU: <= {DEFAULT_TARGET['lars']:g}x. On {dev.type}: "
                 f"{'met' if met else 'NOT met'} (LARS {ratio['lars']:.2f}x, LAMB {ratio['lamb']:.2f}x)")
    return {"rows": rows, "target": target, "met": met, "lines": lines}
