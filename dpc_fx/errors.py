"""The exceptions dpc_fx raises.

Every error is a :class:`DPCError`; catch that to catch them all. Messages say what failed,
where (module path or graph node) and how to fix it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DPCError", "PassOrderError", "PlanError", "ShapeError", "TraceError"]


class DPCError(Exception):
    """Base class of every error dpc_fx raises."""


class ConfigError(DPCError, ValueError):
    """A :class:`~dpc_fx.DPCConfig` field, or an argument of a public function, is invalid."""


class TraceError(DPCError):
    """``torch.fx`` could not trace the model; the message names the submodule that broke."""


class ShapeError(DPCError):
    """The example inputs do not fit the model; the message names the failing node."""


class PassOrderError(DPCError):
    """A pass read metadata that an earlier pass should have written."""


class PlanError(DPCError):
    """A plan does not fit the model it is applied to, or a plan file is malformed."""
