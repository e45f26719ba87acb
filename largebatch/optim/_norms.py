"""Shared by the layer-wise optimizers: norms, the fused-kernel check, the skip flag and the
per-group plan of their multi-tensor paths."""

from __future__ import annotations

import functools
from typing import Callable, Hashable, Optional

import torch

_LOW = (torch.float16, torch.bfloat16)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def wide(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 tensors in float32 for norms; float32 and float64 as they are."""
    return t.float() if t.dtype in _LOW else t


def norms(ts: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norms of same-dtype tensors, stacked into one tensor on their device (float32 for
    fp16/bf16). One multi-tensor kernel and one stack: no copy per tensor."""
    if ts[0].dtype not in _LOW:
        return torch.stack(torch._foreach_norm(ts))
    try:
        return torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))
    except TypeError:  # a torch without the dtype argument
        return torch.stack(torch._foreach_norm([t.float() for t in ts]))


@functools.lru_cache(maxsize=None)
def has_fused_kernel(op: str, device_type: str) -> bool:
    """Whether this torch build has ``torch.<op>`` (``_fused_sgd_``, ``_fused_adamw_``) for the device."""
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", device_type.upper())
    except RuntimeError:  # no such operator
        return False


def fusable_dtype(op: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.<op>`` exists for the device and computes right for the dtype. torch's CPU
    ``_fused_sgd_`` updates the momentum of fp16/bf16 tensors but not the parameters in its
    vectorised loop (all but the last few elements; seen in torch 2.13), so those take foreach
    kernels there."""
    if dtype not in _FUSED_DTYPES or not has_fused_kernel(op, device_type):
        return False
    return not (op == "_fused_sgd_" and device_type == "cpu" and dtype in _LOW)


def on(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """``t`` on ``device`` (no copy when it is there already), or None."""
    return None if t is None else t.to(device)


def skip_on_host(found_inf: Optional[torch.Tensor]) -> bool:
    """Reads the skip flag on the host (a device synchronisation): for the paths without a fused kernel."""
    return found_inf is not None and bool(found_inf.item() == 1.0)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory, each once (in whatever order of dims)."""
    size = 1
    for stride, n in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != size:
            return False
        size *= n
    return True


class Bucket:
    """Tensors of one group with one device and dtype that all go through the fused kernel, or all
    do not. ``state[k]`` lists the state tensors ``k`` in the order of ``params``."""

    __slots__ = ("idx", "params", "state", "fused", "relayout")

    def __init__(self, idx: Optional[list[int]], params: list[torch.Tensor], state: dict[str, list[torch.Tensor]],
                 fused: bool, relayout: list[int]):
        self.idx, self.params, self.state, self.fused, self.relayout = idx, params, state, fused, relayout

    def grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """This bucket's gradients out of the step's list. The fused kernels walk raw memory, so a
        gradient whose layout differs from its parameter's is copied into that layout; a sparse one
        is made dense (on every path)."""
        gs = grads if self.idx is None else [grads[i] for i in self.idx]
        if self.relayout:
            gs = list(gs)
            for j in self.relayout:
                g = gs[j].to_dense() if gs[j].is_sparse else gs[j]
                gs[j] = torch.empty_like(self.params[j]).copy_(g)
        return gs


def make_buckets(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], op: str,
                 same_layout: tuple[str, ...], others: tuple[str, ...] = ()) -> list[Bucket]:
    """Buckets by (device, dtype, fusable). A tensor is fusable when ``op`` works for its device and
    dtype and the parameter is dense; its state tensors ``same_layout`` are then given the
    parameter's strides (a state dict saved with other layouts is copied once, here)."""
    by_key: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        fused = fusable_dtype(op, p.device.type, p.dtype) and _dense(p)
        by_key.setdefault((p.device, p.dtype, fused), []).append(i)
    buckets = []
    for (_, _, fused), idx in by_key.items():
        relayout = []
        for j, i in enumerate(idx):
            p, st = params[i], states[i]
            if grads[i].is_sparse or (fused and grads[i].stride() != p.stride()):
                relayout.append(j)
            for k in same_layout if fused else ():
                if st[k].stride() != p.stride():
                    st[k] = torch.empty_like(p).copy_(st[k])
        state = {k: [states[i][k] for i in idx] for k in same_layout + others}
        buckets.append(Bucket(None if len(idx) == len(params) else idx, [params[i] for i in idx], state, fused,
                              relayout))
    return buckets


class Plans:
    """Each group's buckets, kept from step to step and built again when the group, its parameters
    with gradients, their layouts or their gradients' layouts change (checked from ids and strides:
    no device work)."""

    def __init__(self):
        self._plans: dict[int, tuple] = {}

    def get(self, index: int, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
            extra: Hashable, build: Callable[[], list[Bucket]]) -> list[Bucket]:
        key = (extra, tuple(map(id, params)), tuple(map(torch.Tensor.stride, params)),
               tuple(map(torch.Tensor.stride, grads)))
        hit = self._plans.get(index)
        if hit is not None and hit[0] is group and hit[1] == key:
            return hit[2]
        buckets = build()
        self._plans[index] = (group, key, buckets)
        return buckets
