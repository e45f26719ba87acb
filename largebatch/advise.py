"""``python -m largebatch.advise``: which global batch and how many workers, from a run's measured
gradient noise scale and the scaling simulator (:mod:`largebatch.scaling`).

The names of the steps model, the run reader and the choices stay importable from here.
"""

from largebatch.scaling.advise import build_parser, cli, main  # noqa: F401
from largebatch.scaling.choices import *  # noqa: F401,F403
from largebatch.scaling.runs import *  # noqa: F401,F403
from largebatch.scaling.steps import *  # noqa: F401,F403

if __name__ == "__main__":
    cli()
