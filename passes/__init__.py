"""The compiler passes, each a function ``GraphModule -> GraphModule`` that leaves its input
alone. ``dpc_fx.compile`` is their composition::

    gm = trace(model)                     # nn.Module -> GraphModule
    gm = capacity(gm, example_inputs)     # meta["dpc"]: params, MACs, FLOPs, shape, depth
    gm = assign(gm, config)               # meta["dpc"].bits
    gm = rewrite(gm)                      # quantisers around every quantised layer
    gm = lower(gm)                        # optional: 8-bit linears on integer kernels
"""

from dpc_fx.passes.assign import assign
from dpc_fx.passes.capacity import capacity
from dpc_fx.passes.lower import lower
from dpc_fx.passes.rewrite import rewrite
from dpc_fx.passes.trace import trace

__all__ = ["assign", "capacity", "lower", "rewrite", "trace"]
