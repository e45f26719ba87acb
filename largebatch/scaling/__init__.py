"""The scaling model and the advice built on it, behind ``python -m largebatch.simulate`` and
``python -m largebatch.advise``.

- :mod:`~largebatch.scaling.model`: the cluster, the workload, the model's size, a step's prediction.
- :mod:`~largebatch.scaling.costs`: what one collective costs (alpha-beta).
- :mod:`~largebatch.scaling.predict`: one step's timeline (overlap, sharding), sweeps, memory per worker.
- :mod:`~largebatch.scaling.presets`: the published runs, as data.
- :mod:`~largebatch.scaling.measure`: compute time and model sizes measured with torch (the only
  module that uses it).
- :mod:`~largebatch.scaling.resolve`: the simulator's options to a prediction's inputs.
- :mod:`~largebatch.scaling.steps`: McCandlish et al.'s steps-against-batch model.
- :mod:`~largebatch.scaling.runs`: a measured run folder, and the probe run that makes one.
- :mod:`~largebatch.scaling.choices`: every (workers, global batch) with its time and cost.
- :mod:`~largebatch.scaling.output`: tables, plots and JSON.
- :mod:`~largebatch.scaling.cli`: the options and checks both commands share.
- :mod:`~largebatch.scaling.simulate`, :mod:`~largebatch.scaling.advise`: the two commands.
"""
