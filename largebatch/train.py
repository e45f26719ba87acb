"""Train an image classifier with synchronous data-parallel SGD.

Single process (the bundled digits default)::

    python -m largebatch.train

Several workers on one machine (gloo on CPU, nccl on GPUs)::

    torchrun --standalone --nproc-per-node 2 -m largebatch.train

Many nodes (run on every node; 16 nodes x 8 GPUs = 128 workers)::

    torchrun --nnodes 16 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m largebatch.train --config configs/X.yaml train.global_batch=8192

Config: ``--config FILE`` then ``key=value`` overrides (``--help-config`` lists the keys).
Bad input prints one line and exits with status 2 on every worker. Ctrl-C (SIGINT), SIGTERM or
SIGUSR1 stops every worker after the current step with a checkpoint and status 0, and the same
command resumes; a second Ctrl-C stops at once with status 130.

For tests, ``LARGEBATCH_LEDGER_LAG=N`` makes the host learn each step's outcome N steps late even
where it could at once (the trainer's ``ledger_lag``), and ``LARGEBATCH_FAULT`` injects faults
(:class:`largebatch.engine.guards.FaultInjection`).
"""

from __future__ import annotations

import argparse
import os
import sys

from largebatch.config.arguments import add_config_arguments, config_from_args
from largebatch.distributed import SINGLE, discover
from largebatch.errors import RunStopped, UsageError, run_cli

_topology = SINGLE


def main(argv: list[str] | None = None) -> int:
    global _topology
    parser = argparse.ArgumentParser(prog="python -m largebatch.train", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    _topology = discover()
    stopped = stopped_status()
    cfg = config_from_args(args)
    if cfg is None:
        return 0
    from largebatch.engine import Trainer
    from largebatch.engine.guards import InterruptGuard

    with InterruptGuard():  # loaders forked during set-up must outlive a Ctrl-C (see StopSignal)
        trainer = Trainer(cfg, _topology, ledger_lag=int(os.environ.get("LARGEBATCH_LEDGER_LAG", "0")))
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
    return stopped if "stopped_at_step" in summary else 0


def stopped_status(environ=os.environ) -> int:
    """The exit status of a run stopped by a signal with a checkpoint before its end: 0, or
    LARGEBATCH_STOPPED_STATUS where a batch script sets it to tell such a stop from a finished run
    (launch/slurm.sbatch --requeue: 75)."""
    value = environ.get("LARGEBATCH_STOPPED_STATUS", "0")
    if not value.isdigit() or not 0 <= int(value) <= 125:
        raise UsageError(f"LARGEBATCH_STOPPED_STATUS={value!r} is not an exit status; set an integer 0-125")
    return int(value)


def _main_ending_mpi_on_crash(argv: list[str] | None = None) -> int:
    """``main``; an unexpected error (a bug in a user's model, say) prints its traceback once and
    exits with status 1, and also ends the other ranks of an MPI job (see abort_if_running), which
    is why it is printed here and not by the interpreter. Usage errors and agreed stops need not:
    every rank meets those and exits by itself."""
    from largebatch.engine.guards import finishing

    try:
        status = main(argv)
    except (UsageError, RunStopped, KeyboardInterrupt, SystemExit) as exc:
        finishing(exc)
        raise
    except BaseException as exc:
        finishing(exc)
        sys.excepthook(type(exc), exc, exc.__traceback__)  # under a process group, torch's: [rank<N>] prefixes
        sys.stderr.flush()
        from largebatch.distributed.mpi import abort_if_running

        abort_if_running(1)
        raise SystemExit(1) from None
    finishing(None)
    return status


def cli() -> None:
    """Console-script entry point."""
    run_cli(_main_ending_mpi_on_crash, print_errors=lambda: _topology.is_main)


if __name__ == "__main__":
    cli()
