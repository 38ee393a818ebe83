"""The exceptions dpc_fx raises.

Every error is a :class:`DPCError`; catch that to catch them all. Messages say what failed,
where (module path or graph node) and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DPCError",
    "NonFiniteError",
    "PassOrderError",
    "PlanError",
    "ShapeError",
    "TraceError",
]


class DPCError(Exception):
    """Base class of every error dpc_fx raises."""


class ConfigError(DPCError, ValueError):
    """A :class:`~dpc_fx.DPCConfig` field, or an argument of a public function, is invalid."""


class TraceError(DPCError):
    """``torch.fx`` could not trace the model; the message names the submodule that broke.

    Attributes:
        path: module path of the innermost submodule whose ``forward`` was running when
            tracing failed, ``""`` when the model's own ``forward`` failed.
        reason: FX's own reason, one line.
    """

    def __init__(self, message: str, *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class ShapeError(DPCError):
    """The example inputs do not fit the model; the message names the failing node.

    Attributes:
        node: name of the graph node that failed (``""`` if none).
        module: module path the failing code belongs to (``""`` if unknown).
    """

    def __init__(self, message: str, *, node: str = "", module: str = "") -> None:
        super().__init__(message)
        self.node = node
        self.module = module


class PassOrderError(DPCError):
    """A pass read metadata that an earlier pass should have written."""


class PlanError(DPCError):
    """A plan does not fit the model it is applied to, or a plan file is malformed."""


class NonFiniteError(DPCError, FloatingPointError):
    """A quantiser met NaN or Inf with ``DPCConfig(check_finite=True)``; names the layer."""
