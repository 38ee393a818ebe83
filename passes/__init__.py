"""The compiler passes, each a function ``GraphModule -> GraphModule`` that leaves its input
alone. ``dpc_fx.compile`` composes them over every part of a model (see
:mod:`dpc_fx.compiler`); on a model that traces whole, by hand::

    from dpc_fx.meta import records
    from dpc_fx.policy import decide

    gm = trace(model)                                 # nn.Module -> GraphModule
    gm = capacity(gm, example_inputs)                 # meta["dpc"]: params, MACs, shape, depth
    gm = assign(gm, decide(records(gm), config))      # meta["dpc"].bits, from the policy
    gm = rewrite(gm)                                  # quantisers around every quantised layer
    gm = lower(gm)                                    # optional: 8-bit linears on integer kernels
    gm = fuse(gm)                                     # optional: one node per quantised layer

Passes import only the runtime's leaves (``dpc_fx.meta``, ``errors``, ``config``,
``inputs``, ``quant``, ``kernels``, ``int8``, ``fused``), never the policy, plans, cost, reports or the
driver.
"""

from dpc_fx.passes.assign import assign
from dpc_fx.passes.capacity import capacity
from dpc_fx.passes.fuse import fuse
from dpc_fx.passes.lower import lower
from dpc_fx.passes.rewrite import rewrite
from dpc_fx.passes.trace import trace

__all__ = ["assign", "capacity", "fuse", "lower", "rewrite", "trace"]
