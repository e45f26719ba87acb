"""Print a run's batch plan, schedule and memory per worker without training.

    python -m largebatch.plan --world-size 512 --config configs/X.yaml [key=value ...]

Shows the workers, per-worker batch, micro-batch, accumulation steps, scaled learning rate,
warmup and total steps (with train.phases, a table of them per phase): the same lines rank 0 of a
training run prints when it starts. Then the bytes of parameters, gradients and optimizer state
each worker holds under each comm.shard mode (none, optimizer, full), counted from the shapes of
the run's model (built on the meta device, so no memory is allocated); the run's own mode is marked
with '*'. A plan that training would refuse (a micro-batch of one image through BatchNorm, a
dataset the run cannot read) is refused with training's own line and exit status 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from largebatch.config.arguments import add_config_arguments, config_from_args
from largebatch.errors import UsageError, run_cli

DEFAULT_CLASSES = 1000
"""Classes assumed for an image folder or packed file that is not on this machine (ImageNet-1k)."""
_KNOWN = {"digits": (10, 1, 8), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}
"""(classes, channels, image side) of the datasets whose shape is fixed."""


@dataclass(frozen=True)
class PlanData:
    """What the plan knows of the training data: counted from the dataset, or taken from the config."""

    num_train: int
    num_classes: int
    channels: int
    image_size: Optional[int]
    """The dataset's own side; None where the data is not read."""
    note: str = ""
    """Where the classes (and the shape) come from when they are assumed, for the model's line."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m largebatch.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, required=True, metavar="N", help="number of workers (ranks)")
    parser.add_argument("--num-classes", type=int, metavar="C",
                        help="classes of the model's output, for the memory lines (default: the dataset's own; "
                             f"where the data is not read (data.train_samples set), {DEFAULT_CLASSES} for an image "
                             "folder or packed file, data.num_classes for a pkg.module:factory dataset)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size} is not allowed: use an integer >= 1")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes {args.num_classes} is not allowed: use an integer >= 1")
    cfg = config_from_args(args)
    if cfg is None:
        return 0
    from largebatch.engine import make_run_plan
    from largebatch.engine.adaptive import refuse_unsupported
    from largebatch.engine.run_plan import check_trainable, has_batchnorm

    data = plan_data(cfg, args.num_classes)
    refuse_unsupported(cfg)  # what the adaptive batch cannot measure under, as training refuses it
    run_plan = make_run_plan(cfg, args.world_size, data.num_train, announce=False)
    size = _model_size(cfg, run_plan, data)
    try:
        model, unbuilt = build_model(cfg, data, size), None
    except UsageError as exc:  # e.g. timm not installed here: the plan stands, the memory is not counted
        model, unbuilt = None, exc
    if model is not None:
        check_trainable(run_plan, has_batchnorm(model))  # what training refuses, with its line
    run_plan.announce(True)
    for line in run_plan.lines():
        print(line)
    if model is None:
        print(f"memory per worker      not computed: {unbuilt}")
        if any(p.batch.micro_batch == 1 for p in run_plan.phases):
            print("  micro-batches of 1 image: training refuses them if the model has BatchNorm layers")
        return 0
    for line in memory_lines(cfg, run_plan, args.world_size, model, data):
        print(line)
    return 0


def plan_data(cfg, num_classes: Optional[int] = None) -> PlanData:
    """The training data as the plan sees it. Without data.train_samples the datasets are built as
    training builds them (a ``pkg.module:factory`` is called with data.options): counted, their
    classes and shape read; a dataset training cannot read is refused in training's line. With it,
    the data need not be on this machine: the classes are ``num_classes`` (--num-classes), else the
    dataset's known count, else data.num_classes for a factory and :data:`DEFAULT_CLASSES` for an
    image folder or packed file, and the note says what was assumed."""
    d = cfg.data
    if d.train_samples is None:
        from largebatch.parts import datasets_from_config

        info = datasets_from_config(cfg, cfg.run.seed, True)[2]
        return PlanData(info.num_train, num_classes or info.num_classes, info.channels, info.image_size)
    if d.name in _KNOWN:
        classes, channels, _ = _KNOWN[d.name]
        return PlanData(d.train_samples, num_classes or classes, channels, None)
    if d.name == "synthetic":
        return PlanData(d.train_samples, num_classes or d.num_classes, 3, None)
    if num_classes is not None:
        return PlanData(d.train_samples, num_classes, 3, None)
    if ":" in d.name:
        return PlanData(d.train_samples, d.num_classes, 3, None,
                        f" (data not read with data.train_samples: {d.num_classes} classes from data.num_classes and "
                        "3 channels assumed; --num-classes C to change)")
    return PlanData(d.train_samples, DEFAULT_CLASSES, 3, None,
                    f" ({DEFAULT_CLASSES} classes assumed: --num-classes C to change)")


def _model_size(cfg, run_plan, data: PlanData) -> int:
    """The image side the first phase builds the model for."""
    size = run_plan.phases[0].image_size or data.image_size
    if size is None:  # the dataset's own size, not read here
        size = 32 if cfg.data.name == "synthetic" else _KNOWN.get(cfg.data.name, (0, 0, 224))[2]
    return size


def build_model(cfg, data: PlanData, size: int):
    """The run's model for ``data`` at ``size`` pixels, on the meta device where it builds there (no
    memory is allocated), else on the CPU."""
    import torch

    from largebatch.data import DatasetInfo
    from largebatch.parts import model_builder

    info = DatasetInfo(num_train=0, num_val=0, num_classes=data.num_classes, channels=data.channels,
                       image_size=size)
    build = model_builder(cfg, info)
    try:
        with torch.device("meta"):
            return build(size)
    except UsageError:
        raise
    except Exception:  # a model whose construction needs real tensors
        return build(size)


def memory_lines(cfg, run_plan, world_size: int, model, data: PlanData) -> list[str]:
    """The plan's memory lines: bytes per worker under each comm.shard mode."""
    from largebatch.footprint import footprints, model_groups, numel, state_per_parameter, table

    groups = model_groups(model, cfg.optim.weight_decay, cfg.optim.exclude_bn_and_bias)
    accum = max(p.batch.accum_steps for p in run_plan.phases)
    mode = cfg.comm.shard
    rows = footprints(groups, world_size, cfg.optim.name, cfg.optim.momentum, accum)
    copies, scalars = state_per_parameter(cfg.optim.name, cfg.optim.momentum)
    params = sum(numel(s) for g in groups for s in g)
    tensors = sum(len(g) for g in groups)
    state = f"{copies} fp32 cop{'y' if copies == 1 else 'ies'} per parameter" + (
        " + a step count per tensor" if scalars else "")
    lines = [f"memory per worker      {world_size} workers, comm.shard={mode} (marked *); fp32",
             f"  {cfg.model.name}: {params:,} parameters in {tensors} tensors{data.note}",
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
