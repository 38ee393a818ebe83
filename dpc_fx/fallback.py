"""Compiling a model that ``torch.fx`` cannot trace whole.

When tracing a module fails inside one of its submodules, that submodule becomes a *leaf*
(called as it is) and tracing is tried again; when a module's own ``forward`` cannot be
traced (or its traced graph does not run, or it holds layers and its own code branches on
``self.training``, which a graph would freeze), the module itself is a leaf. A leaf is never
compiled, but its children are, recursively, so the smallest untraceable modules are what
stays in full precision. The traceable *parts* then go through the usual passes, with one
plan for the whole model (the DPC rule's statistics and the pinned first and last layers
are the model's, not each part's), and are swapped into shallow copies of their leaves:

    FasterRCNN         leaf (its forward iterates over the list of images)
    ├── transform      leaf without parameters: runs as it is
    ├── backbone       traced whole ──► compiled GraphModule
    ├── rpn            leaf ──► copy; rpn.head is a leaf too ──► copy with its convs compiled
    └── roi_heads      leaf ──► copy with box_head and box_predictor's linears compiled

The user's model is not modified: leaves are shallow copies that share its parameters, so
``state_dict`` keys stay the same. With example inputs the model runs once (eval mode, no
gradients) to give each part its own example inputs and to count MACs per module; parts
that this run never calls are left alone (their leaf may read their weights directly).
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
from dpc_fx.meta import META_KEY, STATE, DPCState, LayerMeta
from dpc_fx.passes._fx import (
    LEAVES,
    MODULES,
    attach,
    attached,
    join,
    keep_module_order,
    layer_nodes,
    matmul_spec,
    parameter_source,
    weight_name,
)
from dpc_fx.passes.assign import assign
from dpc_fx.passes.capacity import capacity, example_tuple, module_path
from dpc_fx.passes.trace import MODE_BRANCHES, trace
from dpc_fx.plan import Plan

__all__ = [
    "Coverage",
    "Leaf",
    "compile_parts",
    "coverage_of",
    "failing_modules",
    "layer_coverage",
    "quantised_macs",
]

COVERAGE = "dpc_coverage"  # attribute of a compiled module holding its Coverage
SOURCE = "_dpc_source"  # attribute of a compiled module holding the model it came from


@dataclass(frozen=True)
class Leaf:
    """A submodule kept whole because ``torch.fx`` could not trace it.

    Attributes:
        path: its module path (``""``: the model itself).
        module_type: its class name.
        reason: why tracing failed (FX's message, one line).
        macs: MACs its own code ran in full precision on the example inputs, outside its
            compiled children (``None`` without example inputs).
        share: ``macs`` as a share of the model's MACs.
    """

    path: str
    module_type: str
    reason: str
    macs: int | None = None
    share: float | None = None

    def __str__(self) -> str:
        where = f"'{self.path}'" if self.path else "the model itself"
        share = "" if self.share is None else f", {self.share:.1%} of MACs in full precision"
        return f"leaf {where} ({self.module_type}){share}: {self.reason}"


@dataclass(frozen=True)
class Coverage:
    """How much of a model :func:`dpc_fx.compile` reached.

    Attributes:
        traced: the model traced whole (no leaves).
        layers: conv/linear modules in the model, and the input projections of its
            ``nn.MultiheadAttention`` modules.
        compiled: those inside compiled parts, so under the plan (pinned ones included).
        quantised: those whose weights the compiled model quantises.
        macs: MACs of one forward on the example inputs (``None`` without them).
        quantised_macs: MACs of those spent in quantised layers.
        leaves: the submodules kept whole, in module order.
    """

    traced: bool
    layers: int
    compiled: int
    quantised: int
    macs: int | None
    quantised_macs: int | None
    leaves: tuple[Leaf, ...] = field(default=())

    @property
    def macs_share(self) -> float | None:
        """Share of the model's MACs spent in quantised layers."""
        if self.macs is None or self.quantised_macs is None:
            return None
        return self.quantised_macs / self.macs if self.macs else 0.0

    def lines(self) -> list[str]:
        """A summary line, then one line per leaf."""
        share = "" if self.macs_share is None else f", {self.macs_share:.1%} of MACs quantised"
        how = "traced whole" if self.traced else f"{len(self.leaves)} leaves kept whole"
        head = (
            f"coverage: {how}; {self.quantised}/{self.layers} conv/linear layers quantised "
            f"({self.compiled} compiled){share}"
        )
        return [head, *(f"  {leaf}" for leaf in self.leaves)]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def coverage_of(module: nn.Module) -> Coverage | None:
    """The :class:`Coverage` of a module :func:`dpc_fx.compile` returned, if it has one."""
    found = attached(module, COVERAGE)
    return found if isinstance(found, Coverage) else None


# --------------------------------------------------------------------- the part tree


@dataclass(eq=False)
class _Part:
    """A node of the part tree: a traced part (``gm`` set) or a leaf (``gm`` is ``None``).

    ``children`` are, for a traced part, its leaves (``name`` is their path relative to it);
    for a leaf, its children that hold parameters (``name`` is the attribute name).
    """

    path: str
    name: str
    module: nn.Module
    gm: fx.GraphModule | None
    reason: str = ""
    children: list[_Part] = field(default_factory=list)
    inputs: tuple[Any, ...] | None = None
    called: bool = False

    def walk(self) -> Iterator[_Part]:
        yield self
        for child in self.children:
            yield from child.walk()

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
) -> _Part:
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
        branches = gm.meta[MODE_BRANCHES]  # modules with layers that follow train()/eval()
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
    return _Part(path, name, module, gm, children=children)


def _leaf(
    module: nn.Module, path: str, name: str, reason: str, keep: tuple[str, ...], bad: dict[str, str]
) -> _Part:
    if not _has_parameters(module):
        return _Part(path, name, module, None, reason)
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
                children.append(_Part(join(path, n), n, child, None, e.reason))
    return _Part(path, name, module, None, reason, children)


# ------------------------------------------------------------------ the example run


def _record(model: nn.Module, inputs: tuple[Any, ...], root: _Part) -> dict[str, int]:
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
            shapes = ", ".join(_describe(x) for x in inputs)
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
def _recording(model: nn.Module, root: _Part, stack: list[str]) -> Iterator[None]:
    """Hooks that give each part not called yet its first inputs, and keep ``stack`` of the
    module paths running."""
    by_module: dict[int, list[_Part]] = {}
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


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of {len(x)}: " + ", ".join(_describe(v) for v in x[:3])
    if isinstance(x, dict):
        return "dict: " + ", ".join(f"{k}: {_describe(v)}" for k, v in list(x.items())[:3])
    return type(x).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "(no message)"


def _short(reason: str) -> str:
    """FX's reason up to its first sentence's end: its advice is long and generic."""
    return reason.partition(". ")[0].removesuffix(".")


# ------------------------------------------------------------------------ compiling


def compile_parts(
    model: nn.Module,
    example_inputs: Any,
    config: DPCConfig,
    plan: Plan | None,
    finish: Callable[[fx.GraphModule], fx.GraphModule],
    *,
    bad: dict[str, str] | None = None,
) -> nn.Module:
    """Compile ``model`` part by part (see the module docstring).

    Args:
        bad: module paths to keep as leaves from the start, with the reason (modules whose
            traced graph does not run although the module does).
        finish: the passes after ``assign`` (rewrite, and lowering if configured).

    Returns:
        The compiled module: a GraphModule when the model's own forward traces (with
        leaves), else a shallow copy of the model with compiled parts inside.
    """
    bad = dict(bad or {})
    inputs = None if example_inputs is None else example_tuple(example_inputs)
    for _ in range(len(list(model.modules()))):
        root = _split(model, "", "", config.leaf_modules, bad)
        macs = _record(model, inputs, root) if inputs is not None else {}
        parts = [p for p in root.walk() if p.gm is not None and (inputs is None or p.called)]
        try:
            for part in parts:
                part.gm = capacity(part.gm, part.inputs, fake=False)  # type: ignore[arg-type]
            break
        except ShapeError as e:
            # The module ran in the example run, so its graph, not the input, is at fault.
            assert part.gm is not None
            failing = failing_modules(part.gm, part.path, e)
            if all(p in bad for p in failing):
                raise
            bad.update(failing)
    done, resolved = _plan(model, root, parts, config, plan, finish)
    result = _assemble(root, done)
    if root.gm is None:  # a copy of the model's class: give it the plan's record
        if result is model:
            result = _shallow_copy(model, {})
        records = tuple(n.meta[META_KEY] for n in layer_nodes(result))
        result._modules[STATE] = DPCState(records, resolved)
    cov = _coverage(model, root, parts, macs, done)
    attach(result, COVERAGE, cov)
    return result


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


def _plan(
    model: nn.Module,
    root: _Part,
    parts: list[_Part],
    config: DPCConfig,
    plan: Plan | None,
    finish: Callable[[fx.GraphModule], fx.GraphModule],
) -> tuple[dict[str, fx.GraphModule], DPCConfig]:
    """Assign bits to all parts' layers at once, then finish each part that has layers.
    Returns the finished parts by path, and the config ``assign`` resolved.

    The parts' graphs are copied into one graph over the model (targets prefixed with each
    part's path, leaves' parts spliced in where the leaf is called), so ``assign`` sees the
    model's layers in order, under their full paths.
    """
    included = {id(p) for p in parts}
    graph = fx.Graph()
    origin: list[fx.Node] = []

    def emit(part: _Part) -> None:
        if part.gm is None:
            for child in part.children:
                emit(child)
            return
        if id(part) not in included:
            return
        leaves = {child.name: child for child in part.children}
        names = _layer_names(part.gm, part.module)
        env: dict[fx.Node, fx.Node] = {}
        for node in part.gm.graph.nodes:
            if node.op == "output":
                continue
            new = graph.node_copy(node, env.__getitem__)
            env[node] = new
            if node.op in ("call_module", "get_attr"):
                new.target = join(part.path, str(node.target))
            elif node.op == "placeholder":  # parts' inputs may share names
                new.target, new.args = new.name, ()
            meta = node.meta.get(META_KEY)
            if isinstance(meta, LayerMeta):
                name, module_type = names[node]
                new.meta[META_KEY] = meta.replace(
                    layer=join(part.path, name), module_type=module_type
                )
                origin.append(node)
            if node.op == "call_module" and str(node.target) in leaves:
                emit(leaves[str(node.target)])

    emit(root)
    graph.output(None)
    combined = fx.GraphModule(model, graph, type(model).__name__)
    assigned = assign(combined, config, plan=plan)
    for node, done in zip(origin, layer_nodes(assigned), strict=True):
        node.meta[META_KEY] = done.meta[META_KEY]
    resolved: DPCConfig = assigned.meta["dpc_config"]
    compiled = {}
    for part in parts:
        assert part.gm is not None
        if part is root or part.children or any(META_KEY in n.meta for n in part.gm.graph.nodes):
            part.gm.meta["dpc_config"] = resolved
            compiled[part.path] = finish(part.gm)
            keep_module_order(compiled[part.path], part.module)
    return compiled, resolved


def _layer_names(gm: fx.GraphModule, module: nn.Module) -> dict[fx.Node, tuple[str, str | None]]:
    """Layer names and module types inside a part: a functional layer reading a conv/linear
    module's weight (a part traced from an ``nn.Linear`` itself, say) takes the module's path
    and class when no other layer reads it; others keep their record's."""
    metas = {n: m for n in gm.graph.nodes if isinstance(m := n.meta.get(META_KEY), LayerMeta)}
    owners = {n: _weight_owner(n, gm) for n in metas}
    kinds = tuple(MODULES)
    modules = dict(module.named_modules())
    names = {}
    for node, meta in metas.items():
        owner = owners[node]
        names[node] = (meta.layer, meta.module_type)
        if owner is None or meta.module_type is not None:
            continue
        if list(owners.values()).count(owner) == 1 and isinstance(modules.get(owner), kinds):
            names[node] = (owner, type(modules[owner]).__name__)
    return names


def _assemble(part: _Part, compiled: dict[str, fx.GraphModule]) -> nn.Module:
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
        attach(out, LEAVES, tuple(swapped))
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
    attach(gm, _ORIGINAL, (module,))  # in a tuple: not a submodule, even after torch.load
    return gm


_ORIGINAL = "_dpc_original"


def _getattr_or_delegate(self: nn.Module, name: str) -> Any:
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        original = attached(self, _ORIGINAL)
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
    return _delegate(gm, attached(gm, _ORIGINAL)[0])


def _deepcopy_delegating(self: fx.GraphModule, memo: dict[int, Any]) -> fx.GraphModule:
    new = fx.GraphModule.__deepcopy__(self, memo)  # copies ``meta``, and so the original
    return _delegate(new, attached(new, _ORIGINAL)[0])


def _shallow_copy(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``module`` (same class, same parameters) with ``children`` swapped in."""
    new = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, dict):  # parameters, buffers, modules, hooks: the copy's own
            new.__dict__[key] = copy.copy(value)
    new._modules.update(children)
    attach(new, LEAVES, tuple(children))
    return new


# ------------------------------------------------------------------------ coverage


def _weight_owner(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The module whose weight a layer node reads (``None``: an activation product)."""
    spec = matmul_spec(node, gm)
    if spec is None:
        return None
    if spec.module is not None:
        return str(node.target)
    operand = spec.weight.get(node.args, node.kwargs)
    source = parameter_source(operand) if isinstance(operand, fx.Node) else None
    return None if source is None else weight_name(str(source.target))[0]


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
            out.update(join(path, p) for p in projections)
    return out


def layer_coverage(
    model: nn.Module, parts: list[tuple[str, fx.GraphModule]]
) -> tuple[int, int, int]:
    """(matmul-like weights of ``model``, those inside compiled ``parts``, those quantised);
    see :func:`_weight_layers` for what counts.

    ``parts`` are measured and assigned graphs (``path`` in the model, graph).
    """
    total = _weight_layers(model)
    compiled, quantised = set(), set()
    for path, gm in parts:
        for node in gm.graph.nodes:
            meta = node.meta.get(META_KEY)
            owner = _weight_owner(node, gm) if isinstance(meta, LayerMeta) else None
            if owner is None or join(path, owner) not in total:
                continue
            compiled.add(join(path, owner))
            if meta.bits is not None and meta.bits.w is not None:
                quantised.add(join(path, owner))
    return len(total), len(compiled), len(quantised)


def quantised_macs(gm: fx.GraphModule) -> int | None:
    """MACs of the layers of an assigned graph that run with quantised weights."""
    metas = [
        n.meta[META_KEY] for n in gm.graph.nodes if isinstance(n.meta.get(META_KEY), LayerMeta)
    ]
    if any(m.macs is None for m in metas):
        return None
    return sum(m.macs for m in metas if m.bits is not None and not m.bits.full_precision)


def _coverage(
    model: nn.Module,
    root: _Part,
    parts: list[_Part],
    macs: dict[str, int],
    compiled: dict[str, fx.GraphModule],
) -> Coverage:
    measured = [(p.path, p.gm) for p in parts if p.gm is not None and p.path in compiled]
    layers, in_parts, quantised = layer_coverage(model, measured)
    total = macs.get("") if macs else None
    q_total: int | None = None
    if total is not None:
        q_total = 0
        for path, gm in measured:
            own, whole = quantised_macs(gm), gm.meta.get("dpc_macs")
            if own and whole:  # the first call's share, over all of the module's calls
                q_total += round(macs.get(path, whole) * own / whole)

    def spent(part: _Part) -> int:  # a container is never called: count its children
        if part.container:
            return sum(spent(c) for c in part.children)
        return macs.get(part.path, 0)

    leaves = []
    for part in root.walk():
        if part.gm is not None or part.container:
            continue
        own = None
        if total is not None:
            own = spent(part) - sum(spent(c) for c in part.children)
        leaves.append(
            Leaf(
                part.path,
                type(part.module).__name__,
                _short(part.reason),
                own,
                None if own is None else own / total if total else 0.0,
            )
        )
    return Coverage(False, layers, in_parts, quantised, total, q_total, tuple(leaves))
