"""The policy: layer records and a config in, bit-widths out. No graph, no module.

The DPC rule (Shen et al. 2025, as reconstructed in DESIGN.md): with ``N~`` the median (or
mean) capacity of the layers to quantise and ``b = max(N_max / N~, N~ / N_min)``,

    B_k = ceil((B_max + B_min) / 2 - (delta / 2) * (B_max - B_min) * log_b(N_k / N~))

clipped to ``[B_min, B_max]``: the median layer gets the mid-point, larger layers fewer
bits. Weights and input activations get ``B_k``; the output gradient gets ``grad_bits``.
Overridden layers and the pinned first and last layers are set aside before the rule runs.
On top: ``policy="uniform"``, automatic bounds (``b_min="auto"``), a cost budget, and a
user's :class:`~dpc_fx.Plan` applied exactly.

>>> from dpc_fx.meta import LayerMeta
>>> layer = lambda name, params: LayerMeta(layer=name, op="linear", module_type="Linear",
...     params=params, macs=None, flops=None, out_shape=None, depth=0)
>>> sizes = {"stem": 10, "small": 100, "median": 1_000, "large": 10_000, "head": 10}
>>> out = decide([layer(name, params) for name, params in sizes.items()])
>>> [str(m.bits) for m in out.layers]         # the first and last layers are pinned
['fp/fp/fp', '8/8/8', '6/6/8', '4/4/8', 'fp/fp/fp']
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import warnings
from collections.abc import Mapping, Sequence

import torch

from dpc_fx.config import DPCConfig, Override
from dpc_fx.cost import bitops
from dpc_fx.errors import ConfigError, PlanError
from dpc_fx.meta import ATTENTION, FULL_PRECISION, Assignment, Bits, LayerMeta
from dpc_fx.plan import Plan, fingerprint
from dpc_fx.quant import fake_quantize

__all__ = ["decide", "dpc_bits"]

# A layer's weight and the dimension of its output channels (``None``: per tensor).
Weights = Mapping[str, tuple[torch.Tensor, int | None]]


def decide(
    layers: Sequence[LayerMeta],
    config: DPCConfig | None = None,
    *,
    plan: Plan | None = None,
    weights: Weights | None = None,
) -> Assignment:
    """Bits for every layer under ``config`` (or exactly as ``plan`` says), with the config
    that produced them, everything it left open resolved.

    Args:
        layers: the model's layer records in graph order, as the capacity pass made them.
        weights: each layer's weight, by layer key; needed for ``b_min="auto"`` only.

    Raises:
        ConfigError: the config asks for something the layers cannot give: MACs without
            example inputs, an override that matches no layer, an unreachable budget.
        PlanError: the plan names layers the model lacks or misses layers it has.
    """
    layers = tuple(layers)
    if plan is not None:
        return _apply_plan(layers, plan)
    config = config or DPCConfig()
    capacities = [_capacity(m, config) for m in layers]
    if config.b_min == "auto":
        config = config.replace(b_min=_auto_b_min(layers, config, weights or {}))
    if config.budget is not None:
        config = _solve_budget(layers, capacities, config)
    return _annotate(layers, _bits(layers, capacities, config), config)


def _bits(
    layers: Sequence[LayerMeta],
    capacities: list[float],
    config: DPCConfig,
    fixed: dict[int, Bits] | None = None,
) -> list[Bits]:
    """Every layer's bits under a config with its bounds resolved (``fixed``: the layers
    the rule does not choose, when the caller has them already)."""
    fixed = _fixed(layers, config) if fixed is None else fixed
    free = [i for i in range(len(layers)) if i not in fixed]
    widths = _free_bits([capacities[i] for i in free], config)
    out = dict(fixed)
    out.update(zip(free, widths, strict=True))
    return [out[i] for i in range(len(layers))]


def _fixed(layers: Sequence[LayerMeta], config: DPCConfig) -> dict[int, Bits]:
    """Layers whose bits the rule does not choose: overrides, then the pinned ones, then
    attention when the config keeps it in full precision."""
    fixed = _overrides(layers, config)
    if config.pin_first_last:
        for i in _pinned(layers):
            fixed.setdefault(i, FULL_PRECISION)
    if not config.attention:
        for i, m in enumerate(layers):
            if m.op == ATTENTION:
                fixed.setdefault(i, FULL_PRECISION)
    return fixed


def _annotate(layers: Sequence[LayerMeta], bits: list[Bits], config: DPCConfig) -> Assignment:
    pinned = set(_pinned(layers)) if config.pin_first_last else set()
    out = tuple(
        m.replace(
            capacity=_capacity(m, config)
            if m.macs is not None or config.capacity == "params"
            else None,
            bits=b,
            pinned=i in pinned and b == FULL_PRECISION,
        )
        for i, (m, b) in enumerate(zip(layers, bits, strict=True))
    )
    return Assignment(out, config)


def _apply_plan(layers: tuple[LayerMeta, ...], plan: Plan) -> Assignment:
    if not isinstance(plan, Plan):
        raise PlanError(
            f"plan must be a dpc_fx.Plan, got {type(plan).__name__}; use dpc_fx.Plan.load(path)."
        )
    have = [m.layer for m in layers]
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
    if plan.fingerprint and plan.fingerprint != fingerprint(list(layers)):
        warnings.warn(
            "the plan was made for a model with the same layer names but other parameter "
            "counts; its bits are applied as they are.",
            stacklevel=4,
        )
    return _annotate(layers, [plan.layers[m.layer] for m in layers], plan.config)


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


def _pinned(layers: Sequence[LayerMeta]) -> list[int]:
    """The first and the last layer that hold parameters, in graph order (CPT's choice)."""
    weighted = [i for i, m in enumerate(layers) if m.params > 0]
    return [weighted[0], weighted[-1]] if weighted else []


def _overrides(layers: Sequence[LayerMeta], config: DPCConfig) -> dict[int, Bits]:
    """Bits of the layers the config's overrides name; later entries win."""
    out: dict[int, Bits] = {}
    unmatched = []
    for pattern, value in config.override_rules:
        hits = [i for i, m in enumerate(layers) if _matches(pattern, m)]
        if not hits:
            unmatched.append(pattern)
        for i in hits:
            out[i] = _override_bits(value, config)
    if unmatched:
        known = ", ".join(m.layer for m in layers[:8])
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


def _auto_b_min(layers: Sequence[LayerMeta], config: DPCConfig, weights: Weights) -> int:
    """The fewest bits at which every free layer's weights keep ``config.similarity``."""
    fixed = _fixed(layers, config)
    free = [weights[m.layer] for i, m in enumerate(layers) if i not in fixed and m.layer in weights]
    for b in range(1, config.b_max + 1):
        if all(
            _cosine(w.detach(), fake_quantize(w.detach(), b, channel_dim=dim)) >= config.similarity
            for w, dim in free
        ):
            return b
    return config.b_max


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
    )


def _solve_budget(
    layers: Sequence[LayerMeta], capacities: list[float], config: DPCConfig
) -> DPCConfig:
    """``config`` with ``delta`` (and if it must, the bounds, then pinning) set so the plan
    saves ``config.budget`` of static 8-bit's bit-operations within one percentage point,
    with no layer below ``config.floor_bits``.

    The search keeps what the user chose as far as it can: pinning before anything else,
    then the bounds nearest the configured ones, then the fewest bits as high as possible.
    """
    assert config.budget is not None and isinstance(config.b_min, int)
    for m in layers:
        if m.macs is None:
            raise ConfigError(
                f"DPCConfig: budget={config.budget} needs MACs, but layer '{m.layer}' has none; "
                "pass example_inputs to dpc_fx.compile."
            )
    macs = [m.macs or 0 for m in layers]
    if not any(macs):
        raise ConfigError("DPCConfig: budget needs layers with MACs; this model has none.")

    fixed = {pin: _fixed(layers, config.replace(pin_first_last=pin)) for pin in (True, False)}

    def saving(candidate: DPCConfig) -> float:
        """1 - cost / static 8-bit's cost, as :func:`dpc_fx.cost` counts them."""
        total = base = 0
        chosen = _bits(layers, capacities, candidate, fixed[candidate.pin_first_last])
        for n, b in zip(macs, chosen, strict=True):
            total += sum(bitops(n, b))
            base += sum(bitops(n, FULL_PRECISION if b.full_precision else Bits(8, 8, 8)))
        return 1.0 - total / base if base else 0.0

    floor = config.floor_bits
    deltas = [config.delta] + [i / 50 for i in range(1, 51)]
    pairs = [(lo, hi) for hi in range(floor, 17) for lo in range(floor, hi + 1)]
    by_distance: dict[int, list[tuple[int, int]]] = {}
    for lo, hi in pairs:
        by_distance.setdefault(abs(lo - config.b_min) + abs(hi - config.b_max), []).append((lo, hi))
    best: tuple[float, DPCConfig] | None = None
    for pin in dict.fromkeys((config.pin_first_last, False)):
        for distance in sorted(by_distance):
            hits: list[tuple[int, float, DPCConfig]] = []
            for lo, hi in by_distance[distance]:
                for delta in deltas:
                    candidate = config.replace(
                        b_min=lo, b_max=hi, delta=delta, pin_first_last=pin, budget=None
                    )
                    error = abs(saving(candidate) - config.budget)
                    if error <= 0.01:
                        hits.append((-lo, error, candidate))
                    if best is None or error < best[0] - 1e-12:
                        best = (error, candidate)
            if hits:
                # Among equally near bounds, keep the fewest bits as high as possible.
                return min(hits, key=lambda h: (h[0], h[1]))[2].replace(budget=config.budget)
    assert best is not None
    reached = saving(best[1])
    raise ConfigError(
        f"DPCConfig: budget={config.budget:.2f} is out of reach for this model; the closest "
        f"saving versus static 8-bit is {reached:.3f} (b_min={best[1].b_min}, "
        f"b_max={best[1].b_max}, delta={best[1].delta}, "
        f"pin_first_last={best[1].pin_first_last}) with no layer below floor_bits={floor}. "
        "Ask for a budget nearer that, or lower floor_bits (training below 3 bits often fails "
        "to converge)."
    )
