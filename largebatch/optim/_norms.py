"""Shared by the layer-wise optimizers: norms, the fused-kernel check, the skip flag, the
per-group plan of their multi-tensor paths, and the norms of sharded tensors (``comm.shard=full``)."""

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


def zero_momentum(state: dict, params: list[torch.Tensor]) -> list[dict]:
    """The optimizer ``state`` entries of ``params``, each given a zero ``momentum_buffer`` shaped
    like its parameter where it has none (a DTensor for a sharded parameter)."""
    states = [state[p] for p in params]
    for p, st in zip(params, states):
        if st.get("momentum_buffer") is None:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return states


def step_states(state: dict, params: list[torch.Tensor], momentum: bool) -> list[dict]:
    """The optimizer ``state`` entries of ``params`` a step works on: with ``momentum``, each with a
    momentum buffer (:func:`zero_momentum`)."""
    return zero_momentum(state, params) if momentum else [state[p] for p in params]


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
            extra: Hashable, build: Callable[[], list[Bucket]], ident: Optional[tuple] = None) -> list[Bucket]:
        """``ident`` stands for the parameters' identity instead of their ids (sharded parameters,
        whose local shards are new tensor objects over the same memory from step to step)."""
        key = (extra, tuple(map(id, params)) if ident is None else ident, tuple(map(torch.Tensor.stride, params)),
               tuple(map(torch.Tensor.stride, grads)))
        hit = self._plans.get(index)
        if hit is not None and hit[0] is group and hit[1] == key:
            return hit[2]
        buckets = build()
        self._plans[index] = (group, key, buckets)
        return buckets


# --- sharded parameters (DTensors placed Shard(0) by FSDP2) ---


def check_sharding(opt) -> None:
    """Refuses DTensor parameters without ``opt.shard_sum``: their per-tensor norms would be those of
    this worker's shards only."""
    from largebatch.distributed.shard import is_sharded

    if opt.shard_sum is None and any(is_sharded(p) for g in opt.param_groups for p in g["params"]):
        raise ValueError(f"{type(opt).__name__}: the parameters are sharded (DTensors), so their norms need a sum "
                         "over the workers: pass shard_sum= (largebatch.distributed.Communicator.all_reduce_sum)")


def locals_of(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple]:
    """This worker's shards of ``params`` and of their gradients (views sharing their memory), and
    an identity of the parameters for :meth:`Plans.get` that holds while the shards' memory does."""
    from largebatch.distributed.shard import local

    ps = [local(p) for p in params]
    return ps, [local(p.grad) for p in params], tuple((id(p), q.data_ptr(), q.shape) for p, q in zip(params, ps))


def local_states(params: list[torch.Tensor], states: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Each parameter's state with the tensors ``keys`` as views on this worker's shards (the others
    as they are; the states themselves stay shaped like their parameters, DTensors for DTensor
    parameters). A state tensor whose shard has another layout than its parameter's (loaded so) is
    replaced once by a copy in the parameter's layout."""
    from largebatch.distributed.shard import local

    views = []
    for p, st in zip(params, states):
        lp, view = local(p), dict(st)
        for k in keys:
            v = st[k]
            if local(v).stride() != lp.stride():
                fresh = torch.empty_like(p, memory_format=torch.preserve_format)
                local(fresh).copy_(local(v))
                st[k] = v = fresh
            view[k] = local(v)
        views.append(view)
    return views


class ShardNorms:
    """Per-tensor norms of sharded tensors, summed over the workers in one call per step.

    Each worker adds the L2 norms of its local shards, bucket by bucket, each under a position that
    is the same on every worker (:meth:`reserve` gives a group its positions, in the order of the
    param groups and of their parameters, whatever the buckets); :meth:`reduce` squares them, hands
    them to ``shard_sum`` in that order as one 1-D tensor (float32, float64 where a tensor is
    float64), and gives back the square roots of the sums, part by part. Nothing is read on the host.
    """

    def __init__(self):
        self.size = 0
        self._parts: list[torch.Tensor] = []
        self._positions: list[list[int]] = []

    def reserve(self, n: int) -> int:
        """``n`` consecutive positions; returns the first."""
        base, self.size = self.size, self.size + n
        return base

    def add(self, positions: list[int], values: torch.Tensor) -> int:
        """Local norms (1-D) for ``positions``; returns the part's index into :meth:`reduce`'s list."""
        self._parts.append(values)
        self._positions.append(positions)
        return len(self._parts) - 1

    def reduce(self, shard_sum: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        if not self._parts:
            return []
        order = [i for pos in self._positions for i in pos]
        if sorted(order) != list(range(self.size)):
            raise RuntimeError(f"sharded norms: positions {sorted(order)} do not cover 0..{self.size - 1} once each")
        local_sq = torch.cat(self._parts).square()
        index = None
        if order != list(range(self.size)):  # buckets that split a group: into the agreed order
            index = torch.tensor(order, device=local_sq.device)
            local_sq = torch.empty_like(local_sq).index_copy_(0, index, local_sq)
        total = shard_sum(local_sq)
        if index is not None:
            total = total.index_select(0, index)
        return list(total.sqrt().split([len(pos) for pos in self._positions]))
