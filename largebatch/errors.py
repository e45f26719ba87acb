"""The one error type for bad input, and the exit-status-2 convention around it."""

from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: a config value, a CLI argument, a dataset path.

    The message is one line that names the problem and the fix. Entry points turn it into
    ``largebatch: error: <message>`` on stderr and exit status 2, with no traceback.
    """


class RunStopped(Exception):
    """The run ended early for a reason that is not bad input (a non-finite loss, a worker that
    never arrived). One line on stderr, exit status ``status``, no traceback."""

    def __init__(self, message: str, status: int = 3):
        super().__init__(message)
        self.status = status


def run_cli(main: Callable[[], int | None], *, print_errors: Callable[[], bool] = lambda: True) -> None:
    """Run ``main`` and exit; a :class:`UsageError` becomes one line on stderr and status 2.

    ``print_errors`` is asked at failure time whether this process should print (only rank 0
    does under several workers; every worker still exits with status 2).
    """
    try:
        code = main()
    except UsageError as exc:
        if print_errors():
            print(f"largebatch: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    except RunStopped as exc:
        if print_errors():
            print(f"largebatch: stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.status)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)
