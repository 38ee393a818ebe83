"""``dpc_fx.compile``: the four passes, composed."""

from __future__ import annotations

import warnings
from typing import Any

from torch import fx, nn

from dpc_fx.config import DPCConfig
from dpc_fx.errors import ConfigError
from dpc_fx.meta import STATE, DPCState, layer_meta
from dpc_fx.passes import assign, capacity, rewrite, trace
from dpc_fx.passes._fx import layer_nodes
from dpc_fx.plan import Plan

__all__ = ["compile", "layers"]


def compile(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    config: DPCConfig | None = None,
    plan: Plan | None = None,
) -> fx.GraphModule:
    """Compile ``model`` for DPC low-precision training.

    Traces the model, measures each matmul-like layer, assigns it bit-widths and inserts
    quantisers for its weights, input activations and output gradient. The result trains
    like ``model``: same ``state_dict`` keys, same outputs' structure, any optimiser. It
    shares ``model``'s parameters (as ``torch.fx.symbolic_trace`` does); ``model`` itself is
    not modified.

    Args:
        model: the model to compile.
        example_inputs: a tensor or tuple of tensors shaped like one batch of the model's
            inputs. Optional: without it, capacity is measured in parameters and the cost
            model (which needs MACs) is unavailable.
        config: how to assign bits; defaults to ``DPCConfig()``.
        plan: a :class:`dpc_fx.Plan` to apply exactly instead of ``config``'s policy.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> gm = compile(model, torch.randn(4, 8))
    >>> [str(m.bits) for m in layers(gm)]
    ['fp/fp/fp', '6/6/8', 'fp/fp/fp']
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"dpc_fx.compile: model must be an nn.Module, got {type(model).__name__}."
        )
    config = DPCConfig() if config is None else config
    if not isinstance(config, DPCConfig):
        raise ConfigError(
            f"dpc_fx.compile: config must be a DPCConfig, got {type(config).__name__}; "
            "build one with dpc_fx.DPCConfig(b_min=..., b_max=...)."
        )
    if isinstance(getattr(model, STATE, None), DPCState):
        raise ConfigError(
            "dpc_fx.compile: this model is already compiled by dpc_fx; compile the original "
            "model again to get a new plan (quantisers are never stacked)."
        )
    gm = trace(model, leaf_modules=config.leaf_modules)
    gm = capacity(gm, example_inputs)
    gm = assign(gm, config, plan=plan)
    gm = rewrite(gm)
    if not any(m.bits is not None and not m.bits.full_precision for m in layers(gm)):
        warnings.warn(
            f"dpc_fx.compile: {type(model).__name__} has no layer to quantise "
            f"({len(layers(gm))} matmul-like layers, all kept in full precision); "
            "the compiled module computes exactly what the model does.",
            stacklevel=2,
        )
    return gm


def layers(gm: fx.GraphModule) -> list[Any]:
    """The :class:`~dpc_fx.meta.LayerMeta` of every matmul-like layer of ``gm``, in graph order."""
    return [layer_meta(node, needed_by="layers") for node in layer_nodes(gm)]
