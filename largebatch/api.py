"""The Python API: train your own model on your own data with the same engine as the command line.

    import largebatch

    summary = largebatch.fit(model=MyNet(), train_set=my_train, val_set=my_val,
                             config="configs/x.yaml", **{"train.global_batch": 4096, "optim.name": "lars"})

Run it as a plain ``python script.py`` (one worker) or under ``torchrun``, ``mpirun`` or ``srun``
(one process per worker, each running the same script): the topology comes from the launcher's
environment, as for ``python -m largebatch.train``. Every worker gets the run's summary.

A script may call ``fit`` several times (a sweep, say), with different configs: each call starts
its own process group and ends it before returning. Every worker must make the same calls in the
same order, as it does when every worker runs the same script.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Optional, Union

from torch import nn
from torch.utils.data import Dataset

from largebatch.config import Config, load_config
from largebatch.errors import UsageError


def _name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return getattr(obj, "__name__", None) if callable(obj) and not isinstance(obj, nn.Module) else cls.__name__


def fit(config: Union[str, os.PathLike, Config, None] = None, *,
        model: Union[nn.Module, Callable[[], nn.Module], None] = None,
        train_set: Optional[Dataset] = None, val_set: Optional[Dataset] = None,
        overrides: Optional[Iterable[str]] = None, **dotted: Any) -> dict:
    """Train and return the run's summary (the dict ``metrics.jsonl`` ends with), on every worker.

    ``config``: a YAML file, a :class:`Config`, or None (the defaults). ``overrides``: ``key=value``
    strings as on the command line; ``dotted``: the same as keyword arguments
    (``**{"train.global_batch": 4096}``); both win over the file, and ``dotted`` over ``overrides``.

    ``model``: an ``nn.Module``, or a function of no arguments that builds one (called on each
    worker after ``run.seed`` is set); None: ``model.name`` from the config. ``train_set`` and
    ``val_set``: map-style datasets of ``(image tensor (C, H, W), integer label)`` pairs,
    collated by the engine (torchvision and timm datasets with a ``ToTensor()`` transform,
    ``TensorDataset``); without ``val_set``, ``data.val_fraction`` of ``train_set`` is held out
    (a fixed split). None: ``data.name`` from the config. The run records a model or dataset
    passed in as ``python:<class name>`` in its config, so a resumed run must pass the same kinds.

    Bad input raises :class:`largebatch.errors.UsageError` with a one-line message on every worker.
    """
    from largebatch.distributed import discover
    from largebatch.engine import Trainer
    from largebatch.parts import from_objects

    source = from_objects(model, train_set, val_set)
    items = [str(x) for x in (overrides or ())]
    if model is not None:
        items.append(f"model.name=python:{_name(model)}")
    if train_set is not None:
        items.append(f"data.name=python:{_name(train_set)}")
    items += [f"{k}={_yaml_value(v)}" for k, v in dotted.items()]
    if isinstance(config, Config):
        from largebatch.config import flat_config, to_dict
        from largebatch.config.loader import from_flat, parse_override

        cfg = from_flat({**flat_config(to_dict(config)), **dict(parse_override(x) for x in items)})
    elif config is None or isinstance(config, (str, os.PathLike)):
        cfg = load_config(None if config is None else os.fspath(config), items)
    else:
        raise UsageError(f"config must be a YAML file's path or a largebatch Config, not a {type(config).__name__}")
    trainer = Trainer(cfg, discover(), parts=source)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _yaml_value(value: Any) -> str:
    """A keyword argument's value as the command line would write it."""
    import json

    if isinstance(value, str):
        return value
    return json.dumps(value)

