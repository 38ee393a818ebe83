"""Pass 1, trace: capture an ``nn.Module`` as a ``torch.fx.GraphModule``.

Reads: the model. Writes: a new GraphModule (the model itself is left alone; the graph
module shares its submodules and parameters, as ``torch.fx.symbolic_trace`` does).

Attention that FX would record as one opaque call (``nn.MultiheadAttention``,
``nn.Transformer`` and its parts, torchvision's Swin attention) is traced through a
stand-in that computes the same thing with its projections in the graph
(``passes/_standins.py``), whether it is a submodule or the model itself, so they can be
quantised.

FX records ``q, k, v = qkv`` as three ``select`` reads, each of which adds a zero-filled
copy of ``qkv`` to its gradient in backward; the trace reads such rows from one
:func:`rows` call (``unbind``), as the eager model does.

FX freezes ``self.training`` at the trace's mode. One procedure settles it: every trace
makes a dropout call whose ``training`` flag is the calling module's read that flag at
run time. When some class's source mentions ``training``, or a flag was made a run-time
read, the model is traced in the other mode too and the two graphs are compared, module
by module, node by node (op, target, constant arguments). Modules without layers whose
code differs (torchvision's stochastic depth) then stay calls that follow
``train()``/``eval()`` (one more trace); modules with layers whose code differs
(GoogLeNet's auxiliary classifiers, run in training only) are listed in the graph's
:class:`~dpc_fx.meta.GraphInfo` (``mode_branches``): ``dpc_fx.compile`` keeps them whole
and compiles their children; a plain ``trace`` warns that the graph keeps the traced
mode's branch.

If tracing fails, the error names the innermost submodule whose ``forward`` was running,
with FX's own reason, and how to get past it.

Before: ``model`` (any nn.Module). After:

    x ──► conv1 ──► bn1 ──► relu ──► ... ──► fc ──► output      (one node per call)
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, fx, nn

from dpc_fx.errors import ConfigError, TraceError
from dpc_fx.meta import set_graph_info
from dpc_fx.passes._graph import join, keep_module_order, keep_unused
from dpc_fx.passes._matmul import MODULES
from dpc_fx.passes._standins import standin_for

__all__ = ["MODE_BRANCH_REASON", "rows", "trace"]


# Dropout calls whose ``training`` argument (third, or by keyword) a module usually passes
# as ``self.training``.
_DROPOUTS = frozenset(
    {
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
    }
)


class _Tracer(fx.Tracer):
    """A tracer that remembers where it failed, treats chosen submodules as leaves, runs
    attention stand-ins in place of their modules' forwards, and makes dropout follow the
    mode.

    A dropout call whose ``training`` flag equals the calling module's reads that module's
    flag at run time instead (a ``get_attr`` node), so ``F.dropout(x, p,
    training=self.training)`` follows ``train()``/``eval()`` (stand-ins, which read the
    mode themselves, are left as they are). A literal that merely equals the flag in the
    mode traced (``True`` in training) gets the same treatment; ``_settle_mode`` traces
    the other mode too and compares, which tells the two apart.
    """

    def __init__(self, leaf_modules: frozenset[str]) -> None:
        super().__init__()
        self.leaf_paths = leaf_modules
        self.failed_at: tuple[str, str] | None = None
        self.entered: set[str] = set()  # modules whose forward ran (leaves included)
        self.running: list[tuple[str, nn.Module]] = []  # the modules being traced into
        self.reads_mode = False  # whether a dropout flag was made a run-time read

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *rest: Any,
        **more: Any,
    ) -> fx.Proxy:
        if kind == "call_function" and target in _DROPOUTS:
            path, module = self.running[-1] if self.running else ("", self.root)
            flag = kwargs.get("training", args[2] if len(args) > 2 else None)
            # Stand-ins read the mode themselves; a literal flag in one is meant.
            if flag is module.training and standin_for(module) is None:
                self.reads_mode = True
                mode = self._mode(path)
                if "training" in kwargs:
                    kwargs = {**kwargs, "training": mode}
                else:
                    args = (*args[:2], mode, *args[3:])
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Any, list[Any]]:
        # The model itself may be a module with a stand-in (a bare nn.TransformerEncoder):
        # FX reads the inputs from the signature of the function it is given, here the
        # module's own forward (which the stand-in's arguments mirror), and calls it.
        standin = standin_for(self.root) if is_module else None
        if standin is not None:
            root_fn = functools.update_wrapper(self._standin_forward(standin, ""), root_fn)
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        return standin_for(m) is None and super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        path = self.path_of_module(m)
        self.entered.add(path)
        standin = None if path in self.leaf_paths else standin_for(m)
        if standin is not None:
            forward = functools.partial(self._standin_forward(standin, path), m)
        self.running.append((path, m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module sees the error first
                self.failed_at = (path, type(m).__name__)
            raise
        finally:
            self.running.pop()

    def _standin_forward(self, standin: Callable[..., Any], path: str) -> Callable[..., Any]:
        """``standin`` as a forward of the module at ``path``: ``(m, *args, **kwargs)``."""

        def forward(m: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return standin(m, functools.partial(self._mode, path), *args, **kwargs)

        return forward

    def _mode(self, path: str) -> fx.Proxy:
        """The ``training`` flag of the module at ``path``, read when the graph runs."""
        return self.create_proxy("get_attr", join(path, "training"), (), {})


def trace(
    model: nn.Module,
    *,
    leaf_modules: Sequence[str] = (),
    concrete_args: dict[str, Any] | None = None,
    mode_branches: Literal["warn", "record"] = "warn",
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule.

    Args:
        model: the module to trace; it is not modified.
        leaf_modules: module paths to keep as single opaque calls (not traced into).
        concrete_args: forwarded to ``torch.fx.Tracer.trace`` to specialise arguments
            (e.g. a flag that drives control flow).
        mode_branches: modules with layers whose code branches on ``self.training`` are
            always listed in ``graph_info(gm).mode_branches``; ``"warn"`` also warns that the
            graph runs the traced mode's branch in both modes, ``"record"`` leaves that to
            the caller (``dpc_fx.compile`` keeps such modules whole).

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
    _check_root_names(model)
    traced = _trace(model, tuple(leaf_modules), concrete_args)
    gm = traced.gm
    branches: dict[str, str] = {}
    if traced.reads_mode or _may_branch_on_mode(model):
        gm, branches = _settle_mode(model, traced, tuple(leaf_modules), concrete_args)
    if branches and mode_branches == "warn":
        _warn_mode(model, branches)
    if concrete_args:
        _keep_argument_names(gm, concrete_args)
    _read_rows_once(gm)
    keep_module_order(gm, model)
    keep_unused(gm, model)  # same state_dict keys as the model, used by forward or not
    # Class names by module path: GraphModule keeps plain holders for modules it only reads
    # weights from, and a functional layer on a module's weight is named after that module.
    types = {p: type(m).__name__ for p, m in model.named_modules()}
    set_graph_info(gm, mode_branches=branches, module_types=types)
    return gm


def rows(x: Any, n: int) -> Any:
    """``x.unbind(0)`` where ``x`` is a tensor of ``n`` rows: the rows that ``q, k, v = x``
    reads, as eager PyTorch iterates over a tensor; else ``x`` as it is (a tuple, or a
    tensor of more rows than are read, whose rows are selected one by one as before)."""
    return x.unbind(0) if isinstance(x, Tensor) and x.dim() and len(x) == n else x


def _read_rows_once(gm: fx.GraphModule) -> None:
    """Where the graph reads rows ``0..n-1`` of one value by index (FX records
    ``q, k, v = qkv`` as ``qkv[0]``, ``qkv[1]``, ``qkv[2]``), read them from
    ``rows(qkv, n)``: the same values, and in backward one ``stack`` of the rows'
    gradients, as the eager model's ``unbind``, where each ``select`` would add a
    zero-filled copy of the whole tensor to the gradient. Sizes and shapes
    (``x.shape[0]``) are left alone."""
    reads: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        source = node.args[0] if node.args else None
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(node.args[1], int)
            and isinstance(source, fx.Node)
            and source.op in ("call_function", "call_method", "call_module")
            and not (source.op == "call_function" and source.target is getattr)
            and not (source.op == "call_method" and source.target in ("size", "dim"))
        ):
            reads.setdefault(source, []).append(node)
    changed = False
    for source, nodes in reads.items():
        read = {n.args[1] for n in nodes}
        if len(read) < 2 or read != set(range(len(read))):
            continue
        with gm.graph.inserting_after(source):
            unbound = gm.graph.call_function(rows, (source, len(read)))
        for n in nodes:
            n.args = (unbound, n.args[1])
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


# Attributes a GraphModule has and a plain nn.Module has not: a submodule, parameter or
# buffer of the model itself by one of these names cannot be copied onto the graph module.
_GRAPH_MODULE_NAMES = frozenset(
    (set(dir(fx.GraphModule)) | set(vars(fx.GraphModule(nn.Module(), fx.Graph()))))
    - (set(dir(nn.Module)) | set(vars(nn.Module())))
)


def _check_root_names(model: nn.Module) -> None:
    kinds = (("submodule", model._modules), ("parameter", model._parameters))
    for kind, named in (*kinds, ("buffer", model._buffers)):
        for name in named:
            if name in _GRAPH_MODULE_NAMES:
                raise ConfigError(
                    f"trace: {type(model).__name__} has a {kind} named '{name}', which "
                    "torch.fx.GraphModule uses for its own attribute of that name, so the traced "
                    "module cannot hold it. Rename the attribute, or compile a container that "
                    f"holds the model (nn.Sequential(model): state_dict keys gain the prefix '0.')."
                )


@dataclass(frozen=True)
class _Traced:
    """One trace: the graph module, the paths of the modules it called ("" for the model),
    and whether a dropout flag in it reads the mode at run time."""

    gm: fx.GraphModule
    entered: frozenset[str]
    reads_mode: bool


def _trace(
    model: nn.Module,
    leaf_modules: tuple[str, ...],
    concrete_args: dict[str, Any] | None,
    *,
    training: bool | None = None,
) -> _Traced:
    """One trace, in ``model``'s own mode or, with ``training``, in that mode."""
    tracer = _Tracer(frozenset(leaf_modules))
    saved = {m: dict(vars(m)) for m in model.modules()}
    try:
        if training is not None:
            for m in model.modules():
                m.training = training
        graph = tracer.trace(model, _root_flags(model) | (concrete_args or {}))
        # Before restoring: FX keeps tensor constants as attributes of the model.
        gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
        return _Traced(gm, frozenset(tracer.entered | {""}), tracer.reads_mode)
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


# ------------------------------------------------------------------ train/eval branches
# FX records ``if self.training:`` as the branch of the mode it traces in. Tracing again in
# the other mode shows which modules' own code changed: those without layers (stochastic
# depth, say) are kept as calls, which follow train()/eval() at run time; the others
# (GoogLeNet, whose auxiliary heads run in training only) are returned, for the caller to
# keep whole, or named in a warning that the graph keeps the traced mode's branch. Dropout
# on ``self.training`` needs neither: both traces read the flag at run time (``_Tracer``).

MODE_BRANCH_REASON = (
    "its code branches on self.training (a traced graph would run one branch in both modes)"
)


def _settle_mode(
    model: nn.Module,
    traced: _Traced,
    leaf_modules: tuple[str, ...],
    concrete_args: dict[str, Any] | None,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """The graph with modules without layers whose code depends on the mode kept as calls
    (one more trace, when there are such modules); and the modules with layers whose code
    does, with the reason. A literal flag that looked like ``self.training`` in the mode
    traced (``training=True`` in training) is a literal in the other: a difference too."""
    try:
        other = _trace(model, leaf_modules, concrete_args, training=not model.training)
    except TraceError:
        return traced.gm, {}  # untraceable in the other mode: nothing to compare
    causes = _branching_modules(traced, other)
    modules = dict(model.named_modules())
    calls = tuple(p for p in causes if p and not _holds_layers(modules[p]))
    gm = _trace(model, leaf_modules + calls, concrete_args).gm if calls else traced.gm
    return gm, {p: MODE_BRANCH_REASON for p in causes if p not in calls}


def _warn_mode(model: nn.Module, branches: dict[str, str]) -> None:
    modules = dict(model.named_modules())
    mode = "training" if model.training else "eval"
    where = ", ".join(
        f"'{p}' ({type(modules[p]).__name__})"
        if p
        else f"the forward of {type(model).__name__} itself"
        for p in branches
    )
    warnings.warn(
        f"{type(model).__name__}: {where} branches on self.training, and torch.fx records "
        f"the branch of the mode it traces in ({mode}); the traced module runs that branch in "
        "both modes. dpc_fx.compile keeps such modules whole; with trace alone, trace the "
        "model in the mode you will run it in.",
        stacklevel=3,
    )


def _branching_modules(a: _Traced, b: _Traced) -> list[str]:
    """Module paths whose own code made different nodes in traces ``a`` and ``b``. A module
    that only one trace called is left out: the branch that skips it lies in a caller."""
    mine, theirs = _code_by_module(a.gm), _code_by_module(b.gm)
    both = a.entered & b.entered
    return sorted(p for p in both if mine.get(p, []) != theirs.get(p, []))


def _code_by_module(gm: fx.GraphModule) -> dict[str, list[tuple[Any, ...]]]:
    """Each module's own nodes, in order, as ``(op, target, (args, kwargs))`` with the nodes
    they read left out: what the module's code did, not which values it was given."""
    out: dict[str, list[tuple[Any, ...]]] = {"": []}
    for node in gm.graph.nodes:
        stack = [
            v[0] if isinstance(v, tuple) else v
            for v in node.meta.get("nn_module_stack", {}).values()
        ]
        if node.op == "call_module":
            stack = stack[:-1]  # the call belongs to the caller's code
        args = fx.node.map_aggregate((node.args, node.kwargs), _constant)
        out.setdefault(str(stack[-1]) if stack else "", []).append((node.op, node.target, args))
    return out


_INPUT = object()  # an argument that is a node: the value another node made
_NAN = object()  # NaN is not equal to itself; a NaN argument is the same code


def _constant(arg: Any) -> Any:
    """An argument as (type, value): ``1``, ``1.0`` and ``True`` are equal in Python but
    make tensors of different dtypes."""
    if isinstance(arg, fx.Node):
        return fx.Node, _INPUT
    if isinstance(arg, float) and math.isnan(arg):
        return float, _NAN
    return type(arg), arg


def _holds_layers(m: nn.Module) -> bool:
    kinds = (*MODULES, nn.MultiheadAttention)
    return any(isinstance(x, kinds) for x in m.modules())


def _may_branch_on_mode(model: nn.Module) -> bool:
    """Whether any class in ``model`` mentions ``training`` in its code (a cheap test
    that spares most models the second trace)."""
    classes = {type(m) for m in model.modules()}
    return any(_mentions_training(cls) for cls in classes)


_SOURCES: dict[type, bool] = {}


def _mentions_training(cls: type) -> bool:
    if cls not in _SOURCES:
        if cls.__module__.startswith("torch.nn.") or cls.__module__ == "torch.fx.graph_module":
            _SOURCES[cls] = False  # torch.nn modules are calls: they follow the mode
        else:
            try:
                _SOURCES[cls] = "training" in inspect.getsource(cls)
            except (OSError, TypeError):
                _SOURCES[cls] = True  # no source to read: compare the traces
    return _SOURCES[cls]


def _root_flags(model: nn.Module) -> dict[str, Any]:
    """A root stand-in's flags (``need_weights``, the causal-mask hints), fixed at their
    defaults: FX would make them graph inputs, and the stand-ins branch on them (the masks
    themselves stay inputs)."""
    if standin_for(model) is None:
        return {}
    params = inspect.signature(model.forward).parameters.values()
    return {
        p.name: p.default
        for p in params
        if isinstance(p.default, bool) or p.name.endswith("is_causal")
    }


def _keep_argument_names(gm: fx.GraphModule, concrete_args: dict[str, Any]) -> None:
    """FX names the argument of a specialised parameter ``flag_1``; the module must take it by
    its own name, so that it is called with the same keywords as the model."""
    names = set(concrete_args)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        base, _, suffix = str(node.target).rpartition("_")
        if base in names and suffix.isdigit():
            node.target = base  # the generated code binds the node's own name to it
    gm.recompile()


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
