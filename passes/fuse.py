"""Pass 6, fuse: each quantised conv/linear/matmul layer as one node and one autograd step.

Reads: a rewritten (optionally lowered) GraphModule: quantisers in place, ``meta["dpc"]``
with bits. Writes: a copy in which every ``linear``/``conv1d``/``conv2d``/``conv3d`` layer
whose activation and weight are both quantised, and every product of two quantised
activations (``matmul``/``bmm``, as attention computes ``q @ k^T``), runs as one
:class:`~dpc_fx.fused.FusedLayer` call. That module holds the layer's quantiser modules as
its children (``act_q``, ``weight_q``, ``grad_q``: the same objects, under the same paths),
runs their kernels in one autograd function and keeps only integer codes for backward. The
fused node keeps the layer's ``meta["dpc"]``. Traced graphs (``F.linear``, ``F.conv2d``,
``@``) and captured ones (``aten.linear``, ``aten.conv2d``, ``aten.matmul``) alike.
Attention (``scaled_dot_product_attention``) whose query, key and value are quantised runs
as one :class:`~dpc_fx.fused.FusedAttention` call, which keeps their codes for the flash
kernel's backward: ``self.dpc.scaled_dot_product_attention(q, k, v, mask, scale=0.25)`` in
place of the three quantisers, the attention call and its gradient quantiser. Everything else (lowered
linears, transposed convolutions, layers with a full-precision input, convs with
``padding="same"``) is copied as it is; so is a product whose operands broadcast, which the
fused layer declines at run time.

A ReLU or ReLU6 whose output nothing but fused layers keeps (they keep its codes; views of it
and residual additions keep nothing) becomes a call of :func:`dpc_fx.fused.relu` or
:func:`~dpc_fx.fused.relu6`, which keep one bit an element for their backward rather than a
float tensor.

Invariant: the fused module computes what ``gm`` computes, forward and backward, bit for
bit (the same kernels, the same stochastic-rounding stream).

Before::

    conv1_act_q    = self.dpc.conv1.act_q(x)
    conv1_weight_q = self.dpc.conv1.weight_q(conv1_weight)
    conv1          = torch.conv2d(conv1_act_q, conv1_weight_q, None, (2, 2), (3, 3), (1, 1), 1)
    conv1_grad_q   = self.dpc.conv1.grad_q(conv1)

After::

    dpc_conv1 = self.dpc.conv1(x, conv1_weight, None)
    # FusedLayer(conv2d, act_q=6, weight_q=6, grad_q=8, stride=(2, 2), padding=(3, 3))

and a ReLU before a fused layer::

    relu_module = self.relu
    relu = dpc_fx_fused_relu(bn1, relu_module)     # keeps a bit an element, not its output
    dpc_conv2 = self.dpc.conv2(relu, conv2_weight, None)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from dpc_fx.fused import FusedAttention, FusedLayer, relu, relu6
from dpc_fx.meta import QUANTIZERS, DPCState, layer_meta
from dpc_fx.passes._graph import copy_graph_module, layer_nodes
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer
from dpc_fx.sdpa import attention

__all__ = ["fuse"]

aten = torch.ops.aten
# The calls a fused layer replaces, by the op it runs: the functional forms the rewrite pass
# writes for traced models, and the ATen forms of captured (torch.export) graphs.
_TARGETS: dict[Any, str] = {
    F.linear: "linear",
    aten.linear.default: "linear",
    F.conv1d: "conv1d",
    aten.conv1d.default: "conv1d",
    F.conv2d: "conv2d",
    aten.conv2d.default: "conv2d",
    F.conv3d: "conv3d",
    aten.conv3d.default: "conv3d",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    aten.matmul.default: "matmul",
    aten.bmm.default: "matmul",
}
# Attention in the forms a graph calls it: F.scaled_dot_product_attention (traced),
# ATen's op and dpc_fx.sdpa.attention (captured; the latter where a mask is given).
_ATTENTION = {
    F.scaled_dot_product_attention,
    aten.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
    attention,
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def fuse(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with each quantised conv/linear layer as one fused module call."""
    new = copy_graph_module(gm)
    old_state = getattr(gm, QUANTIZERS, None)
    if not isinstance(old_state, DPCState):
        return new
    state = DPCState()
    for name, child in old_state.named_children():
        state.add_module(name, child)
    graph = new.graph
    fused_calls: set[fx.Node] = set()
    for node in layer_nodes(new):
        layer_meta(node, needed_by="fuse", bits=True)  # a clear error if its bits are missing
        if node.op == "call_function" and node.target in _ATTENTION:
            if node.name in state._modules and (fused := _fuse_attention(node, new, state)):
                fused_calls.add(fused)
            continue
        chain = _chain(node, new)
        if chain is None or node.name not in state._modules:
            continue
        call = _arguments(node)
        if call is None:
            continue
        act_q, weight_q, grad_q = chain
        state.add_module(
            node.name,
            FusedLayer(
                _TARGETS[node.target],
                new.get_submodule(str(act_q.target)),  # type: ignore[arg-type]
                new.get_submodule(str(weight_q.target)),  # type: ignore[arg-type]
                None if grad_q is None else new.get_submodule(str(grad_q.target)),  # type: ignore[arg-type]
                **call,
            ),
        )
        bias = _bias(node)
        with graph.inserting_before(node):
            fused = graph.call_module(
                f"{QUANTIZERS}.{node.name}", (act_q.args[0], weight_q.args[0], bias)
            )
        fused.meta = dict(node.meta)
        fused_calls.add(fused)
        (node if grad_q is None else grad_q).replace_all_uses_with(fused)
        for dead in (grad_q, node, weight_q, act_q):
            if dead is not None:
                graph.erase_node(dead)
    new.add_module(QUANTIZERS, state)
    _keep_bits(new, fused_calls)
    graph.lint()
    new.recompile()
    return new


def _fuse_attention(node: fx.Node, gm: fx.GraphModule, state: DPCState) -> fx.Node | None:
    """Attention whose query, key and value each come from their own activation quantiser
    as one :class:`~dpc_fx.fused.FusedAttention` call (its arguments as they were, the
    quantisers' inputs in their place), or ``None`` where it is some other chain."""
    qkv = node.args[:3]
    if len(qkv) != 3 or not all(_quantizer_of(n, gm, ActQuantizer, node) for n in qkv):
        return None
    users = list(node.users)
    grad_q = users[0] if len(users) == 1 and _quantizer_of(users[0], gm, GradQuantizer) else None
    query_q, key_q, value_q = (gm.get_submodule(str(n.target)) for n in qkv)  # type: ignore[union-attr]
    held = None if grad_q is None else gm.get_submodule(str(grad_q.target))
    state.add_module(node.name, FusedAttention(query_q, key_q, value_q, held))  # type: ignore[arg-type]
    with gm.graph.inserting_before(node):
        args = (*(q.args[0] for q in qkv), *node.args[3:])  # type: ignore[union-attr]
        fused = gm.graph.call_module(f"{QUANTIZERS}.{node.name}", args, dict(node.kwargs))
    fused.meta = dict(node.meta)
    (node if grad_q is None else grad_q).replace_all_uses_with(fused)
    for dead in (grad_q, node, *qkv):
        if dead is not None:
            gm.graph.erase_node(dead)  # type: ignore[arg-type]
    return fused


def _quantizer_of(
    node: Any, gm: fx.GraphModule, kind: type, only_user: fx.Node | None = None
) -> bool:
    """Whether ``node`` calls a quantiser of ``kind`` (and ``only_user`` alone reads it)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(gm.get_submodule(str(node.target)), kind)
        and (only_user is None or list(node.users) == [only_user])
    )


def _chain(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """The ``act_q``, ``weight_q`` and (if any) ``grad_q`` nodes around a rewritten layer."""
    if node.op != "call_function" or node.target not in _TARGETS or len(node.args) < 2:
        return None
    act_q, weight_q = node.args[0], node.args[1]
    if not (isinstance(act_q, fx.Node) and isinstance(weight_q, fx.Node)):
        return None
    for n, kind in ((act_q, ActQuantizer), (weight_q, WeightQuantizer)):
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), kind):
            return None
        if len(n.users) != 1:
            return None
    users = list(node.users)
    grad_q = users[0] if len(users) == 1 else None
    if grad_q is not None and not (
        grad_q.op == "call_module"
        and isinstance(gm.get_submodule(str(grad_q.target)), GradQuantizer)
    ):
        grad_q = None
    return act_q, weight_q, grad_q


def _bias(node: fx.Node) -> Any:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _arguments(node: fx.Node) -> dict[str, Any] | None:
    """The convolution's stride, padding, dilation and groups, if they are plain values the
    fused layer can differentiate with (not graph values, not ``padding="same"``)."""
    op = _TARGETS[node.target]
    if op == "matmul":
        return {} if len(node.args) == 2 and not node.kwargs else None
    if op == "linear":
        return {} if len(node.args) + len(node.kwargs) <= 3 else None
    values: dict[str, Any] = dict(_CONV_DEFAULTS)
    values.update(zip(_CONV_ARGS, node.args, strict=False))
    values.update(node.kwargs)
    call = {k: values[k] for k in ("stride", "padding", "dilation", "groups")}
    bias = _bias(node)
    if bias is not None and not isinstance(bias, fx.Node):
        return None
    return call if all(_ints(v) for v in call.values()) else None


def _ints(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


# ReLU and ReLU6 in the forms a graph calls them, as the bit-keeping function that stands
# in; the in-place forms change their input, so they are taken only where nothing else reads
# it. Captured graphs call ReLU6 as hardtanh(x, 0, 6).
_RELU_FUNCTIONS: dict[Any, Any] = {
    F.relu: relu, torch.relu: relu, torch.relu_: relu, aten.relu.default: relu,
    aten.relu_.default: relu, F.relu6: relu6, torch._C._nn.relu6: relu6,
    torch._C._nn.relu6_: relu6, aten.relu6.default: relu6,
    aten.hardtanh.default: relu6, aten.hardtanh_.default: relu6,
}  # fmt: skip
_RELU_MODULES: dict[type, Any] = {nn.ReLU: relu, nn.ReLU6: relu6}
_RELU_METHODS: dict[str, Any] = {"relu": relu, "relu_": relu}
_INPLACE = {torch.relu_, aten.relu_.default, torch._C._nn.relu6_, aten.hardtanh_.default}
_HARDTANH = {aten.hardtanh.default, aten.hardtanh_.default}
# The users that keep nothing of their input for backward: views, and additions (a
# residual connection).
_VIEWS = {torch.flatten, torch.reshape, aten.view.default, aten.reshape.default,
          aten._unsafe_view.default, aten.flatten.using_ints}  # fmt: skip
_VIEW_METHODS = {"flatten", "view", "reshape"}
_ADDS = {operator.add, torch.add, aten.add.Tensor}


def _keep_bits(gm: fx.GraphModule, fused: set[fx.Node]) -> None:
    """Each ReLU or ReLU6 whose output only the ``fused`` layer calls keep (see
    :func:`_kept_as_codes`) made a call of :func:`dpc_fx.fused.relu` or
    :func:`~dpc_fx.fused.relu6`, in place: the node keeps its name and meta; an
    ``nn.ReLU``/``nn.ReLU6`` module goes with it (``relu(x, self.relu)``), so that its hooks
    still run."""
    if not fused:
        return
    for node in list(gm.graph.nodes):
        found = _relu_of(node, gm)
        if found is None or not _kept_as_codes(node, fused, gm):
            continue
        x, fn, inplace = found
        args: tuple[Any, ...] = (x,)
        if node.op == "call_module":  # the module stays: relu calls it where it has hooks
            with gm.graph.inserting_before(node):
                module = gm.graph.create_node("get_attr", node.target, name=f"{node.name}_module")
            args, inplace = (x, module), False  # (relu reads the module's inplace)
        kwargs = {"inplace": True} if inplace else {}
        node.op, node.target, node.args, node.kwargs = "call_function", fn, args, kwargs
        node.meta["is_wrapped"] = True  # a leaf when the code is traced again (torch.load)


def _relu_of(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, Any, bool] | None:
    """The input of ``node``, the function to call there and whether it runs in place, if
    ``node`` is a ReLU or ReLU6 the fuse pass may replace."""
    args = list(node.args) + list(node.kwargs.values())
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        fn = _RELU_MODULES.get(type(module))
        inplace = getattr(module, "inplace", False)
        ok = len(node.args) == 1 and not node.kwargs
    elif node.op == "call_function":
        fn = _RELU_FUNCTIONS.get(node.target)
        inplace = node.target in _INPLACE or node.kwargs.get("inplace") is True
        if node.target in _HARDTANH:  # hardtanh(x, 0, 6): ReLU6
            ok = len(args) == 3 and args[1:] == [0.0, 6.0]
        else:
            inplace = inplace or (len(node.args) > 1 and node.args[1] is True)
            ok = len(args) <= 2 and all(isinstance(a, bool) for a in args[1:])
    elif node.op == "call_method" and isinstance(node.target, str):
        fn = _RELU_METHODS.get(node.target)
        inplace = node.target == "relu_"
        ok = len(node.args) == 1 and not node.kwargs
    else:
        return None
    x = node.args[0] if fn is not None and ok and node.args else None
    if not isinstance(x, fx.Node):
        return None
    # An in-place ReLU changes x, and other readers of x would see it; the bit ReLU runs
    # out of place under torch.compile, so it stands in only where nothing else reads x.
    return None if inplace and len(x.users) != 1 else (x, fn, inplace)


def _kept_as_codes(value: fx.Node, fused: set[fx.Node], gm: fx.GraphModule) -> bool:
    """Whether every use of ``value`` is a fused layer's (which keeps codes), a view whose
    uses all are, or an addition (which keeps nothing)."""
    for user in value.users:
        if user in fused or (user.op == "call_function" and user.target in _ADDS):
            continue
        view = (
            (user.op == "call_function" and user.target in _VIEWS)
            or (user.op == "call_method" and user.target in _VIEW_METHODS)
            or (user.op == "call_module" and type(gm.get_submodule(str(user.target))) is nn.Flatten)
        )
        if not (view and user.args and user.args[0] is value and _kept_as_codes(user, fused, gm)):
            return False
    return bool(value.users)
