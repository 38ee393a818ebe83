"""Graph helpers the passes share: copying a GraphModule, the networkx view, and which
nodes are matmul-like (and which of their operands is the activation and which the weight).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from dpc_fx.errors import PassOrderError
from dpc_fx.meta import META_KEY, STATE, DPCState

__all__ = [
    "LEAVES",
    "MatmulSpec",
    "attach",
    "attached",
    "copy_graph_module",
    "get_attr",
    "join",
    "keep_module_order",
    "keep_unused",
    "layer_nodes",
    "matmul_spec",
    "parameter_source",
    "require_graph",
    "to_digraph",
    "weight_name",
]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its submodules and parameters.

    Node metadata is copied one level deep, so a pass may replace ``meta["dpc"]`` on the copy
    without touching ``gm``.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph, gm.__class__.__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    keep_unused(new, gm)
    return new


def keep_unused(dst: nn.Module, src: nn.Module) -> None:
    """Give ``dst`` the submodules, parameters and buffers of ``src`` that it lacks.

    ``fx.GraphModule`` keeps only what its graph reads; a model's unused parts (a spare head,
    a buffer read only in another mode) would drop out of ``state_dict``, and checkpoints
    would no longer load either way.
    """
    for name, child in src._modules.items():
        mine = dst._modules.get(name)
        if mine is None and child is not None:
            dst.add_module(name, child)
        elif mine is not None and child is not None and mine is not child:
            keep_unused(mine, child)
    for name, param in src._parameters.items():
        if name not in dst._parameters and not hasattr(dst, name):
            dst.register_parameter(name, param)
    for name, buf in src._buffers.items():
        if name not in dst._buffers and not hasattr(dst, name):
            dst.register_buffer(name, buf, persistent=name not in src._non_persistent_buffers_set)


def keep_module_order(gm: nn.Module, model: nn.Module) -> None:
    """Order ``gm``'s submodules as in ``model`` (FX adds them in order of first use), so
    ``state_dict`` keys come in the model's order."""
    for name, module in list(gm.named_modules()):
        try:
            order = list(model.get_submodule(name)._modules)
        except AttributeError:
            continue
        rank = {key: i for i, key in enumerate(order)}
        module._modules = dict(
            sorted(module._modules.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        )


def require_graph(gm: object, needed_by: str) -> None:
    """A :class:`PassOrderError` unless ``gm`` is a GraphModule whose layers were measured."""
    if not isinstance(gm, fx.GraphModule):
        raise PassOrderError(
            f"{needed_by}: expected a torch.fx.GraphModule, got {type(gm).__name__}; "
            "run dpc_fx.passes.trace on the model first."
        )
    for node in gm.graph.nodes:
        if META_KEY not in node.meta and matmul_spec(node, gm) is not None:
            raise PassOrderError(
                f"{needed_by}: node '{node.name}' has no meta['{META_KEY}']; "
                "run dpc_fx.passes.capacity on the graph first."
            )


def to_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph of ``gm`` as a networkx DiGraph keyed by node name.

    Each node has attributes ``op`` (the FX opcode) and ``layer`` (True for matmul-like
    nodes).
    """
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, layer=matmul_spec(node, gm) is not None)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def get_attr(gm: nn.Module, target: fx.Node | str) -> Any:
    """The object a ``get_attr`` node (or a dotted target) refers to in ``gm``."""
    obj: Any = gm
    for part in str(target.target if isinstance(target, fx.Node) else target).split("."):
        obj = getattr(obj, part)
    return obj


LEAVES = "_dpc_leaves"  # set by dpc_fx.fallback on modules holding compiled parts in leaves


def attach(module: nn.Module, key: str, value: Any) -> None:
    """Keep ``value`` with ``module`` across ``copy.deepcopy`` and ``torch.save``, as a plain
    attribute (never a submodule, so ``state_dict`` keys do not change). A GraphModule's
    deepcopy keeps only its ``meta`` of such attributes, and ``torch.load`` all but its
    ``meta``: it gets both."""
    module.__dict__[key] = value
    if isinstance(module, fx.GraphModule):
        module.meta[key] = value


def attached(module: nn.Module, key: str, default: Any = None) -> Any:
    """What :func:`attach` kept with ``module`` under ``key``, else ``default``."""
    meta = module.__dict__.get("meta")
    if isinstance(module, fx.GraphModule) and isinstance(meta, dict) and key in meta:
        return meta[key]
    return module.__dict__.get(key, default)


def layer_nodes(gm: nn.Module) -> list[fx.Node]:
    """The nodes of ``gm`` that carry ``meta["dpc"]``, in graph order.

    A compiled module loaded with ``torch.load`` has a graph rebuilt from code, without node
    metadata; its records are then restored from its ``DPCState``, matched to the
    matmul-like nodes in order (the code is the same, so the order is too).

    A module compiled part by part (:mod:`dpc_fx.fallback`) has parts inside untraceable
    leaves: their nodes come where the leaf is called, or in the leaf's child order.
    """
    leaves = attached(gm, LEAVES)
    if leaves is None:
        return _own_layer_nodes(gm) if isinstance(gm, fx.GraphModule) else []
    if not isinstance(gm, fx.GraphModule):
        return [node for child in gm.children() for node in layer_nodes(child)]
    own = _own_layer_nodes(gm)
    if not leaves:
        return own
    mine = set(own)
    out = []
    for node in gm.graph.nodes:
        if node in mine:
            out.append(node)
        elif node.op == "call_module" and node.target in leaves:
            out.extend(layer_nodes(gm.get_submodule(str(node.target))))
    return out


def _own_layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    nodes = [node for node in gm.graph.nodes if META_KEY in node.meta]
    state = getattr(gm, STATE, None)
    if nodes or not isinstance(state, DPCState) or not state.records:
        return nodes
    candidates = [node for node in gm.graph.nodes if matmul_spec(node, gm) is not None]
    if len(candidates) != len(state.records):
        return nodes
    for node, record in zip(candidates, state.records, strict=True):
        node.meta[META_KEY] = record
    return candidates


@dataclass(frozen=True)
class Operand:
    """Where an operand sits in a call: a position, the keyword it may be passed by, and for
    list arguments (``torch.einsum(eq, [a, b])``) the item in the list."""

    index: int
    keyword: str | None
    item: int | None = None

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The operand in a call's ``args``/``kwargs`` (e.g. ``node.args, node.kwargs``)."""
        if self.keyword is not None and self.keyword in kwargs:
            value = kwargs[self.keyword]
        else:
            value = args[self.index] if self.index < len(args) else None
        return value if self.item is None else value[self.item]  # type: ignore[index]

    def put(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` with this operand replaced by ``value``."""
        if self.keyword is not None and self.keyword in kwargs:
            return args, {**kwargs, self.keyword: _put_item(kwargs[self.keyword], self.item, value)}
        new = list(args)
        new[self.index] = _put_item(new[self.index], self.item, value)
        return tuple(new), kwargs


def _put_item(container: Any, item: int | None, value: Any) -> Any:
    if item is None:
        return value
    items = list(container)
    items[item] = value
    return type(container)(items)


@dataclass(frozen=True)
class MatmulSpec:
    """How to quantise one matmul-like node.

    Attributes:
        op: short name (``"conv2d"``, ``"linear"``, ``"matmul"``, ...).
        act: the operand quantised as an activation (per tensor).
        weight: the operand quantised as a weight.
        channel_dim: output-channel dimension of the weight operand when it is a parameter.
        module: the module for ``call_module`` nodes.
    """

    op: str
    act: Operand
    weight: Operand
    channel_dim: int | None
    module: nn.Module | None = None


_X, _W = Operand(0, "input"), Operand(1, "weight")

_FUNCTIONS: dict[Callable[..., Any], MatmulSpec] = {
    F.linear: MatmulSpec("linear", _X, _W, 0),
    F.conv1d: MatmulSpec("conv1d", _X, _W, 0),
    F.conv2d: MatmulSpec("conv2d", _X, _W, 0),
    F.conv3d: MatmulSpec("conv3d", _X, _W, 0),
    F.conv_transpose1d: MatmulSpec("conv_transpose1d", _X, _W, 1),
    F.conv_transpose2d: MatmulSpec("conv_transpose2d", _X, _W, 1),
    F.conv_transpose3d: MatmulSpec("conv_transpose3d", _X, _W, 1),
    torch.matmul: MatmulSpec("matmul", _X, Operand(1, "other"), -1),
    operator.matmul: MatmulSpec("matmul", Operand(0, None), Operand(1, None), -1),
    torch.mm: MatmulSpec("mm", _X, Operand(1, "mat2"), -1),
    torch.bmm: MatmulSpec("bmm", _X, Operand(1, "mat2"), -1),
    torch.addmm: MatmulSpec("addmm", Operand(1, "mat1"), Operand(2, "mat2"), -1),
}

_METHODS: dict[str, MatmulSpec] = {
    "matmul": MatmulSpec("matmul", Operand(0, None), Operand(1, "other"), -1),
    "mm": MatmulSpec("mm", Operand(0, None), Operand(1, "mat2"), -1),
    "bmm": MatmulSpec("bmm", Operand(0, None), Operand(1, "mat2"), -1),
    "addmm": MatmulSpec("addmm", Operand(1, "mat1"), Operand(2, "mat2"), -1),
    "__matmul__": MatmulSpec("matmul", Operand(0, None), Operand(1, None), -1),
}

# Modules whose forward is exactly one functional call on (input, self.weight, self.bias).
MODULES: dict[type[nn.Module], tuple[str, int]] = {
    nn.Linear: ("linear", 0),
    nn.Conv1d: ("conv1d", 0),
    nn.Conv2d: ("conv2d", 0),
    nn.Conv3d: ("conv3d", 0),
    nn.ConvTranspose1d: ("conv_transpose1d", 1),
    nn.ConvTranspose2d: ("conv_transpose2d", 1),
    nn.ConvTranspose3d: ("conv_transpose3d", 1),
}


def _module_kind(mod: nn.Module) -> tuple[str, int] | None:
    from dpc_fx.int8 import Int8Linear  # a lowered linear (passes/lower.py)

    if isinstance(mod, Int8Linear):
        return ("linear", 0)
    for cls, kind in MODULES.items():
        # A subclass that overrides forward computes something else: do not rewrite it.
        if isinstance(mod, cls) and type(mod).forward is cls.forward:
            return kind
    return None


def matmul_spec(node: fx.Node, gm: fx.GraphModule) -> MatmulSpec | None:
    """How to quantise ``node``, or ``None`` when it is not matmul-like."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        kind = _module_kind(mod)
        if kind is None:
            return None
        return MatmulSpec(kind[0], Operand(0, "input"), _W, kind[1], module=mod)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op != "call_function":
        return None
    if node.target is torch.einsum:
        return _einsum_spec(node)
    try:
        return _FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    except TypeError:  # unhashable target
        return None


def _einsum_spec(node: fx.Node) -> MatmulSpec | None:
    """A two-operand einsum is a (batched) matmul; other einsums are left alone."""
    operands = node.args[1:]
    channel = _einsum_channel(node.args[0]) if node.args else None
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        if len(operands[0]) != 2:
            return None
        return MatmulSpec("einsum", Operand(1, None, 0), Operand(1, None, 1), channel)
    if len(operands) != 2:
        return None
    return MatmulSpec("einsum", Operand(1, None), Operand(2, None), channel)


def _einsum_channel(equation: Any) -> int | None:
    """The second operand's output-channel dimension in an explicit two-operand equation:
    its one index that the output keeps and the first operand lacks (``k`` in
    ``"bij,jk->bik"``: dimension 1); ``None`` where there is not exactly one."""
    if not isinstance(equation, str):
        return None
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    first, second = terms
    own = [i for i, c in enumerate(second) if c in out and c not in first]
    return own[0] if len(own) == 1 else None


_VIEW_METHODS = frozenset(
    {
        "t",
        "transpose",
        "permute",
        "view",
        "reshape",
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "flatten",
        "contiguous",
        "to",
        "float",
        "half",
        "bfloat16",
        "double",
    }
)
_VIEW_FUNCTIONS = frozenset(
    {
        torch.t,
        torch.transpose,
        torch.permute,
        torch.reshape,
        torch.unsqueeze,
        torch.squeeze,
        torch.flatten,
    }
)


def join(a: str, b: str) -> str:
    """Two module paths joined (``""`` is the model itself)."""
    return f"{a}.{b}" if a and b else a or b


def weight_name(target: str) -> tuple[str, bool]:
    """What a layer reading the parameter at ``target`` is called, and whether that is a
    weight's own name: the owning module's path for ``"fc.weight"``, the weight's for a
    packed one (``"attn.in_proj_weight"`` -> ``"attn.in_proj"``); the owner's path, not a
    weight's name, for other parameters (``"block.w"``)."""
    owner, _, attr = target.rpartition(".")
    if attr == "weight":
        return owner, True
    if attr.endswith("_weight"):
        return join(owner, attr.removesuffix("_weight")), True
    return owner, False


def parameter_source(node: fx.Node, hops: int = 6) -> fx.Node | None:
    """The ``get_attr`` node ``node`` is read from, through up to ``hops`` view-like ops
    (``w.t()``, ``w.unsqueeze(0).expand(n, -1, -1)``) or one-input ops, or ``None`` when
    ``node`` is computed from activations."""
    for _ in range(hops + 1):
        if node.op == "get_attr":
            return node
        view = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
            node.op == "call_function" and node.target in _VIEW_FUNCTIONS
        )
        first = node.args[0] if node.args else None
        if view and isinstance(first, fx.Node):
            node = first
        elif len(node.all_input_nodes) == 1 and node.op in ("call_method", "call_function"):
            node = node.all_input_nodes[0]
        else:
            return None
    return None
