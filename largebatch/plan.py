"""Print a run's batch plan, schedule and memory per worker without training.

    python -m largebatch.plan --world-size 512 --config configs/X.yaml [key=value ...]

Shows the workers, per-worker batch, micro-batch, accumulation steps, scaled learning rate,
warmup and total steps (with train.phases, a table of them per phase): the same lines rank 0 of a
training run prints when it starts. Then the bytes of parameters, gradients and optimizer state
each worker holds under each comm.shard mode (none, optimizer, full), counted from the shapes of
the run's model (built on the meta device, so no memory is allocated); the run's own mode is marked
with '*'. See largebatch.footprint for how each mode is counted.
"""

from __future__ import annotations

import argparse

from largebatch.config.arguments import add_config_arguments, config_from_args
from largebatch.errors import UsageError, run_cli

DEFAULT_CLASSES = 1000
"""Classes assumed for an image folder or packed file that is not on this machine (ImageNet-1k)."""
_KNOWN = {"digits": (10, 1, 8), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}
"""(classes, channels, image side) of the datasets whose shape is fixed."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m largebatch.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, required=True, metavar="N", help="number of workers (ranks)")
    parser.add_argument("--num-classes", type=int, metavar="C",
                        help="classes of the model's output, for the memory lines (default: the dataset's own; "
                             f"where the data is not read (data.train_samples set), {DEFAULT_CLASSES} for an image "
                             "folder or packed file)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size} is not allowed: use an integer >= 1")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes {args.num_classes} is not allowed: use an integer >= 1")
    cfg = config_from_args(args)
    if cfg is None:
        return 0
    from largebatch.data import build_datasets
    from largebatch.engine import make_run_plan

    info = None
    if cfg.data.train_samples is not None:
        num_train = cfg.data.train_samples  # the data need not be on this machine
    else:
        info = build_datasets(cfg.data)[2]
        num_train = info.num_train
    run_plan = make_run_plan(cfg, args.world_size, num_train)
    for line in run_plan.lines():
        print(line)
    for line in memory_lines(cfg, run_plan, args.world_size, info, args.num_classes):
        print(line)
    return 0


def _data_shape(cfg, info, num_classes: int | None) -> tuple[int, int, str]:
    """(classes, channels, note on where the classes come from) for the model's build."""
    if info is not None:
        return (num_classes or info.num_classes), info.channels, ""
    name = cfg.data.name
    if num_classes is not None:
        return num_classes, _KNOWN.get(name, (0, 3, 0))[1], ""
    if name in _KNOWN:
        return _KNOWN[name][0], _KNOWN[name][1], ""
    if name == "synthetic":
        return cfg.data.num_classes, 3, ""
    return DEFAULT_CLASSES, 3, f" ({DEFAULT_CLASSES} classes assumed: --num-classes C to change)"


def _shapes(cfg, classes: int, channels: int, size: int) -> tuple[list[list[tuple]], str]:
    """(shapes of the model's parameters in the optimizer's groups, the model's name)."""
    import torch

    from largebatch.data import DatasetInfo
    from largebatch.footprint import model_groups
    from largebatch.parts import model_builder

    info = DatasetInfo(num_train=0, num_val=0, num_classes=classes, channels=channels, image_size=size)
    build = model_builder(cfg, info)
    try:
        with torch.device("meta"):
            model = build(size)
    except UsageError:
        raise
    except Exception:  # a model whose construction needs real tensors
        model = build(size)
    return model_groups(model, cfg.optim.weight_decay, cfg.optim.exclude_bn_and_bias), cfg.model.name


def memory_lines(cfg, run_plan, world_size: int, info=None, num_classes: int | None = None) -> list[str]:
    """The plan's memory lines: bytes per worker under each comm.shard mode."""
    from largebatch.footprint import footprints, numel, state_per_parameter, table

    classes, channels, note = _data_shape(cfg, info, num_classes)
    size = run_plan.phases[0].image_size or (info.image_size if info is not None else None)
    if size is None:  # the dataset's own size, not read here
        size = 32 if cfg.data.name == "synthetic" else _KNOWN.get(cfg.data.name, (0, 0, 224))[2]
    try:
        groups, name = _shapes(cfg, classes, channels, size)
    except UsageError as exc:
        return [f"memory per worker      not computed: {exc}"]
    accum = max(p.batch.accum_steps for p in run_plan.phases)
    mode = cfg.comm.shard
    rows = footprints(groups, world_size, cfg.optim.name, cfg.optim.momentum, accum)
    copies, scalars = state_per_parameter(cfg.optim.name, cfg.optim.momentum)
    params = sum(numel(s) for g in groups for s in g)
    tensors = sum(len(g) for g in groups)
    state = f"{copies} fp32 cop{'y' if copies == 1 else 'ies'} per parameter" + (
        " + a step count per tensor" if scalars else "")
    lines = [f"memory per worker      {world_size} workers, comm.shard={mode} (marked *); fp32",
             f"  {name}: {params:,} parameters in {tensors} tensors{note}",
             f"  {cfg.optim.name}: {state}"]
    lines += table(rows, mark=mode)
    if accum > 1:
        lines.append(f"  full with {accum} accumulation steps: whole gradients between micro-batches (reduce-scattered "
                     "at the last one only)")
    lines.append("  activations not included; full also holds the gathered parameters of the blocks being computed")
    return lines


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
