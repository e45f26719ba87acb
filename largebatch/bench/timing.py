"""Alternating rounds, medians and the table format the sub-benchmarks share."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(tasks: dict[str, Callable[[], None]], rounds: int, warmup: int = 2,
              before: Callable[[], None] = lambda: None, device: torch.device = torch.device("cpu"),
              reduce: Callable[[float], float] = lambda t: t) -> dict[str, list[float]]:
    """Run every task once per round, the order rotated each round so that none always goes first.

    ``before`` runs ahead of each timed call (a barrier, so all workers start together);
    ``reduce`` turns one worker's seconds into the figure kept (the mean over workers, say).
    The first ``warmup`` rounds are not kept.
    """
    names = list(tasks)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rnd in range(warmup + rounds):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            before()
            sync(device)
            t0 = time.perf_counter()
            tasks[name]()
            sync(device)
            elapsed = reduce(time.perf_counter() - t0)
            if rnd >= warmup:
                times[name].append(elapsed)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> tuple[float, float]:
    """25th and 75th percentiles."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return q1, q3
