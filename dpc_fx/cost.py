"""The training cost model: bit-operations per layer (FracTrain's per-layer form of CPT's).

For a layer of ``M`` multiply-accumulates with weight bits ``w``, activation bits ``a`` and
gradient bits ``g`` (full precision counts as 32):

    forward        M * w * a
    input grad     M * w * g
    weight grad    M * a * g

Savings compare the same layers against two baselines: fp32 (32 bits everywhere) and static
8-bit (8/8/8 on every layer this plan quantises; the layers it keeps in full precision stay
at 32 in both, so the comparison is about the bit-widths, not about which layers are pinned).

Each row also says what a fused layer (:class:`~dpc_fx.fused.FusedLayer`, on by default)
keeps for its backward at the plan's bits: ``saved_bytes``, its input's and weight's codes
packed to their bit-widths plus their ranges, for the last batch it trained on (``None``
before its first training step, and for layers that are not fused). For attention
(:class:`~dpc_fx.fused.FusedAttention`) it is the codes and ranges of query, key and value.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dpc_fx.errors import PassOrderError
from dpc_fx.fused import FusedAttention, FusedLayer
from dpc_fx.meta import Bits, compiled, records

__all__ = ["Cost", "LayerCost", "bitops", "cost"]

FP = 32


def bitops(macs: int, bits: Bits) -> tuple[int, int, int]:
    """(forward, input-gradient, weight-gradient) bit-operations of one layer.

    >>> bitops(10, Bits(4, 6, 8))
    (240, 320, 480)
    """
    w, a, g = (FP if b is None else b for b in (bits.w, bits.a, bits.g))
    return macs * w * a, macs * w * g, macs * a * g


@dataclass(frozen=True)
class LayerCost:
    """Bit-operations of one layer for one training step on the example inputs."""

    layer: str
    macs: int
    bits: Bits
    forward: int
    input_grad: int
    weight_grad: int
    saved_bytes: int | None = None

    @property
    def total(self) -> int:
        return self.forward + self.input_grad + self.weight_grad


@dataclass(frozen=True)
class Cost:
    """Bit-operations of a compiled model, per layer and in total, with the two baselines.

    ``saving_vs_fp32 = 0.3`` means 30% fewer bit-operations than the same model in fp32.
    """

    layers: tuple[LayerCost, ...]
    fp32: int
    static8: int

    @property
    def total(self) -> int:
        return sum(r.total for r in self.layers)

    @property
    def forward(self) -> int:
        return sum(r.forward for r in self.layers)

    @property
    def saving_vs_fp32(self) -> float:
        return 1.0 - self.total / self.fp32 if self.fp32 else 0.0

    @property
    def saving_vs_8bit(self) -> float:
        return 1.0 - self.total / self.static8 if self.static8 else 0.0

    @property
    def forward_saving_vs_fp32(self) -> float:
        macs = sum(r.macs for r in self.layers)
        return 1.0 - self.forward / (macs * FP * FP) if macs else 0.0

    def __repr__(self) -> str:
        return (
            f"Cost(layers={len(self.layers)}, total={self.total:.3e} bitops, "
            f"saving_vs_fp32={self.saving_vs_fp32:.1%}, saving_vs_8bit={self.saving_vs_8bit:.1%})"
        )


def cost(gm: nn.Module) -> Cost:
    """The cost of one training step of ``gm`` (a module from :func:`dpc_fx.compile`).

    Raises:
        PassOrderError: the module was compiled without example inputs, so its layers have
            no MACs.
    """
    rows, fp32, static8 = [], 0, 0
    found = compiled(gm)
    holders = (
        dict(zip((m.layer for m in found.layers), found.quantizers, strict=True)) if found else {}
    )
    for meta in records(gm):
        if meta.bits is None:
            raise PassOrderError(
                f"cost: layer '{meta.layer}' has no bit-widths yet; "
                "run dpc_fx.passes.assign on the graph first."
            )
        if meta.macs is None:
            raise PassOrderError(
                f"cost: layer '{meta.layer}' has no MACs because the model was compiled "
                "without example inputs; pass example_inputs to dpc_fx.compile."
            )
        saved = _saved_bytes(gm, holders.get(meta.layer), meta.bits)
        rows.append(
            LayerCost(meta.layer, meta.macs, meta.bits, *bitops(meta.macs, meta.bits), saved)
        )
        fp32 += sum(bitops(meta.macs, Bits(None, None, None)))
        eight = Bits(None, None, None) if meta.bits.full_precision else Bits(8, 8, 8)
        static8 += sum(bitops(meta.macs, eight))
    return Cost(tuple(rows), fp32, static8)


def _saved_bytes(gm: nn.Module, holder: str | None, bits: Bits) -> int | None:
    """What the fused layer at ``holder`` keeps for backward at the plan's ``bits``."""
    module = gm.get_submodule(holder) if holder else None
    if isinstance(module, FusedAttention) and bits.a is not None:
        return module.saved_bytes(bits.a)
    if not isinstance(module, FusedLayer) or bits.a is None or bits.w is None:
        return None
    return module.saved_bytes(bits.a, bits.w)
