"""The part tree: a model split into traced *parts* and *leaves*, measured, then assembled.

Every model is compiled as a tree. A model that ``torch.fx`` traces whole is one part with
no leaves. When tracing a module fails inside one of its submodules, that submodule becomes a
*leaf* (called as it is) and tracing is tried again; when a module's own ``forward`` cannot
be traced (or its traced graph does not run, or it holds layers and its own code branches on
``self.training``, which a graph would freeze), the module itself is a leaf. Before anything
is kept whole, a module that FX cannot trace (or whose graph does not run on the inputs its
model hands it) is captured whole by ``torch.export`` on those inputs
(:mod:`dpc_fx.passes.capture`): a *captured* part, compiled like a traced one. A leaf is never
compiled, but its children are, recursively, so the smallest untraceable modules are what
stays in full precision:

    FasterRCNN         leaf (its forward iterates over the list of images)
    ├── transform      leaf without parameters: runs as it is
    ├── backbone       traced whole ──► compiled GraphModule
    ├── rpn            leaf ──► copy; rpn.head is a leaf too ──► copy with its convs compiled
    └── roi_heads      leaf ──► copy with box_head and box_predictor's linears compiled

:func:`split` traces and measures (the capacity pass) every part; the driver assigns one
plan over all the parts' layers (the DPC rule's statistics and the pinned first and last
layers are the model's, not each part's) and rewrites each part;
:func:`dpc_fx.assemble.assemble` swaps the compiled parts into shallow copies of their
leaves.

The user's model is not modified: leaves are shallow copies that share its parameters, so
``state_dict`` keys stay the same. A model with leaves runs once on the example inputs (eval
mode, no gradients) to give each part its own example inputs and to count MACs per module;
parts that this run never calls are left alone (their leaf may read their weights directly).
A model traced whole is measured on fake tensors alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from dpc_fx import probe
from dpc_fx.config import DPCConfig
from dpc_fx.errors import ShapeError, TraceError
from dpc_fx.meta import META_KEY, LayerMeta, graph_info
from dpc_fx.passes._graph import join, module_path
from dpc_fx.passes._matmul import layer_weight
from dpc_fx.passes.capacity import capacity
from dpc_fx.passes.capture import capture
from dpc_fx.passes.trace import MODE_BRANCH_REASON, trace

__all__ = ["Part", "Tree", "failing_modules", "split"]

# --------------------------------------------------------------------- the part tree


@dataclass(eq=False)
class Part:
    """A node of the part tree: a traced part (``gm`` set) or a leaf (``gm`` is ``None``).

    ``children`` are, for a traced part, its leaves (``name`` is their path relative to it);
    for a leaf, its children that hold parameters (``name`` is the attribute name).
    """

    path: str
    name: str
    module: nn.Module
    gm: fx.GraphModule | None
    reason: str = ""
    children: list[Part] = field(default_factory=list)
    inputs: tuple[Any, ...] | None = None
    called: bool = False
    call: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # first call: args, kwargs
    captured: bool = False  # gm is a torch.export capture, not an FX trace
    varied: bool = False  # called with differing non-tensor arguments or structures

    def walk(self) -> Iterator[Part]:
        yield self
        for child in self.children:
            yield from child.walk()

    @property
    def short_reason(self) -> str:
        """Why it is a leaf, up to the first sentence's end (FX's advice is long)."""
        return self.reason.partition(". ")[0].removesuffix(".")

    @property
    def container(self) -> bool:
        """A module without a forward of its own (``nn.ModuleList``): never called."""
        return type(self.module).forward is nn.Module.forward


def _under(path: str, prefix: str) -> str | None:
    """``path`` relative to ``prefix`` if it lies strictly below it, else ``None``."""
    if not prefix:
        return path or None
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else None


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


@dataclass(eq=False)
class _Captures:
    """What ``torch.export`` is tried on: the calls known by module path (the model's own from
    its example inputs, others from the example run), the captured graphs, and the modules it
    could not capture (tried once)."""

    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def attempt(self, module: nn.Module, path: str) -> bool:
        """Capture the module at ``path`` on its known call; whether that worked."""
        if path in self.graphs:
            return True
        if path not in self.calls or path in self.refused:
            return False
        try:
            self.graphs[path] = capture(module, *self.calls[path])
        except TraceError as e:
            self.refused[path] = e.reason
            return False
        return True

    def why(self, path: str, reason: str) -> str:
        """FX's ``reason`` for keeping ``path`` whole, with torch.export's where it was tried
        too."""
        refused = self.refused.get(path)
        if refused is None or reason == MODE_BRANCH_REASON:  # (kept whole on purpose)
            return reason
        return f"{reason}; torch.export: {refused}"


def _split(
    module: nn.Module,
    path: str,
    name: str,
    keep: tuple[str, ...],
    bad: dict[str, str],
    captures: _Captures,
    concrete: MappingProxyType[str, Any] = MappingProxyType({}),
) -> Part:
    """The part tree of ``module``: trace it, making failing submodules leaves; a module
    FX fails on whose call is known is captured whole instead (``captures``). ``concrete``
    specialises the model's own trace (its non-tensor keyword inputs)."""
    if type(module).forward is nn.Module.forward:
        return _leaf(module, path, name, "no forward of its own", keep, bad, captures)
    if path in captures.graphs or (path in bad and captures.attempt(module, path)):
        return Part(path, name, module, captures.graphs[path], captured=True)
    if path in bad:
        return _leaf(module, path, name, captures.why(path, bad[path]), keep, bad, captures)
    fixed = [rel for p in keep if (rel := _under(p, path))]
    leaves = [rel for p in bad if (rel := _under(p, path))]
    reasons: dict[str, str] = {}
    while True:
        try:
            gm = trace(
                module,
                leaf_modules=fixed + leaves,
                concrete_args=dict(concrete) if not path and concrete else None,
                mode_branches="record",
            )
        except TraceError as e:
            # Captured whole before anything is kept whole (leaves the user asked for
            # stay theirs: a capture would inline them).
            if not fixed and captures.attempt(module, path):
                return Part(path, name, module, captures.graphs[path], captured=True)
            if not e.path or e.path in leaves:
                return _leaf(module, path, name, captures.why(path, e.reason), keep, bad, captures)
            leaves.append(e.path)
            reasons[e.path] = e.reason
            continue
        branches = graph_info(gm).mode_branches  # modules with layers that follow train()/eval()
        inner = {p: why for p, why in branches.items() if p}
        if inner:  # kept whole first: the module's own code may differ only through them
            leaves += list(inner)
            reasons.update(inner)
            continue
        if "" in branches:
            return _leaf(module, path, name, branches[""], keep, bad, captures)
        break
    children = []
    for rel in leaves:
        full = join(path, rel)
        why = bad.get(full, reasons.get(rel, ""))
        child = module.get_submodule(rel)
        children.append(_split(child, full, rel, keep, {**bad, full: why}, captures))
    return Part(path, name, module, gm, children=children)


def _leaf(
    module: nn.Module,
    path: str,
    name: str,
    reason: str,
    keep: tuple[str, ...],
    bad: dict[str, str],
    captures: _Captures,
) -> Part:
    if not _has_parameters(module):
        return Part(path, name, module, None, reason)
    children = [
        _split(child, join(path, n), n, keep, bad, captures)
        for n, child in module.named_children()
        if _has_parameters(child) and join(path, n) not in keep
    ]
    # Children without parameters have nothing to quantise; those that cannot be traced
    # are still leaves, and said so.
    for n, child in module.named_children():
        if not _has_parameters(child):
            try:
                trace(child, mode_branches="record")
            except TraceError as e:
                children.append(Part(join(path, n), n, child, None, e.reason))
    return Part(path, name, module, None, reason, children)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "(no message)"


# ------------------------------------------------------------------------- the tree


@dataclass(eq=False)
class Tree:
    """A model split into parts, each part's graph measured by the capacity pass.

    Attributes:
        model: the model split.
        root: the root of the part tree.
        parts: the parts to compile (with example inputs: those the example run called).
        macs: MACs per module path from the example run (empty for a model traced whole,
            or without example inputs).
    """

    model: nn.Module
    root: Part
    parts: list[Part]
    macs: dict[str, int]

    @property
    def whole(self) -> bool:
        """Traced whole: one part, no leaves."""
        return self.root.gm is not None and not self.root.children

    def graphs(self) -> dict[str, fx.GraphModule]:
        """The measured graphs to compile, by path: the root's always (it is what runs),
        and every other part that holds leaves or layers."""
        out = {}
        for part in self.parts:
            assert part.gm is not None
            if (
                not part.path
                or part.children
                or any(META_KEY in n.meta for n in part.gm.graph.nodes)
            ):
                out[part.path] = part.gm
        return out

    def layers(self, graphs: dict[str, fx.GraphModule] | None = None) -> list[LayerMeta]:
        """The layer records of the parts' graphs (or of ``graphs``, the parts' later forms,
        by path) in model order: each part's in graph order, a leaf's parts spliced in
        where the leaf is called, a leaf's children in their order."""
        if graphs is None:
            graphs = self.graphs()
        out: list[LayerMeta] = []

        def walk(part: Part) -> None:
            if part.gm is None:
                for child in part.children:
                    walk(child)
                return
            gm = graphs.get(part.path)
            if gm is None:
                return
            leaves = {child.name: child for child in part.children}
            for node in gm.graph.nodes:
                meta = node.meta.get(META_KEY)
                if isinstance(meta, LayerMeta):
                    out.append(meta)
                elif node.op == "call_module" and str(node.target) in leaves:
                    walk(leaves[str(node.target)])

        walk(self.root)
        return out

    def weights(self) -> dict[str, tuple[torch.Tensor, int | None]]:
        """Each layer's weight and output-channel dimension, by layer key (for
        ``b_min="auto"``); products of two activations have none."""
        out = {}
        for part in self.parts:
            assert part.gm is not None
            for node in part.gm.graph.nodes:
                meta = node.meta.get(META_KEY)
                if isinstance(meta, LayerMeta) and (found := layer_weight(node, part.gm)):
                    out[meta.layer] = found
        return out


def split(
    model: nn.Module,
    inputs: tuple[Any, ...] | None,
    config: DPCConfig,
    kwargs: dict[str, Any] | None = None,
) -> Tree:
    """Trace ``model`` into its part tree and measure every part on its example inputs
    (``model(*inputs, **kwargs)``; non-tensor keyword inputs specialise the trace).

    Raises:
        ShapeError: the model itself does not run on its example inputs.
    """
    kwargs = kwargs or {}
    given = inputs is not None or bool(kwargs)
    args = inputs or ()
    bad: dict[str, str] = {}
    captures = _Captures()
    if given:
        captures.calls[""] = (args, kwargs)
    concrete = MappingProxyType(_specialised(model, args, kwargs) if given else {})
    error: ShapeError | None = None
    for _ in range(2 * len(list(model.modules())) + 2):
        root = _split(model, "", "", config.leaf_modules, bad, captures, concrete)
        whole = root.gm is not None and not root.children and error is None
        macs: dict[str, int] = {}
        if given and not whole:
            try:
                macs = probe.run(model, args, root, kwargs)
            except ShapeError:
                if error is not None:  # the model fails too: say where its graph did
                    raise error from error.__cause__
                raise
            # Leaves the run called, with parameters: capture them whole if torch.export can
            # (one more round), before keeping them whole.
            found = {
                p.path: p.call
                for p in root.walk()
                if p.gm is None and p.call is not None and not p.container and not p.varied
                if _has_parameters(p.module) and p.path not in captures.calls
            }
            if found:
                captures.calls.update(found)
                continue
        if whole:
            root.called, root.inputs = True, inputs
            root.call = (args, kwargs) if given else None
        parts = [p for p in root.walk() if p.gm is not None and (not given or p.called)]
        try:
            for part in parts:
                assert part.gm is not None
                # A captured part, and the model itself, take the call as it was made; a
                # traced part its positional form.
                own = part.call is not None and (part.captured or not part.path)
                part_args, part_kwargs = part.call if own else (part.inputs, {})  # type: ignore[misc]
                part.gm = capacity(
                    part.gm, part_args, example_kwargs=part_kwargs, fake=whole, prefix=part.path
                )
            return Tree(model, root, parts, macs)
        except ShapeError as e:
            # A graph FX traced that does not run on what its model hands it: captured whole
            # by torch.export on that call, if it can be, before keeping anything whole.
            if not part.captured and part.call is not None and not part.varied:
                if whole and not _runs(model, args, kwargs, root):
                    raise  # the inputs are at fault, and the graph's error says where
                captures.calls.setdefault(part.path, part.call)
                if captures.attempt(part.module, part.path):
                    continue
            # The graph or the inputs at fault? The example run of the next round tells: if
            # the model runs, its graph does not, and the modules whose code made the
            # failing node are kept whole.
            assert part.gm is not None
            failing = failing_modules(part.gm, part.path, e)
            if error is not None and all(p in bad for p in failing):
                raise
            error = error or e
            bad.update(failing)
    raise AssertionError("unreachable: each round keeps at least one more module whole")


def _runs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], root: Part) -> bool:
    """Whether the model runs on its example inputs (the example run, once)."""
    try:
        probe.run(model, args, root, kwargs)
    except ShapeError:
        return False
    return True


def _specialised(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of the model's call that are no tensors (``None``, flags), the
    parameters it leaves out at their defaults: the model's trace is specialised on them
    (FX's ``concrete_args``), as the model will be called. An optional argument left
    ``None`` is then ``None`` in the graph, not a tensor that never comes."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return {}  # the example run says what does not fit
    out = {}
    for name, p in signature.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = bound.arguments.get(name, p.default)
        if value is not p.empty and not _holds_tensor(value):
            out[name] = value
    return out


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value))


def failing_modules(gm: fx.GraphModule, path: str, e: ShapeError) -> dict[str, str]:
    """The modules to keep whole when the graph ``gm`` (traced from the module at ``path``)
    fails to run on inputs its module ran on: the one whose code made the failing node, and
    every one whose code calls the same function (so, say, all 24 attention blocks of a
    transformer are found at once). Maps each path to the reason."""
    cause = e.__cause__ or e
    why = f"its traced graph does not run ({type(cause).__name__}: {_first_line(cause)})"
    nodes = {n.name: n for n in gm.graph.nodes}
    failed = nodes.get(e.node)
    if failed is None:
        return {path: why}
    same = [n for n in nodes.values() if n.op == failed.op and n.target == failed.target]
    return {join(path, module_path(n)): why for n in same}
