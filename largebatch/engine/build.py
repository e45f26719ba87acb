"""Everything a run is built from, before its first step: the device and its threads, the
precision, the communicator, the checks of the plan against the data and the model, the data path
(``data.device_cache``), the gradient bucket size (``comm.bucket_mb=auto``), the loaders, and
``torch.compile`` with its rehearsal."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from largebatch.config import Config, config_hash, to_dict
from largebatch.data import (cacheable_bytes, device_eval_loader, device_train_loader, eval_loader, in_memory,
                             train_loader)
from largebatch.data.fingerprint import differing
from largebatch.distributed import Communicator, Topology, cpu_threads, select_backend, select_device
from largebatch.distributed.wrap import no_sync
from largebatch.engine.adaptive import refuse_unsupported
from largebatch.engine.bucket_tuning import BucketChoice, gradient_mb, tune_bucket_size
from largebatch.engine.noise import choose_source
from largebatch.engine.run_plan import RunPlan
from largebatch.engine.speed import rehearse
from largebatch.engine.state import Position
from largebatch.errors import UsageError
from largebatch.models.sizes import Size, pixels, sides
from largebatch.version import __version__


def set_up_device(cfg: Config, topology: Topology) -> tuple[torch.device, str]:
    """This worker's device and the backend its collectives use; the CPU's threads per worker,
    or on GPUs cuDNN's kernel timing (every training micro-batch of a phase has one shape)."""
    device = select_device(topology, cfg.train.device)
    backend = select_backend(cfg.comm.backend, device)
    if device.type == "cpu":
        threads = cpu_threads(topology)
        if threads:
            torch.set_num_threads(threads)
    else:
        torch.backends.cudnn.benchmark = True
    return device, backend


def precision(cfg: Config, device: torch.device) -> tuple[Callable, Optional[torch.dtype]]:
    """``train.precision``: (the forward pass's autocast context, FSDP2's compute dtype or None).
    Autocast for the forward pass; fp16 also scales the loss against underflow. bf16 under
    comm.shard=full on GPUs: FSDP2 casts the weights it all-gathers to bf16 instead (float32 master
    weights and gradient reduction), which also halves the all-gathers."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    param_dtype = dtype if cfg.comm.shard == "full" and dtype is torch.bfloat16 and device.type == "cuda" else None
    if dtype and param_dtype is None:
        return (lambda: torch.autocast(device.type, dtype=dtype)), None
    return contextlib.nullcontext, param_dtype


def make_communicator(cfg: Config, topology: Topology, device: torch.device, backend: str,
                      param_dtype: Optional[torch.dtype]) -> Communicator:
    """The process group and its settings; under comm.bucket_mb=auto the bucket size comes later
    (:func:`choose_bucket_size`, on the built model)."""
    c = cfg.comm
    return Communicator(topology, backend, device, None if c.bucket_mb == "auto" else c.bucket_mb,
                        timeout_s=c.timeout_s, master_addr=c.master_addr, compression=c.compression,
                        powersgd_rank=c.powersgd_rank, powersgd_start_step=c.powersgd_start_step, shard=c.shard,
                        param_dtype=param_dtype, noise_scale=cfg.train.noise_scale or cfg.adaptive.enabled)


def check_same_everywhere(cfg: Config, comm: Communicator, fingerprints: Optional[dict] = None) -> None:
    """Every worker must run the same config and package version, on the same datasets (their
    :mod:`~largebatch.data.fingerprint`, {name: Fingerprint}): one all_gather."""
    seen = comm.all_gather_object((config_hash(to_dict(cfg)), __version__, fingerprints))
    odd = [rank for rank, other in enumerate(seen) if other[:2] != seen[0][:2]]
    if odd:
        raise UsageError(f"workers {odd} run a different config or largebatch version than rank 0 "
                         f"({seen[odd[0]][:2]} vs {seen[0][:2]}); start every worker with the same files and "
                         "arguments")
    for name in fingerprints or {}:
        odd, what, uneven = differing([other[2][name] for other in seen])
        if odd:
            raise UsageError(f"every worker must hold the same data, and the {name} differs on rank"
                             f"{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd))} from rank 0's: "
                             f"{', '.join(what)} (rank 0 vs rank {odd[0]}); build the same dataset on every worker: "
                             "seed its randomness (torch.manual_seed before making it) and read the same files")
        if uneven and comm.topology.is_main:
            where = ", ".join(f"on rank {rank} at indices {indices}" for rank, indices in uneven.items())
            print(f"largebatch: warning: the {name}'s images differ from rank 0's {where}, while its other sampled "
                  "items agree: fine for a random transform in the dataset; if its data is drawn at random, seed it "
                  "(torch.manual_seed before making it)", file=sys.stderr, flush=True)


def image_sizes(cfg: Config, plan: RunPlan, info) -> list[Size]:
    """The training image sizes of the plan's phases (a side, or (height, width)), fewest pixels
    first, checked against the data and model."""
    sizes = sorted({p.image_size or info.image_size for p in plan.phases}, key=lambda s: (pixels(s), sides(s)))
    limit = info.max_image_size
    if limit is not None and max(sides(sizes[-1])) > limit:
        raise UsageError(f"train.phases ask for {sizes[-1]}-pixel images but '{cfg.data.root}' was packed at "
                         f"{limit}; re-pack it with --size {sizes[-1]} or use sizes <= {limit}")
    if len(sizes) > 1 and cfg.model.name == "mlp":
        raise UsageError(f"model.name=mlp takes images of one size, and train.phases use {sizes}; give every "
                         "phase the same image_size or use a convolutional model")
    return sizes


def check_target_metric(cfg: Config, info, data_name: str) -> None:
    if cfg.train.target_metric == "top5" and info.num_classes <= 5:
        raise UsageError(f"train.target_metric=top5 needs more than 5 classes; {data_name} has "
                         f"{info.num_classes}: use top1")


def noise_source(cfg: Config, plan: RunPlan, workers: int) -> Optional[str]:
    """train.noise_scale: where the two batch sizes come from, or a one-line refusal; None when off."""
    if cfg.adaptive.enabled:
        refuse_unsupported(cfg)
        return "adaptive"
    if not cfg.train.noise_scale:
        return None
    if cfg.comm.shard == "full":
        raise UsageError("train.noise_scale=true needs each worker's gradient before it is averaged, which "
                         "comm.shard=full (FSDP2) never holds; use comm.shard=optimizer or none, or "
                         "train.noise_scale=false")
    if cfg.comm.compression == "powersgd":
        raise UsageError("train.noise_scale=true measures the averaged gradient, which comm.compression=powersgd "
                         "replaces by a low-rank approximation; use comm.compression=none or fp16, or "
                         "train.noise_scale=false")
    source = None
    for phase in plan.phases:
        bp = phase.batch
        try:
            source = choose_source(workers, bp.accum_steps)
        except ValueError:
            raise UsageError(f"train.noise_scale=true compares the gradients of two batch sizes, and one worker "
                             f"without accumulation steps sees one (global batch {bp.global_batch}); set "
                             f"train.max_micro_batch={max(1, bp.per_worker_batch // 2)} or lower, or train on 2 "
                             "or more workers") from None
    return source


@dataclass(frozen=True)
class DataPath:
    """Where the training images come from (data.device_cache)."""
    on_device: bool
    line: str
    """For the run header."""
    nbytes: int = 0


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def choose_data_path(setting, device: torch.device, train_set, val_set, reads_files: bool) -> DataPath:
    """data.device_cache (``setting``): hold the dataset on the device, or read it through the loader."""
    if setting == "off":
        return DataPath(False, "through the loader (data.device_cache=off)")
    sizes = [cacheable_bytes(train_set), cacheable_bytes(val_set)]
    if None in sizes:
        why = "read from files" if reads_files else "fetched image by image from the dataset"
        return DataPath(False, f"through the loader ({why})")
    need = sum(sizes)
    if setting == "auto":
        if device.type == "cuda":
            budget = torch.cuda.get_device_properties(device).total_memory / 4
            why = "a quarter of the GPU's memory"
        elif in_memory(train_set) and in_memory(val_set):
            return DataPath(True, f"on the device ({_mib(need)} MiB, already in memory)", need)
        else:
            return DataPath(False, "through the loader (data.device_cache=auto keeps files on the loader "
                                   "on the CPU)")
    else:
        budget, why = setting * 2**30, f"data.device_cache={setting:g} GiB"
    if need > budget:
        return DataPath(False, f"through the loader ({_mib(need)} MiB is more than {why})")
    return DataPath(True, f"on the device ({_mib(need)} MiB)", need)


def choose_bucket_size(cfg: Config, comm: Communicator, model: torch.nn.Module, plan: RunPlan, info,
                       autocast: Callable, resume_state: Optional[dict]) -> Optional[BucketChoice]:
    """comm.bucket_mb=auto on several workers under DDP: the size a resumed run chose when it
    started with auto (on the same number of workers), else the fastest of
    comm.bucket_candidates_mb, timed here; None where the size is given or does not apply."""
    if not (comm.distributed and cfg.comm.bucket_mb == "auto" and comm.shard != "full"):
        return None
    state = resume_state
    kept = comm.broadcast_object(
        state.get("bucket_mb") if state is not None and state["world_size"] == comm.world_size else None)
    if kept is not None:
        return BucketChoice(kept, gradient_mb(model), from_checkpoint=True)
    first = plan.phases[0]
    size = first.image_size or info.image_size
    return tune_bucket_size(comm, model, cfg.comm.bucket_candidates_mb, first.batch.micro_batch,
                            (info.channels, *sides(size)), info.num_classes, comm.device, autocast)


def make_loaders(cfg: Config, topology: Topology, plan: RunPlan, data_path: DataPath, train_set, val_set,
                 device: torch.device) -> tuple:
    """(training loader, its sampler, validation loader), set for the first phase."""
    first = plan.phases[0]
    if data_path.on_device:
        loader, sampler = device_train_loader(train_set, first.batch, topology.rank, cfg.run.seed, device,
                                              first.image_size)
        val_loader = device_eval_loader(val_set, topology.rank, topology.world_size, cfg.train.eval_batch, device,
                                        plan.eval_size)
        return loader, sampler, val_loader
    pin = device.type == "cuda"
    loader, sampler = train_loader(train_set, first.batch, topology.rank, cfg.run.seed, cfg.data.num_workers, pin,
                                   first.image_size, cfg.data.on_corrupt, device=device)
    val_loader = eval_loader(val_set, topology.rank, topology.world_size, cfg.train.eval_batch, cfg.data.num_workers,
                             pin, plan.eval_size, cfg.data.on_corrupt, device=device)
    return loader, sampler, val_loader


def start_reading(loader, sampler, plan: RunPlan, pos: Position) -> None:
    """Loader processes (data.num_workers > 0) start reading where the run starts while the model compiles."""
    if pos.epoch < plan.epochs:
        phase = plan.phase_of(pos.epoch)
        sampler.set_phase(phase.batch, phase.image_size)
        sampler.set_epoch(pos.epoch, pos.step_in_epoch)
        loader.start()


def compile_rehearsal(cfg: Config, comm: Communicator, model, bare_model, plan: RunPlan, info, autocast: Callable,
                      memory_format: torch.memory_format) -> float:
    """train.compile: one rehearsed pass before the first step, so that compiling happens (and is
    timed) here; a failure on any worker stops every worker in one line. Returns the seconds."""
    first = plan.phases[0]
    size = first.image_size or info.image_size
    # Under comm.shard=full the rehearsal reduce-scatters its gradients: every worker runs it
    # (its forward pass all-gathers anyway), and FSDP2 would otherwise keep them for the first step.
    sync_off = contextlib.nullcontext if comm.shard == "full" else lambda: no_sync(model)
    seconds, error = rehearse(model, bare_model, sync_off, (first.batch.micro_batch, info.channels, *sides(size)),
                              info.num_classes, comm.device, autocast, memory_format)
    comm.raise_if_any_failed(None if error is None else UsageError(
        f"train.compile={cfg.train.compile}: torch.compile failed on {comm.device.type}: {error}; "
        "set train.compile=false"))
    return seconds


def missing_dirs(path: str) -> list[str]:
    """The folders of ``path`` that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(path)
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing
