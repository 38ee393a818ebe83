"""`DPCConfig`: every knob of the pipeline, in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dpc_fx.errors import ConfigError

__all__ = ["DPCConfig", "Override"]

Policy = Literal["dpc", "uniform"]
Capacity = Literal["params", "macs"]
Centre = Literal["median", "mean"]
# What an override sets: one bit-width for weights and activations (gradients keep
# grad_bits), a (w, a, g) triple, or None for full precision.
Override = int | tuple[int | None, int | None, int | None] | None


@dataclass(frozen=True, kw_only=True)
class DPCConfig:
    """How :func:`dpc_fx.compile` assigns bit-widths.

    Attributes:
        policy: ``"dpc"`` gives larger layers fewer bits (the paper's rule); ``"uniform"``
            gives every quantised layer ``b_max`` bits.
        b_min: fewest forward bits a layer may get (weights and input activations), or
            ``"auto"``: the fewest bits at which every layer's quantised weights keep a
            cosine similarity of at least ``similarity`` with the float ones.
        b_max: most forward bits a layer may get.
        grad_bits: bits of the gradient of each quantised layer's output, or ``None`` to
            leave gradients in full precision.
        delta: spread of the DPC rule in (0, 1]; with 1 the largest and smallest layers
            reach ``b_min`` and ``b_max``.
        capacity: what measures a layer's capacity: ``"params"`` (parameter count, needs no
            inputs) or ``"macs"`` (multiply-accumulates, needs example inputs).
        centre: the capacity that gets the mid-point bit-width: ``"median"`` or ``"mean"``.
        pin_first_last: keep the first and the last layer with parameters in full
            precision, as CPT does.
        overrides: bits for chosen layers, by module path (``"fc"``), glob pattern
            (``"*.downsample.*"``) or module type (``"Linear"``); a value is an int (weights
            and activations; gradients keep ``grad_bits``), a ``(w, a, g)`` triple, or
            ``None`` for full precision. A dict, or (pattern, value) pairs; later entries
            win over earlier ones. Kept as a tuple of pairs (also as ``override_rules``,
            typed so). Overridden layers do not enter the DPC statistics.
        budget: a target saving of training bit-operations versus static 8-bit, in (0, 1);
            ``delta`` (and if needed the bounds, and then pinning) are solved to meet it
            within one percentage point, never below ``floor_bits``. Needs example inputs.
        floor_bits: the fewest forward bits the budget solver may give a layer (3, CPT's
            lowest: below it training often collapses). A budget out of reach at the floor
            is an error that names the closest saving.
        similarity: the cosine-similarity threshold of ``b_min="auto"``.
        leaf_modules: module paths that tracing keeps whole (not traced into, not quantised).
        lower: run linear layers of at most 8 bits (weights, activations and gradients) on
            integer kernels in forward and backward: the CPU's u8 x s8 kernel (oneDNN's)
            where it is exact at the layer's bits (on x86 without VNNI: 7 bits or fewer),
            else ``torch._int_mm``. Their weights are then quantised per tensor, as integer
            products need.
        attention: quantise attention (``F.scaled_dot_product_attention``: query, key and
            value per tensor at the layer's activation bits, and its output gradient) like
            any layer whose inputs are activations. ``False`` keeps every attention layer in
            full precision (an override still wins), and ``dpc_fx.coverage`` says so.
            Attention has no parameters: under ``capacity="params"`` it has capacity 0 and
            gets ``b_max``; under ``capacity="macs"`` it is ranked by its MACs.
        fuse: run each quantised conv/linear layer (activation and weight quantised, at
            most 8 bits) as one autograd node that keeps only the integer codes of its input
            and weight for backward (packed to their bit-widths), not float copies. Same
            numbers as the unfused quantisers; ``False`` keeps one graph node per quantiser.
        check_finite: raise :class:`~dpc_fx.errors.NonFiniteError`, naming the layer, when a
            quantised tensor holds NaN or Inf (costs a check per tensor). Off, ranges come
            from the finite values and one bad element spoils only itself.

    Bit-widths run from 1 to 32; 32 means full precision.

    >>> DPCConfig(b_min=3, b_max=8).b_min
    3
    >>> DPCConfig(overrides={"fc": None, "*.downsample.*": 8}).overrides
    (('fc', None), ('*.downsample.*', 8))
    >>> DPCConfig(b_min=9, b_max=8)
    Traceback (most recent call last):
    ...
    dpc_fx.errors.ConfigError: DPCConfig: b_min=9 is greater than b_max=8; lower b_min or raise b_max.
    """

    policy: Policy = "dpc"
    b_min: int | Literal["auto"] = 4
    b_max: int = 8
    grad_bits: int | None = 8
    delta: float = 1.0
    capacity: Capacity = "params"
    centre: Centre = "median"
    pin_first_last: bool = True
    overrides: Mapping[str, Override] | tuple[tuple[str, Override], ...] = field(default=())
    budget: float | None = None
    floor_bits: int = 3
    similarity: float = 0.95
    leaf_modules: tuple[str, ...] = ()
    lower: bool = False
    attention: bool = True
    fuse: bool = True
    check_finite: bool = False

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, ("dpc", "uniform"))
        _check_choice("capacity", self.capacity, ("params", "macs"))
        _check_choice("centre", self.centre, ("median", "mean"))
        if self.b_min != "auto":
            _check_bits("b_min", self.b_min)
        _check_bits("b_max", self.b_max)
        if self.grad_bits is not None:
            _check_bits("grad_bits", self.grad_bits, none_ok=True)
        if self.b_min != "auto" and self.b_min > self.b_max:
            raise ConfigError(
                f"DPCConfig: b_min={self.b_min} is greater than b_max={self.b_max}; "
                "lower b_min or raise b_max."
            )
        _check_bits("floor_bits", self.floor_bits)
        _check_fraction("delta", self.delta, "(0, 1]", upper_closed=True, fix="try delta=1.0")
        _check_fraction("similarity", self.similarity, "(0, 1)", fix="try similarity=0.95")
        if self.budget is not None:
            _check_fraction(
                "budget",
                self.budget,
                "(0, 1)",
                fix="e.g. budget=0.3 for 30% fewer bit-operations than static 8-bit",
            )
        for flag in ("pin_first_last", "lower", "attention", "fuse", "check_finite"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(
                    f"DPCConfig: {flag}={getattr(self, flag)!r} must be True or False."
                )
        object.__setattr__(self, "overrides", _normalise_overrides(self.overrides))
        leaves = self.leaf_modules
        if isinstance(leaves, str) or not all(isinstance(p, str) for p in leaves):
            raise ConfigError(
                f"DPCConfig: leaf_modules={leaves!r} must be a tuple of module paths, e.g. ('backbone.roi',)."
            )
        object.__setattr__(self, "leaf_modules", tuple(leaves))

    def replace(self, **changes: Any) -> DPCConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def override_rules(self) -> tuple[tuple[str, Override], ...]:
        """``overrides`` as (pattern, value) pairs in order: the form it is kept in."""
        return self.overrides  # type: ignore[return-value]  # normalised on construction

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; :meth:`from_dict` reads them back."""
        out = dataclasses.asdict(self)
        out["overrides"] = [
            [pattern, list(v) if isinstance(v, tuple) else v] for pattern, v in self.override_rules
        ]
        out["leaf_modules"] = list(self.leaf_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DPCConfig:
        """A config from :meth:`to_dict`'s output (e.g. parsed JSON); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"DPCConfig: unknown field(s) {unknown}; known fields are {sorted(known)}."
            )
        values = dict(data)
        if "overrides" in values:
            values["overrides"] = tuple(
                (p, tuple(v) if isinstance(v, list) else v) for p, v in values["overrides"]
            )
        if "leaf_modules" in values:
            values["leaf_modules"] = tuple(values["leaf_modules"])
        return cls(**values)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"DPCConfig: {name}={value!r} is not one of {options}.")


def _check_bits(name: str, value: object, none_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
        extra = " (or None for full precision)" if none_ok else ""
        raise ConfigError(
            f"DPCConfig: {name}={value!r} is not a bit-width; use an int from 1 to 32{extra}."
        )


def _check_fraction(
    name: str, value: object, interval: str, *, fix: str, upper_closed: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = 0.0 < v < 1.0 or (upper_closed and v == 1.0)
    if not ok:
        raise ConfigError(f"DPCConfig: {name}={value!r} is outside {interval}; {fix}.")


def _normalise_overrides(raw: object) -> tuple[tuple[str, Override], ...]:
    items = list(raw.items()) if isinstance(raw, Mapping) else list(raw)  # type: ignore[call-overload]
    out: list[tuple[str, Override]] = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(
                f"DPCConfig: overrides entry {item!r} is not (pattern, bits); "
                "write overrides={'layer1.*': 6, 'fc': None}."
            )
        pattern, bits = item
        where = f"overrides[{pattern!r}]"
        if isinstance(bits, (tuple, list)):
            if len(bits) != 3:
                raise ConfigError(
                    f"DPCConfig: {where}={bits!r} must be one int, None, or (w, a, g)."
                )
            for b in bits:
                if b is not None:
                    _check_bits(where, b, none_ok=True)
            bits = tuple(bits)
        elif bits is not None:
            _check_bits(where, bits, none_ok=True)
        out.append((pattern, bits))
    return tuple(out)
