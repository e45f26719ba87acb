"""The config on a command line: ``--config FILE``, ``--help-config`` and ``key=value`` overrides, as
``largebatch.train`` and ``largebatch.plan`` take them."""

from __future__ import annotations

import argparse

from largebatch.config.loader import describe_keys, load_config
from largebatch.config.schema import Config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--help-config`` and the ``key=value`` overrides to ``parser``."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of config sections (run, data, model, ...)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.global_batch=512 optim.base_lr=0.1; they override "
                             "--config, which overrides the defaults; quote lists: schedule.milestones='[30,60]'")


def config_from_args(args: argparse.Namespace) -> Config | None:
    """The resolved config, or None after printing the key list for ``--help-config``."""
    if args.help_config:
        print(describe_keys())
        return None
    return load_config(args.config, args.overrides)
