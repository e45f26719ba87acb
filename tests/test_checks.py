"""The shared checks themselves: a NaN or an infinity cannot hide in a difference, and every host
read is refused."""

import math

import pytest
import torch

from checks import HOST_READS, host_reads_refused, max_abs_diff, worst


def test_a_nan_anywhere_makes_the_difference_nan():
    a = {"w": torch.zeros(3), "b": torch.zeros(2)}
    for key in ("w", "b"):  # first or last: Python's max over per-tensor maxima would drop a later NaN
        b = {k: v.clone() for k, v in a.items()}
        b[key][1] = float("nan")
        assert math.isnan(max_abs_diff(a, b)) and math.isnan(max_abs_diff(b, a))
        assert not max_abs_diff(a, b) <= 1e-5 and not max_abs_diff(a, b) == 0.0
    inf = {"w": torch.full((3,), float("inf")), "b": torch.zeros(2)}
    assert math.isnan(max_abs_diff(inf, inf))  # the same infinite weights are no match either
    assert max_abs_diff(a, inf) == math.inf
    assert math.isnan(worst([0.0, float("nan"), 1.0])) and worst([0.5, 2.0, 1.0]) == 2.0


def test_the_difference_is_exact_and_checks_what_it_compares():
    a = [torch.tensor([1.0, 2.0]), torch.zeros(0), torch.tensor([[3.0]], dtype=torch.float64)]
    b = [torch.tensor([1.0, 2.5]), torch.zeros(0), torch.tensor([[2.0]], dtype=torch.float64)]
    assert max_abs_diff(a, b) == 1.0 and max_abs_diff(a, a) == 0.0
    assert max_abs_diff({"x": a[0], "y": a[2]}, {"x": b[0], "y": b[2]}, keys=["x"]) == 0.5
    with pytest.raises(AssertionError, match="shape"):
        max_abs_diff([torch.zeros(2)], [torch.zeros(1, 2)])  # broadcasting would hide it
    with pytest.raises(AssertionError, match="different tensors"):
        max_abs_diff({"w": torch.zeros(1)}, {"v": torch.zeros(1)})
    with pytest.raises(AssertionError, match="2 tensors against 1"):
        max_abs_diff(a[:2], a[:1])


@pytest.mark.parametrize("read", [lambda t: t.item(), lambda t: t.tolist(), lambda t: t.numpy(), lambda t: t.cpu(),
                                  lambda t: bool(t), lambda t: float(t), lambda t: int(t), lambda t: [0, 1][t],
                                  lambda t: __import__("numpy").asarray(t), lambda t: complex(t)])
def test_every_host_read_is_refused_and_restored(read):
    t = torch.tensor(1)
    with host_reads_refused():
        with pytest.raises(AssertionError, match="read on the host"):
            read(t)
    read(t)  # restored
    assert len(set(HOST_READS)) == len(HOST_READS) == 10


def test_the_refusal_leaves_torch_tensor_as_it_found_it():
    before = dict(vars(torch.Tensor))
    with host_reads_refused():
        assert all(name in vars(torch.Tensor) for name in HOST_READS)
    assert dict(vars(torch.Tensor)) == before
