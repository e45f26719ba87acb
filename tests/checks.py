"""Checks the tests share: the largest difference between two sets of tensors, which a NaN or an
infinity cannot hide, and the ways a tensor's value reaches the host, refused inside a step.

A plain module (torch only), so that the workers' scripts the tests start can import it too.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch

HOST_READS = ("item", "tolist", "numpy", "cpu", "__array__", "__bool__", "__float__", "__int__", "__index__",
              "__complex__")
"""The Tensor methods through which a tensor's value reaches Python or host memory; inside a step on
a GPU each would wait for the device. On the CPU they are what a test can refuse; on a GPU, CUDA's
sync-debug mode (tests/test_cuda.py) also catches reads through other functions."""

Tensors = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


def _pairs(a: Tensors, b: Tensors, keys: Optional[Sequence[str]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(a, Mapping):
        if keys is None:
            assert a.keys() == b.keys(), f"different tensors: {sorted(set(a) ^ set(b))}"
            keys = list(a)
        return [(k, a[k], b[k]) for k in keys]
    a, b = list(a), list(b)
    assert len(a) == len(b), f"{len(a)} tensors against {len(b)}"
    return [(str(i), x, y) for i, (x, y) in enumerate(zip(a, b))]


def max_abs_diff(a: Tensors, b: Tensors, keys: Optional[Sequence[str]] = None) -> float:
    """The largest |a - b| over every element, computed in float64. ``a`` and ``b`` are state dicts
    (compared on ``keys``, or on all keys, which must then be the same) or sequences of tensors
    compared in order. NaN where either side holds a NaN, or an infinity (inf - inf is NaN, inf - x
    is inf): a comparison ``<= tol`` or ``== 0`` then fails, as it must."""
    pairs = _pairs(a, b, keys)
    assert pairs, "no tensors to compare"
    worst = torch.zeros((), dtype=torch.float64)
    for key, x, y in pairs:
        assert x.shape == y.shape, f"{key}: shape {tuple(x.shape)} against {tuple(y.shape)}"
        if x.numel():
            diff = (x.detach().cpu().double() - y.detach().cpu().double()).abs().max()
            worst = torch.maximum(worst, diff)  # NaN wins, unlike Python's max
    return worst.item()


def worst(values) -> float:
    """The largest of plain numbers (differences a worker sent back as JSON, say); NaN if any is NaN."""
    values = list(values)
    assert values, "no values"
    return max(values, key=lambda v: (v != v, v))


@contextlib.contextmanager
def host_reads_refused() -> Iterator[None]:
    """Inside the block every read of a tensor's value on the host (HOST_READS) raises
    AssertionError naming the method; the methods are restored afterwards."""
    saved = {name: vars(torch.Tensor).get(name) for name in HOST_READS}  # None: inherited, not defined here

    def refusal(name):
        def refuse(self, *args, **kwargs):
            raise AssertionError(f"a tensor value was read on the host inside the step (Tensor.{name})")
        return refuse

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refusal(name))
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
