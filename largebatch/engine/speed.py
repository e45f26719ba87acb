"""Channels-last and torch.compile: the settings that make a convolutional network fast on a GPU.

- ``train.channels_last``: NHWC activations let cuDNN use its tensor-core convolution kernels
  without layout transposes. 'auto' turns it on for models with 2-d convolutions on CUDA only
  (oneDNN on the CPU gains little and some CPU kernels lose).
- ``train.compile``: ``torch.compile`` of the DDP-wrapped model, so TorchDynamo's DDP support splits
  the graph at the gradient buckets and the allreduce still overlaps the backward pass. Compiling
  is lazy in torch; :func:`rehearse` runs one forward and backward pass on a random micro-batch of
  the run's shape before the first step, so that the compile time is known (and printed in the run
  header) and a platform that cannot compile fails there with one line, not in the middle of the
  first epoch. The rehearsal leaves weights, BatchNorm statistics, gradients and the random state
  as they were, and runs without the gradient allreduce, so a failure on one worker leaves no
  other waiting in a collective.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.engine.checkpoint import rng_state, set_rng_state
from largebatch.errors import UsageError


def wants_channels_last(setting: Union[bool, str], model: nn.Module, device: torch.device) -> bool:
    """``train.channels_last`` resolved for ``model`` on ``device``."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def check_compiler(setting: Union[bool, str], device: torch.device) -> None:
    """Refuse ``train.compile`` in one line where this machine cannot compile for ``device``."""
    if setting is False:
        return
    off = "or set train.compile=false"
    if device.type == "cpu":
        cxx = os.environ.get("CXX")
        if not (cxx and shutil.which(cxx)) and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise UsageError(f"train.compile={setting}: torch.compile needs a C++ compiler on the CPU and none was "
                             f"found (g++, c++, clang++ or $CXX); install one (e.g. apt-get install g++) {off}")
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UsageError(f"train.compile={setting}: torch.compile needs Triton on CUDA and it is not installed; "
                             f"pip install triton {off}") from None


def compile_model(model: nn.Module, setting: Union[bool, str]) -> nn.Module:
    """``torch.compile(model)`` with the mode of ``train.compile`` (true: the default mode)."""
    return torch.compile(model, mode=None if setting is True else setting)


def rehearse(model: nn.Module, bare: nn.Module, no_sync: Callable, input_shape: tuple[int, ...], num_classes: int,
             device: torch.device, autocast: Callable = contextlib.nullcontext,
             memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, Optional[str]]:
    """One forward and backward pass of ``model`` (compiled; ``bare`` is the module inside) on random
    inputs of ``input_shape`` (N, C, H, W) under ``no_sync``, to compile before the first step.
    Returns (seconds, None), or (seconds, the error's first line) when compiling failed."""
    saved_state = {k: v.detach().clone() for k, v in bare.state_dict().items()}
    saved_rng = rng_state(device)
    was_training = bare.training
    g = torch.Generator().manual_seed(0)
    x = torch.randn(input_shape, generator=g).to(device).contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (input_shape[0],), generator=g).to(device)
    t0 = time.perf_counter()
    error = None
    try:
        model.train()
        with no_sync():
            with autocast():
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # torch.compile raises many types (BackendCompilerFailed, InductorError, ...)
        text = " ".join(str(exc).split()) or type(exc).__name__
        error = text if len(text) <= 300 else text[:297] + "..."
    finally:
        bare.zero_grad(set_to_none=True)
        bare.load_state_dict(saved_state)
        set_rng_state(saved_rng, device)
        bare.train(was_training)
    return time.perf_counter() - t0, error
