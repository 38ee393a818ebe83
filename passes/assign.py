"""Pass 3, assign: write the policy's bit-widths onto the graph.

Reads: ``meta["dpc"]`` from :func:`~dpc_fx.passes.capacity`, and an
:class:`~dpc_fx.meta.Assignment` from :func:`dpc_fx.policy.decide` (which chooses the bits
from the layer records alone: the DPC rule, overrides, pinning, budget, automatic bounds, or
a plan). Writes: a copy of the GraphModule whose records are the assignment's (``capacity``,
``bits`` and ``pinned`` set), and the resolved config in its
:class:`~dpc_fx.meta.GraphInfo`. The graph itself is unchanged.

Before:                                  After:
    meta["dpc"] = LayerMeta(params=...)      meta["dpc"] = LayerMeta(..., bits=Bits(5, 5, 8))
"""

from __future__ import annotations

from torch import fx

from dpc_fx.errors import PlanError
from dpc_fx.meta import META_KEY, Assignment, layer_meta, set_graph_info
from dpc_fx.passes._graph import copy_graph_module, require_graph

__all__ = ["assign"]


def assign(gm: fx.GraphModule, assignment: Assignment) -> fx.GraphModule:
    """A copy of ``gm`` whose layers carry the records of ``assignment`` (matched by layer
    key; the assignment may cover other graphs' layers too, as for a model compiled part by
    part).

    >>> import torch
    >>> from torch import nn
    >>> from dpc_fx.meta import records
    >>> from dpc_fx.passes import capacity, trace
    >>> from dpc_fx.policy import decide
    >>> gm = capacity(trace(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))))
    >>> [str(m.bits) for m in records(assign(gm, decide(records(gm))))]
    ['fp/fp/fp', '6/6/8', 'fp/fp/fp']

    Raises:
        PassOrderError: ``gm`` was not measured by the capacity pass.
        PlanError: the assignment lacks one of ``gm``'s layers.
    """
    require_graph(gm, "assign")
    new = copy_graph_module(gm)
    decided = {m.layer: m for m in assignment.layers}
    for node in new.graph.nodes:
        if META_KEY not in node.meta:
            continue
        key = layer_meta(node, needed_by="assign").layer
        if key not in decided:
            raise PlanError(
                f"assign: the assignment has no bits for layer '{key}' (node '{node.name}'); "
                "decide the bits from this graph's own records (dpc_fx.policy.decide)."
            )
        node.meta = {**node.meta, META_KEY: decided[key]}
    set_graph_info(new, config=assignment.config)
    return new
