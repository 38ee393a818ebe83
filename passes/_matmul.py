"""Which graph nodes are matmul-like, which of their operands are activations and which
the weight, and what each layer is called.

A layer is a module call (``nn.Linear``, ``nn.Conv*``, ``nn.ConvTranspose*`` whose forward is
torch's own), a functional call (``F.linear``, ``F.conv*``), a matrix product (``@``,
``torch.matmul/mm/bmm/addmm`` and their methods), a two-operand ``einsum``, or attention
(``F.scaled_dot_product_attention``: two products, of query and key and of the scores and
value, with no weight). Graphs captured by ``torch.export`` hold the same ops in their ATen
forms (``aten.linear.default``, ``aten.conv2d.default``, ``aten.convolution.default``,
``aten.matmul.default``, ``aten.scaled_dot_product_attention.default``, ...): those are
layers too.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from dpc_fx.meta import ATTENTION
from dpc_fx.sdpa import attention

__all__ = [
    "MODULES",
    "MatmulSpec",
    "Operand",
    "layer_names",
    "layer_weight",
    "matmul_spec",
    "parameter_source",
    "weight_name",
    "weight_source",
]


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
        op: short name (``"conv2d"``, ``"linear"``, ``"matmul"``, ``"attention"``, ...).
        acts: the operands quantised as activations (per tensor, running range): one for a
            conv, linear or matrix product; query, key and value for attention.
        weight: the operand quantised as a weight (per output channel when it is read from
            a parameter, else per tensor), or ``None`` for a layer without one (attention).
        channel_dim: output-channel dimension of the weight operand when it is a parameter.
        module: the module for ``call_module`` nodes.
    """

    op: str
    acts: tuple[Operand, ...]
    weight: Operand | None
    channel_dim: int | None
    module: nn.Module | None = None


_X, _W = Operand(0, "input"), Operand(1, "weight")

_FUNCTIONS: dict[Callable[..., Any], MatmulSpec] = {
    F.linear: MatmulSpec("linear", (_X,), _W, 0),
    F.conv1d: MatmulSpec("conv1d", (_X,), _W, 0),
    F.conv2d: MatmulSpec("conv2d", (_X,), _W, 0),
    F.conv3d: MatmulSpec("conv3d", (_X,), _W, 0),
    F.conv_transpose1d: MatmulSpec("conv_transpose1d", (_X,), _W, 1),
    F.conv_transpose2d: MatmulSpec("conv_transpose2d", (_X,), _W, 1),
    F.conv_transpose3d: MatmulSpec("conv_transpose3d", (_X,), _W, 1),
    torch.matmul: MatmulSpec("matmul", (_X,), Operand(1, "other"), -1),
    operator.matmul: MatmulSpec("matmul", (Operand(0, None),), Operand(1, None), -1),
    torch.mm: MatmulSpec("mm", (_X,), Operand(1, "mat2"), -1),
    torch.bmm: MatmulSpec("bmm", (_X,), Operand(1, "mat2"), -1),
    torch.addmm: MatmulSpec("addmm", (Operand(1, "mat1"),), Operand(2, "mat2"), -1),
}

# F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, ...):
# two products of activations, query @ key^T and softmax(scores) @ value, no weight.
_ATTENTION = MatmulSpec(
    ATTENTION, (Operand(0, "query"), Operand(1, "key"), Operand(2, "value")), None, None
)
_FUNCTIONS[F.scaled_dot_product_attention] = _ATTENTION
_FUNCTIONS[attention] = _ATTENTION  # the captured form, where a mask may be the causal one


def _aten_functions() -> dict[Any, MatmulSpec]:
    """The ATen forms of the functional layers, as ``torch.export`` captures them: each
    op's overload packet and its overloads (``aten.linear``, ``aten.linear.default``).
    ATen names the first operand ``self`` where the Python function says ``input``."""
    aten = torch.ops.aten
    self_ = Operand(0, "self")
    table: dict[str, MatmulSpec] = {
        "linear": MatmulSpec("linear", (_X,), _W, 0),
        "conv1d": MatmulSpec("conv1d", (_X,), _W, 0),
        "conv2d": MatmulSpec("conv2d", (_X,), _W, 0),
        "conv3d": MatmulSpec("conv3d", (_X,), _W, 0),
        "conv_transpose1d": MatmulSpec("conv_transpose1d", (_X,), _W, 1),
        "conv_transpose2d": MatmulSpec("conv_transpose2d", (_X,), _W, 1),
        "conv_transpose3d": MatmulSpec("conv_transpose3d", (_X,), _W, 1),
        "matmul": MatmulSpec("matmul", (self_,), Operand(1, "other"), -1),
        "mm": MatmulSpec("mm", (self_,), Operand(1, "mat2"), -1),
        "bmm": MatmulSpec("bmm", (self_,), Operand(1, "mat2"), -1),
        "addmm": MatmulSpec("addmm", (Operand(1, "mat1"),), Operand(2, "mat2"), -1),
        "scaled_dot_product_attention": _ATTENTION,
    }
    out: dict[Any, MatmulSpec] = {}
    for name, spec in table.items():
        packet = getattr(aten, name)
        out[packet] = spec
        for overload in packet.overloads():
            out[getattr(packet, overload)] = spec
    return out


_FUNCTIONS.update(_aten_functions())
_EINSUMS = frozenset({torch.einsum, torch.ops.aten.einsum, torch.ops.aten.einsum.default})
_CONVOLUTIONS = frozenset({torch.ops.aten.convolution, torch.ops.aten.convolution.default})

_METHODS: dict[str, MatmulSpec] = {
    "matmul": MatmulSpec("matmul", (Operand(0, None),), Operand(1, "other"), -1),
    "mm": MatmulSpec("mm", (Operand(0, None),), Operand(1, "mat2"), -1),
    "bmm": MatmulSpec("bmm", (Operand(0, None),), Operand(1, "mat2"), -1),
    "addmm": MatmulSpec("addmm", (Operand(1, "mat1"),), Operand(2, "mat2"), -1),
    "__matmul__": MatmulSpec("matmul", (Operand(0, None),), Operand(1, None), -1),
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
        return MatmulSpec(kind[0], (Operand(0, "input"),), _W, kind[1], module=mod)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op != "call_function":
        return None
    try:
        if node.target in _EINSUMS:
            return _einsum_spec(node)
        if node.target in _CONVOLUTIONS:
            return _convolution_spec(node)
        return _FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    except TypeError:  # unhashable target
        return None


def _convolution_spec(node: fx.Node) -> MatmulSpec:
    """``aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups)``, what every conv decomposes to: a transposed one keeps its
    output channels in the weight's dimension 1."""
    transposed = Operand(6, "transposed").get(node.args, node.kwargs)
    return MatmulSpec("convolution", (_X,), _W, 1 if transposed else 0)


def _einsum_spec(node: fx.Node) -> MatmulSpec | None:
    """A two-operand einsum is a (batched) matmul; other einsums are left alone. ATen's form
    takes the operands as a list (``aten.einsum(equation, [a, b])``), as ``torch.einsum``
    may."""
    operands = node.args[1:2] if node.target is not torch.einsum else node.args[1:]
    channel = _einsum_channel(node.args[0]) if node.args else None
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        if len(operands[0]) != 2:
            return None
        return MatmulSpec("einsum", (Operand(1, None, 0),), Operand(1, None, 1), channel)
    if len(operands) != 2:
        return None
    return MatmulSpec("einsum", (Operand(1, None),), Operand(2, None), channel)


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


def weight_name(target: str) -> tuple[str, bool]:
    """What a layer reading the parameter at ``target`` is called, and whether that is a
    weight's own name: the owning module's path for ``"fc.weight"``, the weight's for a
    packed one (``"attn.in_proj_weight"`` -> ``"attn.in_proj"``); the owner's path, not a
    weight's name, for other parameters (``"block.w"``)."""
    owner, _, attr = target.rpartition(".")
    if attr == "weight":
        return owner, True
    if attr.endswith("_weight"):
        return _join(owner, attr.removesuffix("_weight")), True
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


def weight_source(node: fx.Node, spec: MatmulSpec) -> fx.Node | None:
    """The ``get_attr`` node a functional layer's weight operand is read from, or ``None``
    (no weight operand, or one computed from activations)."""
    if spec.weight is None:
        return None
    operand = spec.weight.get(node.args, node.kwargs)
    return parameter_source(operand) if isinstance(operand, fx.Node) else None


def layer_weight(node: fx.Node, gm: fx.GraphModule) -> tuple[torch.Tensor, int | None] | None:
    """The parameter a layer node quantises as its weight, with its output-channel
    dimension (``None``: per tensor); ``None`` for a product of two activations."""
    spec = matmul_spec(node, gm)
    if spec is None:
        return None
    if spec.module is not None:
        weight = spec.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight, spec.channel_dim
    source = weight_source(node, spec)
    if source is None:
        return None
    obj: Any = gm
    for part in str(source.target).split("."):
        obj = getattr(obj, part)
    return obj, None


def layer_names(
    gm: fx.GraphModule,
    specs: Mapping[fx.Node, MatmulSpec],
    module_types: Mapping[str, str],
    *,
    prefix: str = "",
) -> dict[fx.Node, tuple[str, str | None]]:
    """(layer key, module class name) per layer node, keys as module paths of the model in
    which ``gm`` sits at ``prefix``.

    A module call is named by its module path. A functional call on a module's weight
    (``F.linear(x, self.qkv.weight)``, as in attention stand-ins) is named after that
    module, and one on a packed weight (``in_proj_weight``) after the weight
    (``attn.in_proj``); several on one packed weight are numbered (``attn.in_proj.0``).
    A graph traced from a conv/linear module itself names its one layer after that module
    (the part's path), when it is a part of a larger model. A layer without a weight of its
    own (attention, a product of activations) is named after the module whose code ran it
    (``blocks.0.attn.attention``). Anything else by its node name. Module types come from
    ``module_types`` (the trace's), else from the nodes' ``nn_module_stack`` (a graph
    captured by ``torch.export``).
    """
    kinds = {cls.__name__ for cls in MODULES}
    # A captured graph (torch.export) has no traced module types: its nodes' module stacks
    # name each module that ran, with its class.
    types = {**_stack_types(gm), **module_types}
    owners: dict[fx.Node, tuple[str, str] | None] = {}
    calls: dict[fx.Node, tuple[str, str]] = {}  # captured calls of conv/linear modules
    for node, spec in specs.items():
        owners[node] = None
        if spec.module is not None:
            continue
        called = _captured_module_call(node, spec, types)
        if called is not None:
            calls[node] = called
            continue
        source = weight_source(node, spec)
        if source is None:
            continue
        owner = str(source.target).rpartition(".")[0]
        name, is_weight = weight_name(str(source.target))
        if not is_weight or owner not in types:
            continue
        if owner or (prefix and types.get("") in kinds):
            owners[node] = (name, types[owner])
    taken = [o[0] for o in owners.values() if o is not None]
    taken += [str(node.target) for node, spec in specs.items() if spec.module is not None]
    taken += [path for path, _ in calls.values()]
    modules = {p for p, _ in gm.named_modules()}
    seen: dict[str, int] = {}
    names: dict[fx.Node, tuple[str, str | None]] = {}
    for node, spec in specs.items():
        named = owners[node]
        if spec.module is not None:
            names[node] = (str(node.target), type(spec.module).__name__)
        elif node in calls:
            # A module called again (a loop unrolled by the capture) is one layer per
            # call, each with its own MACs: ``fc``, then ``fc.1``, ``fc.2``.
            path, kind = calls[node]
            i = seen[path] = seen.get(path, -1) + 1
            numbered = f"{path}.{i}" if i else path
            free = not i or (numbered not in modules and numbered not in taken)
            names[node] = (numbered, kind) if free else (node.name, None)
        elif named is not None and taken.count(named[0]) == 1:
            names[node] = named
        elif named is not None and named[0] and named[0] not in modules:
            # Several layers on one weight (cross-attention's slices of a packed
            # in_proj_weight): numbered in graph order, ``attn.in_proj.0`` .. ``.2``.
            i = seen[named[0]] = seen.get(named[0], -1) + 1
            numbered = f"{named[0]}.{i}"
            free = numbered not in modules and numbered not in taken
            names[node] = (numbered, named[1]) if free else (node.name, None)
        else:
            names[node] = (node.name, None)
    _name_by_module(specs, names, {*taken, *modules})
    return {node: (_join(prefix, name), kind) for node, (name, kind) in names.items()}


def _name_by_module(
    specs: Mapping[fx.Node, MatmulSpec],
    names: dict[fx.Node, tuple[str, str | None]],
    taken: set[str],
) -> None:
    """Name layers without a weight of their own (attention, products of activations) after
    the module whose code ran them, from their ``nn_module_stack``: ``blocks.0.attn.attention``,
    then ``blocks.0.attn.attention_1`` for the next in the same module (as FX numbers nodes).
    Layers in the model's own code, and any whose name would clash, keep their node names."""
    seen: dict[str, int] = {}
    for node in specs:
        name, kind = names[node]
        path = _stack_path(node)
        if name != node.name or kind is not None or not path:
            continue
        base = f"{path}.{specs[node].op}"
        i = seen[base] = seen.get(base, -1) + 1
        candidate = base if i == 0 else f"{base}_{i}"
        if candidate not in taken:
            names[node] = (candidate, None)
            taken.add(candidate)


def _stack_path(node: fx.Node) -> str:
    """The path of the innermost module on ``node``'s ``nn_module_stack`` (``""``: none)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return str(last[0] if isinstance(last, tuple) else last)


def _stack_types(gm: fx.GraphModule) -> dict[str, str]:
    """Class name by module path, from the ``nn_module_stack`` of ``gm``'s nodes."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(entry, tuple) and len(entry) == 2:
                path, kind = entry
                name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
                out[str(path)] = name.rpartition(".")[2]
    return out


def _captured_module_call(
    node: fx.Node, spec: MatmulSpec, module_types: Mapping[str, str]
) -> tuple[str, str] | None:
    """(module path, class name) when ``node``, in a graph torch.export captured, is the
    call of a conv/linear module on its own weight: named after that module, as the module
    call in a traced graph is."""
    stack = node.meta.get("nn_module_stack")
    if not stack or not isinstance(node.target, torch._ops.OpOverload):
        return None
    path = list(stack.values())[-1][0]
    if spec.weight is None:
        return None
    operand = spec.weight.get(node.args, node.kwargs)
    if not isinstance(operand, fx.Node) or operand.op != "get_attr":
        return None
    if str(operand.target) != _join(path, "weight"):
        return None
    kind = module_types.get(path)
    return (path, kind) if kind in {cls.__name__ for cls in MODULES} else None


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b
