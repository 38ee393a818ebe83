"""Pass 1, trace: capture an ``nn.Module`` as a ``torch.fx.GraphModule``.

Reads: the model. Writes: a new GraphModule (the model itself is left alone; the graph
module shares its submodules and parameters, as ``torch.fx.symbolic_trace`` does).

Attention that FX would record as one opaque call (``nn.MultiheadAttention``,
``nn.Transformer`` and its parts, torchvision's Swin attention) is traced through a
stand-in that computes the same thing with its projections in the graph
(``passes/_standins.py``), so they can be quantised. Modules that branch on
``self.training`` in ways FX would freeze (torchvision's stochastic depth) stay calls.

If tracing fails, the error names the innermost submodule whose ``forward`` was running,
with FX's own reason, and how to get past it.

Before: ``model`` (any nn.Module). After:

    x ──► conv1 ──► bn1 ──► relu ──► ... ──► fc ──► output      (one node per call)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from torch import fx, nn

from dpc_fx.errors import ConfigError, TraceError
from dpc_fx.passes._fx import keep_module_order, keep_unused
from dpc_fx.passes._standins import standin_for, swin_standins

__all__ = ["trace"]


class _Tracer(fx.Tracer):
    """A tracer that remembers where it failed and treats chosen submodules as leaves."""

    def __init__(self, leaf_modules: frozenset[str]) -> None:
        super().__init__()
        self.leaf_paths = leaf_modules
        self.failed_at: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or _follows_mode(m):
            return True
        return standin_for(m, _no_mode) is None and super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        path = self.path_of_module(m)
        mode = functools.partial(self.create_proxy, "get_attr", _join(path, "training"), (), {})
        if path not in self.leaf_paths:
            forward = standin_for(m, mode) or forward
        try:
            with swin_standins(m, mode):
                return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module sees the error first
                self.failed_at = (path, type(m).__name__)
            raise


def trace(
    model: nn.Module,
    *,
    leaf_modules: Sequence[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule.

    Args:
        model: the module to trace; it is not modified.
        leaf_modules: module paths to keep as single opaque calls (not traced into).
        concrete_args: forwarded to ``torch.fx.Tracer.trace`` to specialise arguments
            (e.g. a flag that drives control flow).

    Raises:
        TraceError: naming the submodule that could not be traced and why.

    >>> gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"trace: expected an nn.Module, got {type(model).__name__}; "
            "pass the model object (e.g. torchvision.models.resnet18())."
        )
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(leaf_modules) - names)
    if unknown:
        raise ConfigError(
            f"trace: leaf_modules {unknown} are not submodules of {type(model).__name__}; "
            "use paths as model.named_modules() lists them."
        )
    tracer = _Tracer(frozenset(leaf_modules))
    saved = {m: dict(vars(m)) for m in model.modules()}
    try:
        graph = tracer.trace(model, concrete_args)
        # Before restoring: FX keeps tensor constants as attributes of the model.
        gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    except Exception as e:
        path, cls = tracer.failed_at or ("", type(model).__name__)
        where = f"submodule '{path}' ({cls})" if path else f"the forward of {cls} itself"
        fix = (
            f"keep it whole with DPCConfig(leaf_modules=('{path}',))"
            if path
            else "move the untraceable code into a submodule and list it in DPCConfig(leaf_modules=...)"
        )
        reason = f"{type(e).__name__}: {_first_line(e)}"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {where} failed with "
            f"{reason}. To get past it, {fix}, or make the "
            "code traceable (no Python control flow on tensor values; torch.fx.wrap for "
            "helper functions; concrete_args for flags).",
            path=path,
            reason=reason,
        ) from e
    finally:
        _restore(saved)
    name = model.__class__.__name__
    keep_module_order(gm, model)
    keep_unused(gm, model)  # same state_dict keys as the model, used by forward or not
    gm.meta["dpc_source"] = name
    # Class names by module path: GraphModule keeps plain holders for modules it only reads
    # weights from, and a functional layer on a module's weight is named after that module.
    gm.meta["dpc_module_types"] = {p: type(m).__name__ for p, m in model.named_modules()}
    return gm


def _no_mode() -> Any:
    raise AssertionError("only asked for while tracing")


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _follows_mode(m: nn.Module) -> bool:
    """Kept as a call so it follows ``train()``/``eval()``: FX would freeze the branch on
    ``self.training`` at the mode of the trace (torchvision's stochastic depth, say,
    would keep dropping residual branches in eval)."""
    cls = type(m)
    return (cls.__module__, cls.__name__) in _MODE_LEAVES


_MODE_LEAVES = frozenset({("torchvision.ops.stochastic_depth", "StochasticDepth")})


def _restore(saved: dict[nn.Module, dict[str, Any]]) -> None:
    """Undo attributes a forward set while being traced: some modules cache values on their
    first call (torchvision's ``MultiScaleRoIAlign.scales``), which would keep proxies."""
    for module, attrs in saved.items():
        now = vars(module)
        for key in [k for k in now if k not in attrs]:
            del now[key]
        for key, value in attrs.items():
            if now.get(key) is not value:
                now[key] = value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "(no message)"
