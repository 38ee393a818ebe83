"""CPT's cyclic precision in time, on top of DPC's per-layer offsets.

Within each cycle of ``period`` steps the base bit-width rises from ``low`` to ``high``
along a half cosine (Fu et al., CPT, ICLR 2021):

    base(t) = ceil(low + (high - low) / 2 * (1 - cos(pi * (t mod period) / period)))

and each quantised layer ``k`` runs its weights and activations at
``clamp(base(t) + offset_k, low, high)``, where ``offset_k`` is the layer's planned bits
minus the plan's median, so layers DPC made narrower stay narrower. Gradient bits stay as
planned (CPT keeps 8-bit gradients). The schedule sets the quantisers' ``bits`` in place:
nothing is re-traced or recompiled.

>>> import torch, dpc_fx
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> sched = CyclicSchedule(dpc_fx.compile(model), low=3, high=8, period=4)
>>> [sched.base(t) for t in range(5)]
[3, 4, 6, 8, 3]
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from torch import nn

from dpc_fx.errors import ConfigError
from dpc_fx.meta import compiled
from dpc_fx.quant import Quantizer

__all__ = ["CyclicSchedule"]


class CyclicSchedule:
    """Cycles the forward bit-widths of a compiled module; call :meth:`step` once per step.

    Args:
        gm: a module from :func:`dpc_fx.compile`.
        low, high: the bit-widths each cycle starts and ends at.
        period: steps per cycle (CPT uses 32 cycles over a whole training run).
    """

    def __init__(self, gm: nn.Module, *, low: int = 3, high: int = 8, period: int = 100) -> None:
        for name, value in (("low", low), ("high", high), ("period", period)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CyclicSchedule: {name}={value!r} must be a positive int.")
        if low > high or high > 32:
            raise ConfigError(
                f"CyclicSchedule: need 1 <= low <= high <= 32, got low={low}, high={high}."
            )
        self.low, self.high, self.period = low, high, period
        self.t = 0
        self._layers: list[tuple[list[Quantizer], int]] = []
        planned = []
        found = compiled(gm)
        for meta, holder in zip(found.layers, found.quantizers, strict=True) if found else ():
            bits = meta.bits
            if holder is None or bits is None:
                continue
            quantizers = [
                q
                for role, q in gm.get_submodule(holder).named_children()
                if role != "grad_q" and isinstance(q, Quantizer)  # attention: query_q, key_q, ...
            ]
            forward = [b for b in (bits.w, bits.a) if b is not None]
            if quantizers and forward:
                planned.append(min(forward))
                self._layers.append((quantizers, min(forward)))
        if not self._layers:
            raise ConfigError(
                "CyclicSchedule: the module has no quantised layers to schedule; compile a "
                "model with dpc_fx.compile first (and check its plan quantises something)."
            )
        centre = round(statistics.median(planned))
        self._layers = [(qs, b - centre) for qs, b in self._layers]
        self._apply()

    def base(self, t: int) -> int:
        """The cycle's base bit-width at step ``t``."""
        phase = (t % self.period) / self.period
        return math.ceil(
            round(self.low + (self.high - self.low) / 2 * (1 - math.cos(math.pi * phase)), 9)
        )

    def bits(self, t: int | None = None) -> list[int]:
        """The forward bit-width of each scheduled layer at step ``t`` (default: now)."""
        base = self.base(self.t if t is None else t)
        return [min(self.high, max(self.low, base + offset)) for _, offset in self._layers]

    def step(self) -> None:
        """Advance one training step and set the quantisers' bits for it."""
        self.t += 1
        self._apply()

    def _apply(self) -> None:
        for (quantizers, _), b in zip(self._layers, self.bits(), strict=True):
            for q in quantizers:
                q.bits = b

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "low": self.low, "high": self.high, "period": self.period}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.low, self.high, self.period = (
            state["t"],
            state["low"],
            state["high"],
            state["period"],
        )
        self._apply()

    def __repr__(self) -> str:
        return (
            f"CyclicSchedule(low={self.low}, high={self.high}, period={self.period}, t={self.t}, "
            f"layers={len(self._layers)}, base={self.base(self.t)})"
        )
