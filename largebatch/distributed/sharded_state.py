"""Model and optimizer state under ``comm.shard``: what a checkpoint holds, and loading it back.

- ``full``: the parameters and the optimizer state are DTensors split across the workers. Each
  worker writes its own shards with ``torch.distributed.checkpoint`` (DCP); a checkpoint written by
  N workers loads on M workers (DCP reads, for each worker, the slices of its new shards).
- ``optimizer`` (ZeRO-1): each worker holds the optimizer state of some whole tensors;
  :func:`gather_optimizer_state` brings all of it to rank 0, which writes a plain checkpoint.

A DCP folder here holds tensors only: everything else (the optimizer's hyperparameters, the
non-tensor entries of a state dict) is handed back by :func:`state_to_save` for the caller to
store beside it, so that loading reads tensors with ``weights_only`` and never unpickles code.
The folder's ``.metadata`` (a pickle written by DCP) is read by an unpickler that accepts only
DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

MODEL, OPTIMIZER = "model", "optimizer"
_SEP = "/"


def is_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a ``ZeroRedundancyOptimizer`` (``comm.shard=optimizer``)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def gather_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> Optional[dict]:
    """The whole optimizer state, in the format of a plain optimizer's ``state_dict()``, on rank 0
    (``main``); None elsewhere. Every worker must call this: a ZeRO optimizer's shards are
    gathered to rank 0 (a collective)."""
    if is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)
        if not main:
            return None
        state = optimizer.state_dict()
        optimizer._all_state_dicts = []  # the gathered copy is the caller's now, not kept until the next one
        return state
    return optimizer.state_dict() if main else None


def failure(exc: BaseException) -> str:
    """One line for a failed save or load: DCP's ``CheckpointException`` names each worker's error."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, CheckpointException) and failures:
        rank, inner = sorted(failures.items(), key=lambda kv: kv[0])[0]
        return f"rank {rank}: {failure(inner[0] if isinstance(inner, tuple) else inner)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}".rstrip(": ")


# -- splitting a state into tensors and the rest ---------------------------------------------------
def _split(tree: dict, path: tuple, tensors: dict, paths: dict) -> dict:
    rest = {}
    for key, value in tree.items():
        where = path + (key,)
        if isinstance(value, torch.Tensor):
            name = _SEP.join(map(str, where))
            if name in tensors:
                raise ValueError(f"two state entries are both named {name!r}")
            tensors[name], paths[name] = value, list(where)
        elif isinstance(value, dict):
            rest[key] = _split(value, where, tensors, paths)
        else:
            rest[key] = value
    return rest


def _put(tree: dict, path: list, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def state_to_save(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """Every worker: this worker's part of the model and optimizer state (from
    ``get_state_dict``: parameter names as keys, DTensors for sharded tensors), as
    (tensors by flat name, the path of each flat name in the state, everything that is not a tensor).
    The tensors go to :func:`save`; the other two are plain data for the caller to store."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[str, list] = {}
    rest = _split({MODEL: model_state, OPTIMIZER: optim_state}, (), tensors, paths)
    return tensors, paths, rest


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every call without a process group (one worker under comm.shard=none), where
    reading or writing in this process alone is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*(unavailable|uninitialized)")
        yield


def save(tensors: dict[str, torch.Tensor], folder: str) -> None:
    """Every worker writes its shards of ``tensors`` into ``folder`` (created), each file fsync'd;
    when this returns on any worker, every worker's files and DCP's ``.metadata`` are written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    with _single_process_quietly():
        dcp.save(tensors, storage_writer=FileSystemWriter(folder, sync_files=True, overwrite=True),
                 no_dist=not dist.is_initialized())


# -- reading DCP's metadata as data ------------------------------------------------------------------
_SAFE_MODULES = ("torch.distributed.checkpoint.metadata",)
_SAFE_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "PureWindowsPath"), ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch dtypes and sizes, paths; anything else is refused."""

    def find_class(self, module: str, name: str):
        import importlib

        found = None
        if module in _SAFE_MODULES or (module, name) in _SAFE_NAMES:
            found = getattr(importlib.import_module(module), name, None)
            if module in _SAFE_MODULES and not isinstance(found, type):
                found = None
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which is not DCP metadata")
        return found


def read_metadata(folder: str):
    """DCP's ``.metadata`` of ``folder``, unpickled as data only; raises OSError or
    ``pickle.UnpicklingError`` (or another exception of a damaged file)."""
    with open(os.path.join(folder, ".metadata"), "rb") as fh:
        return _MetadataUnpickler(io.BytesIO(fh.read())).load()


def check_files(folder: str) -> None:
    """Raise ValueError when ``folder``'s metadata cannot be read, or names a file that is missing
    or shorter than the bytes it should hold (a checkpoint cut off by a crash or a full disk)."""
    try:
        metadata = read_metadata(folder)
        extent: dict[str, int] = {}
        for info in metadata.storage_data.values():
            extent[info.relative_path] = max(extent.get(info.relative_path, 0), info.offset + info.length)
    except FileNotFoundError:
        raise ValueError("its .metadata is missing") from None
    except Exception as exc:  # a cut-off or foreign pickle
        raise ValueError(f"its .metadata cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    for name, size in sorted(extent.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"its shard file {name} is missing")
        have = os.path.getsize(path)
        if have < size:
            raise ValueError(f"its shard file {name} is cut off ({have} of {size} bytes)")


def _safe_reader(folder: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(folder)


# -- loading -----------------------------------------------------------------------------------------
def _shapes(folder: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(folder)
    return {name: (tuple(md.size), md.properties.dtype) for name, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


def _targets(folder: str, paths: dict[str, list], model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """A tensor for every tensor of the checkpoint, for DCP to load into. Under ``sharded``, the
    model's own state-dict entries (DTensors: each worker gets its slices) and, for optimizer state of
    a parameter's shape, a DTensor split like that parameter; elsewhere whole tensors on the CPU."""
    shapes = _shapes(folder)
    params = dict(model.named_parameters())
    own = model.state_dict() if sharded else {}
    targets = {}
    for name, path in paths.items():
        if name not in shapes:
            raise ValueError(f"its metadata has no tensor {name!r}")
        size, dtype = shapes[name]
        mine = own.get(path[1]) if path[0] == MODEL and len(path) == 2 else None
        param = params.get(path[2]) if path[:2] == [OPTIMIZER, "state"] and len(path) == 4 else None
        if mine is not None and tuple(mine.shape) == size:
            targets[name] = torch.zeros_like(mine, dtype=dtype)
        elif sharded and param is not None and tuple(param.shape) == size:
            targets[name] = torch.zeros_like(param, dtype=dtype)
        else:
            targets[name] = torch.zeros(size, dtype=dtype)
    return targets


def load_into(folder: str, paths: dict[str, list], rest: dict, model: nn.Module,
              optimizer: torch.optim.Optimizer) -> None:
    """Every worker: the model and optimizer state of the DCP checkpoint in ``folder`` (``paths``
    and ``rest`` from :func:`state_to_save`, stored beside it) into ``model`` and ``optimizer``,
    whatever the number of workers that wrote it.

    ``model`` may be sharded (FSDP2) or whole (every worker then reads every tensor whole, and
    loads the same values); ``optimizer`` may be a ``ZeroRedundancyOptimizer``, which takes its own
    part of the whole state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from largebatch.distributed.shard import is_fsdp

    sharded = is_fsdp(model)
    targets = _targets(folder, paths, model, sharded)
    with _single_process_quietly():
        dcp.load(targets, storage_reader=_safe_reader(folder), no_dist=not dist.is_initialized())
    state = _copy_dicts(rest)
    for name, path in paths.items():
        _put(state, path, targets[name])
    model_state, optim_state = state[MODEL], state[OPTIMIZER]
    if sharded:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    else:  # a whole model (comm.shard none or optimizer): plain state dicts, the same on every worker
        model.load_state_dict(model_state)
        optimizer.load_state_dict(by_index(optim_state, model, optimizer))


# -- parameter names and positions ------------------------------------------------------------------
def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order of a plain ``state_dict()``'s indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _groups(saved: list[dict], optimizer: torch.optim.Optimizer, params) -> list[dict]:
    """The checkpoint's parameter groups with their parameters renamed by ``params`` and their
    settings this optimizer's own: the config is the same, but the implementation flags (fused,
    foreach) may differ between the optimizers of the comm.shard modes."""
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(saved)} parameter groups, the optimizer "
                         f"{len(optimizer.param_groups)}")
    return [{**{k: v for k, v in mine.items() if k != "params"}, "params": [params(p) for p in group["params"]]}
            for mine, group in zip(optimizer.param_groups, saved)]


def by_index(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state keyed by parameter names (``get_state_dict``'s) keyed by position, as
    ``Optimizer.load_state_dict`` takes it."""
    index = {n: i for i, n in enumerate(param_names(model, optimizer))}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": _groups(state["param_groups"], optimizer, index.__getitem__)}


def by_name(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A plain optimizer ``state_dict()`` (keyed by position) keyed by parameter names."""
    names = param_names(model, optimizer)
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": _groups(state["param_groups"], optimizer, names.__getitem__)}


def load_optimizer_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Every worker: a plain checkpoint's whole optimizer state (keyed by position, as
    ``state_dict()`` gives it; the same on every worker) into the optimizer of a sharded (FSDP2)
    model, each worker keeping its slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, by_name(state, model, optimizer),
                             options=StateDictOptions(full_state_dict=True))


def full_model_state(model: nn.Module) -> dict:
    """Every worker: the whole model state, gathered on the CPU of rank 0 (an empty dict elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
