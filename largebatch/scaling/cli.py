"""The command line both tools share: the simulator's options (``python -m largebatch.advise`` takes
them too) and their checks, a parser whose errors are one line, integer lists, the default worker
counts, and the checks on --plot and --json.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os

from largebatch.errors import UsageError
from largebatch.footprint import OPTIMIZERS
from largebatch.scaling.model import ALGORITHMS, FUSIONS, INTER_ALGORITHMS, SHARDS
from largebatch.scaling.output import MATPLOTLIB_MISSING
from largebatch.scaling.presets import PRESETS

SIMULATE_DESCRIPTION = "Predict step time, throughput and scaling efficiency of synchronous data-parallel training."
"""The first line of python -m largebatch.simulate --help."""
DEFAULT_WORKERS = tuple(2 ** i for i in range(3, 13))
"""The simulator's worker counts when none are given: 8, 16, ..., 4096."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a :class:`UsageError`: one line and exit status 2 through
    :func:`largebatch.errors.run_cli`."""

    def error(self, message: str):
        raise UsageError(message)


def int_list(flag: str, text: str, *, example: str, rule: str) -> list[int]:
    """The sorted distinct integers of a comma-separated ``text`` given to ``flag``; an error names
    the bad part and shows ``example``, or for a value below 1 says ``rule``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UsageError(f"{flag} {text!r}: {part!r} is not an integer; give a list such as {example}") from None
        if value < 1:
            raise UsageError(f"{flag} {text!r}: {value} is not allowed; {rule}")
        out.append(value)
    return sorted(set(out))


def default_workers(workers_per_node: int, *, smallest: int = DEFAULT_WORKERS[0],
                    whole_nodes_instead: bool = True) -> list[int]:
    """Worker counts to predict when none are given: the powers of two from ``smallest`` to 4096 that
    fit in one node or fill whole nodes. Where the node size leaves some of them out and
    ``whole_nodes_instead`` is set (the simulator's table), whole nodes instead: 1, 2, 4, ... nodes
    up to 4096 workers."""
    counts = [2 ** i for i in range(smallest.bit_length() - 1, 13)]
    fits = [p for p in counts if p <= workers_per_node or p % workers_per_node == 0]
    if len(fits) == len(counts) or not whole_nodes_instead:
        return fits
    out, nodes = [], 1
    while nodes * workers_per_node <= DEFAULT_WORKERS[-1] or not out:
        out.append(nodes * workers_per_node)
        nodes *= 2
    return out


def check_number(flag: str, value, *, minimum: float = 0.0, strict: bool = True, integer: bool = False) -> None:
    """A UsageError unless ``value`` (None: not given) is finite and above ``minimum`` (at least it,
    with ``strict=False``)."""
    if value is None:
        return
    bad = not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        kind = "an integer" if integer else "a number"
        rel = ">" if strict else ">="
        raise UsageError(f"{flag} {value:g} is not allowed: use {kind} {rel} {minimum:g}")


def check_outputs(args: argparse.Namespace) -> None:
    """The folders of --plot and --json exist, and matplotlib is there for --plot."""
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(MATPLOTLIB_MISSING)


def simulator_parser() -> argparse.ArgumentParser:
    """The options of python -m largebatch.simulate: what to run, the workload, the cluster, the output."""
    p = Parser(prog="python -m largebatch.simulate", description=SIMULATE_DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="Flags given with --preset replace the preset's values (--micro-batch does not rescale "
                      "the compute time: give --compute-ms with it). Bandwidths are the rates the collective "
                      "achieves (line rate x achievable fraction).")
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a published run (see --validate)")
    g.add_argument("--validate", action="store_true",
                   help="predict the three published runs and compare with the published efficiencies")
    g.add_argument("--workers", metavar="LIST", help="comma-separated worker counts (default: 8,16,...,4096)")
    g.add_argument("--nodes", type=int, metavar="N", help="also predict N full nodes (N x --workers-per-node workers)")
    g.add_argument("--baseline-workers", type=int, metavar="B",
                   help="efficiency against B workers instead of 1 (default: 1)")
    w = p.add_argument_group("workload")
    w.add_argument("--compute-ms", type=float, metavar="MS", help="forward+backward of one micro-batch on one worker")
    w.add_argument("--measure", metavar="MODEL", help="time forward+backward of MODEL from the zoo on this machine")
    w.add_argument("--image-size", type=int, default=224, metavar="PIXELS", help="input size for --measure (default 224)")
    w.add_argument("--measure-iterations", type=int, default=3, metavar="N",
                   help="timed iterations for --measure, after one warm-up (default 3)")
    w.add_argument("--micro-batch", type=int, metavar="B", help="images per worker per micro-batch (default 32)")
    w.add_argument("--accumulation-steps", type=int, metavar="A", help="micro-batches per optimizer step (default 1)")
    w.add_argument("--model", metavar="NAME", help="gradient size from the parameters of NAME in the zoo")
    w.add_argument("--gradient-mb", type=float, metavar="MIB", help="gradient size in MiB (2^20 bytes, as --bucket-mb)")
    w.add_argument("--params", type=float, metavar="N",
                   help="parameters of the model, e.g. 1e9: sets the gradient size and replaces --model's count "
                        "(the tensors' shapes are then not known: memory is split evenly over the workers)")
    w.add_argument("--bytes-per-value", type=int, choices=(2, 4), help="with --model/--measure/--params: 4 (fp32, "
                   "default) or 2 (fp16/bf16 gradients; with --shard full, parameters gathered in bf16)")
    w.add_argument("--shard", choices=SHARDS, help="comm.shard: none (DDP, default), optimizer (ZeRO-1) or full "
                   "(ZeRO-3, --bucket-mb per block); prints memory per worker")
    w.add_argument("--optimizer", choices=OPTIMIZERS, help="for memory per worker: sgd (default), lars, larc or lamb "
                   "(momentum 0.9)")
    w.add_argument("--backward-fraction", type=float, metavar="F", help="backward share of forward+backward (2/3)")
    w.add_argument("--bucket-mb", type=float, metavar="MIB", help="allreduce bucket in MiB (default 25)")
    w.add_argument("--fusion", choices=FUSIONS, help="fixed buckets (DDP) or greedy tensor fusion (Horovod)")
    w.add_argument("--cycle-ms", type=float, metavar="MS", help="greedy fusion: ms between looks (default 5)")
    w.add_argument("--update-ms", type=float, metavar="MS", help="per-step time after the allreduce (default 0)")
    c = p.add_argument_group("cluster")
    c.add_argument("--workers-per-node", type=int, metavar="K", help="workers in one node (default 8)")
    c.add_argument("--intra-gbit", type=float, metavar="GBIT",
                   help="achieved bandwidth between two workers of a node, Gbit/s (default 128)")
    c.add_argument("--intra-latency-us", type=float, metavar="US", help="per message inside a node (default 5)")
    c.add_argument("--inter-gbit", type=float, metavar="GBIT",
                   help="achieved network bandwidth of one node, Gbit/s (default 80)")
    c.add_argument("--inter-latency-us", type=float, metavar="US", help="per message between nodes (default 5)")
    c.add_argument("--algorithm", choices=ALGORITHMS, help="allreduce algorithm (default ring)")
    c.add_argument("--inter-algorithm", choices=INTER_ALGORITHMS, help="between nodes for hierarchical (default ring)")
    o = p.add_argument_group("output")
    o.add_argument("--plot", metavar="FILE", help="PNG of efficiency against workers (needs matplotlib)")
    o.add_argument("--json", metavar="FILE", help="the inputs and the table as JSON")
    o.add_argument("--variations", action="store_true",
                   help="with --preset or --validate: predictions with other plausible values of uncertain inputs")
    return p


def check_simulator_args(args: argparse.Namespace) -> None:
    """The simulator's options are each in range and do not contradict one another."""
    for flag, attr in (("--compute-ms", "compute_ms"), ("--gradient-mb", "gradient_mb"), ("--bucket-mb", "bucket_mb"),
                       ("--cycle-ms", "cycle_ms"), ("--intra-gbit", "intra_gbit"), ("--inter-gbit", "inter_gbit")):
        check_number(flag, getattr(args, attr))
    for flag, attr in (("--update-ms", "update_ms"), ("--intra-latency-us", "intra_latency_us"),
                       ("--inter-latency-us", "inter_latency_us")):
        check_number(flag, getattr(args, attr), strict=False)
    for flag, attr in (("--micro-batch", "micro_batch"), ("--accumulation-steps", "accumulation_steps"),
                       ("--workers-per-node", "workers_per_node"), ("--nodes", "nodes"),
                       ("--baseline-workers", "baseline_workers"), ("--image-size", "image_size"),
                       ("--measure-iterations", "measure_iterations")):
        check_number(flag, getattr(args, attr), minimum=1, strict=False, integer=True)
    if args.backward_fraction is not None and not (0 < args.backward_fraction <= 1):
        raise UsageError(f"--backward-fraction {args.backward_fraction:g} is not allowed: use a number in (0, 1]")
    if args.compute_ms is not None and args.measure:
        raise UsageError("--compute-ms and --measure both give the compute time: use one")
    if args.params is not None and not (math.isfinite(args.params) and args.params >= 1
                                        and args.params == int(args.params)):
        raise UsageError(f"--params {args.params:g} is not allowed: use a whole number of parameters >= 1, e.g. 1e9")
    if args.params is not None and args.gradient_mb is not None:
        raise UsageError("--params and --gradient-mb both give the gradient size: use one")
    sources = [f for f, v in (("--model", args.model), ("--gradient-mb", args.gradient_mb)) if v is not None]
    if len(sources) > 1:
        raise UsageError(f"{' and '.join(sources)} both give the gradient size: use one")
    if args.validate and args.preset:
        raise UsageError("--validate runs every preset: leave out --preset")
    if args.validate and any(v is not None for v in (args.shard, args.params, args.optimizer)):
        raise UsageError("--validate predicts the published runs as they ran: leave out --shard, --params and "
                         "--optimizer (give them with --preset NAME instead)")
    check_outputs(args)

