"""Plans: the per-layer bit-widths of a compiled model, as a value you can save and re-apply.

>>> import torch
>>> from torch import nn
>>> import dpc_fx
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> plan = dpc_fx.plan_of(dpc_fx.compile(model))
>>> plan.layers["2"]
Bits(w=6, a=6, g=8)
>>> dpc_fx.plan_of(dpc_fx.compile(model, plan=plan)) == plan
True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dpc_fx.config import DPCConfig
from dpc_fx.errors import ConfigError, PassOrderError, PlanError
from dpc_fx.meta import Bits, LayerMeta, config_of, records

__all__ = ["Plan", "fingerprint", "plan_of"]

FORMAT = "dpc_fx.plan"
VERSION = 1


def fingerprint(metas: list[LayerMeta]) -> str:
    """A short hash of a model's layer structure: names, ops and parameter counts, in order.

    Shapes are left out, so one plan fits every input size of the same model.
    """
    text = json.dumps([[m.layer, m.op, m.params] for m in metas])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    """Per-layer bit-widths, the config that produced them, and the model's fingerprint.

    Layers are keyed by module path (``"layer1.0.conv1"``) or, for functional calls, by
    graph node name. Plans compare with ``==``; :meth:`diff` lists what differs.
    """

    layers: dict[str, Bits]
    config: DPCConfig = field(default_factory=DPCConfig)
    fingerprint: str = ""
    version: int = VERSION

    def diff(self, other: Plan) -> dict[str, tuple[Bits | None, Bits | None]]:
        """Layers whose bits differ, as ``{layer: (bits here, bits in other)}``."""
        keys = list(self.layers) + [k for k in other.layers if k not in self.layers]
        return {
            k: (self.layers.get(k), other.layers.get(k))
            for k in keys
            if self.layers.get(k) != other.layers.get(k)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "layers": {k: str(b) for k, b in self.layers.items()},
        }

    def save(self, path: str | Path) -> None:
        """Write the plan as readable JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> Plan:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f'{source}: not a dpc_fx plan (expected "format": "{FORMAT}").')
        if data.get("version") != VERSION:
            raise PlanError(
                f"{source}: plan format version {data.get('version')!r} is not supported "
                f"(this dpc_fx reads version {VERSION})."
            )
        try:
            layers = {k: _bits(v) for k, v in data["layers"].items()}
            config = DPCConfig.from_dict(data.get("config", {}))
        except (KeyError, TypeError, AttributeError, ConfigError) as e:
            raise PlanError(f"{source}: malformed plan ({type(e).__name__}: {e}).") from e
        return cls(layers, config, str(data.get("fingerprint", "")), VERSION)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e}).") from e
        return cls.from_dict(data, source=str(path))

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for b in self.layers.values():
            counts[str(b)] = counts.get(str(b), 0) + 1
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        return f"Plan({len(self.layers)} layers; w/a/g {summary}; fingerprint={self.fingerprint})"


def _bits(value: Any) -> Bits:
    """``"6/6/8"`` (weights/activations/gradients; ``fp`` for full precision) as Bits."""
    parts = str(value).split("/")
    if len(parts) != 3 or not all(p == "fp" or (p.isdigit() and 1 <= int(p) <= 32) for p in parts):
        raise ConfigError(f'bits {value!r} are not written as w/a/g, e.g. "6/6/8" or "fp/fp/fp"')
    w, a, g = (None if p in ("fp", "32") else int(p) for p in parts)
    return Bits(w, a, g)


def plan_of(gm: nn.Module) -> Plan:
    """The plan of a module compiled by :func:`dpc_fx.compile` (or annotated by ``assign``)."""
    metas = records(gm)
    for m in metas:
        if m.bits is None:
            raise PassOrderError(
                f"plan_of: layer '{m.layer}' has no bit-widths yet; "
                "run dpc_fx.passes.assign on the graph first."
            )
    config = config_of(gm)
    return Plan(
        {m.layer: m.bits for m in metas if m.bits is not None},
        config or DPCConfig(),
        fingerprint(metas),
    )
