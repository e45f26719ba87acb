"""What the scaling package measures with torch: the compute time of a zoo model on this machine,
its parameters and their shapes, and the gradient size of a trained run's final checkpoint.

The only module of the package that uses torch. torch and the model zoo are imported when one of
these functions runs, so predicting from given numbers starts without them.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from largebatch.errors import UsageError

__all__ = ["measure_compute", "count_parameters", "model_shapes", "checkpoint_facts"]

NOT_GRADIENTS = ("running_mean", "running_var", "num_batches_tracked")
"""Suffixes of the floating-point buffers in a state dict that are statistics, not parameters."""


def _zoo_model(flag: str, model_name: str):
    """``largebatch.models.create_model``, after checking that ``model_name`` is in the zoo."""
    from largebatch.models import available_models, create_model

    if model_name not in available_models():
        raise UsageError(f"{flag} {model_name!r} is not a model of the zoo: use one of "
                         f"{', '.join(available_models())}")
    return create_model


def measure_compute(model_name: str, micro_batch: int, image_size: int = 224, num_classes: int = 1000,
                    iterations: int = 3) -> tuple[float, int]:
    """(median seconds of forward+backward of one micro-batch, parameter count) for a model of the zoo,
    on this machine, after one warm-up iteration."""
    create_model = _zoo_model("--measure", model_name)
    import torch
    from torch.nn import functional as F

    try:
        model = create_model(model_name, num_classes, image_size=image_size)
    except ValueError as exc:
        raise UsageError(f"--measure {model_name} with --image-size {image_size}: {exc}") from None
    model.train()
    x = torch.randn(micro_batch, 3, image_size, image_size)
    y = torch.randint(0, num_classes, (micro_batch,))
    times = []
    for i in range(iterations + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        if i:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], sum(p.numel() for p in model.parameters())


def count_parameters(model_name: str) -> int:
    """Parameters of ``model_name`` from the zoo, for 1000 classes."""
    create_model = _zoo_model("--model", model_name)
    return sum(p.numel() for p in create_model(model_name, 1000).parameters())


def model_shapes(model_name: str, image_size: int = 224) -> list[list[tuple]]:
    """Shapes of the parameters of ``model_name`` from the zoo (1000 classes), in the optimizer's
    groups (biases and normalisation weights apart), built on the meta device."""
    create_model = _zoo_model("--model", model_name)
    import torch

    from largebatch.footprint import model_groups

    with torch.device("meta"):
        model = create_model(model_name, 1000, image_size=image_size)
    return model_groups(model)


def _final_state(run_dir: str) -> Optional[dict]:
    """The model's state dict in ``run_dir``'s ``checkpoints/final.pt``; None where the file is
    missing or unreadable."""
    path = os.path.join(run_dir, "checkpoints", "final.pt")
    if not os.path.isfile(path):
        return None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception:  # unreadable: what it would say must then be given or assumed
        return None


def checkpoint_facts(run_dir: str) -> tuple[Optional[float], Optional[bool]]:
    """What ``run_dir``'s ``checkpoints/final.pt`` says of its model, read once: (bytes of fp32
    gradient: its floating-point tensors but the BatchNorm statistics, x 4; whether it has BatchNorm
    layers: running statistics in its state); (None, None) where the file is missing or unreadable."""
    state = _final_state(run_dir)
    if state is None:
        return None, None
    gradient = float(sum(t.numel() * 4 for k, t in state.items()
                         if t.is_floating_point() and not k.endswith(NOT_GRADIENTS)))
    return gradient, any(k.endswith(("running_mean", "running_var")) for k in state)
