"""Graph helpers the passes share: copying a GraphModule, keeping a model's unused state and
module order, the networkx view, and module paths.

Which nodes are matmul-like, and which operand is the weight, is :mod:`._matmul`'s concern.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
from torch import fx, nn

from dpc_fx.errors import PassOrderError
from dpc_fx.meta import META_KEY, LayerMeta
from dpc_fx.passes._matmul import matmul_spec

__all__ = [
    "copy_graph_module",
    "get_attr",
    "join",
    "keep_module_order",
    "keep_unused",
    "layer_nodes",
    "module_path",
    "require_graph",
    "to_digraph",
]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its submodules and parameters.

    Node metadata is copied one level deep, so a pass may replace ``meta["dpc"]`` on the copy
    without touching ``gm``.
    """
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)  # a captured graph's inputs and outputs are pytrees
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


def join(a: str, b: str) -> str:
    """Two module paths joined (``""`` is the model itself)."""
    return f"{a}.{b}" if a and b else a or b


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of ``gm`` that carry a :class:`~dpc_fx.meta.LayerMeta`, in graph order."""
    return [node for node in gm.graph.nodes if isinstance(node.meta.get(META_KEY), LayerMeta)]


def module_path(n: fx.Node) -> str:
    """The path of the module whose code made node ``n`` (``""``: the model's own code)."""
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return str(path[0] if isinstance(path, tuple) else path)
