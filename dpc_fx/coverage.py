"""What a compile reached: matmul-like layers quantised (attention among them), share of MACs
quantised (attention's in the total), leaves kept whole.

Computed once, by the driver, from the part tree and the parts' assigned graphs; kept in the
compiled module's :class:`~dpc_fx.meta.Compiled` record and read by :func:`dpc_fx.coverage`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from dpc_fx.meta import ATTENTION, Coverage, LayerMeta, Leaf, graph_info, records
from dpc_fx.parts import Part, Tree
from dpc_fx.passes._matmul import MODULES

__all__ = ["measure"]


def measure(tree: Tree, assigned: dict[str, fx.GraphModule]) -> Coverage:
    """The coverage of ``tree`` whose parts' assigned graphs are ``assigned`` (by path).

    Layers are every matmul-like layer the compiled parts hold (conv/linear modules, GPT-2's
    ``Conv1D``, products of activations, attention), and the conv/linear modules of the
    leaves kept whole, which run in full precision.
    """
    modules = _weight_layers(tree.model)
    quantised_by_layer: dict[str, bool] = {}
    attention: dict[str, bool] = {}
    kept = False
    for gm in assigned.values():
        config = graph_info(gm).config
        kept = kept or (config is not None and not config.attention)
        for meta in records(gm):
            key = _owner(meta.layer, modules) or meta.layer
            quantised_by_layer[key] = quantised_by_layer.get(key, False) or meta.quantised
            if meta.op == ATTENTION:
                attention[key] = quantised_by_layer[key]
    counts = (
        len(modules | set(quantised_by_layer)),
        len(quantised_by_layer),
        sum(quantised_by_layer.values()),
    )

    def coverage(
        traced: bool, total: int | None, q_total: int | None, leaves: tuple[Leaf, ...] = ()
    ) -> Coverage:
        return Coverage(
            traced,
            *counts,
            total,
            q_total,
            leaves,
            attention=len(attention),
            attention_quantised=sum(attention.values()),
            attention_kept=kept and bool(attention),
            captured=tuple(p.path for p in tree.parts if p.captured),
        )

    if tree.whole:
        gm = assigned[""]
        total = graph_info(gm).macs
        q_total = _quantised_macs(records(gm)) if total is not None else None
        return coverage(True, total, q_total)

    macs = tree.macs
    total = macs.get("") if macs else None
    q_total = None if total is None else 0
    if q_total is not None:
        for path, gm in assigned.items():
            own, whole = _quantised_macs(records(gm)), graph_info(gm).macs
            if own and whole:  # the first call's share, over all of the module's calls
                q_total += round(macs.get(path, whole) * own / whole)

    def spent(part: Part) -> int:  # a container is never called: count its children
        if part.container:
            return sum(spent(c) for c in part.children)
        return macs.get(part.path, 0)

    leaves = []
    for part in tree.root.walk():
        if part.gm is not None or part.container:
            continue
        own = None
        if total is not None:
            own = spent(part) - sum(spent(c) for c in part.children)
        share = None if own is None else own / total if total else 0.0
        leaves.append(Leaf(part.path, type(part.module).__name__, part.short_reason, own, share))
    return coverage(False, total, q_total, tuple(leaves))


def _weight_layers(model: nn.Module) -> set[str]:
    """Names of the model's matmul-like weights: conv/linear modules by path, and
    ``nn.MultiheadAttention``'s input projections as ``path.in_proj`` (or ``q_proj``,
    ``k_proj``, ``v_proj`` when keys and values have their own sizes)."""
    kinds = tuple(MODULES)
    out = set()
    for path, m in model.named_modules():
        if isinstance(m, kinds):
            out.add(path)
        elif isinstance(m, nn.MultiheadAttention):
            projections = ("in_proj",) if m._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj")
            out.update(f"{path}.{p}" if path else p for p in projections)
    return out


def _owner(layer: str, weights: set[str]) -> str | None:
    """The model weight a layer key names: itself, or for a numbered slice of a packed
    weight (``attn.in_proj.0``) the packed weight; ``None`` for a product of activations."""
    if layer in weights:
        return layer
    base, _, index = layer.rpartition(".")
    return base if index.isdigit() and base in weights else None


def _quantised_macs(metas: Sequence[LayerMeta]) -> int | None:
    """MACs of the layers that run with any quantised tensor (``None``: some lack MACs)."""
    if any(m.macs is None for m in metas):
        return None
    return sum(m.macs or 0 for m in metas if m.quantised)
