"""The scaling model behind ``python -m largebatch.simulate``.

- :mod:`~largebatch.scaling.model`: the cluster, the workload, the model's size, a step's prediction.
- :mod:`~largebatch.scaling.costs`: what one collective costs (alpha-beta).
- :mod:`~largebatch.scaling.predict`: one step's timeline (overlap, sharding), sweeps, memory per worker.
- :mod:`~largebatch.scaling.presets`: the published runs, as data.
- :mod:`~largebatch.scaling.measure`: compute time and model sizes measured with torch (the only
  module that uses it).
- :mod:`~largebatch.scaling.resolve`: the simulator's options to a prediction's inputs.
- :mod:`~largebatch.scaling.output`: tables, plots and JSON.
- :mod:`~largebatch.scaling.cli`: the simulator's options and their checks.
- :mod:`~largebatch.scaling.simulate`: the command.
"""
