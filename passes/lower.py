"""Pass 5 (optional), lower: run 8-bit linear layers on integer kernels.

Reads: a rewritten GraphModule (quantisers in place, ``meta["dpc"]`` with bits). Writes: a
copy in which every linear layer whose weight, activation and gradient bits are all at most
8 runs as one :class:`~dpc_fx.int8.Int8Linear` call: ``torch._int_mm`` for the forward
product and both backward products. The layer's quantiser modules are kept (they hold the
bits and the running range) and shared with the input module; ``meta["dpc"].lowered`` is
set. Everything else is copied as it is.

Integer kernels need one scale along each product's reduction dimension, so lowerable layers
quantise weights per tensor; :func:`dpc_fx.int8.lowerable` tells the rewrite pass which layers those are,
and the simulated graph uses the same per-tensor weights, so simulated and lowered agree.

Before::

    fc_act_q    = self.dpc.fc.act_q(x)
    fc_weight_q = self.dpc.fc.weight_q(fc_weight)
    fc          = torch._C._nn.linear(fc_act_q, fc_weight_q, fc_bias)
    fc_grad_q   = self.dpc.fc.grad_q(fc)

After::

    fc = self.dpc.fc(x, fc_weight, fc_bias)        # Int8Linear: int8 x int8 -> int32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from dpc_fx.int8 import Int8Linear, lowerable
from dpc_fx.meta import META_KEY, QUANTIZERS, DPCState, graph_info, layer_meta
from dpc_fx.passes._graph import copy_graph_module, layer_nodes
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer

__all__ = ["lower"]


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its 8-bit linear layers on integer kernels."""
    new = copy_graph_module(gm)
    old_state = getattr(gm, QUANTIZERS, None)
    if not isinstance(old_state, DPCState):
        return new
    config = graph_info(gm).config
    state = DPCState()
    for name, child in old_state.named_children():
        state.add_module(name, child)
    graph = new.graph
    for node in layer_nodes(new):
        meta = layer_meta(node, needed_by="lower", bits=True)
        holder = state._modules.get(node.name)
        chain = _chain(node, new)
        if holder is None or chain is None or meta.op != "linear":
            continue
        act_q, weight_q, grad_q = chain
        roles = dict(holder.named_children())
        if not lowerable(meta, config):
            continue
        state.add_module(
            node.name,
            Int8Linear(roles["act_q"], roles["weight_q"], roles["grad_q"]),  # type: ignore[arg-type]
        )
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.inserting_before(node):
            fused = graph.call_module(
                f"{QUANTIZERS}.{node.name}", (act_q.args[0], weight_q.args[0], bias)
            )
        fused.meta = dict(node.meta)
        fused.meta[META_KEY] = meta.replace(lowered=True)
        grad_q.replace_all_uses_with(fused)
        for dead in (grad_q, node, weight_q, act_q):
            graph.erase_node(dead)
    new.add_module(QUANTIZERS, state)
    graph.lint()
    new.recompile()
    return new


# F.linear, and its ATen form in a graph captured by torch.export: Int8Linear computes both.
_LINEARS = (F.linear, torch.ops.aten.linear.default)


def _chain(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """The ``act_q``, ``weight_q`` and ``grad_q`` nodes around a rewritten ``linear`` node."""
    if node.op != "call_function" or node.target not in _LINEARS or len(node.args) < 2:
        return None
    act_q, weight_q = node.args[0], node.args[1]
    users = list(node.users)
    if not (isinstance(act_q, fx.Node) and isinstance(weight_q, fx.Node) and len(users) == 1):
        return None
    grad_q = users[0]
    kinds = [(act_q, ActQuantizer), (weight_q, WeightQuantizer), (grad_q, GradQuantizer)]
    for n, kind in kinds:
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), kind):
            return None
    if len(act_q.users) != 1 or len(weight_q.users) != 1:
        return None
    return act_q, weight_q, grad_q
