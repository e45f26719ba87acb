"""Print a run's batch plan and schedule without training.

    python -m largebatch.plan --world-size 512 --config configs/X.yaml [key=value ...]

Shows the workers, per-worker batch, micro-batch, accumulation steps, scaled learning rate,
warmup and total steps (with train.phases, a table of them per phase): the same lines rank 0 of a
training run prints when it starts.
"""

from __future__ import annotations

import argparse

from largebatch.cli import add_config_arguments, config_from_args
from largebatch.errors import UsageError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m largebatch.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, required=True, metavar="N", help="number of workers (ranks)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size} is not allowed: use an integer >= 1")
    cfg = config_from_args(args)
    if cfg is None:
        return 0
    from largebatch.data import build_datasets
    from largebatch.engine import make_run_plan

    if cfg.data.train_samples is not None:
        num_train = cfg.data.train_samples  # the data need not be on this machine
    else:
        num_train = build_datasets(cfg.data)[2].num_train
    for line in make_run_plan(cfg, args.world_size, num_train).lines():
        print(line)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
