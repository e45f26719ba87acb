"""One worker of a ``largebatch.bench memory`` measurement (started by it under torchrun).

    python -m largebatch.bench.memory_worker engine|plain|shard OUT.json STEPS [section.key=value ...]

``engine`` and ``plain`` report each worker's peak resident MiB; ``shard`` (the engine, under the
config's comm.shard) reports each worker's bytes of parameters, gradients and optimizer state as
it holds them after the steps, and its peak.
"""

from __future__ import annotations

import itertools
import json
import resource
import sys

import torch
import torch.nn.functional as F


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def held_bytes(model: torch.nn.Module, optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state this worker holds: the local shards of
    DTensors (comm.shard=full), the state of ZeroRedundancyOptimizer's inner optimizer (only this
    worker's tensors; comm.shard=optimizer)."""
    from largebatch.distributed.shard import local

    def size(t) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    params = list(model.parameters())
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its share in .optim
    state = sum(size(v) for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return {"parameter_bytes": sum(size(p) for p in params),
            "gradient_bytes": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": state}


def main() -> None:
    mode, out, steps, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    from largebatch.config.loader import load_config
    from largebatch.distributed import discover

    cfg = load_config(None, overrides)
    topo = discover()
    if mode in ("engine", "shard"):
        from largebatch.engine import Trainer
        from largebatch.distributed.wrap import unwrap
        from largebatch.engine.guards import StopSignal

        trainer = Trainer(cfg, topo)
        bp = trainer.plan.phases[0].batch
        trainer.sampler.set_epoch(0, 0)
        batches, stop = iter(trainer.loader), StopSignal()
        trainer.model.train()
        for step in range(steps):
            trainer.run_step(batches, bp, step, stop)
        comm = trainer.comm
        if mode == "shard":
            held = held_bytes(unwrap(trainer.model), trainer.optimizer)
    else:
        from torch.nn.parallel import DistributedDataParallel

        from largebatch.batching import plan as batch_plan
        from largebatch.data import build_datasets
        from largebatch.distributed import Communicator, select_backend
        from largebatch.models import create_model

        device = torch.device("cpu")
        comm = Communicator(topo, select_backend(cfg.comm.backend, device), device, cfg.comm.bucket_mb)
        train, _, info = build_datasets(cfg.data, seed=cfg.run.seed, verbose=False)
        torch.manual_seed(cfg.run.seed)
        model = create_model(cfg.model.name, info.num_classes, in_channels=info.channels, norm=cfg.model.norm,
                             width=cfg.model.width, image_size=info.image_size)
        ddp = DistributedDataParallel(model, bucket_cap_mb=cfg.comm.bucket_mb, gradient_as_bucket_view=True)
        sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay, foreach=True)
        bp = batch_plan(cfg.train.global_batch, topo.world_size, cfg.train.max_micro_batch)
        index = itertools.count(topo.rank * bp.micro_batch, topo.world_size * bp.micro_batch)
        for _ in range(steps):
            sgd.zero_grad(set_to_none=True)
            for _ in range(bp.accum_steps):
                start = next(index) % (len(train) - bp.micro_batch)
                batch = train.__getitems__(list(range(start, start + bp.micro_batch)))
                F.cross_entropy(ddp(batch.images), batch.labels).backward()
            sgd.step()
    report = {**held, "peak_mib": _peak_mib()} if mode == "shard" else _peak_mib()
    reports = comm.all_gather_object(report)
    if topo.is_main:
        with open(out, "w") as f:
            json.dump(reports, f)
    comm.barrier()
    if mode in ("engine", "shard"):
        trainer.close()
    else:
        comm.close()


if __name__ == "__main__":
    main()
