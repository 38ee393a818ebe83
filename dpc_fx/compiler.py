"""``dpc_fx.compile``: the four passes, composed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from dpc_fx.config import DPCConfig
from dpc_fx.errors import ConfigError, ShapeError, TraceError
from dpc_fx.fallback import (
    COVERAGE,
    SOURCE,
    Coverage,
    compile_parts,
    coverage_of,
    failing_modules,
    layer_coverage,
    quantised_macs,
)
from dpc_fx.meta import STATE, DPCState, layer_meta
from dpc_fx.passes._fx import attach, attached, keep_module_order, layer_nodes
from dpc_fx.passes.assign import assign
from dpc_fx.passes.capacity import capacity
from dpc_fx.passes.lower import lower
from dpc_fx.passes.rewrite import rewrite
from dpc_fx.passes.trace import MODE_BRANCH_REASON, MODE_BRANCHES, trace
from dpc_fx.plan import Plan

__all__ = ["compile", "coverage", "layers"]


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

    Submodules that torch.fx cannot trace (or whose traced graph does not run) are kept
    whole as *leaves* and their traceable children compiled, under one plan for the whole
    model (see :mod:`dpc_fx.fallback`); a warning names each leaf and :func:`coverage` lists
    them. When the model's own ``forward`` cannot be traced, the result is not a GraphModule
    but a copy of the model's class with compiled parts inside; :func:`layers`,
    :func:`dpc_fx.plan_of`, :func:`dpc_fx.cost` and :func:`dpc_fx.show` work on it alike.

    Compiling a module this function returned re-plans the model it was compiled from
    (quantisers are never stacked): ``compile(gm, config=other)`` is
    ``compile(model, config=other)``.

    Args:
        model: the model to compile.
        example_inputs: one batch of the model's inputs: a tensor, or a tuple with one entry
            per positional argument (each a tensor, or a list, tuple or dict of them:
            ``([img1, img2],)`` for a detection model). Optional: without it, capacity is
            measured in parameters and the cost model (which needs MACs) is unavailable.
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
    source = attached(model, SOURCE, (None,))[0]
    if isinstance(getattr(model, STATE, None), DPCState):
        if not isinstance(source, nn.Module):
            raise ConfigError(
                f"dpc_fx.compile: this {type(model).__name__} was compiled by dpc_fx, but it does "
                "not hold the model it was compiled from; compile the original model instead."
            )
        model = source  # re-plan the model it came from: quantisers are never stacked

    def finish(gm: fx.GraphModule) -> fx.GraphModule:
        lowered = gm.meta["dpc_config"].lower  # as assign resolved it (a plan's own config)
        gm = rewrite(gm)
        return lower(gm) if lowered else gm

    try:
        traced = trace(model, leaf_modules=config.leaf_modules, mode_branches="record")
        # Modules with layers whose own code follows train()/eval() are kept whole.
        branches = traced.meta[MODE_BRANCHES]
        measured = None if branches else capacity(traced, example_inputs)
    except TraceError:
        result = compile_parts(model, example_inputs, config, plan, finish)
    except ShapeError as e:
        if example_inputs is None:
            raise
        try:  # if the model runs on the inputs, its traced graph is at fault: keep it whole
            bad = failing_modules(traced, "", e)
            result = compile_parts(model, example_inputs, config, plan, finish, bad=bad)
        except ShapeError:
            raise e from e.__cause__
    else:
        if measured is None:
            # Submodules first: the model's own code may differ only through what they return.
            inner = {p: why for p, why in branches.items() if p}
            result = compile_parts(model, example_inputs, config, plan, finish, bad=inner)
        else:
            result = _compile_whole(model, measured, config, plan, finish)
    attach(result, SOURCE, (model,))  # in a tuple: never a submodule
    _warn(model, result)
    return result  # type: ignore[return-value]


def _compile_whole(
    model: nn.Module,
    measured: fx.GraphModule,
    config: DPCConfig,
    plan: Plan | None,
    finish: Callable[[fx.GraphModule], fx.GraphModule],
) -> fx.GraphModule:
    """The passes after capacity on a model traced whole, with its coverage attached."""
    assigned = assign(measured, config, plan=plan)
    result = finish(assigned)
    keep_module_order(result, model)
    macs = assigned.meta.get("dpc_macs")
    reached = layer_coverage(model, [("", assigned)])
    quantised = None if macs is None else quantised_macs(assigned)
    attach(result, COVERAGE, Coverage(True, *reached, macs, quantised))
    return result


def _warn(model: nn.Module, result: nn.Module) -> None:
    name = type(model).__name__
    found = coverage_of(result)
    for leaf in found.leaves if found else ():
        where = f"submodule '{leaf.path}'" if leaf.path else "its forward"
        share = "" if leaf.share is None else f" ({leaf.share:.1%} of the model's MACs)"
        if leaf.reason == MODE_BRANCH_REASON:
            message = (
                f"{where} ({leaf.module_type}) is kept whole: {leaf.reason}. Its own code runs "
                f"as it is, following train()/eval(), in full precision{share}; its children "
                "that the example inputs reach are compiled."
            )
        else:
            message = (
                f"torch.fx cannot trace {where} ({leaf.module_type}): {leaf.reason}. It runs as "
                f"it is, in full precision{share}; its traceable children that the example "
                "inputs reach are compiled. "
                "dpc_fx.coverage(compiled) lists every such leaf; to quantise more, make that "
                "code traceable."
            )
        warnings.warn(f"dpc_fx.compile: {name}: {message}", stacklevel=3)
    records = layers(result)
    if not any(m.bits is not None and not m.bits.full_precision for m in records):
        warnings.warn(
            f"dpc_fx.compile: {name} has no layer to quantise "
            f"({len(records)} matmul-like layers, all kept in full precision); "
            "the compiled module computes exactly what the model does.",
            stacklevel=3,
        )


def coverage(module: nn.Module) -> Coverage:
    """What :func:`compile` reached in ``module``: conv/linear layers quantised, share of
    MACs quantised, and the submodules kept whole because torch.fx could not trace them.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> print(coverage(compile(model, torch.randn(4, 8))))
    coverage: traced whole; 1/3 conv/linear layers quantised (3 compiled), 76.2% of MACs quantised
    """
    found = coverage_of(module)
    if found is None:
        raise ConfigError(
            f"coverage: this {type(module).__name__} was not compiled by dpc_fx.compile; "
            "pass the module compile returned."
        )
    return found


def layers(gm: nn.Module) -> list[Any]:
    """The :class:`~dpc_fx.meta.LayerMeta` of every matmul-like layer of ``gm``, in graph order
    (for a model compiled part by part: in the order of its parts, under their full paths)."""
    return [layer_meta(node, needed_by="layers") for node in layer_nodes(gm)]
