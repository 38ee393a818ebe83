"""Example inputs: the tuple of positional arguments they stand for, and a short description
of them for error messages."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["describe", "example_tuple"]


def example_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as the tuple of positional arguments it stands for."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list) and all(
        isinstance(x, torch.Tensor) for x in example_inputs
    ):
        return tuple(example_inputs)
    return (example_inputs,)


def describe(x: Any) -> str:
    """``(2, 3) float32`` for a tensor; containers by their first few entries."""
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of {len(x)}: " + ", ".join(describe(v) for v in x[:3])
    if isinstance(x, dict):
        return "dict: " + ", ".join(f"{k}: {describe(v)}" for k, v in list(x.items())[:3])
    return type(x).__name__
