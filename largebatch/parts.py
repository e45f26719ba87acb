"""The parts a run trains: the model and the datasets, from names or from the caller.

The engine (:class:`largebatch.engine.Trainer`) takes its parts from a :data:`PartsSource`, a
function it calls on every worker once the workers are connected, so that a part that fails to
build on one worker (a missing file on its node) stops all of them with the same message:

- the command line and YAML name the parts (:func:`from_config`): the zoo's models and datasets,
  ``timm:<name>`` and ``torchvision:<name>`` models, and ``pkg.module:factory`` for your own;
- the Python API passes objects (:func:`from_objects`): an ``nn.Module`` or a function building
  one, and map-style datasets of ``(image, label)`` pairs.

Either way the engine gets a :class:`Parts` and runs the same.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from largebatch.data import IGNORE, DatasetInfo, build_datasets
from largebatch.data.augment import Augment, resolve
from largebatch.data.base import ImageDataset
from largebatch.data.fingerprint import Fingerprint, fingerprint
from largebatch.data.user import UserImages, label_problem, largest_label, num_classes_of, split
from largebatch.errors import UsageError
from largebatch.models import create_model
from largebatch.models.sizes import text as size_text


@dataclass
class Parts:
    train_set: Dataset
    val_set: Dataset
    info: DatasetInfo
    build_model: Callable[[Union[int, tuple]], nn.Module]
    """Builds this worker's model for images of the given size (a side, or (height, width): the
    smallest of the phases'), seeded by the caller."""
    model_name: str
    """For the run header: the config's name, or the class of a model passed in."""
    data_name: str
    fits_data: bool = False
    """The model is built with the data's class count (the zoo, timm, torchvision): its outputs
    fit by construction, and :func:`check_model` need not run it."""
    given_weights: bool = False
    """A model instance was passed in: its weights were drawn before run.seed was set."""


PartsSource = Callable[["Config", int, bool], Parts]  # noqa: F821  (cfg, seed, verbose) -> Parts


# -- names -----------------------------------------------------------------------------------------
def import_factory(name: str, key: str) -> Callable:
    """The function ``pkg.module:factory`` names, imported from the working directory or the
    installed packages; a missing module or function is one line naming it."""
    module_name, function = name.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"{key}={name}: cannot import {exc.name!r} (from {os.getcwd()}); run from the folder "
                         "that holds it, add that folder to PYTHONPATH, or pip install it") from None
    except Exception as exc:
        raise UsageError(f"{key}={name}: importing {module_name} failed: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise UsageError(f"{key}={name}: {module_name} has no function {function!r}")
    return factory


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _takes(factory: Callable, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call(factory: Callable, key: str, name: str, options: dict, extra: dict):
    kwargs = dict(options)
    for k, v in extra.items():
        if k not in kwargs and v is not None and _takes(factory, k):
            kwargs[k] = v
    try:
        return factory(**kwargs)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{key}={name}: calling it with {kwargs} failed: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from None


def _optional(package: str, key: str, name: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UsageError(f"{key}={name} needs {package}, which is not installed: pip install "
                         f"'largebatch[{package}]' (or pip install {package})") from None


def model_builder(cfg, info: DatasetInfo) -> Callable[[int], nn.Module]:
    """A builder for ``model.name`` on data described by ``info``."""
    m, name = cfg.model, cfg.model.name
    if name.startswith("python:"):
        raise UsageError(f"model.name={name} names a model object passed to largebatch.fit(); on the command line "
                         "name a function that builds it, as pkg.module:factory")
    if name.startswith("timm:"):
        def build(size: int) -> nn.Module:
            timm = _optional("timm", "model.name", name)
            try:
                return timm.create_model(name[5:], pretrained=False, num_classes=info.num_classes,
                                         in_chans=info.channels, **m.options)
            except Exception as exc:
                raise UsageError(f"model.name={name}: timm could not build it: {_first_line(exc)}") from None
        return build
    if name.startswith("torchvision:"):
        def build(size: int) -> nn.Module:
            tv = _optional("torchvision", "model.name", name)
            if info.channels != 3:
                raise UsageError(f"model.name={name}: torchvision's models take 3-channel images and "
                                 f"{cfg.data.name} has {info.channels}; use timm:<name> (it takes in_chans) or "
                                 "your own model")
            try:
                return tv.models.get_model(name[12:], weights=None, num_classes=info.num_classes, **m.options)
            except Exception as exc:
                raise UsageError(f"model.name={name}: torchvision could not build it: {_first_line(exc)}") from None
        return build
    if ":" in name:
        def build(size: int) -> nn.Module:
            factory = import_factory(name, "model.name")
            model = _call(factory, "model.name", name, m.options,
                          {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": size})
            if not isinstance(model, nn.Module):
                raise UsageError(f"model.name={name} returned a {type(model).__name__}, not a torch.nn.Module")
            return model
        return build

    def build(size: int) -> nn.Module:
        try:
            return create_model(name, info.num_classes, in_channels=info.channels, norm=m.norm, width=m.width,
                                image_size=size, zero_init_residual=m.zero_init_residual)
        except ValueError as exc:
            raise UsageError(f"model.name={name} does not fit {cfg.data.name} images of {size_text(size)}: {exc}; set "
                             "data.image_size or choose another model") from None
    return build


def user_datasets(train_set: Dataset, val_set: Optional[Dataset], cfg, seed: int, name: str,
                  num_classes: Optional[int] = None) -> tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """The engine's view of a user's datasets (``val_set`` None: data.val_fraction of train_set)."""
    if val_set is None:
        train_set, val_set = split(train_set, cfg.data.val_fraction)
    train = UserImages(train_set, "train_set", cfg.data.image_size)
    val = UserImages(val_set, "val_set", cfg.data.image_size)
    if train.channels != val.channels:
        raise UsageError(f"train_set images have {train.channels} channels and val_set images {val.channels}")
    classes = tuple(getattr(train_set, "classes", ()) or ())
    count = num_classes or num_classes_of(train_set)
    kind = resolve(cfg.data.augment, name)
    if kind != "none":
        train.augment = Augment(kind, seed, min_area=cfg.data.crop_min_area, padding=cfg.data.crop_padding)
    info = DatasetInfo(num_train=len(train), num_val=len(val), num_classes=count or 0, channels=train.channels,
                       image_size=train.image_size, classes=classes if len(classes) == count else (), augment=kind)
    return train, val, info


def datasets_from_config(cfg, seed: int, verbose: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    d = cfg.data
    if ":" not in d.name:
        return build_datasets(d, seed=seed, verbose=verbose)
    factory = import_factory(d.name, "data.name")
    made = _call(factory, "data.name", d.name, d.options, {"root": d.root})
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and all(isinstance(x, Dataset) for x in made)):
        raise UsageError(f"data.name={d.name} returned a {type(made).__name__}; return (train_set, val_set), two "
                         "map-style torch.utils.data.Dataset")
    train, val, info = user_datasets(made[0], made[1], cfg, seed, d.name)
    if not info.num_classes:
        raise UsageError(f"data.name={d.name}: the datasets do not say how many classes there are; give train_set "
                         "a classes or num_classes attribute")
    return train, val, info


def from_config(cfg, seed: int, verbose: bool) -> Parts:
    """The parts the config names (the command line's source)."""
    train, val, info = datasets_from_config(cfg, seed, verbose)
    return Parts(train, val, info, model_builder(cfg, info), cfg.model.name, cfg.data.name,
                 fits_data=_builds_to_fit(cfg.model.name))


def from_objects(model: Union[nn.Module, Callable[[], nn.Module], None] = None, train_set: Optional[Dataset] = None,
                 val_set: Optional[Dataset] = None) -> PartsSource:
    """A parts source for objects passed in (the Python API); what is not passed comes from the config."""
    if model is not None and not (isinstance(model, nn.Module) or callable(model)):
        raise UsageError(f"model must be a torch.nn.Module or a function that builds one, not a "
                         f"{type(model).__name__}")
    if val_set is not None and train_set is None:
        raise UsageError("val_set was given without train_set; pass both, or train_set alone")
    for key, ds in (("train_set", train_set), ("val_set", val_set)):
        if ds is not None and not isinstance(ds, Dataset):
            raise UsageError(f"{key} must be a map-style torch.utils.data.Dataset, not a {type(ds).__name__}")

    def source(cfg, seed: int, verbose: bool) -> Parts:
        if train_set is None:
            train, val, info = datasets_from_config(cfg, seed, verbose)
            data_name = cfg.data.name
        else:
            data_name = f"{type(train_set).__name__} (passed in)"
            train, val, info = user_datasets(train_set, val_set, cfg, seed, "python")
        if model is None:
            if not info.num_classes:
                raise UsageError("the datasets passed in do not say how many classes there are; give train_set a "
                                 "classes or num_classes attribute, or pass the model")
            return Parts(train, val, info, model_builder(cfg, info), cfg.model.name, data_name,
                         fits_data=_builds_to_fit(cfg.model.name))
        made = model if isinstance(model, nn.Module) else None

        def build(size: int) -> nn.Module:
            built = made if made is not None else model()
            if not isinstance(built, nn.Module):
                raise UsageError(f"model() returned a {type(built).__name__}, not a torch.nn.Module")
            return built

        return Parts(train, val, info, build, f"{type(made).__name__ if made is not None else model.__name__} "
                                              "(passed in)", data_name, given_weights=made is not None)
    return source


def _builds_to_fit(name: str) -> bool:
    """``model.name`` is built with the data's class count (not a pkg.module:factory)."""
    return ":" not in name or name.startswith(("timm:", "torchvision:"))


def fingerprints(parts: Parts) -> dict[str, Fingerprint]:
    """The fingerprints of the training and validation sets, which the workers compare at start-up."""
    return {"training set": fingerprint(parts.train_set), "validation set": fingerprint(parts.val_set)}


def check_model(parts: Parts, model: nn.Module, sampled: dict[str, Fingerprint], verbose: bool) -> Parts:
    """The model against the data, before the run starts: its output on one validation image must
    be (batch, classes) logits with an output for every class (more are allowed, with a warning
    where ``verbose``), and the labels of the ``sampled`` items (:func:`fingerprints`) must lie in
    0..classes-1. Returns parts whose class count is known (the model's outputs where the data
    does not say); user datasets then check every label they give against it as the run goes."""
    info = parts.info
    outputs = info.num_classes if parts.fits_data and info.num_classes else _outputs(parts, model)
    classes, declared = info.num_classes or outputs, bool(info.num_classes)
    if outputs < classes:
        raise UsageError(f"the model gives {outputs} outputs and the data has {classes} classes"
                         f"{_counted_from_labels(parts.train_set, classes, outputs)}")
    if outputs > classes and verbose:
        print(f"largebatch: warning: the model gives {outputs} outputs and the data has {classes} classes; outputs "
              f"{classes}..{outputs - 1} are never a target (fine for a head sized for another dataset)",
              file=sys.stderr, flush=True)
    for dataset, sample in zip((parts.train_set, parts.val_set), sampled.values()):
        for index, label in zip(sample.indices, sample.labels or ()):
            problem = None if label == IGNORE and info.reads_files else label_problem(
                dataset.describe(index), label, classes, outputs, declared)
            if problem:
                raise UsageError(problem)
        if hasattr(dataset, "label_range"):
            dataset.label_range = (classes, outputs, declared)
    return replace(parts, info=replace(info, num_classes=classes))


def _counted_from_labels(train_set, classes: int, outputs: int) -> str:
    """The end of the line refusing a model with fewer outputs than classes: where the class count
    comes from the largest label (a TensorDataset's), that label and its sample, which may be a
    stray one."""
    largest = largest_label(train_set.dataset) if isinstance(train_set, UserImages) else None
    if largest is None or largest[0] + 1 != classes:
        return f"; build it with {classes} outputs (num_classes={classes})"
    label, index = largest
    return (f", counted from its largest label, {label} ({train_set.name}[{index}]); build it with {classes} outputs "
            f"(num_classes={classes}), or map the dataset's labels to 0..{outputs - 1}")


def _outputs(parts: Parts, model: nn.Module) -> int:
    """The model's output count, from its output on one validation image, on the model's own
    device (an instance passed in may already be on a GPU; the engine moves it to the run's device
    later), the random number generators left as they were."""
    device = _device_of(model)
    sample = parts.val_set.__getitems__([0]).images.to(device)
    was_training = model.training
    model.eval()
    try:  # an error raised in the model's own code keeps its traceback, from the user's frame
        with torch.no_grad(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            out = model(sample)
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"the model returns {shape} for one image of shape {tuple(sample.shape[1:])}; a classifier "
                         "returns (batch, classes) logits: flatten its output (end it with nn.Flatten())")
    return out.shape[1]


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; the CPU for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
