"""Values a captured graph computes from its inputs' sizes alone, computed once per size.

A decoder captured by ``torch.export`` builds its positions and its causal mask at every call
from ``arange`` over the sequence length: some fifty small ATen ops whose results depend on
nothing but the batch and sequence sizes. The capture pass (:mod:`dpc_fx.passes.capture`)
moves such a subgraph into a :class:`SizeCache`, which runs it the first time it meets a set
of sizes and hands back the same tensors after that (the eager model computes them each
call; the values are the same). A cached tensor written in place since (its version moved)
is computed again. Inside a trace (``torch.compile``, ``torch.export``, ``torch.jit``), under
a dispatch mode (fake tensors, a FLOP counter) and under ``torch.inference_mode`` the
subgraph runs as it is, and nothing it makes there is kept.

>>> import torch
>>> from torch import fx
>>> g = fx.Graph()
>>> n = g.placeholder("n")
>>> _ = g.output((g.call_function(torch.ops.aten.arange.default, (n,)),))
>>> cache = SizeCache(fx.GraphModule(torch.nn.Module(), g))
>>> (a,), (b,) = cache(3), cache(3)
>>> a is b, a.tolist()
(True, [0, 1, 2])
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["SizeCache"]


class SizeCache(nn.Module):
    """Runs ``compute`` (a GraphModule of ints to a tuple of tensors) once per distinct
    arguments, the last :attr:`KEEP` of them kept."""

    KEEP = 8

    def __init__(self, compute: fx.GraphModule) -> None:
        super().__init__()
        self.compute = compute
        # sizes -> (values, their versions when computed)
        self._values: OrderedDict[tuple[int, ...], tuple[tuple[Tensor, ...], list[int]]] = (
            OrderedDict()
        )

    def forward(self, *sizes: int) -> tuple[Tensor, ...]:
        if (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or torch.is_inference_mode_enabled()  # (inference tensors have no version)
            or _get_current_dispatch_mode() is not None  # (fake tensors, a FLOP counter)
        ):
            return tuple(self.compute(*sizes))
        key = tuple(sizes)
        kept = self._values.get(key)
        if kept is not None and [t._version for t in kept[0]] == kept[1]:
            self._values.move_to_end(key)
            return kept[0]
        values = tuple(self.compute(*sizes))
        if any(type(t) is not Tensor for t in values):
            return values  # (a tensor subclass, a fake one: not kept past this call)
        self._values[key] = (values, [t._version for t in values])
        self._values.move_to_end(key)
        while len(self._values) > self.KEEP:
            self._values.popitem(last=False)
        return values

    def extra_repr(self) -> str:
        return f"{len(self._values)} size(s) cached"
