"""``python -m largebatch.simulate``: the scaling simulator's command line (:mod:`largebatch.scaling`).

The names of the simulator's model, presets, predictions and output stay importable from here.
"""

from largebatch.scaling.costs import *  # noqa: F401,F403
from largebatch.scaling.measure import *  # noqa: F401,F403
from largebatch.scaling.model import *  # noqa: F401,F403
from largebatch.scaling.output import *  # noqa: F401,F403
from largebatch.scaling.predict import *  # noqa: F401,F403
from largebatch.scaling.presets import *  # noqa: F401,F403
from largebatch.scaling.simulate import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
