"""Example inputs: the tuple of positional arguments they stand for, and a short description
of them for error messages."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx
from torch.fx._pytree import tree_flatten_spec
from torch.fx.graph import _PyTreeCodeGen

__all__ = ["describe", "example_tuple", "graph_inputs"]


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


def graph_inputs(
    gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """The values of ``gm``'s placeholders, in order, for the call ``gm(*args, **kwargs)``:
    flattened as the graph's input pytree says for a captured graph, else bound to its
    ``forward``'s parameters (defaults filled in).

    Raises:
        TypeError: the call does not fit ``gm``'s signature.
    """
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        spec = codegen.pytree_info.in_spec
        return tuple(tree_flatten_spec((args, kwargs), spec))
    if not kwargs:
        return args
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.args)
