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
Everything else (lowered linears, transposed convolutions, attention kernels, layers with a
full-precision input, convs with ``padding="same"``) is copied as it is; so is a product
whose operands broadcast, which the fused layer declines at run time.

A ReLU whose output nothing but fused layers keeps (they keep its codes; views of it and
residual additions keep nothing) becomes a call of :func:`dpc_fx.fused.relu`, which keeps
one bit an element for its backward rather than its float output.

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

    relu_1 = self.relu
    relu = dpc_fx_fused_relu(bn1, relu_1)          # keeps a bit an element, not its output
    dpc_conv2 = self.dpc.conv2(relu, conv2_weight, None)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from dpc_fx.fused import FusedLayer, relu
from dpc_fx.meta import QUANTIZERS, DPCState, layer_meta
from dpc_fx.passes._graph import copy_graph_module, layer_nodes
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer

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
    for node in layer_nodes(new):
        layer_meta(node, needed_by="fuse", bits=True)  # a clear error if its bits are missing
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
        (node if grad_q is None else grad_q).replace_all_uses_with(fused)
        for dead in (grad_q, node, weight_q, act_q):
            if dead is not None:
                graph.erase_node(dead)
    new.add_module(QUANTIZERS, state)
    _keep_bits(new, state)
    graph.lint()
    new.recompile()
    return new


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


# ReLU in the forms a graph calls it (the in-place ones change their input, so they are
# taken only where nothing else reads that input), and the users that keep nothing of their
# input for backward: views, and additions (a residual connection).
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, aten.relu.default, aten.relu_.default}
_INPLACE_RELU = {torch.relu_, aten.relu_.default}
_VIEWS = {torch.flatten, torch.reshape, aten.view.default, aten.reshape.default,
          aten._unsafe_view.default, aten.flatten.using_ints}  # fmt: skip
_VIEW_METHODS = {"flatten", "view", "reshape"}
_ADDS = {operator.add, torch.add, aten.add.Tensor}


def _keep_bits(gm: fx.GraphModule, state: DPCState) -> None:
    """Each ReLU whose output only fused layers keep (see :func:`_kept_as_codes`) made a call
    of :func:`dpc_fx.fused.relu`, in place: the node keeps its name and meta; an ``nn.ReLU``
    module goes with it (``relu(x, self.relu)``), so that its hooks still run."""
    fused = {
        n
        for n in gm.graph.nodes
        if n.op == "call_module"
        and str(n.target).startswith(f"{QUANTIZERS}.")
        and isinstance(state._modules.get(str(n.target).removeprefix(f"{QUANTIZERS}.")), FusedLayer)
    }
    if not fused:
        return
    for node in list(gm.graph.nodes):
        x = _relu_input(node, gm)
        if x is None or not _kept_as_codes(node, fused, gm):
            continue
        args: tuple[Any, ...] = (x,)
        if node.op == "call_module":  # the module stays: relu calls it where it has hooks
            with gm.graph.inserting_before(node):
                args = (x, gm.graph.get_attr(str(node.target)))
        node.op, node.target, node.args, node.kwargs = "call_function", relu, args, {}
        node.meta["is_wrapped"] = True  # a leaf when the code is traced again (torch.load)


def _relu_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input of ``node`` if it is a ReLU the fuse pass may replace."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        inplace = getattr(module, "inplace", False)
        ok = type(module) is nn.ReLU and len(node.args) == 1 and not node.kwargs
    elif node.op == "call_function":
        inplace = node.target in _INPLACE_RELU or bool(
            node.args[1] if len(node.args) > 1 else node.kwargs.get("inplace", False)
        )
        ok = node.target in _RELU_FUNCTIONS and len(node.args) + len(node.kwargs) <= 2
    elif node.op == "call_method":
        inplace = node.target == "relu_"
        ok = node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs
    else:
        return None
    x = node.args[0] if ok and node.args else None
    if not isinstance(x, fx.Node):
        return None
    # An in-place ReLU changes x: the out-of-place one may stand in only where nothing else
    # reads x.
    return None if inplace and len(x.users) != 1 else x


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
