"""The MPI gradient hook (comm.backend=mpi) against gloo, on the same gradient buckets and the same model.

    python benchmarks/mpi_vs_gloo.py [--workers 2] [--rounds 15] [--model resnet18] [--out FILE]

Starts itself under ``mpiexec -n WORKERS`` (the ``mpi`` extra) unless already under an MPI
launcher. Every rank joins one gloo process group through the engine's own rendezvous and also
holds the MPI hook, then measures two things, alternating gloo and MPI round after round so the
ratios hold on a noisy machine:

1. **Buckets.** ResNet-50's gradients (25.6M float32 values) cut into buckets as DDP cuts them
   (1 MiB first, then ``--bucket-mb``), all launched at once and awaited, as DDP does after
   backward: through ``dist.all_reduce(async_op=True)`` on gloo, through the hook on MPI. Bus
   bandwidth as nccl-tests defines it: bytes / time x 2(n-1)/n.
2. **Steps.** Forward, backward and SGD step of ``--model`` on synthetic images, one DDP model with
   gloo's allreduce and one identical DDP model with the MPI hook.

Prints a table and writes the figures as JSON (``--out``, default runs/mpi_vs_gloo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

from largebatch.fileio import write_bytes_atomic


def _relaunch(args: argparse.Namespace) -> int:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.access(mpiexec, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        print("mpi_vs_gloo: error: no mpiexec; pip install -e '.[mpi]'", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    return subprocess.call([mpiexec, "-n", str(args.workers), sys.executable, *sys.argv], env=env)


def _buckets(bucket_mb: float) -> list[torch.Tensor]:
    from largebatch.models import create_model

    sizes = [p.numel() for p in create_model("resnet50", 1000).parameters()][::-1]  # DDP fills from the end
    out, cur, cap = [], 0, 1 << 20  # the first bucket is 1 MiB, as in DDP
    for n in sizes:
        cur += n
        if cur * 4 >= cap:
            out.append(cur)
            cur, cap = 0, int(bucket_mb * (1 << 20))
    if cur:
        out.append(cur)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) for n in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="training steps per round and backend")
    ap.add_argument("--out", default=os.path.join("runs", "mpi_vs_gloo.json"), help="the JSON file to write")
    args = ap.parse_args()

    from largebatch.distributed import Communicator, discover

    topo = discover()
    if not topo.is_mpi:
        return _relaunch(args)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from largebatch.distributed import mpi
    from largebatch.models import create_model

    comm = Communicator(topo, "mpi", torch.device("cpu"), args.bucket_mb)
    hook = mpi.AllreduceHook()
    n = topo.world_size
    busbw_factor = 2 * (n - 1) / n

    # 1. The same buckets through each backend.
    buckets = _buckets(args.bucket_mb)
    nbytes = sum(b.numel() * 4 for b in buckets)

    def gloo_buckets():
        for w in [dist.all_reduce(b, async_op=True) for b in buckets]:
            w.wait()

    def mpi_buckets():
        for f in [hook.submit(b) for b in buckets]:
            f.wait()

    # 2. The same model, one DDP wrapper per backend.
    torch.manual_seed(0)
    base = create_model(args.model, 10)
    models = {}
    for name in ("gloo", "mpi"):
        m = create_model(args.model, 10)
        m.load_state_dict(base.state_dict())
        ddp = DistributedDataParallel(m, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True)
        if name == "mpi":
            ddp.register_comm_hook(state=None, hook=hook.allreduce)
        models[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9))
    g = torch.Generator().manual_seed(topo.rank)
    x = torch.randn(args.micro_batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.micro_batch,), generator=g)

    def steps(name):
        ddp, opt = models[name]
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

    tasks = {"buckets gloo": gloo_buckets, "buckets mpi": mpi_buckets,
             "step gloo": lambda: steps("gloo"), "step mpi": lambda: steps("mpi")}
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for rnd in range(args.rounds + 2):
        for name, fn in tasks.items():
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - t0])
            comm.all_reduce_sum(elapsed)  # the mean over ranks
            if rnd >= 2:  # the first rounds warm up connections and allocators
                times[name].append(elapsed.item() / n)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = {k: med[f"step {k}"] / args.steps for k in ("gloo", "mpi")}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "mpi": " ".join(mpi.import_mpi().Get_library_version().splitlines()[0].split()),
        "workers": n, "rounds": args.rounds, "bucket_mb": args.bucket_mb, "buckets": len(buckets),
        "bucket_bytes": nbytes,
        "busbw_gbps": {k: nbytes / med[f"buckets {k}"] * busbw_factor / 1e9 for k in ("gloo", "mpi")},
        "model": args.model, "image_size": args.image_size, "micro_batch": args.micro_batch,
        "step_s": per_step,
    }
    result["mpi_over_gloo_busbw"] = result["busbw_gbps"]["mpi"] / result["busbw_gbps"]["gloo"]
    result["mpi_over_gloo_step_time"] = per_step["mpi"] / per_step["gloo"]
    if topo.rank == 0:
        bw = result["busbw_gbps"]
        print(f"{n} workers, {result['mpi']}, torch {torch.__version__}, {result['machine']}, "
              f"{torch.get_num_threads()} threads per worker; median of {args.rounds} alternating rounds")
        print(f"gradient buckets: ResNet-50, {len(buckets)} buckets, {nbytes / 2**20:.1f} MiB")
        print(f"  {'backend':<8} {'time':>10} {'busbw':>12}")
        for k in ("gloo", "mpi"):
            print(f"  {k:<8} {med[f'buckets {k}'] * 1e3:>8.1f} ms {bw[k]:>8.2f} GB/s")
        print(f"  mpi / gloo bus bandwidth: {result['mpi_over_gloo_busbw']:.2f}x")
        print(f"training step: {args.model}, micro-batch {args.micro_batch} of {args.image_size}x{args.image_size}")
        for k in ("gloo", "mpi"):
            print(f"  {k:<8} {per_step[k] * 1e3:>8.1f} ms per step")
        print(f"  mpi / gloo step time: {result['mpi_over_gloo_step_time']:.3f}x")
        write_bytes_atomic(json.dumps(result, indent=2).encode(), args.out)
        print(f"wrote {args.out}")
    hook.close()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
