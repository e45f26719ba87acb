"""Benchmarks of the engine against its baselines, side by side.

    python -m largebatch.bench [step allreduce overlap optim memory buckets throughput] [--workers 2] [--out DIR]

With no names, runs them all. Started on its own, it starts ``--workers`` workers on this machine
through torchrun (one per GPU where there are CUDA GPUs, gloo workers on the CPU otherwise), so
``python -m largebatch.bench`` works from a fresh clone; started by torchrun or mpirun, it uses the
workers it was given. Each sub-benchmark prints a table on rank 0 and writes
``DIR/bench-<name>.json`` (default DIR: runs/bench):

  step       the engine's training step against a plain DistributedDataParallel loop with the
             same model, micro-batch, data and workers (target: ratio <= 1.03); with
             --noise-scale, the engine measuring the gradient noise scale beside it (target <= 1.03)
  allreduce  bus bandwidth of the gradient allreduce as the engine runs it against one flat
             allreduce of the same bytes (target: >= 0.9 of that ceiling)
  overlap    compute only against the full synchronised step: the share of communication hidden
  optim      LARS and LAMB step time against SGD(foreach) on ResNet-50's parameters, fused SGD and
             AdamW beside them (target on the CPU <= 2x; on CUDA LARS <= 1.3x, LAMB <= 1.5x)
  memory     peak resident memory of the engine against the plain loop (target <= 1.05x), at
             global batches 1K to 32K at a fixed micro-batch (accumulation keeps it flat), and the
             bytes of parameters, gradients and LAMB state each worker holds under comm.shard none,
             optimizer and full (targets on 2+ workers: optimizer state <= 0.55x of none with
             optimizer, all three <= 0.55x with full; --memory-cases, --shard-model, --image-size,
             --micro-batch, --steps)
  buckets    the size comm.bucket_mb=auto picks, against every candidate size and DDP's 25 MiB
             default timed side by side (--step-model, --image-size, --micro-batch)
  throughput images/s of fit's loop in steady state on one worker against a plain loop over batches
             already on the device, in the engine's settings and at its best (channels-last,
             torch.compile), with the data held on the device and read through the loader; resnet50
             and resnet9 (bf16 on CUDA; fp32 and smaller on the CPU), and the engine's time to its
             first step (target on CUDA: >= 0.9 of the best plain loop; --case, --image-size,
             --micro-batch, --steps, --compile)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

import torch

from largebatch.errors import UsageError, run_cli
from largebatch.fileio import write_bytes_atomic

NAMES = ("step", "allreduce", "overlap", "optim", "memory", "buckets", "throughput")
DEFAULT_OUT = os.path.join("runs", "bench")
"""Where the JSON files go without ``--out``: under runs/, where training runs write theirs."""


@dataclass
class Context:
    """What a sub-benchmark needs: the workers, the communicator, the arguments."""
    args: argparse.Namespace
    comm: object
    rank: int
    world_size: int
    device: torch.device
    backend: str

    def mean_over_workers(self, seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        return self.comm.all_reduce_sum(t).item() / self.world_size

    def max_over_workers(self, seconds: float) -> float:
        return max(self.comm.all_gather_object(seconds))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m largebatch.bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"sub-benchmarks: {', '.join(NAMES)} (default: all)")
    ap.add_argument("--workers", type=int, default=None,
                    help="workers to start when not under a launcher (default 2, or one per GPU where the machine "
                         "has CUDA GPUs and fewer than 2: every worker takes a GPU of its own)")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per sub-benchmark (default 10)")
    ap.add_argument("--backend", default="auto", help="comm.backend: auto, gloo, nccl or mpi (default auto)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="comm.bucket_mb (default 25)")
    ap.add_argument("--compression", default="none", choices=("none", "fp16", "bf16", "powersgd"),
                    help="comm.compression for the engine's allreduce (default none; PowerSGD from the third "
                         "step, rank 2)")
    ap.add_argument("--model", default="resnet50", help="model whose gradients allreduce moves (default resnet50)")
    ap.add_argument("--optim-model", default="resnet50", help="model whose parameters optim steps (default resnet50)")
    ap.add_argument("--step-model", default="resnet18", help="model for overlap and buckets (default resnet18)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="synthetic image size for overlap and buckets (default 64); throughput: replaces the "
                         "cases' own; memory's shard case: default 32")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="micro-batch for overlap and buckets (default 32); throughput: replaces the cases' own; "
                         "memory's shard case: default 8")
    ap.add_argument("--case", default=None, help="throughput: run this case only (resnet50 or resnet9)")
    ap.add_argument("--steps", type=int, default=None,
                    help="throughput: optimizer steps per timed window or round (default: the case's own); "
                         "memory's shard case: steps before counting (default 3)")
    ap.add_argument("--memory-cases", default=None, metavar="LIST",
                    help="memory: comma-separated cases among engine, accumulation, shard (default: all)")
    ap.add_argument("--shard-model", default="resnet50",
                    help="memory's shard case: the model, with LAMB and 1000 classes (default resnet50)")
    ap.add_argument("--compile", default="auto",
                    help="throughput: torch.compile the engine and the best plain loop: auto (on CUDA only), "
                         "true or false (default auto)")
    ap.add_argument("--noise-scale", action="store_true",
                    help="step: also time the engine with train.noise_scale=true beside it (target: <= 1.03 "
                         "of the engine without; on 1 worker every arm takes 2 accumulation steps)")
    ap.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                    help="folder for the JSON files (default %(default)s, beside the training runs' runs/default)")
    return ap


def _relaunch(args, argv: list[str]) -> int:
    """Start ``--workers`` copies of this command under torchrun on this machine."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
           "-m", "largebatch.bench", *argv]
    return subprocess.call(cmd, env=env)


def default_workers(requested: int | None, gpus: int | None = None) -> int:
    """--workers: where the machine has CUDA GPUs every worker takes one of its own (select_device),
    so the default is 2 or the GPUs there are, and more workers than GPUs are refused in one line."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if requested is None:
        return min(2, gpus) if gpus > 0 else 2
    if gpus > 0 and requested > gpus:
        raise UsageError(f"--workers {requested} but this machine has {gpus} CUDA GPU(s) and each worker takes one; "
                         f"use --workers {gpus} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to time the CPU")
    return requested


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES)}")
    args.workers = default_workers(args.workers)
    if args.workers < 1 or args.rounds < 1:
        raise UsageError(f"--workers {args.workers} and --rounds {args.rounds} must be integers >= 1")
    from largebatch.bench import throughput

    throughput.check_args(args)
    from largebatch.bench.memory import parse_cases

    parse_cases(args.memory_cases)
    from largebatch.models import available_models

    if args.shard_model not in available_models():
        raise UsageError(f"--shard-model {args.shard_model!r} is not a model of the zoo; choose from "
                         f"{', '.join(available_models())}")
    # None: throughput keeps each case's own size and batch; overlap and buckets take 64 and 32
    args.case_image_size, args.case_micro_batch = args.image_size, args.micro_batch
    args.image_size = 64 if args.image_size is None else args.image_size
    args.micro_batch = 32 if args.micro_batch is None else args.micro_batch
    from largebatch.distributed import Communicator, discover, select_backend, select_device

    topo = discover()
    if topo.world_size == 1 and args.workers > 1:
        return _relaunch(args, argv)
    device = select_device(topo)
    backend = select_backend(args.backend, device)
    comm = Communicator(topo, backend, device, args.bucket_mb, timeout_s=3600, compression=args.compression,
                        powersgd_start_step=2)
    ctx = Context(args, comm, topo.rank, topo.world_size, device, backend if comm.distributed else "no backend")
    names = args.names or list(NAMES)
    if topo.is_main:
        print(f"largebatch.bench: {', '.join(names)} on {topo.world_size} worker(s), {device}, torch "
              f"{torch.__version__}, {platform.processor() or platform.machine()} with {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} threads per worker; medians of {args.rounds} rounds", flush=True)
        os.makedirs(args.out, exist_ok=True)
    try:
        for name in names:
            result = _run(name, ctx)
            if topo.is_main and result is not None:
                print(f"\n== {name} ==")
                print("\n".join(result["lines"]), flush=True)
                figures = {k: v for k, v in result.items() if k != "lines"}
                write_bytes_atomic(json.dumps(figures, indent=2).encode(), os.path.join(args.out, f"bench-{name}.json"))
    finally:
        comm.close()
    return 0


def _run(name: str, ctx: Context):
    if name in ("optim", "throughput"):  # one worker's figures; the others wait, leaving it the cores
        from largebatch.bench import optim, throughput

        result = (optim if name == "optim" else throughput).run(ctx) if ctx.rank == 0 else None
        ctx.comm.barrier()
        return result
    if name in ("allreduce", "overlap"):
        from largebatch.bench import comm

        return (comm.run_allreduce if name == "allreduce" else comm.run_overlap)(ctx)
    if name == "step":
        from largebatch.bench import step

        return step.run(ctx)
    if name == "buckets":
        from largebatch.bench import buckets

        return buckets.run(ctx)
    from largebatch.bench import memory

    return memory.run(ctx)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
