"""The part tree: a model split into traced *parts* and *leaves*, measured, then assembled.

Every model is compiled as a tree. A model that ``torch.fx`` traces whole is one part with
no leaves. When tracing a module fails inside one of its submodules, that submodule becomes a
*leaf* (called as it is) and tracing is tried again; when a module's own ``forward`` cannot
be traced (or its traced graph does not run, or it holds layers and its own code branches on
``self.training``, which a graph would freeze), the module itself is a leaf. A leaf is never
compiled, but its children are, recursively, so the smallest untraceable modules are what
stays in full precision:

    FasterRCNN         leaf (its forward iterates over the list of images)
    ├── transform      leaf without parameters: runs as it is
    ├── backbone       traced whole ──► compiled GraphModule
    ├── rpn            leaf ──► copy; rpn.head is a leaf too ──► copy with its convs compiled
    └── roi_heads      leaf ──► copy with box_head and box_predictor's linears compiled

:func:`split` traces and measures (the capacity pass) every part; the driver assigns one
plan over all the parts' layers (the DPC rule's statistics and the pinned first and last
layers are the model's, not each part's) and rewrites each part; :func:`assemble` swaps the
compiled parts into shallow copies of their leaves.

The user's model is not modified: leaves are shallow copies that share its parameters, so
``state_dict`` keys stay the same. A model with leaves runs once on the example inputs (eval
mode, no gradients) to give each part its own example inputs and to count MACs per module;
parts that this run never calls are left alone (their leaf may read their weights directly).
A model traced whole is measured on fake tensors alone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from dpc_fx.config import DPCConfig
from dpc_fx.errors import ShapeError, TraceError
from dpc_fx.inputs import describe
from dpc_fx.meta import META_KEY, LayerMeta, graph_info, keep_attribute, kept_attribute
from dpc_fx.passes._graph import join, keep_module_order, module_path
from dpc_fx.passes._matmul import layer_weight
from dpc_fx.passes.capacity import capacity
from dpc_fx.passes.trace import trace

__all__ = ["Part", "Tree", "assemble", "failing_modules", "split"]

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


def _split(
    module: nn.Module, path: str, name: str, keep: tuple[str, ...], bad: dict[str, str]
) -> Part:
    """The part tree of ``module``: trace it, making failing submodules leaves."""
    if type(module).forward is nn.Module.forward or path in bad:
        return _leaf(module, path, name, bad.get(path, "no forward of its own"), keep, bad)
    fixed = [rel for p in keep if (rel := _under(p, path))]
    leaves = [rel for p in bad if (rel := _under(p, path))]
    reasons: dict[str, str] = {}
    while True:
        try:
            gm = trace(module, leaf_modules=fixed + leaves, mode_branches="record")
        except TraceError as e:
            if not e.path or e.path in leaves:
                return _leaf(module, path, name, e.reason, keep, bad)
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
            return _leaf(module, path, name, branches[""], keep, bad)
        break
    children = []
    for rel in leaves:
        full = join(path, rel)
        why = bad.get(full, reasons.get(rel, ""))
        children.append(_split(module.get_submodule(rel), full, rel, keep, {**bad, full: why}))
    return Part(path, name, module, gm, children=children)


def _leaf(
    module: nn.Module, path: str, name: str, reason: str, keep: tuple[str, ...], bad: dict[str, str]
) -> Part:
    if not _has_parameters(module):
        return Part(path, name, module, None, reason)
    children = [
        _split(child, join(path, n), n, keep, bad)
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


# ------------------------------------------------------------------ the example run


def _record(model: nn.Module, inputs: tuple[Any, ...], root: Part) -> dict[str, int]:
    """Run ``model`` once in eval mode; store each part's first inputs; return MACs per module
    path. Parts that only training mode calls (auxiliary classifiers) get theirs from a second
    run in training mode, which leaves no trace: buffers (batch-norm statistics) and the
    random state are restored after it."""
    stack: list[str] = []
    with _recording(model, root, stack), _mode(model, training=False):
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(*inputs)
        except Exception as e:
            where = stack[-1] if stack else ""
            module = model.get_submodule(where) if where not in ("", "?") else model
            shapes = ", ".join(describe(x) for x in inputs)
            raise ShapeError(
                f"example inputs do not fit the model: module '{where or '(the model itself)'}' "
                f"({type(module).__name__}) failed on example inputs [{shapes}] with "
                f"{type(e).__name__}: {_first_line(e)}. Check the shape and dtype of the example "
                "inputs (batch first, as the model expects; a tuple holds one entry per argument).",
                module=where,
            ) from e
    if any(part.gm is not None and not part.called for part in root.walk()):
        with _recording(model, root, []), _mode(model, training=True), _untouched(model):
            try:
                model(*inputs)
            except Exception:  # training may need more (a detector's targets): left alone
                pass
    root_name = type(model).__name__
    macs = {}
    for key, ops in counter.get_flop_counts().items():
        if key == root_name or key.startswith(root_name + "."):
            macs[key[len(root_name) + 1 :]] = sum(ops.values()) // 2
    return macs


@contextlib.contextmanager
def _recording(model: nn.Module, root: Part, stack: list[str]) -> Iterator[None]:
    """Hooks that give each part not called yet its first inputs, and keep ``stack`` of the
    module paths running."""
    by_module: dict[int, list[Part]] = {}
    for part in root.walk():
        by_module.setdefault(id(part.module), []).append(part)
    paths = {id(m): p for p, m in model.named_modules()}

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stack.append(paths.get(id(module), "?"))
        for part in by_module.get(id(module), ()):
            if not part.called:
                part.called, part.inputs = True, _positional(module, args, kwargs)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, was in modes.items():
            m.training = was


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run without gradients, then put back every buffer (same tensor, same values) and the
    random state (the CPU's, and that of the GPUs the model lives on)."""
    saved = [
        (m, name, b, b.clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    try:
        gpus = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=gpus):
            yield
    finally:
        with torch.no_grad():
            for module, name, buffer, values in saved:
                module._buffers[name] = buffer
                buffer.copy_(values)


def _positional(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    if not kwargs:
        return args
    try:
        return inspect.signature(module.forward).bind(*args, **kwargs).args
    except TypeError:
        return args


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

    def layers(self, graphs: dict[str, fx.GraphModule] | None = None) -> list[LayerMeta]:
        """The layer records of the parts' graphs (or of ``graphs``, the parts' later forms,
        by path) in model order: each part's in graph order, a leaf's parts spliced in
        where the leaf is called, a leaf's children in their order."""
        if graphs is None:
            graphs = {p.path: p.gm for p in self.parts if p.gm is not None}
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


def split(model: nn.Module, inputs: tuple[Any, ...] | None, config: DPCConfig) -> Tree:
    """Trace ``model`` into its part tree and measure every part on its example inputs.

    Raises:
        ShapeError: the model itself does not run on ``inputs``.
    """
    bad: dict[str, str] = {}
    error: ShapeError | None = None
    for _ in range(len(list(model.modules())) + 1):
        root = _split(model, "", "", config.leaf_modules, bad)
        whole = root.gm is not None and not root.children and error is None
        macs: dict[str, int] = {}
        if inputs is not None and not whole:
            try:
                macs = _record(model, inputs, root)
            except ShapeError:
                if error is not None:  # the model fails too: say where its graph did
                    raise error from error.__cause__
                raise
        if whole:
            root.called, root.inputs = True, inputs
        parts = [p for p in root.walk() if p.gm is not None and (inputs is None or p.called)]
        try:
            for part in parts:
                assert part.gm is not None
                part.gm = capacity(part.gm, part.inputs, fake=whole, prefix=part.path)
            return Tree(model, root, parts, macs)
        except ShapeError as e:
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


def assemble(tree: Tree, compiled: dict[str, fx.GraphModule]) -> nn.Module:
    """The module to run: the root's compiled graph, or a shallow copy of the model with
    the compiled parts (``compiled``, by path) swapped in, each where its module sat."""
    for path, gm in compiled.items():
        keep_module_order(gm, tree.model.get_submodule(path))
    result = _assemble(tree.root, compiled)
    # Nothing compiled, or the model's own forward is a leaf: a copy of the model's class,
    # so the compiled module's record never lands on the user's model.
    return _shallow_copy(tree.model, {}) if result is tree.model else result


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


def _assemble(part: Part, compiled: dict[str, fx.GraphModule]) -> nn.Module:
    """The module to run for ``part``: its compiled graph, or a shallow copy of its module
    with compiled children; the module itself if nothing in it was compiled."""
    if part.gm is not None:
        out = compiled.get(part.path)
        if out is None:
            return part.module
        if part.path:  # the leaf above calls it, and may read its attributes
            _delegate(out, part.module)
        swapped = []
        for child in part.children:
            new = _assemble(child, compiled)
            if new is not child.module:
                out.set_submodule(child.name, new, strict=False)
                swapped.append(child.name)
        return out
    children = {child.name: _assemble(child, compiled) for child in part.children}
    changed = {name: m for name, m in children.items() if m is not part.module._modules[name]}
    return _shallow_copy(part.module, changed) if changed else part.module


def _delegate(gm: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """Let ``gm`` answer for ``module`` what its graph does not hold: the leaf code calling a
    compiled part may read its attributes or call its methods (RAFT reads
    ``update_block.hidden_state_size``; RetinaNet calls ``head.compute_loss``). Every
    GraphModule has a class of its own, so the change stays with ``gm``; it survives
    ``copy.deepcopy`` and ``torch.save``."""
    cls = type(gm)
    cls.__getattr__ = _getattr_or_delegate  # type: ignore[method-assign]
    cls.__reduce__ = _reduce_delegating  # type: ignore[method-assign,assignment]
    cls.__deepcopy__ = _deepcopy_delegating  # type: ignore[method-assign]
    keep_attribute(gm, _ORIGINAL, (module,))  # in a tuple: not a submodule, even after torch.load
    return gm


_ORIGINAL = "_dpc_original"


def _getattr_or_delegate(self: nn.Module, name: str) -> Any:
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        original = kept_attribute(self, _ORIGINAL)
        if original is None or name.startswith("__"):
            raise
        return getattr(original[0], name)


def _reduce_delegating(self: fx.GraphModule) -> tuple[Any, ...]:
    rebuild, args = fx.GraphModule.__reduce__(self)[:2]
    return _rebuild_delegating, (rebuild, args)


def _rebuild_delegating(
    rebuild: Callable[..., fx.GraphModule], args: tuple[Any, ...]
) -> fx.GraphModule:
    gm = rebuild(*args)
    return _delegate(gm, kept_attribute(gm, _ORIGINAL)[0])


def _deepcopy_delegating(self: fx.GraphModule, memo: dict[int, Any]) -> fx.GraphModule:
    new = fx.GraphModule.__deepcopy__(self, memo)  # copies ``meta``, and so the original
    return _delegate(new, kept_attribute(new, _ORIGINAL)[0])


def _shallow_copy(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``module`` (same class, same parameters) with ``children`` swapped in."""
    new = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, dict):  # parameters, buffers, modules, hooks: the copy's own
            new.__dict__[key] = copy.copy(value)
    new._modules.update(children)
    return new
