"""Pass 3, assign: give every matmul-like node its bit-widths.

Reads: ``meta["dpc"]`` from :func:`~dpc_fx.passes.capacity`, and a
:class:`~dpc_fx.DPCConfig`. Writes: a copy of the GraphModule whose records have
``capacity``, ``bits`` and ``pinned`` set, and ``gm.meta["dpc_config"]``: the config with
everything it left open resolved (``b_min="auto"``, ``budget``), so a plan can say exactly
what produced it. The graph itself is unchanged.

The DPC rule (Shen et al. 2025, as reconstructed in DESIGN.md): with ``N~`` the median (or
mean) capacity of the layers to quantise and ``b = max(N_max / N~, N~ / N_min)``,

    B_k = ceil((B_max + B_min) / 2 - (delta / 2) * (B_max - B_min) * log_b(N_k / N~))

clipped to ``[B_min, B_max]``: the median layer gets the mid-point, larger layers fewer
bits. Weights and input activations get ``B_k``; the output gradient gets ``grad_bits``.
Pinned layers (first and last) and overridden layers are set aside before the rule runs.

Before:                                  After:
    meta["dpc"] = LayerMeta(params=...)      meta["dpc"] = LayerMeta(..., bits=Bits(5, 5, 8))
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import warnings
from collections.abc import Sequence

import torch
from torch import fx

from dpc_fx.config import DPCConfig, Override
from dpc_fx.cost import bitops
from dpc_fx.errors import ConfigError, PlanError
from dpc_fx.meta import FULL_PRECISION, META_KEY, Bits, LayerMeta, layer_meta
from dpc_fx.passes._fx import (
    copy_graph_module,
    get_attr,
    layer_nodes,
    matmul_spec,
    parameter_source,
    require_graph,
)
from dpc_fx.plan import Plan, fingerprint
from dpc_fx.quant import fake_quantize

__all__ = ["assign", "dpc_bits"]


def assign(
    gm: fx.GraphModule, config: DPCConfig | None = None, *, plan: Plan | None = None
) -> fx.GraphModule:
    """Annotate (a copy of) ``gm`` with per-layer bit-widths under ``config``, or exactly
    as ``plan`` says (its own config then describes the result).

    Raises:
        PassOrderError: ``gm`` was not measured by the capacity pass.
        ConfigError: the config asks for something the graph cannot give: MACs without
            example inputs, an override that matches no layer, an unreachable budget.
        PlanError: the plan names layers the model lacks or misses layers it has.
    """
    require_graph(gm, "assign")
    new = copy_graph_module(gm)
    metas = {node: layer_meta(node, needed_by="assign") for node in layer_nodes(new)}
    if plan is not None:
        return _apply_plan(new, metas, plan)
    config = config or DPCConfig()
    fixed = _overrides(metas, config)
    if config.pin_first_last:
        for node in _pinned(metas):
            fixed.setdefault(node, FULL_PRECISION)
    free = [node for node in metas if node not in fixed]
    capacities = {node: _capacity(meta, config) for node, meta in metas.items()}

    if config.b_min == "auto":
        config = config.replace(b_min=_auto_b_min(new, free, config))
    if config.budget is not None:
        config = _solve_budget(config, [capacities[n] for n in free], metas, free, fixed)
    bits = dict(fixed)
    bits.update(zip(free, _free_bits([capacities[n] for n in free], config), strict=True))

    return _annotate(new, metas, bits, config)


def _annotate(
    gm: fx.GraphModule,
    metas: dict[fx.Node, LayerMeta],
    bits: dict[fx.Node, Bits],
    config: DPCConfig,
) -> fx.GraphModule:
    pinned = set(_pinned(metas)) if config.pin_first_last else set()
    for node, meta in metas.items():
        node.meta[META_KEY] = meta.replace(
            capacity=_capacity(meta, config)
            if meta.macs is not None or config.capacity == "params"
            else None,
            bits=bits[node],
            pinned=node in pinned and bits[node] == FULL_PRECISION,
        )
    gm.meta["dpc_config"] = config
    return gm


def _apply_plan(gm: fx.GraphModule, metas: dict[fx.Node, LayerMeta], plan: Plan) -> fx.GraphModule:
    if not isinstance(plan, Plan):
        raise PlanError(
            f"plan must be a dpc_fx.Plan, got {type(plan).__name__}; use dpc_fx.Plan.load(path)."
        )
    have = [m.layer for m in metas.values()]
    extra = [k for k in plan.layers if k not in set(have)]
    missing = [k for k in have if k not in plan.layers]
    if extra or missing:
        problems = []
        if extra:
            problems.append(f"layers in the plan but not in the model: {extra}")
        if missing:
            problems.append(f"layers in the model but not in the plan: {missing}")
        raise PlanError(
            f"plan does not fit this model: {'; '.join(problems)}. Make the plan from this "
            'model (dpc_fx.plan_of) or edit the plan\'s "layers".'
        )
    if plan.fingerprint and plan.fingerprint != fingerprint(list(metas.values())):
        warnings.warn(
            "the plan was made for a model with the same layer names but other parameter "
            "counts; its bits are applied as they are.",
            stacklevel=3,
        )
    bits = {node: plan.layers[meta.layer] for node, meta in metas.items()}
    return _annotate(gm, metas, bits, plan.config)


def dpc_bits(
    capacities: Sequence[float],
    *,
    b_min: int,
    b_max: int,
    delta: float = 1.0,
    centre: str = "median",
) -> list[int]:
    """Bit-widths for layers of the given capacities under the DPC rule.

    Layers of capacity 0 (e.g. a matmul of two activations, ranked by parameters) have
    nothing to shrink; they get ``b_max`` and do not enter the statistics.

    >>> dpc_bits([100, 1_000, 10_000], b_min=4, b_max=8)
    [8, 6, 4]
    >>> dpc_bits([100, 1_000, 10_000], b_min=4, b_max=8, delta=0.5)
    [7, 6, 5]
    >>> dpc_bits([5, 5, 5], b_min=4, b_max=8)
    [6, 6, 6]
    """
    sized = [c for c in capacities if c > 0]
    if not sized:
        return [b_max] * len(capacities)
    mid = statistics.median(sized) if centre == "median" else statistics.fmean(sized)
    base = max(max(sized) / mid, mid / min(sized))
    half = (b_max + b_min) / 2
    out = []
    for c in capacities:
        if c <= 0:
            out.append(b_max)
            continue
        # Equal capacities give base == 1 (or 1 + an ulp, from the mean): no spread.
        log = math.log(c / mid, base) if base > 1 + 1e-9 else 0.0
        # Round away float noise before ceil: 6.000000000001 must stay 6.
        raw = round(half - delta / 2 * (b_max - b_min) * log, 9)
        out.append(min(b_max, max(b_min, math.ceil(raw))))
    return out


def _free_bits(capacities: list[float], config: DPCConfig) -> list[Bits]:
    assert isinstance(config.b_min, int)
    if config.policy == "uniform":
        widths = [config.b_max] * len(capacities)
    else:
        widths = dpc_bits(
            capacities,
            b_min=config.b_min,
            b_max=config.b_max,
            delta=config.delta,
            centre=config.centre,
        )
    return [Bits(b, b, config.grad_bits) for b in widths]


def _capacity(meta: LayerMeta, config: DPCConfig) -> float:
    if config.capacity == "params":
        return float(meta.params)
    if meta.macs is None:
        raise ConfigError(
            f"DPCConfig: capacity='macs' needs the layers' MACs, but layer '{meta.layer}' was "
            "measured without example inputs; pass example_inputs to dpc_fx.compile or use "
            "capacity='params'."
        )
    return float(meta.macs)


def _pinned(metas: dict[fx.Node, LayerMeta]) -> list[fx.Node]:
    """The first and the last layer that hold parameters, in graph order (CPT's choice)."""
    weighted = [node for node, meta in metas.items() if meta.params > 0]
    return [weighted[0], weighted[-1]] if weighted else []


def _overrides(metas: dict[fx.Node, LayerMeta], config: DPCConfig) -> dict[fx.Node, Bits]:
    """Bits of the layers the config's overrides name; later entries win."""
    out: dict[fx.Node, Bits] = {}
    unmatched = []
    for pattern, value in config.override_rules:
        hits = [node for node, meta in metas.items() if _matches(pattern, meta)]
        if not hits:
            unmatched.append(pattern)
        for node in hits:
            out[node] = _override_bits(value, config)
    if unmatched:
        known = ", ".join(m.layer for m in list(metas.values())[:8])
        raise ConfigError(
            f"DPCConfig: overrides {unmatched} match no matmul-like layer; patterns match a "
            f"module path or node name (glob allowed) or a module type. Layers include: {known}..."
        )
    return out


def _matches(pattern: str, meta: LayerMeta) -> bool:
    kind = meta.module_type or meta.op
    return fnmatch.fnmatchcase(meta.layer, pattern) or pattern in (kind, f"nn.{kind}")


def _override_bits(value: Override, config: DPCConfig) -> Bits:
    if value is None:
        return FULL_PRECISION
    if isinstance(value, tuple):
        w, a, g = (None if b == 32 else b for b in value)
        return Bits(w, a, g)
    return FULL_PRECISION if value == 32 else Bits(value, value, config.grad_bits)


def _auto_b_min(gm: fx.GraphModule, free: list[fx.Node], config: DPCConfig) -> int:
    """The fewest bits at which every free layer's weights keep ``config.similarity``."""
    weights = []
    for node in free:
        spec = matmul_spec(node, gm)
        assert spec is not None
        if spec.module is not None:
            weight = spec.module.weight
            assert isinstance(weight, torch.Tensor)
            weights.append((weight.detach(), spec.channel_dim))
            continue
        operand = spec.weight.get(node.args, node.kwargs)
        source = parameter_source(operand) if isinstance(operand, fx.Node) else None
        if source is not None:
            weights.append((get_attr(gm, source).detach(), None))
    for b in range(1, config.b_max + 1):
        if all(
            _cosine(w, fake_quantize(w, b, channel_dim=dim)) >= config.similarity
            for w, dim in weights
        ):
            return b
    return config.b_max


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
    )


def _solve_budget(
    config: DPCConfig,
    capacities: list[float],
    metas: dict[fx.Node, LayerMeta],
    free: list[fx.Node],
    fixed: dict[fx.Node, Bits],
) -> DPCConfig:
    """``config`` with ``delta`` (and if it must, ``b_min``/``b_max``) set so the plan saves
    ``config.budget`` of static 8-bit's bit-operations, within one percentage point."""
    assert config.budget is not None and isinstance(config.b_min, int)
    macs = {}
    for node, meta in metas.items():
        if meta.macs is None:
            raise ConfigError(
                f"DPCConfig: budget={config.budget} needs MACs, but layer '{meta.layer}' has none; "
                "pass example_inputs to dpc_fx.compile."
            )
        macs[node] = meta.macs
    fixed_cost = sum(sum(bitops(macs[n], b)) for n, b in fixed.items())
    eight = Bits(8, 8, 8)
    base = sum(
        sum(bitops(macs[n], FULL_PRECISION if b.full_precision else eight))
        for n, b in fixed.items()
    )
    base += sum(sum(bitops(macs[n], eight)) for n in free)
    if base == 0:
        raise ConfigError("DPCConfig: budget needs layers with MACs; this model has none.")

    def saving(candidate: DPCConfig) -> float:
        widths = _free_bits(capacities, candidate)
        total = fixed_cost + sum(sum(bitops(macs[n], b)) for n, b in zip(free, widths, strict=True))
        return 1.0 - total / base

    deltas = [config.delta] + [i / 50 for i in range(1, 51)]
    pairs = [(lo, hi) for hi in range(1, 17) for lo in range(1, hi + 1)]
    by_distance: dict[int, list[tuple[int, int]]] = {}
    for lo, hi in pairs:
        by_distance.setdefault(abs(lo - config.b_min) + abs(hi - config.b_max), []).append((lo, hi))
    best: tuple[float, DPCConfig] | None = None
    for distance in sorted(by_distance):
        hits: list[tuple[int, float, DPCConfig]] = []
        for lo, hi in by_distance[distance]:
            for delta in deltas:
                candidate = config.replace(b_min=lo, b_max=hi, delta=delta, budget=None)
                error = abs(saving(candidate) - config.budget)
                if error <= 0.01:
                    hits.append((-lo, error, candidate))
                if best is None or error < best[0] - 1e-12:
                    best = (error, candidate)
        if hits:
            # Among equally near bounds, keep the fewest bits as high as possible.
            chosen = min(hits, key=lambda h: (h[0], h[1]))[2].replace(budget=config.budget)
            fewest = min((b.w for b in _free_bits(capacities, chosen) if b.w), default=None)
            if fewest is not None and fewest < 3:
                warnings.warn(
                    f"DPCConfig: budget={config.budget} puts some layers at {fewest} bits "
                    f"(b_min={chosen.b_min}, b_max={chosen.b_max}, delta={chosen.delta}); "
                    "training at so few bits often fails to converge. A smaller budget, or "
                    "pin_first_last=False (more layers to share the saving), keeps more bits.",
                    stacklevel=4,
                )
            return chosen
    assert best is not None
    reached = saving(best[1])
    raise ConfigError(
        f"DPCConfig: budget={config.budget:.2f} is out of reach for this model; the closest "
        f"saving versus static 8-bit is {reached:.3f} (b_min={best[1].b_min}, "
        f"b_max={best[1].b_max}, delta={best[1].delta}). Full-precision layers bound the "
        "saving: unpin them (pin_first_last=False) or ask for a budget nearer that."
    )
