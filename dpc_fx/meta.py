"""The one metadata record dpc_fx keeps on graph nodes: ``node.meta["dpc"]``.

Every matmul-like node of a compiled graph carries a :class:`LayerMeta`. The capacity pass
creates it, the assign pass fills in ``capacity`` and ``bits``; records are frozen and
passes replace them (``dataclasses.replace``) rather than edit them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from dpc_fx.errors import PassOrderError

__all__ = ["META_KEY", "STATE", "Bits", "DPCState", "LayerMeta", "layer_meta"]

META_KEY = "dpc"
STATE = "dpc"  # attribute of a compiled module holding its DPCState


@dataclass(frozen=True)
class Bits:
    """Bit-widths of one layer: weights ``w``, input activations ``a``, output gradient ``g``.

    ``None`` means full precision.

    >>> str(Bits(6, 6, 8)), str(Bits(None, None, None))
    ('6/6/8', 'fp/fp/fp')
    """

    w: int | None
    a: int | None
    g: int | None

    def __post_init__(self) -> None:
        for role in ("w", "a", "g"):  # 32 bits is full precision: one spelling for it
            if getattr(self, role) == 32:
                object.__setattr__(self, role, None)

    @property
    def full_precision(self) -> bool:
        return self.w is None and self.a is None and self.g is None

    def __str__(self) -> str:
        return "/".join("fp" if b is None else str(b) for b in (self.w, self.a, self.g))


FULL_PRECISION = Bits(None, None, None)


@dataclass(frozen=True, kw_only=True)
class LayerMeta:
    """What dpc_fx knows about one matmul-like node.

    Attributes:
        layer: stable key of the layer: its module path (``"layer1.0.conv1"``) for module
            calls, the graph node's name for functional calls.
        op: the operation, e.g. ``"conv2d"``, ``"linear"``, ``"matmul"``.
        module_type: class name of the module for module calls, else ``None``.
        params: number of parameter elements the layer reads (weight and bias).
        macs: multiply-accumulates for the example inputs (``None`` without inputs).
        flops: floating-point operations, as ``torch.utils.flop_counter`` counts them.
        out_shape: shape of the layer's output for the example inputs.
        depth: matmul-like layers on the longest path from an input up to this one.
        capacity: the figure the policy ranked layers by (set by the assign pass).
        bits: the assigned bit-widths (set by the assign pass).
        pinned: kept in full precision because it is the first or last layer.
        lowered: runs on integer kernels (set by the lower pass).
    """

    layer: str
    op: str
    module_type: str | None
    params: int
    macs: int | None
    flops: int | None
    out_shape: tuple[int, ...] | None
    depth: int
    capacity: float | None = None
    bits: Bits | None = None
    pinned: bool = False
    lowered: bool = False

    def replace(self, **changes: object) -> LayerMeta:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def layer_meta(node: fx.Node, *, needed_by: str, bits: bool = False) -> LayerMeta:
    """``node.meta["dpc"]``, or a :class:`PassOrderError` naming the pass to run first."""
    meta = node.meta.get(META_KEY)
    if not isinstance(meta, LayerMeta):
        raise PassOrderError(
            f"{needed_by}: node '{node.name}' has no meta['{META_KEY}']; "
            "run dpc_fx.passes.capacity on the graph first."
        )
    if bits and meta.bits is None:
        raise PassOrderError(
            f"{needed_by}: node '{node.name}' has no bit-widths yet; "
            "run dpc_fx.passes.assign on the graph first."
        )
    return meta


class DPCState(nn.Module):
    """What a compiled module keeps besides its graph, as its submodule ``dpc``.

    Children: one container per quantised layer (named after its node) holding that layer's
    quantisers. Attributes: ``records``, the layers' :class:`LayerMeta` in graph order, and
    ``config``, the (resolved) config that produced them. Being a submodule, all of it
    survives ``copy.deepcopy`` and ``torch.save``, where FX rebuilds the graph from code and
    drops node metadata; :func:`dpc_fx.passes._fx.layer_nodes` restores the records then.
    It adds no ``state_dict`` keys.
    """

    def __init__(self, records: tuple[LayerMeta, ...] = (), config: Any = None) -> None:
        super().__init__()
        self.records = records
        self.config = config

    def extra_repr(self) -> str:
        return f"layers={len(self.records)}"
