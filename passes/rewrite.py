"""Pass 4, rewrite: insert quantisers around every layer that has bit-widths.

Reads: ``meta["dpc"]`` with ``bits`` (from :func:`~dpc_fx.passes.assign`). Writes: a new
GraphModule in which each quantised layer reads a fake-quantised activation and weight and
passes its output through a gradient quantiser. Module calls (``nn.Conv2d``, ``nn.Linear``,
...) become the equivalent functional call on the module's own parameters, so the weight is
a graph value that can be quantised; ``state_dict`` keys do not change. Full-precision
layers are copied as they are.

Quantisers are submodules under ``gm.dpc.<node name>`` (``act_q``, ``weight_q``,
``grad_q``), so their ``bits`` can be changed between steps without re-tracing. Each role
is inserted only when its bits are active (not ``None``/32). Attention
(``F.scaled_dot_product_attention`` or its ATen form) has no weight: its query, key and
value are quantised per tensor as activations (``query_q``, ``key_q``, ``value_q``, at the
layer's activation bits), its output gradient by ``grad_q``, and the kernel itself is
PyTorch's (flash, memory-efficient or math, as it chooses).

Before::

    conv1 = self.conv1(x)

After::

    conv1_weight   = self.conv1.weight
    conv1_bias     = self.conv1.bias
    conv1_act_q    = self.dpc.conv1.act_q(x)                 # per tensor, running range
    conv1_weight_q = self.dpc.conv1.weight_q(conv1_weight)   # per output channel
    conv1          = torch.conv2d(conv1_act_q, conv1_weight_q, conv1_bias, (2, 2), (3, 3), ...)
    conv1_grad_q   = self.dpc.conv1.grad_q(conv1)            # quantises d(loss)/d(conv1)

Invariant: with every quantiser's ``bits`` set to ``None`` the new module computes exactly
what ``gm`` computes, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from dpc_fx.errors import ConfigError, DPCError
from dpc_fx.int8 import lowerable
from dpc_fx.meta import META_KEY, QUANTIZERS, DPCState, LayerMeta, graph_info, layer_meta
from dpc_fx.passes._graph import get_attr, keep_module_order, keep_unused, require_graph
from dpc_fx.passes._matmul import MatmulSpec, Operand, matmul_spec, weight_source
from dpc_fx.quant import ActQuantizer, GradQuantizer, Quantizer, WeightQuantizer, is_active

__all__ = ["rewrite"]


_FUNCTIONAL = {
    "linear": F.linear,
    "conv1d": F.conv1d,
    "conv2d": F.conv2d,
    "conv3d": F.conv3d,
    "conv_transpose1d": F.conv_transpose1d,
    "conv_transpose2d": F.conv_transpose2d,
    "conv_transpose3d": F.conv_transpose3d,
}

_PROVENANCE = ("stack_trace", "nn_module_stack", "source_fn_stack")


def rewrite(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with quantise/dequantise nodes around ``gm``'s quantised layers.

    Raises:
        PassOrderError: a layer has no bit-widths (run the assign pass first).
    """
    require_graph(gm, "rewrite")
    clash = getattr(gm, QUANTIZERS, None)
    if clash is not None and not isinstance(clash, DPCState):
        raise ConfigError(
            f"rewrite: the model has its own attribute '{QUANTIZERS}' ({type(clash).__name__}), "
            f"where dpc_fx keeps the quantisers; rename that attribute of the model to compile it."
        )
    graph = fx.Graph()
    # A captured graph (torch.export) flattens its inputs and outputs with pytree code of
    # its own: keep it, so the new module is called and returns as the old one does.
    graph.set_codegen(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    quantizers = DPCState()
    converted: dict[str, nn.Module] = {}

    for node in gm.graph.nodes:
        meta = layer_meta(node, needed_by="rewrite", bits=True) if META_KEY in node.meta else None
        if meta is None or meta.bits is None or meta.bits.full_precision:
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        held = nn.Module()
        quantizers.add_module(node.name, held)
        env[node] = _quantize_layer(graph, env, gm, node, meta, held, converted)

    roots: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            if target.startswith(QUANTIZERS + "."):
                roots[target] = quantizers.get_submodule(target.removeprefix(QUANTIZERS + "."))
            else:
                roots[target] = get_attr(gm, target)
    new = fx.GraphModule(roots, graph, gm.__class__.__name__)
    for path, module in converted.items():
        new.set_submodule(path, module, strict=False)  # keep the module object, not a stub
    keep_unused(new, gm)
    keep_module_order(new, gm)
    new.add_module(QUANTIZERS, quantizers)
    new.meta = dict(getattr(gm, "meta", {}))
    new.training = gm.training
    quantizers.train(gm.training)
    new.graph.lint()  # its code was generated when the graph was set, complete
    return new


def _quantize_layer(
    graph: fx.Graph,
    env: dict[fx.Node, fx.Node],
    gm: fx.GraphModule,
    node: fx.Node,
    meta: LayerMeta,
    held: nn.Module,
    converted: dict[str, nn.Module],
) -> fx.Node:
    spec = matmul_spec(node, gm)
    assert spec is not None and meta.bits is not None
    prefix = f"{QUANTIZERS}.{node.name}"
    provenance = {k: node.meta[k] for k in _PROVENANCE if k in node.meta}

    config = graph_info(gm).config

    def add(role: str, module: Quantizer, value: fx.Node) -> fx.Node:
        module.layer = meta.layer
        module.check_finite = bool(config and config.check_finite)
        held.add_module(role, module)
        q = graph.create_node(
            "call_module", f"{prefix}.{role}", (value,), name=f"{node.name}_{role}"
        )
        q.meta.update(provenance)
        return q

    args = fx.map_arg(node.args, env.__getitem__)
    kwargs = fx.map_arg(node.kwargs, env.__getitem__)
    if spec.module is not None:
        target, args, kwargs = _functional_call(graph, node, meta.op, spec.module, args, kwargs)
        converted[str(node.target)] = spec.module
        weight_dim: int | None = spec.channel_dim
    else:
        target = node.target
        from_param = weight_source(node, spec) is not None
        weight_dim = spec.channel_dim if from_param else None
    if lowerable(meta, config):
        weight_dim = None  # integer kernels need one weight scale (see passes/lower.py)

    for operand in spec.acts:
        act = operand.get(args, kwargs)
        if is_active(meta.bits.a) and isinstance(act, fx.Node):
            q = add(_act_role(spec, operand), ActQuantizer(meta.bits.a), act)
            args, kwargs = operand.put(args, kwargs, q)
    weight = None if spec.weight is None else spec.weight.get(args, kwargs)
    if spec.weight is not None and is_active(meta.bits.w) and isinstance(weight, fx.Node):
        q = add("weight_q", WeightQuantizer(meta.bits.w, weight_dim), weight)
        args, kwargs = spec.weight.put(args, kwargs, q)

    out = graph.create_node(
        "call_function" if spec.module is not None else node.op,
        target,
        args,
        kwargs,
        name=node.name,
    )
    out.meta = dict(node.meta)
    if is_active(meta.bits.g):
        out = add("grad_q", GradQuantizer(meta.bits.g), out)
    return out


def _act_role(spec: MatmulSpec, operand: Operand) -> str:
    """The quantiser's name for an activation operand: ``act_q`` for a layer's one input;
    by the argument's name for several (attention's ``query_q``, ``key_q``, ``value_q``)."""
    if len(spec.acts) == 1:
        return "act_q"
    return f"{operand.keyword}_q" if operand.keyword else f"act{spec.acts.index(operand)}_q"


def _functional_call(
    graph: fx.Graph,
    node: fx.Node,
    op: str,
    mod: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The functional call a conv/linear module makes, with its parameters as graph values."""
    path = str(node.target)
    x = Operand(0, "input").get(args, kwargs)
    if len(args) + len(kwargs) != 1:
        raise DPCError(
            f"rewrite: module '{path}' ({type(mod).__name__}) is called with extra arguments "
            f"{list(kwargs) or len(args) - 1}; dpc_fx rewrites only calls on the input alone. "
            "For ConvTranspose, set output_padding on the module instead of passing output_size."
        )
    weight = graph.get_attr(f"{path}.weight")
    bias = graph.get_attr(f"{path}.bias") if getattr(mod, "bias", None) is not None else None
    fn = _FUNCTIONAL[op]
    if isinstance(mod, nn.Linear):
        return fn, (x, weight, bias), {}
    assert isinstance(mod, nn.modules.conv._ConvNd), type(mod)
    if mod.transposed:
        return (
            fn,
            (
                x,
                weight,
                bias,
                mod.stride,
                mod.padding,
                mod.output_padding,
                mod.groups,
                mod.dilation,
            ),
            {},
        )
    padding: Any = mod.padding
    if mod.padding_mode != "zeros":
        x = graph.call_function(
            F.pad, (x, mod._reversed_padding_repeated_twice), {"mode": mod.padding_mode}
        )
        padding = 0
    return fn, (x, weight, bias, mod.stride, padding, mod.dilation, mod.groups), {}
