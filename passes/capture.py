"""Pass 1b, capture: what ``torch.fx`` cannot trace, captured whole by ``torch.export``.

Reads: a module and one call's example inputs (positional and keyword). Writes: a new
GraphModule of ATen ops (``aten.linear``, ``aten.conv2d``, ``aten.addmm``, ...), specialised
on those inputs as ``torch.export.export(module, args, kwargs, strict=False)`` sees them
(shapes, ``None`` arguments, flags); the module itself is left alone. The graph module shares
the module's parameters and buffers under their own paths, so ``state_dict`` keys are the
module's and layers are named after their modules (a weight's ``get_attr`` target is
``bert.encoder.layer.0.attention.self.query.weight``). It is called as the module was, with
the same keywords, and returns what the module returns (a ``ModelOutput`` with its loss, a
tuple, a dict): its inputs and outputs are pytrees (``torch.fx.graph._PyTreeCodeGen``), which
the other passes keep.

``ExportedProgram.module()`` runs the mode it was exported in (and refuses ``eval()``): a
dropout's ``training`` flag, batch norm's, attention's dropout probability are constants.
So the module is captured in both modes and the two graphs compared node by node: constants
that differ read the graph module's own ``training`` flag at run time (``by_mode``), a batch
norm's batch counter counts in training only (``count_batch``), and graphs that differ in
anything else (code that branches on ``self.training`` around layers) are not captured.

A decoder called eagerly asks attention for ``is_causal=True``; captured, it builds the
causal mask as a tensor. Attention that takes a mask therefore calls
:func:`dpc_fx.sdpa.attention`, which runs the causal kernel where the mask is the causal one
when the graph runs (the same values and gradients, without the mask's reads and the blocks
above the diagonal). Attention over keys and values repeated across the query's heads reads
them unrepeated (``enable_gqa=True``). The ops that build values from the inputs' sizes alone
(a decoder's positions and causal mask) run in a :class:`~dpc_fx.sizes.SizeCache`
(``self.sizes``), once per size.

Before: ``model`` (a Hugging Face forward with ``**kwargs``, which FX cannot read). After:

    input_ids, attention_mask = tree_flatten_spec(([], {...}), self._in_spec)
    linear = aten.linear(layer_norm, self.bert...query.weight, self.bert...query.bias)
    dropout = aten.dropout(linear_1, 0.1, self.training)
    return tree_unflatten((loss, logits), self._out_spec)
"""

from __future__ import annotations

import inspect
import logging
import operator
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from dpc_fx.errors import TraceError
from dpc_fx.meta import set_graph_info
from dpc_fx.passes._graph import keep_module_order, keep_unused
from dpc_fx.sdpa import attention
from dpc_fx.sizes import SizeCache

__all__ = ["by_mode", "capture", "count_batch", "specialised_to"]


def by_mode(training: bool, in_training: Any, in_eval: Any) -> Any:
    """``in_training`` in training mode, else ``in_eval``: a constant the two modes set apart
    (attention's dropout probability), read when the graph runs."""
    return in_training if training else in_eval


def count_batch(count: torch.Tensor, training: bool) -> torch.Tensor:
    """Batch norm's ``num_batches_tracked += 1``, in training mode only, as
    ``nn.BatchNorm*`` does."""
    if training:
        count.add_(1)
    return count


def capture(
    module: nn.Module, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> fx.GraphModule:
    """``module`` captured by ``torch.export`` on one call ``module(*args, **kwargs)``.

    Raises:
        TraceError: ``torch.export`` could not capture the module, or the module's code does
            more than set constants apart between training and eval mode.
    """
    args, kwargs = _unaliased(args, dict(kwargs or {}))
    name = type(module).__name__
    trained = _export(module, args, kwargs, training=True)
    evaluated = _export(module, args, kwargs, training=False)
    graph = fx.Graph()
    graph.set_codegen(trained.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(trained.graph, env))
    gm = fx.GraphModule(trained, graph, name)
    gm.meta = {}
    _follow_mode(gm, evaluated, name)
    _drop_guards(gm)
    _check_constants(gm, args, kwargs, name)
    _causal_when_masked(gm)
    _drop_full_slices(gm)
    _grouped_query(gm)
    _cache_sizes(gm)
    gm.graph.lint()
    gm.recompile()
    keep_unused(gm, module)
    keep_module_order(gm, module)
    set_graph_info(gm, module_types={p: type(m).__name__ for p, m in module.named_modules()})
    gm.train(module.training)
    return gm


def _unaliased(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The example inputs with every tensor that shares memory with an earlier one copied.
    Export ties inputs it sees aliased into one graph input (``input_ids=ids, labels=ids``
    would make the graph read ``labels`` for both); inputs are never aliased at run time."""
    seen: set[int] = set()

    def own(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.untyped_storage().data_ptr() in seen and x.numel():
            return x.clone()
        seen.add(x.untyped_storage().data_ptr())
        return x

    return pytree.tree_map(own, (args, kwargs))  # type: ignore[no-any-return]


def _export(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, training: bool
) -> fx.GraphModule:
    modes = {m: m.training for m in module.modules()}
    saved = {m: dict(vars(m)) for m in module.modules()}
    module.train(training)
    # export's own notes on what it specialised (a size of 1, say) are logged and warned
    quiet = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch._dynamo")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                module, args, kwargs, dynamic_shapes=_any_size(module, args, kwargs), strict=False
            )
        return program.module()  # type: ignore[return-value]
    except Exception as e:
        why = f"{type(e).__name__}: {_first_line(e)}"
        if "Cache" in why and "in output" in why:  # a Hugging Face model's own cache
            why = (
                "the model returns its key/value cache, which torch.export cannot output; "
                "give the example inputs as keywords with use_cache=False, as a training "
                "step calls it"
            )
        raise TraceError(
            f"torch.export could not capture {type(module).__name__} "
            f"({'training' if training else 'eval'} mode) either: {why}.",
            reason=why,
        ) from e
    finally:
        for m, attrs in saved.items():  # export's run may cache values on modules
            vars(m).clear()
            vars(m).update(attrs)
        for m, was in modes.items():
            m.training = was
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def _any_size(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Every dimension of every tensor input free to change (``Dim.AUTO``): export keeps
    those the code lets vary (the batch, a sequence's length) symbolic and fixes the others,
    so the graph runs on the last, smaller batch of an epoch too."""

    def sizes(x: Any) -> Any:
        return {i: torch.export.Dim.AUTO for i in range(x.dim())} if x.dim() else None

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return None  # export says what does not fit
    return {
        name: pytree.tree_map(lambda x: sizes(x) if isinstance(x, torch.Tensor) else None, value)
        for name, value in bound.arguments.items()
    }


def _follow_mode(gm: fx.GraphModule, other: fx.GraphModule, name: str) -> None:
    """Make ``gm`` (captured in training mode) follow ``gm.training`` where ``other``
    (captured in eval mode) differs from it in constants; raise if it differs otherwise."""
    ours = [n for n in gm.graph.nodes if not _skipped(n)]
    theirs = [n for n in other.graph.nodes if not _skipped(n)]
    pairs = enumerate(zip(ours, theirs, strict=False))
    where = next((i for i, (a, b) in pairs if (a.op, a.target) != (b.op, b.target)), None)
    if where is None and len(ours) != len(theirs):  # the same up to the shorter one's end
        where = min(len(ours), len(theirs))
    if where is not None:
        raise TraceError(
            f"torch.export captured {name} differently in training and eval mode "
            f"(from node '{ours[min(where, len(ours) - 1)].name}'): its code branches on "
            "self.training around more than constants, which one graph cannot follow.",
            reason="its code branches on self.training (a captured graph would run one "
            "branch in both modes)",
        )
    graph = gm.graph
    flag: fx.Node | None = None

    def training() -> fx.Node:
        nonlocal flag
        if flag is None:
            with graph.inserting_before(_first_body_node(graph)):
                flag = graph.create_node("get_attr", "training")  # the bool, not a tensor
        return flag

    for a, b in zip(ours, theirs, strict=True):
        leaves_a, spec = pytree.tree_flatten(_full_arguments(a))
        leaves_b, spec_b = pytree.tree_flatten(_full_arguments(b))
        if spec != spec_b:
            raise TraceError(f"torch.export captured {name} differently in the two modes.")
        changed = False
        for i, (x, y) in enumerate(zip(leaves_a, leaves_b, strict=True)):
            if isinstance(x, fx.Node) or isinstance(y, fx.Node) or _same(x, y):
                continue
            changed = True
            if x is True and y is False:
                leaves_a[i] = training()
            else:
                with graph.inserting_before(a):
                    leaves_a[i] = graph.call_function(by_mode, (training(), x, y))
        if changed:
            a.args, a.kwargs = pytree.tree_unflatten(leaves_a, spec)
    for node in list(graph.nodes):
        if _is_batch_count(node):
            node.target = count_batch
            node.args = (node.args[0], training())


def _full_arguments(node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An ATen call's arguments with the defaults its schema fills in (attention passes its
    dropout probability in training only, leaving the default 0.0 in eval): positional ones
    as positional, keyword-only ones by keyword."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return node.args, node.kwargs
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, arg in enumerate(schema.arguments):
        if arg.kwarg_only:
            if arg.name not in kwargs and arg.has_default_value():
                kwargs[arg.name] = arg.default_value
        elif i >= len(args):
            if arg.name in kwargs:
                args.append(kwargs.pop(arg.name))
            elif arg.has_default_value():
                args.append(arg.default_value)
            else:
                return node.args, node.kwargs  # not a call this schema reads: compare as is
    return tuple(args), kwargs


def _skipped(node: fx.Node) -> bool:
    """Nodes the comparison of the two modes leaves out: the batch counter (training only)
    and ``contiguous``, which export records in one mode and not the other where a
    tensor's layout differs (after attention with dropout), and which computes nothing."""
    return _is_batch_count(node) or node.target is torch.ops.aten.contiguous.default


def specialised_to(value: Any, captured: Any, where: str) -> None:
    """Raise unless an input the graph was specialised on has the value it was captured with."""
    if type(value) is not type(captured) or value != captured:
        raise ValueError(
            f"{where} was captured with the value {captured!r} and is called with {value!r}; "
            "a captured module is specialised on its example inputs: compile it again with "
            "this value in example_inputs/example_kwargs."
        )


def _check_constants(
    gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> None:
    """Check, when the graph runs, each input that is no tensor (``num_flow_updates=2``):
    export bakes its value into the graph, which would silently ignore another one."""
    codegen = gm.graph._codegen
    spec = codegen.pytree_info.in_spec  # type: ignore[attr-defined]
    values = pytree.tree_leaves((args, kwargs))
    if spec.num_leaves != len(values):
        return  # not the structure we think: nothing to check
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, values, strict=False):
        if isinstance(value, torch.Tensor):
            continue
        with gm.graph.inserting_after(placeholders[-1]):
            gm.graph.call_function(specialised_to, (node, value, f"{name}'s input '{node.name}'"))


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove export's input check (``_guards_fn``): its code cannot read a ``**kwargs``
    forward's inputs, and the ops themselves say when a shape does not fit."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if "_guards_fn" in gm._modules:
        del gm._modules["_guards_fn"]


def _causal_when_masked(gm: fx.GraphModule) -> None:
    """Attention that takes a mask calls :func:`dpc_fx.sdpa.attention` (the same arguments),
    which runs the causal kernel where the mask, when the graph runs, is the causal one:
    export builds as a tensor the mask that the eager model leaves to ``is_causal``."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            node.target = attention


_SDPA = torch.ops.aten.scaled_dot_product_attention.default
aten = torch.ops.aten


def _drop_full_slices(gm: fx.GraphModule) -> None:
    """Read a tensor itself where export recorded a slice of the whole of it (``x[:, 0:]``,
    a Hugging Face head's ``hidden_states[:, slice(-0, None), :]``), as eager indexing
    does: each such slice is otherwise an op forward and, backward, a zero-filled copy of
    its gradient (``slice_backward``)."""
    for node in list(gm.graph.nodes):
        source = _whole(node)
        if source is not node:
            node.replace_all_uses_with(source)
            _erase_unused(gm.graph, node)


def _grouped_query(gm: fx.GraphModule) -> None:
    """Attention whose key and value are repeated across the query's heads (a decoder's
    ``repeat_kv``: ``unsqueeze(x, 2)``, ``expand`` to ``(B, H, n, L, E)``, ``reshape`` to
    ``(B, H*n, L, E)``) reads the unrepeated key and value with ``enable_gqa=True``: the
    same attention (query head ``h`` reads key head ``h // n`` either way), without the two
    copies, and with half or less of the key and value to quantise and keep. The eager
    decoder does the same where it passes no mask."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (_SDPA, attention):
            continue
        if len(node.args) < 3 or node.kwargs.get("enable_gqa", False):
            continue
        key, value = (_repeated(arg) for arg in node.args[1:3])
        if key is None or value is None or key[1] != value[1]:
            continue
        repeats = node.args[1:3]
        node.args = (node.args[0], key[0], value[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        for repeat in repeats:
            _erase_unused(gm.graph, repeat)


def _cache_sizes(gm: fx.GraphModule) -> None:
    """The ATen ops whose values depend on the inputs' sizes alone (a decoder's positions
    and causal mask, built from ``arange`` at every call) run in a :class:`SizeCache`, once
    per size: ``sizes = self.sizes(sym_size_int, ...)`` and its items in their place. Ops
    that write in place, draw random numbers, or read a tensor the graph is given or holds
    (an input, a parameter, a buffer) stay where they are."""
    sized: list[fx.Node] = []  # in graph order
    members: set[fx.Node] = set()
    inputs: dict[fx.Node, None] = {}  # the sizes they read, in order
    for node in gm.graph.nodes:
        if _size_only(node, members):
            sized.append(node)
            members.add(node)
            inputs.update((n, None) for n in node.all_input_nodes if n not in members)
    results = [n for n in sized if any(u not in members for u in n.users)]
    if len(sized) < 2 or not results:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_input = max((order[n] for n in inputs), default=-1)
    readers = [u for n in results for u in n.users if u not in members]
    if any(order[u] <= last_input for u in readers):
        return  # (a result read before the last size it needs is known: left alone)
    graph = fx.Graph()
    env = {n: graph.placeholder(n.name) for n in inputs}
    for node in sized:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in results))
    gm.add_module("sizes", SizeCache(fx.GraphModule(gm, graph, "Sizes")))
    at = min(readers, key=order.__getitem__)
    with gm.graph.inserting_before(at):
        call = gm.graph.call_module("sizes", tuple(inputs))
        for i, node in enumerate(results):
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item, delete_user_cb=lambda u: u not in members)
    for node in reversed(sized):
        gm.graph.erase_node(node)


def _size_only(node: fx.Node, sized: set[fx.Node]) -> bool:
    """Whether ``node`` is an ATen op without side effects or random draws whose inputs
    are all in ``sized`` or sizes (ints; constants are arguments, not inputs)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    value = node.meta.get("val")
    if not (isinstance(value, torch.Tensor) or target is aten._assert_tensor_metadata.default):
        return False
    return all(
        n in sized or isinstance(n.meta.get("val"), int | torch.SymInt)
        for n in node.all_input_nodes
    )


def _repeated(node: Any) -> tuple[fx.Node, int] | None:
    """``(x, n)`` where ``node`` is ``x`` (``(B, H, L, E)``) with each head repeated ``n``
    times in place (``reshape(expand(unsqueeze(x, 2), (B, H, n, L, E)), (B, H*n, L, E))``),
    else ``None``. (Export's full slices between, ``x[:, :, None]``, were dropped first:
    :func:`_drop_full_slices`.)"""
    if not _calls(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    if not _calls(expand, aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not _calls(unsqueeze, aten.unsqueeze.default) or unsqueeze.args[1] not in (2, -3):
        return None
    source = unsqueeze.args[0]
    shapes = [_shape(n) for n in (source, expand, node)]
    if shapes[0] is None or shapes[1] is None or shapes[2] is None:
        return None
    (b, h, length, e), expanded, out = shapes[0], shapes[1], shapes[2]
    if len(expanded) != 5 or not isinstance(expanded[2], int) or len(out) != 4:
        return None
    n = expanded[2]
    if _equal(expanded, (b, h, n, length, e)) and _equal(out, (b, h * n, length, e)):
        return source, n
    return None


def _whole(node: Any) -> Any:
    """``node`` with the full slices (``x[:, :]``, as export records them) above it
    skipped: the tensor they are views of."""
    while _calls(node, aten.slice.Tensor) and not node.kwargs:
        args: tuple[Any, ...] = (*node.args, *_SLICE_DEFAULTS[len(node.args) :])
        start, step = args[2], args[4]
        if start not in (0, None) or step != 1 or not _equal(_shape(node), _shape(node.args[0])):
            break
        node = node.args[0]
    return node


# aten.slice.Tensor(self, dim=0, start=None, end=None, step=1)
_SLICE_DEFAULTS = (None, 0, None, None, 1)


def _calls(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: Any) -> tuple[Any, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _equal(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    """Whether two shapes (their sizes ints or symbols) are the same for every input."""
    return (
        a is not None
        and b is not None
        and len(a) == len(b)
        and all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))
    )


def _erase_unused(graph: fx.Graph, node: Any) -> None:
    """Erase ``node`` if nothing reads it, then its inputs that nothing else reads."""
    if not isinstance(node, fx.Node) or node.users or node.op != "call_function":
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for n in inputs:
        if n.op == "call_function" and n.target in _VIEWS:
            _erase_unused(graph, n)


# The ops of a repeat_kv chain, which compute nothing but a view or its copy.
_VIEWS = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.unsqueeze.default,
}


def _is_batch_count(node: fx.Node) -> bool:
    """``aten.add_(bn.num_batches_tracked, 1)``: batch norm counting a training batch."""
    if node.op != "call_function" or node.target is not torch.ops.aten.add_.Tensor:
        return False
    first = node.args[0] if node.args else None
    return (
        isinstance(first, fx.Node)
        and first.op == "get_attr"
        and str(first.target).endswith("num_batches_tracked")
    )


def _first_body_node(graph: fx.Graph) -> fx.Node:
    for node in graph.nodes:
        if node.op != "placeholder":
            return node
    raise AssertionError("a graph ends with its output node")


def _same(x: Any, y: Any) -> bool:
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:
        return x is y


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "(no message)"
