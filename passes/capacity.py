"""Pass 2, capacity: measure every matmul-like node.

Reads: the graph, and ``example_inputs`` if given. Writes: a copy of the GraphModule in which
every matmul-like node carries ``node.meta["dpc"]``, a :class:`~dpc_fx.meta.LayerMeta`
with its parameter count, MACs and FLOPs, output shape and depth. Nothing else changes.

Shapes and FLOPs come from running the graph on fake tensors (``FakeTensorMode``) under
``torch.utils.flop_counter.FlopCounterMode``: no real arithmetic, so even very large models
are measured in well under a second. Without example inputs, ``macs``, ``flops`` and
``out_shape`` are ``None`` and parameter counts still work.

Attention (``F.scaled_dot_product_attention``) is two products: ``B*H*L*S*E`` MACs for
query and key, ``B*H*L*S*Ev`` for the scores and value. PyTorch's counter has no formula
for its CPU kernel (it counts those on GPUs); :func:`flop_counter` adds one, so the graph's
MACs and the layer's are the same on every device.

Depth is the number of matmul-like layers on the longest path from an input to the node
(ResNet-18's ``fc`` has depth 18), found on the networkx view of the graph.

Before:                       After:
    conv1 = conv1(x)              conv1 = conv1(x)    meta["dpc"] = LayerMeta(params=9408, ...)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from dpc_fx.errors import PassOrderError, ShapeError
from dpc_fx.inputs import example_tuple, graph_inputs
from dpc_fx.meta import META_KEY, LayerMeta, graph_info, set_graph_info
from dpc_fx.passes._graph import copy_graph_module, get_attr, module_path, to_digraph
from dpc_fx.passes._matmul import MatmulSpec, layer_names, matmul_spec, parameter_source

__all__ = ["attention_macs", "capacity", "flop_counter"]


def capacity(
    gm: fx.GraphModule,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    fake: bool = True,
    prefix: str = "",
) -> fx.GraphModule:
    """Annotate each matmul-like node of (a copy of) ``gm`` with its capacity figures.

    With example inputs, the copy's :class:`~dpc_fx.meta.GraphInfo` holds the MACs of the
    whole graph (every op ``torch.utils.flop_counter`` counts, not only the layers').

    Args:
        gm: a traced module (see :func:`dpc_fx.passes.trace`); it is not modified.
        example_inputs: a tensor, or a tuple of the model's positional inputs (each a
            tensor or a list, tuple or dict of them); only their shapes and dtypes are used.
        example_kwargs: the model's keyword inputs, as it is called with them.
        fake: run the graph on fake tensors (no arithmetic). ``False`` runs it on the
            example inputs themselves, for graphs that keep untraceable submodules as
            leaves: those may branch on tensor values, which fake tensors do not have.
        prefix: the module path of ``gm``'s module in a larger model compiled part by part;
            layers are named by their paths in that model.

    Raises:
        ShapeError: the inputs do not fit the model; names the failing node and shapes.
    """
    if not isinstance(gm, fx.GraphModule):
        raise PassOrderError(
            f"capacity: expected a torch.fx.GraphModule, got {type(gm).__name__}; "
            "run dpc_fx.passes.trace on the model first."
        )
    new = copy_graph_module(gm)
    specs = {node: spec for node in new.graph.nodes if (spec := matmul_spec(node, new))}
    measured: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    if example_inputs is not None or example_kwargs:
        args = () if example_inputs is None else example_tuple(example_inputs)
        inputs = _bind(new, args, example_kwargs or {})
        measured, total = _propagate(new, inputs, set(specs), fake=fake)
        set_graph_info(new, macs=total // 2)
    depths = _depths(new)
    names = layer_names(new, specs, graph_info(new).module_types, prefix=prefix)
    for node, spec in specs.items():
        flops, shape = measured.get(node.name, (None, None))
        node.meta[META_KEY] = LayerMeta(
            layer=names[node][0],
            op=spec.op,
            module_type=names[node][1],
            params=_params(new, node, spec),
            macs=None if flops is None else flops // 2,
            flops=flops,
            out_shape=shape,
            depth=depths[node.name],
        )
    return new


def attention_macs(query: Sequence[int], key: Sequence[int], value: Sequence[int], **_: Any) -> int:
    """MACs of ``scaled_dot_product_attention`` on tensors of these shapes: ``query @ key^T``
    and ``scores @ value`` over the query's batch and head dimensions (keys and values with
    fewer heads, grouped-query attention, are broadcast to the query's).

    >>> attention_macs((2, 4, 16, 8), (2, 4, 32, 8), (2, 4, 32, 6))  # B=2 H=4 L=16 S=32 E=8 Ev=6
    57344
    """
    *batch, length, e = query
    source, ev = key[-2], value[-1]
    return math.prod(batch) * length * source * (e + ev)


def _attention_flops(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    return 2 * attention_macs(query, key, value)


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts attention on CPUs
    (PyTorch's counts its GPU kernels only)."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops},
    )


def _params(gm: fx.GraphModule, node: fx.Node, spec: MatmulSpec) -> int:
    """Parameter elements the layer reads: a module's own, or for a functional layer those
    of each operand read from a parameter; from a slice of one (a packed ``in_proj_weight``
    split for cross-attention), the slice's. A layer without a weight operand (attention)
    has none, whatever its mask is read from."""
    if spec.module is not None:
        return sum(p.numel() for p in spec.module.parameters(recurse=False))
    if spec.weight is None:
        return 0
    total = 0
    for src in node.all_input_nodes:
        attr = parameter_source(src)
        if attr is None:
            continue
        whole = get_attr(gm, attr).numel()
        # A view can read fewer elements (a slice) or seem to read more (an expand): the
        # elements read are at most the source's.
        total += whole if src is attr else min(whole, _evaluate_from_parameter(gm, src, whole))
    return total


@torch.no_grad()
def _evaluate_from_parameter(gm: fx.GraphModule, node: fx.Node, default: int) -> int:
    """The number of elements of ``node``, a chain of one-input ops on a parameter, computed
    on the parameter itself (views and slices: no copy); ``default`` if it cannot be."""

    def value(n: fx.Node) -> Any:
        if n.op == "get_attr":
            return get_attr(gm, n)
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), value)
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        return n.target(*args, **kwargs)  # type: ignore[operator]

    try:
        out = value(node)
    except Exception:  # an op that needs more than the parameter: count it whole
        return default
    return out.numel() if isinstance(out, torch.Tensor) else default


def _depths(gm: fx.GraphModule) -> dict[str, int]:
    g = to_digraph(gm)
    depth: dict[str, int] = {}
    for name in nx.topological_sort(g):
        above = max((depth[p] for p in g.predecessors(name)), default=0)
        depth[name] = above + int(g.nodes[name]["layer"])
    return depth


_SHAPE_PRESERVING = frozenset(
    {
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.ReLU,
        nn.ReLU6,
        nn.GELU,
        nn.SiLU,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.Sigmoid,
        nn.Tanh,
        nn.LeakyReLU,
        nn.ELU,
        nn.Mish,
        nn.Identity,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
    }
)


class _FakeProp(fx.Interpreter):
    """Runs the graph on fake tensors and records FLOPs and output shape per layer node."""

    def __init__(
        self, gm: fx.GraphModule, counter: FlopCounterMode, layers: set[fx.Node], *, fake: bool
    ):
        super().__init__(gm)
        self.extra_traceback = False  # our ShapeError already says which node failed
        self.counter = counter
        self.layers = layers
        self.fake = fake
        self.shortcut_flops = 0  # FLOPs of layers sized without a dispatch
        self.measured: dict[str, tuple[int, tuple[int, ...] | None]] = {}

    def flops(self) -> int:
        return self.counter.get_total_flops() + self.shortcut_flops

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # The generated code passes fresh lists and dicts; FX's immutable ones break
        # functions that write to their arguments (torchvision's swin3d window sizes).
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Normalisations and activations keep their input's shape and hold no FLOPs that
        # the counter would see; skipping their fake dispatch (batch norm's decomposition
        # above all) halves the time of measuring a CNN.
        module = self.fetch_attr(str(target))
        if (
            type(module) in _SHAPE_PRESERVING
            and len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and _fits_norm(module, args[0])
        ):
            return args[0]
        if self.fake and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            sized = _size_module(module, args[0])
            if sized is not None:
                self.shortcut_flops += sized[1]
                return sized[0]
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.fake and target in _LINEAR_FUNCTIONS and not kwargs and 2 <= len(args) <= 3:
            sized = _size_linear(*args)
            if sized is not None:
                self.shortcut_flops += sized[1]
                return sized[0]
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        before = self.flops()
        try:
            if n in self.layers:
                self._check_dtypes(n)
            out = super().run_node(n)
        except ShapeError:
            raise
        except Exception as e:
            raise ShapeError(_shape_message(n, self, e), node=n.name, module=module_path(n)) from e
        if n in self.layers:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            self.measured[n.name] = (self.flops() - before, shape)
        return out

    def _check_dtypes(self, n: fx.Node) -> None:
        """Fake tensors let ``float16 @ float32`` through where real ones fail: a layer's
        floating-point operands (its module's weight included) must share one dtype."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if n.op == "call_module":
            operands += list(self.fetch_attr(str(n.target)).parameters(recurse=False))
        check_input_dtype(n, args, operands)
        dtypes = sorted({str(t.dtype) for t in operands if t.is_floating_point()})
        if len(dtypes) > 1:
            raise RuntimeError(f"mixed dtypes {' and '.join(dtypes)} in one layer")


def check_input_dtype(n: fx.Node, args: tuple[Any, ...], operands: list[torch.Tensor]) -> None:
    """Raise :class:`ShapeError` if an integer tensor reaches layer ``n`` whose other operands
    (its weight) are floating point, naming the example input it comes from.

    Fake tensors run ``int64 @ float32`` without complaint where real ones fail, so integer
    example inputs for a float model would otherwise compile silently.
    """
    wanted = next((t.dtype for t in operands if t.is_floating_point()), None)
    if wanted is None:
        return
    for arg, value in zip(n.args, args, strict=False):
        if not isinstance(value, torch.Tensor) or value.is_floating_point():
            continue
        if value.dtype == torch.bool or value.is_complex():  # masks; complex fails elsewhere
            continue
        sources = _placeholders(arg) if isinstance(arg, fx.Node) else []
        named = ", ".join(f"'{name}'" for name in sources) or "a tensor the model makes"
        layer = module_path(n) or n.name
        raise ShapeError(
            f"example inputs: input {named} reaches layer '{layer}' as "
            f"{str(value.dtype).removeprefix('torch.')}, but the layer computes in "
            f"{str(wanted).removeprefix('torch.')}; pass it as that dtype "
            f"(x.to({wanted})), as the model itself needs.",
            node=n.name,
            module=module_path(n),
        )


def _placeholders(node: fx.Node) -> list[str]:
    """Names of the graph inputs that ``node`` is computed from, in graph order."""
    seen, stack, found = {node}, [node], []
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            found.append(current)
        for src in current.all_input_nodes:
            if src not in seen:
                seen.add(src)
                stack.append(src)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return [str(n.target) for n in sorted(found, key=order.__getitem__)]


# Linear layers and convolutions, sized by arithmetic: their output shape and the FLOPs
# FlopCounterMode would count, without the fake dispatch (a few milliseconds per layer, most
# of a compile). Anything unusual returns None and takes the dispatch, which also raises
# the errors for inputs that do not fit.

_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_LINEAR_FUNCTIONS = frozenset({F.linear, torch.ops.aten.linear.default})
_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _size_module(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    if type(m) in _LINEARS:
        return _size_linear(x, m.weight, m.bias)
    nd = _CONVS.get(type(m))
    if nd is None or not isinstance(m, nn.modules.conv._ConvNd):
        return None
    w = m.weight
    if x.dim() != nd + 2 or x.shape[1] != w.shape[1] * m.groups or not _fits(x, w, m.bias):
        return None
    if m.padding == "same":
        spatial = list(x.shape[2:])
    else:
        pad: tuple[int, ...] = (0,) * nd if m.padding == "valid" else tuple(m.padding)  # type: ignore[arg-type]
        spatial = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                x.shape[2:], pad, m.dilation, w.shape[2:], m.stride, strict=True
            )
        ]
    if min(spatial, default=1) < 1:
        return None
    out = x.new_empty((x.shape[0], w.shape[0], *spatial))
    if nd == 2 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)  # as the convolution's would be
    return out, conv_flop_count(list(x.shape), list(w.shape), list(out.shape))


def _size_linear(x: Any, w: Any, b: Any = None) -> tuple[torch.Tensor, int] | None:
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)):
        return None
    if x.dim() < 2 or w.dim() != 2 or x.shape[-1] != w.shape[1] or not _fits(x, w, b):
        return None
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],)):
        return None
    out = x.new_empty((*x.shape[:-1], w.shape[0]))
    return out, 2 * math.prod(x.shape[:-1]) * w.shape[1] * w.shape[0]


def _fits_norm(m: nn.Module, x: torch.Tensor) -> bool:
    """Whether a normalisation's shape check would pass (else: let torch say)."""
    if isinstance(m, nn.LayerNorm):
        return tuple(x.shape[x.dim() - len(m.normalized_shape) :]) == tuple(m.normalized_shape)
    if isinstance(m, nn.GroupNorm):
        return x.dim() >= 2 and x.shape[1] == m.num_channels
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return x.dim() >= 2 and x.shape[1] == m.num_features
    return True


def _fits(x: torch.Tensor, w: torch.Tensor, b: Any) -> bool:
    """Same floating dtype and device for input, weight and bias (else: let torch say)."""
    same = x.dtype == w.dtype and x.device == w.device and x.is_floating_point()
    return same and (b is None or (isinstance(b, torch.Tensor) and b.dtype == w.dtype))


def _mutable(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_mutable(v) for v in value)
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def _bind(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return graph_inputs(gm, args, kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ShapeError(
            f"example inputs do not fit {gm.__class__.__name__}.forward: {e}; pass them as the "
            "model is called (positional inputs in a tuple, keyword inputs in example_kwargs)."
        ) from e


def _propagate(
    gm: fx.GraphModule, inputs: tuple[Any, ...], layers: set[fx.Node], *, fake: bool
) -> tuple[dict[str, tuple[int, tuple[int, ...] | None]], int]:
    """Per layer node: (FLOPs, output shape); and the FLOPs of the whole graph."""
    mode: Any = FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.no_grad()
    if fake:
        inputs = tree_map(
            lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, inputs
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # no default value
    if not len(required) <= len(inputs) <= len(placeholders):
        raise ShapeError(
            f"example inputs: {gm.__class__.__name__}.forward takes "
            f"{len(required)}..{len(placeholders)} positional inputs "
            f"({', '.join(n.name for n in placeholders)}), got {len(inputs)}; "
            "pass a tuple with one tensor per input."
        )
    # Eval mode: shapes are the same, and batch norm accepts a batch of one and updates no
    # running statistics. The modes are restored afterwards.
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    # Fake-tensor mode logs a traceback of its own for an op that fails; ShapeError says it.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with mode, flop_counter() as counter:
            prop = _FakeProp(gm, counter, layers, fake=fake)
            prop.run(*inputs, enable_io_processing=False)  # inputs are the placeholders'
    finally:
        fake_log.setLevel(level)
        for m, training in modes.items():
            m.training = training
    return prop.measured, prop.flops()


def _shape_message(n: fx.Node, prop: fx.Interpreter, e: Exception) -> str:
    where = f"module '{n.target}'" if n.op == "call_module" else _module_of(n)
    shapes = []
    for src in n.all_input_nodes:
        value = prop.env.get(src)
        if isinstance(value, torch.Tensor):
            shapes.append(
                f"{src.name}: {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
            )
    lines = str(e).strip().splitlines()
    reason = lines[0].rstrip(".") if lines else "(no message)"
    return (
        f"example inputs do not fit the model: node '{n.name}' ({where}) failed on inputs "
        f"[{', '.join(shapes)}] with {type(e).__name__}: {reason}. "
        "Check the shape and dtype of the example inputs (batch first, as the model expects)."
    )


def _module_of(n: fx.Node) -> str:
    if n.meta.get("nn_module_stack"):
        return f"in module '{module_path(n)}'"
    return f"{n.op} {getattr(n.target, '__name__', n.target)}"
