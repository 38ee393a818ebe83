"""The typed records dpc_fx keeps, and the one small API that reads them.

Three records, each a frozen dataclass under one key:

* :class:`LayerMeta` on every matmul-like graph node, ``node.meta["dpc"]``: what the
  capacity pass measured and the assign pass decided for that layer.
* :class:`GraphInfo` on a GraphModule between passes, ``gm.meta["dpc"]``: what one pass
  tells the next about the whole graph (the trace's mode branches and module types, the
  graph's MACs, the resolved config).
* :class:`Compiled` on a module :func:`dpc_fx.compile` returned: the model it came from,
  the resolved config, every layer's record in order, where each layer's quantisers live,
  and the coverage.

Passes replace records (``dataclasses.replace``) on their own output and never edit their
input's; readers (:func:`records`, :func:`config_of`, :func:`compiled`) never write.
The quantisers themselves are modules under the compiled graph's submodule ``dpc``
(:data:`QUANTIZERS`), a :class:`DPCState`, so they move with ``.to()`` and ``state_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from dpc_fx.config import DPCConfig
from dpc_fx.errors import PassOrderError

__all__ = [
    "ATTENTION",
    "META_KEY",
    "QUANTIZERS",
    "Assignment",
    "Bits",
    "Compiled",
    "Coverage",
    "DPCState",
    "GraphInfo",
    "LayerMeta",
    "Leaf",
    "compiled",
    "config_of",
    "graph_info",
    "layer_meta",
    "records",
]

ATTENTION = "attention"  # LayerMeta.op of scaled_dot_product_attention
META_KEY = "dpc"  # the key of node.meta (a LayerMeta) and gm.meta (a GraphInfo)
QUANTIZERS = "dpc"  # the submodule of a rewritten graph holding its quantisers
_RECORD = "_dpc_fx"  # the attribute of a compiled module holding its Compiled record


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

    @property
    def quantised(self) -> bool:
        """Whether any of the layer's tensors is quantised."""
        return self.bits is not None and not self.bits.full_precision


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


@dataclass(frozen=True)
class Assignment:
    """What the policy decided (:func:`dpc_fx.policy.decide`) and the assign pass writes
    back: every layer's record with ``capacity``, ``bits`` and ``pinned`` set, in graph order,
    and the config that produced them with everything it left open resolved."""

    layers: tuple[LayerMeta, ...]
    config: DPCConfig


@dataclass(frozen=True)
class GraphInfo:
    """What the passes tell each other about a whole graph (``gm.meta["dpc"]``).

    Attributes:
        mode_branches: module paths whose own code branches on ``self.training`` and holds
            layers, with the reason (trace; ``""`` is the model itself).
        module_types: class name by module path of the traced model (trace), for naming
            functional layers after the module whose weight they read.
        macs: MACs of one forward of the whole graph on the example inputs (capacity).
        config: the config the assign pass resolved (``b_min="auto"``, ``budget``).
    """

    mode_branches: Mapping[str, str] = field(default_factory=dict)
    module_types: Mapping[str, str] = field(default_factory=dict)
    macs: int | None = None
    config: DPCConfig | None = None


def graph_info(gm: nn.Module) -> GraphInfo:
    """The :class:`GraphInfo` of a GraphModule from the passes (empty if it has none)."""
    info = getattr(gm, "meta", {}).get(META_KEY) if isinstance(gm, fx.GraphModule) else None
    return info if isinstance(info, GraphInfo) else GraphInfo()


def set_graph_info(gm: fx.GraphModule, **changes: Any) -> None:
    """Set fields of the :class:`GraphInfo` of ``gm``, a pass's own new output."""
    gm.meta[META_KEY] = dataclasses.replace(graph_info(gm), **changes)


@dataclass(frozen=True)
class Leaf:
    """A submodule kept whole because ``torch.fx`` could not trace it.

    Attributes:
        path: its module path (``""``: the model itself).
        module_type: its class name.
        reason: why tracing failed (FX's message, one line).
        macs: MACs its own code ran in full precision on the example inputs, outside its
            compiled children (``None`` without example inputs).
        share: ``macs`` as a share of the model's MACs.
    """

    path: str
    module_type: str
    reason: str
    macs: int | None = None
    share: float | None = None

    def __str__(self) -> str:
        where = f"'{self.path}'" if self.path else "the model itself"
        share = "" if self.share is None else f", {self.share:.1%} of MACs in full precision"
        return f"leaf {where} ({self.module_type}){share}: {self.reason}"


@dataclass(frozen=True)
class Coverage:
    """How much of a model :func:`dpc_fx.compile` reached.

    Attributes:
        traced: the model traced whole (no leaves).
        layers: matmul-like layers: every one the compiled parts hold (conv/linear modules,
            functional layers such as GPT-2's ``Conv1D``, products of activations,
            attention), and the conv/linear modules and ``nn.MultiheadAttention`` input
            projections of the leaves kept whole.
        compiled: those inside compiled parts, so under the plan (pinned ones included).
        quantised: those the compiled model quantises (any of their tensors).
        macs: MACs of one forward on the example inputs, attention's included (``None``
            without them).
        quantised_macs: MACs of those spent in quantised layers.
        leaves: the submodules kept whole, in module order.
        attention: attention layers (``scaled_dot_product_attention``) among ``compiled``.
        attention_quantised: those quantised.
        attention_kept: the config keeps attention in full precision
            (``DPCConfig(attention=False)``).
        captured: paths of the parts captured through ``torch.export`` rather than traced
            by ``torch.fx`` (``""``: the model itself).
    """

    traced: bool
    layers: int
    compiled: int
    quantised: int
    macs: int | None
    quantised_macs: int | None
    leaves: tuple[Leaf, ...] = field(default=())
    attention: int = 0
    attention_quantised: int = 0
    attention_kept: bool = False
    captured: tuple[str, ...] = ()

    @property
    def macs_share(self) -> float | None:
        """Share of the model's MACs spent in quantised layers."""
        if self.macs is None or self.quantised_macs is None:
            return None
        return self.quantised_macs / self.macs if self.macs else 0.0

    def lines(self) -> list[str]:
        """A summary line, then one line per leaf."""
        share = "" if self.macs_share is None else f", {self.macs_share:.1%} of MACs quantised"
        whole = "captured whole (torch.export)" if "" in self.captured else "traced whole"
        how = whole if self.traced else f"{len(self.leaves)} leaves kept whole"
        if self.captured and self.captured != ("",):
            how += f", {len(self.captured)} parts captured (torch.export)"
        attention = ""
        if self.attention_kept:
            attention = f"; attention ({self.attention}) in full precision (attention=False)"
        elif self.attention:
            attention = f"; attention: {self.attention_quantised}/{self.attention} quantised"
        head = (
            f"coverage: {how}; {self.quantised}/{self.layers} matmul-like layers quantised "
            f"({self.compiled} compiled){share}{attention}"
        )
        return [head, *(f"  {leaf}" for leaf in self.leaves)]

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass(frozen=True)
class Compiled:
    """What :func:`dpc_fx.compile` keeps with the module it returns.

    Attributes:
        source: the model it was compiled from (compiling the result again re-plans it).
        config: the config that produced the plan, with everything it left open resolved.
        layers: every matmul-like layer's record, in graph order (parts in model order).
        quantizers: per layer, the path of the module holding its quantisers (its
            ``act_q``/``weight_q``/``grad_q``, or the lowered layer itself); ``None`` for a
            layer in full precision.
        coverage: what the compile reached.
    """

    source: nn.Module = field(repr=False, compare=False)
    config: DPCConfig
    layers: tuple[LayerMeta, ...]
    quantizers: tuple[str | None, ...]
    coverage: Coverage


def compiled(module: nn.Module) -> Compiled | None:
    """The :class:`Compiled` record of a module :func:`dpc_fx.compile` returned, if any."""
    found = kept_attribute(module, _RECORD)
    return found if isinstance(found, Compiled) else None


def attach_compiled(module: nn.Module, record: Compiled) -> None:
    """Keep ``record`` with ``module`` (the driver's last step)."""
    keep_attribute(module, _RECORD, record)


def records(module: nn.Module) -> list[LayerMeta]:
    """The layer records of a compiled module, or of a GraphModule the passes annotated
    (its nodes' ``meta["dpc"]`` in graph order)."""
    found = compiled(module)
    if found is not None:
        return list(found.layers)
    if isinstance(module, fx.GraphModule):
        return [m for n in module.graph.nodes if isinstance(m := n.meta.get(META_KEY), LayerMeta)]
    return []


def config_of(module: nn.Module) -> DPCConfig | None:
    """The resolved config behind a compiled module or an assigned GraphModule."""
    found = compiled(module)
    return found.config if found is not None else graph_info(module).config


class DPCState(nn.Module):
    """The container of a rewritten graph's quantisers, as its submodule ``dpc``: one child
    per quantised layer (named after its node) holding that layer's quantisers."""

    def extra_repr(self) -> str:
        return f"layers={len(self._modules)}"


def keep_attribute(module: nn.Module, key: str, value: Any) -> None:
    """Keep ``value`` with ``module`` across ``copy.deepcopy`` and ``torch.save``, as a plain
    attribute (never a submodule, so ``state_dict`` keys do not change). A GraphModule's
    deepcopy keeps only its ``meta`` of such attributes, and ``torch.load`` all but its
    ``meta``: it gets both."""
    module.__dict__[key] = value
    if isinstance(module, fx.GraphModule):
        module.meta[key] = value


def kept_attribute(module: nn.Module, key: str) -> Any:
    meta = module.__dict__.get("meta")
    if isinstance(module, fx.GraphModule) and isinstance(meta, dict) and key in meta:
        return meta[key]
    return module.__dict__.get(key)
