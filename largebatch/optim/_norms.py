"""Shared by the layer-wise optimizers."""

import torch


def wide(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 tensors in float32 for norms; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
