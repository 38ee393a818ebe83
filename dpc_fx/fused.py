"""A quantised layer (conv, linear, or a product of two activations) as one autograd node
that keeps only integer codes.

The rewrite pass surrounds a layer with three quantisers: ``act_q`` and ``weight_q``
fake-quantise its inputs, ``grad_q`` quantises its output gradient in backward. Run as they
are, autograd keeps a float copy of the quantised activation and weight for the layer's
backward, and each quantiser is a node of its own. :class:`FusedLayer` runs the same
quantisers' kernels inside one :class:`torch.autograd.Function`:

forward   the activation's range and codes (per tensor: the batch's range in training,
          updating ``act_q``'s running range, the running range in eval), the weight
          quantised (per output channel), the product on the quantised values;
saved     the codes of the activation (two to a byte at 4 bits or fewer, four in three
          bytes at 5 or 6, one a byte above) and its range; the weight itself when it is a
          parameter (kept anyway; backward quantises it again), else its codes: never a
          float copy;
backward  the output gradient quantised as ``grad_q`` does (stochastic, per tensor, the same
          seed stream), the saved codes dequantised, and the layer's own backward formula
          (``aten.convolution_backward``; for linear, the matmuls ``aten.linear``'s backward
          runs; for a product of two activations, ``bmm``'s backward on the folded batch).

Every quantised value equals the one the unfused chain computes (the same kernels; codes
dequantise to exactly the fake-quantised floats), so outputs and gradients agree bit for bit
(``tests/test_fuse.py``). Where the codes cannot stand in (a bit-width above 8 or off, no
gradient wanted, ``torch.jit`` tracing the model) the layer runs the unfused chain through
the same quantiser modules.

On float32 CPU tensors the work runs on the native loops (:mod:`dpc_fx.native`); the float
temporaries (the quantised input in forward, the quantised gradient and the dequantised
input in backward) come from ``native.pool`` and go back to it once the product has read
them. The common case, a conv or linear layer in training whose weight is a parameter,
runs as one operator, ``torch.ops.dpc_fx.layer`` (``csrc/layer.cpp``): the same loops, ops,
random draws and saved tensors as :class:`_FusedFn`, with its autograd node in C++, so a
small layer pays no Python per step beyond the call (:func:`_native_step`); so does a
product of two activations in training, as ``torch.ops.dpc_fx.product``
(:func:`_native_product`). Layers on the operator that read the same tensor at the same bits
(a transformer's q, k and v projections) quantise it once and keep one set of codes between
them.

Attention on quantised query, key and value runs as :class:`FusedAttention`: the three
quantisers and PyTorch's CPU flash kernel in one autograd node that keeps the inputs' codes
(not float copies) beside the kernel's output and log-sum-exp, and runs the kernel's own
backward at the dequantised codes.

A ReLU or ReLU6 whose output only such layers read (the fuse pass finds them) runs as
:func:`relu` or :func:`relu6`: ATen's values and gradients, keeping one bit an element for
its backward rather than a float tensor, so the activation between two fused layers is kept
as codes and bits alone.

Under ``torch.compile`` the same layers run the operator's two halves,
``torch.ops.dpc_fx.layer_forward`` and ``layer_backward``, joined by :class:`_CompiledFn`:
opaque calls that inductor places between its own kernels, with the eager operator's
numbers and saved codes. The other layers run the unfused chain, whose torch kernels
inductor compiles with the model.

>>> q = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 5], dtype=torch.uint8)
>>> pack(q, 3).shape, torch.equal(unpack(pack(q, 3), 3, 9), q)
(torch.Size([5]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from dpc_fx import kernels, native
from dpc_fx.kernels import _grouping, packed_bytes
from dpc_fx.quant import (
    ActQuantizer,
    GradQuantizer,
    WeightQuantizer,
    _flat,
    _quantize_grad,
    _rows,
    _working,
    fake_quantize,
    is_active,
)
from dpc_fx.sdpa import as_causal

__all__ = [
    "FUSABLE",
    "FusedAttention",
    "FusedLayer",
    "pack",
    "packed_bytes",
    "relu",
    "relu6",
    "unpack",
]

# The ops a fused layer runs, with their number of spatial dimensions. ``matmul`` is a
# product of two activations (attention's ``q @ k^T`` and ``p @ v``): batched, with equal
# batch dimensions (no broadcasting), its second operand quantised per tensor.
FUSABLE = {"linear": 0, "matmul": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}
_FUNCTIONAL: dict[str, Callable[..., Tensor]] = {
    "linear": F.linear,
    "matmul": torch.matmul,
    "conv1d": F.conv1d,
    "conv2d": F.conv2d,
    "conv3d": F.conv3d,
}
_MAX_CODE_BITS = 8  # a code fits a byte


def pack(q: Tensor, bits: int) -> Tensor:
    """The ``bits``-bit codes ``q`` (a uint8 vector) packed to their width: two to a byte
    at 4 bits or fewer, four in three bytes at 5 or 6 bits, one a byte at 7 or 8 (``q``
    itself).

    Codes are packed by planes, not neighbours: the vector is cut into equal contiguous
    parts (two, or four) and the parts' codes at the same place share bytes, so every op
    runs over contiguous bytes, vectorised. (Packing neighbours, through strided views,
    took 6.3 ms to pack and unpack a 64x64x32x32 activation's 4-bit codes, against 0.34 ms
    by planes; bit planes, which would fit 5 and 7 bits exactly, cost more than the layer's
    own product.) A remainder that fills no group stays a byte a code.
    """
    codes, nbytes = _grouping(bits)
    if codes == 1:
        return q
    m, _ = divmod(q.numel(), codes)
    out = q.new_empty(packed_bytes(q.numel(), bits))
    parts, planes = q[: m * codes].view(codes, m), out[: m * nbytes].view(nbytes, m)
    if codes == 2:
        torch.bitwise_left_shift(parts[1], 4, out=planes[0]).bitwise_or_(parts[0])
    else:  # three codes in the low 6 bits of three bytes; the fourth's 2-bit pieces on top
        # (a uint8 shift drops what passes bit 7: the first piece needs no mask)
        torch.bitwise_left_shift(parts[3], 6, out=planes[0])
        for i, shift in ((1, 4), (2, 2)):
            torch.bitwise_left_shift(parts[3], shift, out=planes[i]).bitwise_and_(0xC0)
        planes.bitwise_or_(parts[:3])
    out[m * nbytes :] = q[m * codes :]
    return out


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The ``numel`` codes :func:`pack` packed, as a uint8 vector."""
    codes, nbytes = _grouping(bits)
    if codes == 1:
        return packed
    m, _ = divmod(numel, codes)
    out = packed.new_empty(numel)
    parts, planes = out[: m * codes].view(codes, m), packed[: m * nbytes].view(nbytes, m)
    if codes == 2:
        torch.bitwise_and(planes[0], 15, out=parts[0])
        torch.bitwise_right_shift(planes[0], 4, out=parts[1])
    else:
        torch.bitwise_and(planes, 63, out=parts[:3])
        torch.bitwise_right_shift(planes[0], 6, out=parts[3])
        for i, shift, mask in ((1, 4, 0x0C), (2, 2, 0x30)):
            parts[3].bitwise_or_(planes[i].bitwise_right_shift(shift).bitwise_and_(mask))
    out[m * codes :] = packed[m * nbytes :]
    return out


class _Codes:
    """One quantised tensor as backward needs it: packed codes and range (tensors, saved
    through ``save_for_backward``) and how to turn them back into the fake-quantised floats
    (plain values: nothing here may hold the float tensor).

    ``q`` is the codes one a byte, packed here; or, where the native loops made them and
    ``scalars`` holds their ``(lo, hi, non-finite)`` as Python values, packed already."""

    def __init__(
        self,
        q: Tensor,
        lo: Tensor,
        hi: Tensor,
        bad: Tensor,
        bits: int,
        dtype: torch.dtype,
        restore: Callable[[Tensor], Tensor],
        *,
        shape: torch.Size,
        scalars: tuple[float, float, bool] | None = None,
    ) -> None:
        packed = q if scalars is not None else pack(q.reshape(-1), bits)
        self.tensors: tuple[Tensor, ...] = (packed, lo, hi, bad)
        self.bits, self.numel, self.shape = bits, shape.numel(), shape
        self.dtype, self.restore, self.scalars = dtype, restore, scalars

    def floats(self, packed: Tensor, lo: Tensor, hi: Tensor, bad: Tensor) -> Tensor:
        """The floats the codes stand for, in the quantised tensor's layout and dtype; where
        the native loops run, in a buffer of :data:`dpc_fx.native.pool` that the caller
        hands back (:meth:`~dpc_fx.native._Pool.give`) when done with them."""
        if self.scalars is not None and native.usable(packed):
            out = native.pool.take(self.numel)
            flat = native.dequantize(packed, self.numel, self.bits, *self.scalars, out=out)
            return self.restore(flat.view(self.shape)).to(self.dtype)
        q = unpack(packed, self.bits, self.numel).view(self.shape)
        levels = kernels.levels_tensor(self.bits, lo)
        return self.restore(kernels.dequantize_codes(q, lo, hi, levels, bad)).to(self.dtype)


def _strided(size: torch.Size, stride: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    return lambda flat: flat.as_strided(size, stride)


_FLAG = (torch.zeros((), dtype=torch.bool), torch.ones((), dtype=torch.bool))


def _tensor_codes(
    flat: Tensor, bits: int, given: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[float, float, bool] | None]:
    """``(out, codes, lo, hi, bad, scalars)`` of a vector quantised per tensor, over its own
    finite range or over ``given``: the native loops where they apply (the codes packed, and
    ``scalars`` the range and non-finite flag as Python values), else the torch kernels
    (the codes one a byte, ``scalars`` None)."""
    if native.usable(flat):  # range, codes and packing in two passes
        buffer = native.pool.take(flat.numel())
        if given is None:
            out, measured, span, nonfinite = native.quantize_measured(flat, bits, out=buffer)
            assert measured is not None
            codes = measured
            lo, hi = span.unbind()
            scalars = span.tolist()
        else:
            lo, hi = given
            scalars = [lo.item(), hi.item()]
            nonfinite = native.range_of(flat)[1]
            out, packed = native.quantize(
                flat, scalars[0], scalars[1], bits, packed=True, out=buffer
            )
            assert packed is not None
            codes = packed
        return out, codes, lo, hi, _FLAG[nonfinite], (scalars[0], scalars[1], nonfinite)
    levels = kernels.levels_tensor(bits, flat)
    if given is None:
        codes, out, lo, hi, bad = kernels.measured_codes(flat, levels)
    else:
        lo, hi = given
        codes, out, bad = kernels.quantize_codes(flat, lo, hi, levels)
    return out, codes, lo, hi, bad, None


def _activation(q: ActQuantizer, x: Tensor) -> tuple[Tensor, _Codes]:
    """``q(x)`` (nearest rounding over the batch's or the running range) and its codes."""
    assert q.bits is not None
    q._check(x)
    work = _working(x.detach())
    flat, back = _flat(work)
    given = None
    if not q.training:
        lo, hi = q.range_for(x)
        given = (lo.reshape(()).to(work.dtype), hi.reshape(()).to(work.dtype))
    out, codes, lo, hi, bad, scalars = _tensor_codes(flat, q.bits, given)
    if q.training:
        q._observe(lo, hi)
    x_hat = back(out).to(x.dtype)
    # _flat's way back holds x itself; backward rebuilds the layout from sizes and strides.
    restore = _strided(x_hat.size(), x_hat.stride())
    codes_ = _Codes(codes, lo, hi, bad, q.bits, x.dtype, restore, shape=flat.shape, scalars=scalars)
    return x_hat, codes_


def _weight(q: WeightQuantizer, w: Tensor) -> tuple[Tensor, _Codes]:
    """``q(w)`` (per output channel, or per tensor) and its codes."""
    assert q.bits is not None
    q._check(w)
    work = _working(w.detach())
    channel_dim = q.channel_dim if w.dim() > 1 else None
    if channel_dim is None:
        flat, back = _flat(work)
        out, codes, lo, hi, bad, scalars = _tensor_codes(flat, q.bits)
        w_hat = back(out).to(w.dtype)
        restore = _strided(w_hat.size(), w_hat.stride())
        return w_hat, _Codes(
            codes, lo, hi, bad, q.bits, w.dtype, restore, shape=flat.shape, scalars=scalars
        )
    rows, restore = _rows(work, channel_dim)
    levels = kernels.levels_tensor(q.bits, work)
    codes, out, lo, hi, bad = kernels.quantize_codes_channels(rows, levels)
    w_hat = restore(out).to(w.dtype)
    return w_hat, _Codes(codes, lo, hi, bad, q.bits, w.dtype, restore, shape=codes.shape)


def _parameter(q: WeightQuantizer, w: Tensor) -> Tensor:
    """``q(w)`` alone, for a parameter that backward quantises again rather than keep codes
    of: the unfused weight quantiser's own kernel (no codes to write)."""
    assert q.bits is not None
    q._check(w)
    channel_dim = q.channel_dim if w.dim() > 1 else None
    return fake_quantize(w.detach(), q.bits, channel_dim=channel_dim)


class _FusedFn(torch.autograd.Function):
    """Quantise, multiply, keep codes; in backward quantise the gradient and differentiate
    the product at the dequantised codes (straight through to ``x`` and ``weight``).

    The Python path, for every case :func:`_native_layer` and :func:`_native_matmul` leave
    out (a weight that is not a parameter, autocast, eval mode, half precision, a quantiser
    checking for non-finite values); :func:`_native_step` and :func:`_native_product` are
    the same step."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: FusedLayer
    ) -> Tensor:
        native.pool.enter("forward")
        x_hat, act = _activation(layer.act_q, x)
        # A parameter is kept anyway: backward quantises it again (the same values, nearest
        # rounding is deterministic) rather than keep its codes beside it.
        wgt: _Codes | None = None
        if isinstance(weight, nn.Parameter):
            w_hat = _parameter(layer.weight_q, weight)
        else:
            w_hat, wgt = _weight(layer.weight_q, weight)
        y = layer.product(x_hat, w_hat, bias)
        # The quantised operands' floats are read: their buffers serve the next layer.
        native.pool.give(_buffer(x_hat), _buffer(w_hat) if wgt is not None else None)
        del x_hat, w_hat
        # Under autocast the product ran on copies cast to y's dtype; backward differentiates
        # at those copies and casts the gradients back, as autograd does unfused.
        ctx.dtypes = (y.dtype, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*act.tensors, *(wgt.tensors if wgt is not None else (weight,)))
        # (input elements, weight elements and ranges kept as codes: none for a parameter)
        layer.last_shapes = (
            x.numel(),
            *((weight.numel(), wgt.tensors[1].numel()) if wgt is not None else (0, 0)),
        )
        # Only save_for_backward holds them from here, so saved-tensor hooks (offloading,
        # checkpointing) see every tensor backward keeps.
        act.tensors = ()
        if wgt is not None:
            wgt.tensors = ()
        ctx.codes, ctx.layer = (act, wgt), layer
        ctx.has_bias = bias is not None
        ctx.grad_bits = _grad_bits(layer) or None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        act, wgt = ctx.codes
        layer: FusedLayer = ctx.layer
        native.pool.enter("backward")
        incoming = grad  # autograd's: never handed to the pool
        if ctx.grad_bits is not None:
            assert layer.grad_q is not None
            if layer.grad_q.check_finite:
                layer.grad_q._check(grad)
            grad = _quantize_grad(grad, ctx.grad_bits, native.pool)
        product, *dtypes = ctx.dtypes
        x_hat = act.floats(*saved[:4])
        if wgt is None:  # the parameter itself
            w_hat = _parameter(layer.weight_q, saved[4])
        else:
            w_hat = wgt.floats(*saved[4:])
        x_hat, w_hat = x_hat.to(product), w_hat.to(product)
        want = ctx.needs_input_grad[:3]
        if layer.op == "linear":
            dx, dw, db = _linear_backward(grad, x_hat, w_hat, want)
        elif layer.op == "matmul":
            dx, dw, db = (*_matmul_backward(grad, x_hat, w_hat, want), None)
        else:
            n = FUSABLE[layer.op]
            dx, dw, db = torch.ops.aten.convolution_backward(
                grad,
                x_hat,
                w_hat,
                [w_hat.shape[0]] if ctx.has_bias else None,
                layer.stride,
                layer.padding,
                layer.dilation,
                False,
                [0] * n,
                layer.groups,
                [want[0], want[1], want[2] and ctx.has_bias],
            )
        native.pool.give(
            _buffer(grad) if grad is not incoming else None,
            _buffer(x_hat),
            _buffer(w_hat) if wgt is not None else None,
        )
        grads = (dx, dw, db if ctx.has_bias else None)
        return (
            *(
                g.to(t) if g is not None and w and t is not None else None
                for g, w, t in zip(grads, want, dtypes, strict=True)
            ),
            None,
        )


def _operator_takes(layer: FusedLayer, x: Tensor, weight: Tensor) -> bool:
    """What both of a fused layer's operators (``layer``, ``product``) take: training mode,
    float32 CPU operands and running range outside autocast, and no quantiser checking for
    non-finite values (the Python path raises that error, naming the layer)."""
    act_q, weight_q, grad_q = layer.act_q, layer.weight_q, layer.grad_q
    return (
        act_q.training
        and not act_q.check_finite
        and not weight_q.check_finite
        and not (grad_q is not None and grad_q.check_finite)
        and x.dtype == weight.dtype == act_q.running_min.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
    )


def _native_layer(layer: FusedLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``layer``'s step can run as the operator ``torch.ops.dpc_fx.layer``
    (``csrc/layer.cpp``, where it could be built): a conv or linear layer that
    :func:`_operator_takes`, on contiguous tensors, its weight a parameter quantised per
    output channel."""
    return (
        layer.op != "matmul"
        and isinstance(weight, nn.Parameter)
        and layer.weight_q.channel_dim == 0
        and (bias is None or bias.dtype == torch.float32)
        and _operator_takes(layer, x, weight)
        and (
            native.layers_loaded()  # a trace must not start a build; compile() ran it
            if torch.compiler.is_compiling()
            else x.is_contiguous() and weight.is_contiguous() and native.layers()
        )
    )


def _grad_bits(layer: FusedLayer | FusedAttention) -> int:
    """The bits the operator rounds the output gradient to; 0: as it is."""
    grad_q = layer.grad_q
    return grad_q.bits if grad_q is not None and grad_q.active else 0  # type: ignore[return-value]


def _native_step(layer: FusedLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's step as ``torch.ops.dpc_fx.layer``: what :class:`_FusedFn` does, with the
    same loops, ops, random draws and saved tensors, in one call forward and a C++ autograd
    node backward."""
    act_q = layer.act_q
    layer.last_shapes = (x.numel(), 0, 0)
    return torch.ops.dpc_fx.layer.default(
        x,
        weight,
        bias,
        act_q.bits,
        layer.weight_q.bits,
        _grad_bits(layer),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        act_q.running_min,
        act_q.running_max,
        act_q.seen,
        1.0 - act_q.momentum,
        kernels._rank(),
    )


def _native_matmul(layer: FusedLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``layer``'s step can run as ``torch.ops.dpc_fx.product``: a product of two
    activations (the fused layer's op ``"matmul"``, its batch dimensions equal) that
    :func:`_operator_takes`, outside ``torch.compile``, its second operand quantised per
    tensor."""
    return (
        layer.op == "matmul"
        and bias is None
        and layer.weight_q.channel_dim is None
        and _operator_takes(layer, x, weight)
        and native.layers()
    )


def _native_product(layer: FusedLayer, x: Tensor, weight: Tensor, bias: None) -> Tensor:
    """The product's step as ``torch.ops.dpc_fx.product``: what :class:`_FusedFn` does for
    a ``"matmul"`` layer, with the same loops, ops, random draws and saved codes, in one
    call forward and a C++ autograd node backward."""
    act_q = layer.act_q
    layer.last_shapes = (x.numel(), weight.numel(), 1)
    return torch.ops.dpc_fx.product.default(  # type: ignore[no-any-return]
        x,
        weight,
        act_q.bits,
        layer.weight_q.bits,
        _grad_bits(layer),
        act_q.running_min,
        act_q.running_max,
        act_q.seen,
        1.0 - act_q.momentum,
        kernels._rank(),
    )


class _CompiledFn(torch.autograd.Function):
    """A layer's step under ``torch.compile``: ``torch.ops.dpc_fx.layer_forward`` forward and
    ``layer_backward`` backward, opaque calls to the C++ of ``torch.ops.dpc_fx.layer``
    (whose autograd node a trace cannot see into), for dynamo to trace and inductor to run
    between its own kernels. Keeps what that node keeps: the codes, their range and flag,
    and the weight."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: FusedLayer
    ) -> tuple[Tensor, Tensor, Tensor]:
        bits = (layer.act_q.bits, layer.weight_q.bits)
        grad_bits, rank = _grad_bits(layer), kernels._rank()
        conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
        y, codes, lo, hi, bad = torch.ops.dpc_fx.layer_forward.default(
            x, weight, bias, *bits, *conv, grad_bits, rank
        )
        ctx.save_for_backward(codes, lo, hi, bad, weight)
        ctx.step = (list(x.shape), *bits, grad_bits, *conv)
        ctx.rank, ctx.has_bias = rank, bias is not None
        ctx.mark_non_differentiable(lo, hi)
        return y, lo, hi

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *unused: Tensor | None) -> tuple[Tensor | None, ...]:
        codes, lo, hi, bad, weight = ctx.saved_tensors
        want = [bool(w) for w in ctx.needs_input_grad[:3]]
        grads = torch.ops.dpc_fx.layer_backward.default(
            grad, codes, lo, hi, bad, weight, *ctx.step, ctx.rank, ctx.has_bias, want
        )
        return (*(g if w else None for g, w in zip(grads, want, strict=True)), None)


def _compiled_step(layer: FusedLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's step under ``torch.compile`` (:class:`_CompiledFn`), and the running range
    updated from the input's."""
    y, lo, hi = _CompiledFn.apply(x, weight, bias, layer)
    layer.act_q._observe(lo, hi)
    return y  # type: ignore[no-any-return]


def _python_step(layer: FusedLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _FusedFn.apply(x, weight, bias, layer)  # type: ignore[no-any-return]


def _buffer(t: Tensor) -> Tensor | None:
    """The float32 vector ``t`` views, if it is one of this layer's own temporaries a pool
    may take back (not a parameter, not a tensor the caller holds)."""
    base = t if t._base is None else t._base
    if base.dtype != torch.float32 or base.dim() != 1 or isinstance(base, nn.Parameter):
        return None
    return base


def _linear_backward(
    grad: Tensor, x_hat: Tensor, w_hat: Tensor, want: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    # The products autograd runs for aten.linear (addmm / mm on the flattened input):
    # d(input) = g @ W and d(weight) = g^T @ x, in these layouts, so the sums match.
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = g2.mm(w_hat).view(x_hat.shape) if want[0] else None
    dw = g2.t().mm(x_hat.reshape(-1, x_hat.shape[-1])) if want[1] else None
    db = g2.sum(0) if want[2] else None
    return dx, dw, db


def _matmul_backward(
    grad: Tensor, a_hat: Tensor, b_hat: Tensor, want: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None]:
    # torch.matmul folds equal batch dimensions into one and runs bmm; autograd then runs
    # bmm's backward (d(a) = g @ b^T, d(b) = a^T @ g) on the folded operands and unfolds.
    n, k, m = a_hat.shape[-2], a_hat.shape[-1], b_hat.shape[-1]
    a3, b3, g3 = a_hat.reshape(-1, n, k), b_hat.reshape(-1, k, m), grad.reshape(-1, n, m)
    da = g3.bmm(b3.transpose(1, 2)).reshape(a_hat.shape) if want[0] else None
    db = a3.transpose(1, 2).bmm(g3).reshape(b_hat.shape) if want[1] else None
    return da, db


def _tuple(value: int | tuple[int, ...], n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * n


def relu(x: Tensor, module: nn.Module | None = None, inplace: bool = False) -> Tensor:
    """``torch.relu(x)`` keeping one bit an element for its backward, where ATen's relu
    keeps its float output: the fuse pass calls it for a ReLU whose output only fused layers
    keep (as codes), so that output is not kept in float for the ReLU alone. Values and
    gradients are ATen's bit for bit (``-0.0`` and ``nan`` pass forward as they are, and the
    gradient passes where ATen's does: where the output is not ``<= 0``). It runs as
    ``torch.ops.dpc_fx.relu`` (a C++ autograd node; under ``torch.compile`` its halves,
    opaque calls), on contiguous float32 CPU tensors of 1024 elements or more that need a
    gradient; else as ``F.relu``.

    ``module``: the ``nn.ReLU`` the graph called there, if any. Where it has hooks (its own
    or global ones), it is called instead: its hooks run as they would have, and it keeps
    its float output as before. ``inplace`` (or the module's): write the output over ``x``,
    as ``F.relu(x, inplace=True)`` does, rather than into a new tensor.

    >>> x = torch.tensor([-1.0, 0.0, 2.0]).repeat(400).requires_grad_()
    >>> relu(x).sum().backward()
    >>> x.grad[:3]
    tensor([0., 0., 1.])
    """
    return _bit_relu(x, module, inplace, math.inf, F.relu)


def relu6(x: Tensor, module: nn.Module | None = None, inplace: bool = False) -> Tensor:
    """``F.relu6(x)`` keeping one bit an element for its backward, where ATen's keeps its
    float input: as :func:`relu`, with the gradient passing where ATen's ``hardtanh_backward``
    passes it (where the input is neither ``<= 0`` nor ``>= 6``). At a ``nan`` input ATen's
    own gradient depends on where the element falls (its vector loop stops it, its scalar
    loop passes it); this one passes it, as ATen's relu does.

    >>> x = torch.tensor([-1.0, 3.0, 6.0, 7.0]).repeat(300).requires_grad_()
    >>> relu6(x).sum().backward()
    >>> x.grad[:4]
    tensor([0., 1., 0., 0.])
    """
    return _bit_relu(x, module, inplace, 6.0, F.relu6)


def _bit_relu(
    x: Tensor,
    module: nn.Module | None,
    inplace: bool,
    top: float,
    plain: Callable[..., Tensor],
) -> Tensor:
    # (Per call on every ReLU of a model: the cheap checks first.)
    if module is not None:
        if _hooked(module):
            return module(x)  # type: ignore[no-any-return]
        inplace = inplace or bool(getattr(module, "inplace", False))
    if (
        x.requires_grad
        and not torch.jit.is_tracing()  # (before numel: a tracer would record that)
        and x.numel() >= _FEWEST_BITS
        and x.dtype is torch.float32
        and x.is_cpu
        and x.is_contiguous()  # ATen's keeps a layout the next op reads its order from
        and torch.is_grad_enabled()
    ):
        if torch.compiler.is_compiling():  # (functional there: inductor places the buffers)
            if native.layers_loaded():  # a trace must not start a build
                return _CompiledRelu.apply(x, top)  # type: ignore[no-any-return]
        elif native.layers_loaded() or native.layers():
            op = torch.ops.dpc_fx.relu_ if inplace else torch.ops.dpc_fx.relu
            return op.default(x, top)  # type: ignore[no-any-return]
    return plain(x, inplace=inplace)


# Below this many elements a ReLU stays ATen's: its float output is a few KiB, and the
# operator's autograd node costs some microseconds more than ATen's (a squeeze-and-excite
# block's ReLU on a few hundred channels, say).
_FEWEST_BITS = 1024


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks, its own or global ones."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


class _CompiledRelu(torch.autograd.Function):
    """:func:`relu` and :func:`relu6` under ``torch.compile``: ``torch.ops.dpc_fx.relu_forward`` and
    ``relu_backward``, the halves of its C++ node, joined for dynamo to trace."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, top: float) -> Tensor:
        y, bits = torch.ops.dpc_fx.relu_forward.default(x, top)
        ctx.save_for_backward(bits)
        return y  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (bits,) = ctx.saved_tensors
        return torch.ops.dpc_fx.relu_backward.default(grad, bits), None


class FusedLayer(nn.Module):
    """A quantised conv/linear layer: its three quantisers and one autograd node.

    Called in the graph as ``self.dpc.<layer>(x, weight, bias)`` in place of the
    ``act_q -> op <- weight_q ; grad_q`` chain. The quantisers stay its children under their
    roles' names (so quantiser paths, ``state_dict`` keys and schedules setting ``bits``
    keep working); their ``bits`` are read on every call.

    Args:
        op: ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"``, or ``"matmul"`` for a
            product of two activations (``weight`` is then the second activation, kept as
            codes like the first).
        act_q, weight_q, grad_q: the layer's quantisers (``grad_q`` may be ``None``).
        stride, padding, dilation, groups: the convolution's, as ints or tuples.
    """

    act_q: ActQuantizer
    weight_q: WeightQuantizer
    grad_q: GradQuantizer | None

    def __init__(
        self,
        op: str,
        act_q: ActQuantizer,
        weight_q: WeightQuantizer,
        grad_q: GradQuantizer | None,
        *,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if op not in FUSABLE:
            raise ValueError(f"FusedLayer: op={op!r} is not one of {sorted(FUSABLE)}")
        n = max(FUSABLE[op], 1)
        self.op = op
        self.act_q, self.weight_q = act_q, weight_q
        self.register_module("grad_q", grad_q)
        self.stride, self.padding = _tuple(stride, n), _tuple(padding, n)
        self.dilation, self.groups = _tuple(dilation, n), groups
        # Elements of the last input, weight and weight ranges the fused path saw.
        self.last_shapes: tuple[int, int, int] | None = None

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        step = self._step(x, weight, bias)
        if step is None:
            y = self.product(self.act_q(x), self.weight_q(weight), bias)
            return y if self.grad_q is None else self.grad_q(y)
        if self.op == "linear" and x.dim() > 2:
            # aten.linear runs a dense 3-D input as a 2-D product and returns a view of it;
            # a custom Function's output may not be a view (in-place ops on it would be
            # refused), so the Function takes the 2-D product and autograd the view.
            y = step(self, x.reshape(-1, x.shape[-1]), weight, bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        return step(self, x, weight, bias)

    def _step(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Callable[..., Tensor] | None:
        """How this call runs fused, or ``None``: as the unfused chain of quantisers."""
        if not self._fusable(x, weight, bias):
            return None
        if torch.compiler.is_compiling():
            # The operator's halves where they take the layer; else the quantisers' torch
            # ops, for inductor to fuse into their neighbours.
            return _compiled_step if _native_layer(self, x, weight, bias) else None
        if _native_layer(self, x, weight, bias):
            return _native_step
        return _native_product if _native_matmul(self, x, weight, bias) else _python_step

    def product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's op on (quantised) ``x`` and ``weight``."""
        if self.op == "linear":
            return F.linear(x, weight, bias)
        if self.op == "matmul":
            return torch.matmul(x, weight)
        fn = _FUNCTIONAL[self.op]
        return fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _fusable(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
        if not torch.is_grad_enabled() or torch.jit.is_tracing():
            return False  # nothing to keep, or a tracer that should see the quantisers
        if not any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return False
        if self.op == "matmul":
            # Equal batch dimensions, no broadcasting: the folded product backward redoes.
            batched = x.dim() == weight.dim() >= 3 and x.shape[:-2] == weight.shape[:-2]
        elif self.op == "linear":
            # aten.matmul folds a strided input differently when it requires grad (as it
            # does unfused, never inside an autograd function): only dense inputs agree.
            batched = x.dim() == 2 or (x.dim() > 2 and x.is_contiguous())
        else:
            batched = x.dim() == FUSABLE[self.op] + 2
        codes = all(
            is_active(b := getattr(q, "bits", None)) and b <= _MAX_CODE_BITS  # type: ignore[operator]
            for q in (self.act_q, self.weight_q)
        )
        return codes and batched and x.numel() > 0 and weight.numel() > 0

    def saved_bytes(self, a_bits: int | None = None, w_bits: int | None = None) -> int | None:
        """Bytes this layer keeps for backward at ``a_bits``/``w_bits`` (default: its
        quantisers' bits) for the last input it ran on; ``None`` before its first fused
        step. The input's codes, its 4-byte ``lo``/``hi`` and a one-byte non-finite flag;
        a weight that is a parameter is kept as it is (no new memory) and quantised again in
        backward, any other weight as codes, ranges per channel and a flag."""
        if self.last_shapes is None:
            return None
        a_bits = self.act_q.bits if a_bits is None else a_bits
        w_bits = self.weight_q.bits if w_bits is None else w_bits
        if not (is_active(a_bits) and is_active(w_bits)):
            return None
        assert a_bits is not None and w_bits is not None
        x_numel, w_numel, channels = self.last_shapes
        act = packed_bytes(x_numel, a_bits) + 2 * 4 + 1
        return act + (packed_bytes(w_numel, w_bits) + 2 * 4 * channels + 1 if w_numel else 0)

    def extra_repr(self) -> str:
        roles = (("act_q", self.act_q), ("weight_q", self.weight_q), ("grad_q", self.grad_q))
        bits = ", ".join(f"{role}={getattr(q, 'bits', None) or 'fp'}" for role, q in roles)
        conv = ""
        if self.op not in ("linear", "matmul"):
            conv = f", stride={tuple(self.stride)}, padding={tuple(self.padding)}"
            conv += f", groups={self.groups}" if self.groups != 1 else ""
        return f"{self.op}, {bits}{conv}"


_FLASH = torch.nn.attention.SDPBackend.FLASH_ATTENTION.value
_sdpa = torch.ops.aten.scaled_dot_product_attention.default
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class _AttentionFn(torch.autograd.Function):
    """Quantise query, key and value, run the CPU flash kernel on the quantised values, keep
    their codes; in backward quantise the output gradient and run the kernel's backward at
    the dequantised codes (straight through to the three inputs)."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
        layer: FusedAttention,
    ) -> Tensor:
        native.pool.enter("forward")
        quantised = [
            _activation(q, x) for q, x in zip(layer.quantizers, (query, key, value), strict=True)
        ]
        hats = [hat for hat, _ in quantised]
        if mask is not None and mask.dtype == torch.bool:  # as ATen's attention converts it
            keep = mask
            mask = torch.zeros(keep.shape, dtype=query.dtype, device=keep.device)
            mask.masked_fill_(~keep, -torch.inf)
        out, lse = _flash(*hats, 0.0, is_causal, attn_mask=mask, scale=scale)
        native.pool.give(*(_buffer(hat) for hat in hats))
        del hats
        codes = [c for _, c in quantised]
        ctx.save_for_backward(*(t for c in codes for t in c.tensors), out, lse, mask)
        for c in codes:  # only save_for_backward holds them (see _FusedFn)
            c.tensors = ()
        ctx.codes, ctx.layer, ctx.call = codes, layer, (is_causal, scale)
        ctx.grad_bits = _grad_bits(layer) or None
        return out  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        layer: FusedAttention = ctx.layer
        native.pool.enter("backward")
        incoming = grad
        if ctx.grad_bits is not None:
            assert layer.grad_q is not None
            if layer.grad_q.check_finite:
                layer.grad_q._check(grad)
            grad = _quantize_grad(grad, ctx.grad_bits, native.pool)
        hats = [c.floats(*saved[4 * i : 4 * i + 4]) for i, c in enumerate(ctx.codes)]
        out, lse, mask = saved[12:]
        is_causal, scale = ctx.call
        grads = _flash_backward(grad, *hats, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
        native.pool.give(
            _buffer(grad) if grad is not incoming else None, *(_buffer(hat) for hat in hats)
        )
        want = ctx.needs_input_grad[:3]
        return (
            *(g if w else None for g, w in zip(grads, want, strict=True)),
            None,
            None,
            None,
            None,
        )


def _native_attention(
    layer: FusedAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> Tensor:
    """The fused step as ``torch.ops.dpc_fx.attention``: what :class:`_AttentionFn` does, with
    the same loops, kernel calls, random draws and saved tensors, in one call forward and a
    C++ autograd node backward."""
    quantizers = layer.quantizers
    return torch.ops.dpc_fx.attention.default(  # type: ignore[no-any-return]
        query,
        key,
        value,
        mask,
        is_causal,
        scale,
        [q.bits for q in quantizers],
        _grad_bits(layer),
        [t for q in quantizers for t in (q.running_min, q.running_max, q.seen)],
        [1.0 - q.momentum for q in quantizers],
        kernels._rank(),
    )


class FusedAttention(nn.Module):
    """Attention (``scaled_dot_product_attention``) on quantised query, key and value as one
    autograd node that keeps their codes.

    Called in the graph as ``self.dpc.<layer>(query, key, value, attn_mask, ...)`` (the
    attention's own arguments) in place of the chain ``query_q, key_q, value_q -> attention
    ; grad_q``. The quantisers stay its children under their roles' names, as a
    :class:`FusedLayer`'s do.

    Where the unfused chain would run PyTorch's CPU flash kernel (float32 CPU tensors, no
    dropout, a gradient wanted, every input quantised to 8 bits or fewer; grouped-query
    attention, ``enable_gqa=True``, included), this layer runs that kernel on the same
    quantised values and keeps, for its backward, the three inputs' codes (packed as
    :class:`FusedLayer` packs them) with the kernel's output and log-sum-exp, which fp32
    attention keeps too: no float copy of a quantised input. Backward quantises the output
    gradient as ``grad_q`` does and runs the kernel's backward on the dequantised codes, so
    values and gradients are the unfused chain's bit for bit. In training, on the native
    loops, the step is the operator ``torch.ops.dpc_fx.attention`` (``csrc/layer.cpp``: one
    call forward, a C++ autograd node backward), with the same results. Elsewhere (eval
    under ``no_grad``, ``torch.compile``, dropout, another backend) it runs the unfused
    chain through the same quantiser modules. A mask that is the causal one runs as causal
    attention (:mod:`dpc_fx.sdpa`), as the captured graph's own call does.
    """

    query_q: ActQuantizer
    key_q: ActQuantizer
    value_q: ActQuantizer
    grad_q: GradQuantizer | None

    def __init__(
        self,
        query_q: ActQuantizer,
        key_q: ActQuantizer,
        value_q: ActQuantizer,
        grad_q: GradQuantizer | None,
    ) -> None:
        super().__init__()
        self.query_q, self.key_q, self.value_q = query_q, key_q, value_q
        self.register_module("grad_q", grad_q)
        # Elements of the last query, key and value the fused path saw.
        self.last_shapes: tuple[int, int, int] | None = None

    @property
    def quantizers(self) -> tuple[ActQuantizer, ActQuantizer, ActQuantizer]:
        return self.query_q, self.key_q, self.value_q

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        attn_mask, is_causal = as_causal(query, key, attn_mask, is_causal)
        call = (attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if self._fusable(query, key, value, *call):
            self.last_shapes = (query.numel(), key.numel(), value.numel())
            if self._native():
                return _native_attention(self, query, key, value, attn_mask, is_causal, scale)
            return _AttentionFn.apply(query, key, value, attn_mask, is_causal, scale, self)  # type: ignore[no-any-return]
        inputs = (q(x) for q, x in zip(self.quantizers, (query, key, value), strict=True))
        out = _sdpa(*inputs, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return out if self.grad_q is None else self.grad_q(out)

    def _fusable(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
    ) -> bool:
        if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        inputs = (query, key, value)
        if not any(t.requires_grad for t in inputs) or dropout_p != 0.0:
            return False
        if mask is not None and mask.requires_grad:
            return False
        dense = all(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 4 and t.numel()
            for t in inputs
        )
        if not dense or not query.shape[0] == key.shape[0] == value.shape[0]:
            return False  # (a broadcast batch: ATen's composite expands it)
        heads, kv_heads = query.shape[1], key.shape[1]
        grouped = enable_gqa and kv_heads == value.shape[1] and heads % kv_heads == 0
        if not (heads == kv_heads == value.shape[1] or grouped):
            return False  # (broadcast heads)
        if torch.is_autocast_enabled("cpu"):
            return False
        codes = all(
            is_active(b := getattr(q, "bits", None)) and b <= _MAX_CODE_BITS  # type: ignore[operator]
            for q in self.quantizers
        )
        choice = torch._fused_sdp_choice(
            query, key, value, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
        return codes and choice == _FLASH

    def _native(self) -> bool:
        """Whether the fused step can run as the operator ``torch.ops.dpc_fx.attention``
        (``csrc/layer.cpp``): in training, float32 running ranges, no quantiser checking for
        non-finite values (the Python path raises that error, naming the layer)."""
        quantizers = (*self.quantizers, self.grad_q)
        return (
            all(q.training and q.running_min.dtype == torch.float32 for q in self.quantizers)
            and not any(q is not None and q.check_finite for q in quantizers)
            and native.layers()
        )

    def saved_bytes(self, a_bits: int | None = None) -> int | None:
        """Bytes of codes this layer keeps for backward at ``a_bits`` (default: its
        quantisers' bits) for the last inputs it ran on, ``None`` before its first fused
        step: each input's codes, its 4-byte ``lo``/``hi`` and a one-byte non-finite flag.
        (The kernel's output and log-sum-exp, kept in float as fp32 attention keeps them,
        are not counted.)"""
        if self.last_shapes is None:
            return None
        bits = [q.bits if a_bits is None else a_bits for q in self.quantizers]
        total = 0
        for numel, b in zip(self.last_shapes, bits, strict=True):
            if b is None or not is_active(b):
                return None
            total += packed_bytes(numel, b) + 2 * 4 + 1
        return total

    def extra_repr(self) -> str:
        roles = ("query_q", "key_q", "value_q", "grad_q")
        quantizers = (*self.quantizers, self.grad_q)
        return "attention, " + ", ".join(
            f"{role}={getattr(q, 'bits', None) or 'fp'}"
            for role, q in zip(roles, quantizers, strict=True)
        )
