"""``dpc_fx.compile``: the pipeline, stage by stage.

split      parts.split       trace the model into parts (a model traced whole is one
                             part), measure each part's layers (passes.capacity)
decide     policy.decide     bits for every layer of the model, from the records alone
assign     passes.assign     write the bits onto each part's graph
rewrite    passes.rewrite    quantisers around every quantised layer
lower      passes.lower      optional: 8-bit linears on integer kernels
fuse       passes.fuse       optional (on by default): each quantised conv/linear layer as
                             one node that keeps integer codes for backward
assemble   parts.assemble    the compiled parts put back where their modules sat
record     meta.Compiled     the plan, the quantisers' places and the coverage, kept
                             with the result
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from torch import fx, nn

from dpc_fx import coverage as coverage_
from dpc_fx import native, parts
from dpc_fx.assemble import assemble
from dpc_fx.config import DPCConfig
from dpc_fx.errors import ConfigError
from dpc_fx.inputs import example_tuple
from dpc_fx.meta import (
    META_KEY,
    QUANTIZERS,
    Compiled,
    Coverage,
    DPCState,
    LayerMeta,
    attach_compiled,
    compiled,
    records,
)
from dpc_fx.passes._graph import join
from dpc_fx.passes.assign import assign
from dpc_fx.passes.fuse import fuse
from dpc_fx.passes.lower import lower
from dpc_fx.passes.rewrite import rewrite
from dpc_fx.passes.trace import MODE_BRANCH_REASON
from dpc_fx.plan import Plan
from dpc_fx.policy import decide

__all__ = ["compile", "coverage", "layers"]


def compile(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    config: DPCConfig | None = None,
    plan: Plan | None = None,
) -> nn.Module:
    """Compile ``model`` for DPC low-precision training.

    Traces the model, measures each matmul-like layer, assigns it bit-widths and inserts
    quantisers for its weights, input activations and output gradient. The result trains
    like ``model``: same outputs' structure, any optimiser, the model's ``state_dict`` keys
    plus the quantisers' state under ``dpc.`` (a plain model's ``state_dict`` loads into it
    with ``strict=True``; :func:`dpc_fx.model_state_dict` gives the plain one back). It
    shares ``model``'s parameters (as ``torch.fx.symbolic_trace`` does); ``model`` itself is
    not modified.

    What torch.fx cannot trace (or whose traced graph does not run on what its model hands
    it) is captured whole by ``torch.export``, specialised on the example inputs. Submodules
    that neither can read are kept whole as *leaves* and their traceable children compiled,
    under one plan for the whole model (see :mod:`dpc_fx.parts`); a warning names each leaf
    and :func:`coverage` lists them. The result is a ``torch.fx.GraphModule`` when the model's own ``forward`` traces,
    else a copy of the model's class with compiled parts inside; :func:`layers`,
    :func:`dpc_fx.plan_of`, :func:`dpc_fx.cost` and :func:`dpc_fx.show` work on both alike.

    Compiling a module this function returned re-plans the model it was compiled from
    (quantisers are never stacked): ``compile(gm, config=other)`` is
    ``compile(model, config=other)``.

    Args:
        model: the model to compile.
        example_inputs: one batch of the model's inputs: a tensor, or a tuple with one entry
            per positional argument (each a tensor, or a list, tuple or dict of them:
            ``([img1, img2],)`` for a detection model). Optional: without it (and without
            ``example_kwargs``), capacity is measured in parameters and the cost model
            (which needs MACs) is unavailable.
        example_kwargs: the model's keyword inputs, as it will be called:
            ``dict(input_ids=ids, attention_mask=mask, labels=labels)``. Tensors (also in
            lists, tuples and dicts) are inputs; ``None`` and plain values
            (``return_dict=False``) specialise the compiled module, which is then called
            with the same keywords.
        config: how to assign bits; defaults to ``DPCConfig()``.
        plan: a :class:`dpc_fx.Plan` to apply exactly instead of ``config``'s policy.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> gm = compile(model, torch.randn(4, 8))
    >>> [str(m.bits) for m in layers(gm)]
    ['fp/fp/fp', '6/6/8', 'fp/fp/fp']
    """
    model, config = _arguments(model, config)
    inputs = None if example_inputs is None else example_tuple(example_inputs)
    kwargs = _example_kwargs(model, inputs, example_kwargs)

    tree = parts.split(model, inputs, config, kwargs)
    decided = decide(tree.layers(), config, plan=plan, weights=tree.weights())
    assigned = {path: assign(gm, decided) for path, gm in tree.graphs().items()}
    done = {path: _rewrite(gm, decided.config) for path, gm in assigned.items()}
    result = assemble(tree, done)

    final = tree.layers(done)
    attach_compiled(
        result,
        Compiled(
            source=model,
            config=decided.config,
            layers=tuple(final),
            quantizers=tuple(_quantizers(done)[m.layer] for m in final),
            coverage=coverage_.measure(tree, assigned),
        ),
    )
    _warn(model, result)
    if final:  # the native loops and the layer operator, built (once a machine) before training
        native.layers()
    return result


def _arguments(model: Any, config: Any) -> tuple[nn.Module, DPCConfig]:
    """The model to compile (the source of an already compiled one) and the config."""
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
    found = compiled(model)
    if found is not None:  # re-plan the model it came from: quantisers are never stacked
        return found.source, config
    if any(isinstance(m, DPCState) for m in model.modules()):
        raise ConfigError(
            f"dpc_fx.compile: this {type(model).__name__} was compiled by dpc_fx, but it does "
            "not hold the model it was compiled from; compile the original model instead."
        )
    return model, config


def _example_kwargs(
    model: nn.Module, inputs: tuple[Any, ...] | None, example_kwargs: Any
) -> dict[str, Any]:
    """``example_kwargs`` checked against ``model.forward``'s parameters."""
    if example_kwargs is None:
        return {}
    name = type(model).__name__
    if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
        raise ConfigError(
            f"dpc_fx.compile: example_kwargs must be a dict of keyword arguments by name, got "
            f"{type(example_kwargs).__name__}; pass e.g. example_kwargs=dict(input_ids=ids)."
        )
    signature = inspect.signature(model.forward)
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in example_kwargs if k not in params]
        if unknown:
            raise ConfigError(
                f"dpc_fx.compile: example_kwargs names {unknown}, which {name}.forward does not "
                f"take (its parameters: {', '.join(params)}); use the names of its parameters."
            )
    try:
        signature.bind_partial(*(inputs or ()), **example_kwargs)
    except TypeError as e:
        raise ConfigError(
            f"dpc_fx.compile: example_inputs and example_kwargs do not fit {name}.forward{signature}: "
            f"{e}; give each argument once, positional ones in example_inputs."
        ) from e
    return dict(example_kwargs)


def _rewrite(gm: fx.GraphModule, config: DPCConfig) -> fx.GraphModule:
    gm = rewrite(gm)
    gm = lower(gm) if config.lower else gm
    return fuse(gm) if config.fuse else gm


def _quantizers(done: dict[str, fx.GraphModule]) -> dict[str, str | None]:
    """Per layer key, the path (in the assembled module) of what holds its quantisers."""
    out: dict[str, str | None] = {}
    for path, gm in done.items():
        held = getattr(gm, QUANTIZERS, None)
        for node in gm.graph.nodes:
            meta = node.meta.get(META_KEY)
            if not isinstance(meta, LayerMeta):
                continue
            target = str(node.target) if node.op == "call_module" else ""
            # A lowered or fused layer is a call of the module that holds its quantisers.
            inside = target.startswith(f"{QUANTIZERS}.")
            name = target.removeprefix(f"{QUANTIZERS}.") if inside else node.name
            has = held is not None and name in held._modules
            out[meta.layer] = join(path, f"{QUANTIZERS}.{name}") if has else None
    return out


def _warn(model: nn.Module, result: nn.Module) -> None:
    name = type(model).__name__
    found = coverage(result)
    for leaf in found.leaves:
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
    found_layers = layers(result)
    if not any(m.quantised for m in found_layers):
        warnings.warn(
            f"dpc_fx.compile: {name} has no layer to quantise "
            f"({len(found_layers)} matmul-like layers, all kept in full precision); "
            "the compiled module computes exactly what the model does.",
            stacklevel=3,
        )


def coverage(module: nn.Module) -> Coverage:
    """What :func:`compile` reached in ``module``: matmul-like layers quantised, share of
    MACs quantised, and the submodules kept whole because torch.fx could not trace them.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> print(coverage(compile(model, torch.randn(4, 8))))
    coverage: traced whole; 1/3 matmul-like layers quantised (3 compiled), 76.2% of MACs quantised
    """
    found = compiled(module)
    if found is None:
        raise ConfigError(
            f"coverage: this {type(module).__name__} was not compiled by dpc_fx.compile; "
            "pass the module compile returned."
        )
    return found.coverage


def layers(module: nn.Module) -> list[LayerMeta]:
    """The :class:`~dpc_fx.meta.LayerMeta` of every matmul-like layer of ``module`` (a
    compiled module, or a GraphModule the passes annotated), in graph order (for a model
    compiled part by part: in the order of its parts, under their full paths)."""
    return records(module)
