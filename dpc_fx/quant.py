"""Simulated quantisation: the math, its autograd rules, and the modules the rewrite inserts.

A quantiser maps a tensor onto ``2**bits`` evenly spaced levels spanning its range
``[lo, hi]`` (asymmetric min/max, as in CPT and Banner et al.) and maps back to floats:

    scale = (hi - lo) / (2**bits - 1)
    q     = clamp(round((x - lo) / scale), 0, 2**bits - 1)      # or stochastic rounding
    x_hat = q * scale + lo

Three modules use it, one per role, each with a mutable ``bits`` (``None`` or 32: pass
through untouched):

* :class:`WeightQuantizer`: per output channel, range from the weight itself, nearest
  rounding, straight-through gradient.
* :class:`ActQuantizer`: per tensor, range from the batch in training and a running
  average of it (momentum 0.9) in eval, nearest rounding, straight-through gradient.
* :class:`GradQuantizer`: identity in forward; in backward it quantises the incoming
  gradient per tensor with stochastic (unbiased) rounding.

Ranges come from the finite values only, so one ``inf`` or ``nan`` does not spoil a whole
tensor; a constant tensor (``hi == lo``) comes back unchanged.

>>> x = torch.tensor([0.0, 0.1, 0.52, 1.0])
>>> fake_quantize(x, 2)          # levels 0, 1/3, 2/3, 1
tensor([0.0000, 0.0000, 0.6667, 1.0000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dpc_fx import kernels
from dpc_fx.errors import NonFiniteError

__all__ = [
    "ActQuantizer",
    "GradQuantizer",
    "Quantizer",
    "WeightQuantizer",
    "fake_quantize",
    "tensor_range",
]


def is_active(bits: int | None) -> bool:
    """Whether ``bits`` asks for quantisation at all (``None`` and 32 do not)."""
    return bits is not None and bits < 32


def _working(x: Tensor) -> Tensor:
    """Half-precision tensors are quantised in float32: their own mantissa cannot count levels."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _flat(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as a 1-D view (a copy only if its memory is not dense) and the way back.

    Per-tensor kernels do not care about shape; giving them one rank keeps the number of
    compiled variants small.
    """
    if torch.compiler.is_compiling():  # the outer compiler traces shapes; nothing to save
        return x, lambda out: out
    if x.is_contiguous():
        return x.view(-1), lambda out: out.view(x.shape)
    order = sorted(range(x.dim()), key=lambda d: -x.stride()[d])
    dense = x.permute(order)
    if not dense.is_contiguous():
        dense = dense.contiguous()
    inverse = [order.index(d) for d in range(x.dim())]
    shape = dense.shape
    return dense.view(-1), lambda out: out.view(shape).permute(inverse)


def _rows(x: Tensor, dim: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as a (channels, rest) matrix for per-channel kernels, and the way back."""
    moved = x.movedim(dim, 0)
    shape = moved.shape
    return moved.reshape(shape[0], -1), lambda out: out.reshape(shape).movedim(0, dim)


def tensor_range(x: Tensor, channel_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of the finite values of ``x``, per tensor or per slice along ``channel_dim``.

    The results broadcast against ``x``. Where a slice has no finite value the range is
    ``[0, 0]``.
    """
    x = _working(x.detach())
    if channel_dim is None or x.dim() == 0:
        return kernels.tensor_range(_flat(x)[0])
    rows, _ = _rows(x, channel_dim)
    lo, hi = kernels.channel_range(rows)
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return lo.view(shape), hi.view(shape)


def fake_quantize(
    x: Tensor,
    bits: int,
    lo: Tensor | None = None,
    hi: Tensor | None = None,
    *,
    stochastic: bool = False,
    channel_dim: int | None = None,
) -> Tensor:
    """Quantise ``x`` to ``bits`` bits over ``[lo, hi]`` and return it as floats.

    Without ``lo``/``hi`` the range is measured from ``x`` (per slice of ``channel_dim`` if
    given). Values outside the range are clamped to it; ``nan`` stays ``nan``. Stochastic
    rounding (per tensor) rounds up with probability equal to the fractional part, so it is
    unbiased.
    """
    if x.numel() == 0:
        return x.clone()
    work = _working(x.detach())
    levels = kernels.levels_tensor(bits, work)
    if channel_dim is not None and x.dim() > 0 and lo is None:
        if stochastic:
            raise ValueError("fake_quantize: stochastic rounding is per tensor; drop channel_dim")
        rows, back = _rows(work, channel_dim)
        return back(kernels.fake_quant_channels(rows, levels)).to(x.dtype)
    if lo is not None and hi is not None and (lo.numel() > 1 or hi.numel() > 1):
        return kernels.fake_quant(work, lo.to(work.dtype), hi.to(work.dtype), levels).to(x.dtype)
    if not stochastic and (lo is None or hi is None):
        return _measured_fake_quantize(x, bits)[0]
    flat, back = _flat(work)
    if stochastic:
        if lo is not None:
            raise ValueError(
                "fake_quantize: stochastic rounding measures its own range; drop lo/hi"
            )
        out = kernels.fake_quant_stochastic(flat, levels, kernels.new_seed())
    else:
        assert lo is not None and hi is not None  # measured above when either is missing
        out = kernels.fake_quant(
            flat, lo.reshape(()).to(work.dtype), hi.reshape(()).to(work.dtype), levels
        )
    return back(out).to(x.dtype)


def _measured_fake_quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` quantised per tensor over its own finite range, in one kernel: ``(x_hat, lo,
    hi)``; ``x`` must not be empty."""
    work = _working(x.detach())
    flat, back = _flat(work)
    out, lo, hi = kernels.fake_quant_tensor(flat, kernels.levels_tensor(bits, work))
    return back(out).to(x.dtype), lo, hi


class _FakeQuantSTE(torch.autograd.Function):
    """Nearest-rounding fake-quantise in forward, straight-through in backward.

    ``lo``/``hi`` given: quantise over that range; else measure it (per slice of
    ``channel_dim``, or per tensor)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        bits: int,
        lo: Tensor | None,
        hi: Tensor | None,
        channel_dim: int | None,
    ) -> Tensor:
        return fake_quantize(x, bits, lo, hi, channel_dim=channel_dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        return grad, None, None, None, None


class _MeasuredFakeQuantSTE(torch.autograd.Function):
    """Per-tensor range and nearest-rounding fake-quantise in one kernel, straight-through in
    backward: ``(x_hat, lo, hi)``, the range for the running average."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
        out, lo, hi = _measured_fake_quantize(x, bits)
        ctx.mark_non_differentiable(lo, hi)
        return out, lo, hi

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor, None]:
        return grad, None


def _quantize_grad(grad: Tensor, bits: int) -> Tensor:
    return grad if grad.numel() == 0 else fake_quantize(grad, bits, stochastic=True)


def _grad_hook(bits: int, check: Callable[[Tensor], None] | None) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        if check is not None:
            check(grad)
        return _quantize_grad(grad, bits)

    return hook


class _QuantizeGrad(torch.autograd.Function):
    """Identity in forward; the gradient quantised in backward (for leaf tensors)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int) -> Tensor:
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _quantize_grad(grad, ctx.bits), None


class Quantizer(nn.Module):
    """Base of the three quantiser roles. ``bits`` may be changed between steps."""

    role = "tensor"

    def __init__(self, bits: int | None) -> None:
        super().__init__()
        self.bits = bits
        self.layer = ""  # set by the rewrite pass: which layer this quantiser serves
        self.check_finite = False

    def _check(self, x: Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteError(
                f"layer '{self.layer}': its {self.role} holds NaN or Inf ({bad} of {x.numel()} "
                "values). Look for a diverging loss (lower the learning rate) or bad inputs; "
                "with DPCConfig(check_finite=False) the range comes from the finite values."
            )

    @property
    def active(self) -> bool:
        return is_active(self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class WeightQuantizer(Quantizer):
    """Fake-quantises a weight per output channel (``channel_dim``), or per tensor if ``None``."""

    role = "weight"

    def __init__(self, bits: int | None, channel_dim: int | None = 0) -> None:
        super().__init__(bits)
        self.channel_dim = channel_dim

    def forward(self, w: Tensor) -> Tensor:
        if not self.active or w.numel() == 0:
            return w
        self._check(w)
        assert self.bits is not None
        channel_dim = self.channel_dim if w.dim() > 1 else None  # a vector is one channel
        return _FakeQuantSTE.apply(w, self.bits, None, None, channel_dim)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channel_dim={self.channel_dim}"


class ActQuantizer(Quantizer):
    """Fake-quantises an activation per tensor.

    In training the range is the batch's min/max and a running average of it is kept
    (``running = momentum * running + (1 - momentum) * batch``); eval uses the running range,
    or the batch's own if no training batch was seen yet. The running range is a
    non-persistent buffer: it moves with ``.to()`` and is pickled with the module, but adds
    no ``state_dict`` keys, so checkpoints stay interchangeable with the original model.
    """

    role = "activation"
    running_min: Tensor
    running_max: Tensor

    def __init__(self, bits: int | None, momentum: float = 0.9) -> None:
        super().__init__(bits)
        self.momentum = momentum
        self.observed = False
        self.register_buffer("running_min", torch.zeros(()), persistent=False)
        self.register_buffer("running_max", torch.zeros(()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active or x.numel() == 0:
            return x
        assert self.bits is not None
        self._check(x)
        if self.training:  # the batch's range, measured in the quantising kernel itself
            out, lo, hi = _MeasuredFakeQuantSTE.apply(x, self.bits)
            self._observe(lo, hi)
            return out
        lo, hi = self.range_for(x)
        return _FakeQuantSTE.apply(x, self.bits, lo, hi, None)

    def range_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The range to quantise ``x`` over: the batch's in training (updating the running
        range), the running range in eval, or the batch's own if no training batch was seen."""
        if self.training:
            lo, hi = tensor_range(x)
            self._observe(lo, hi)
            return lo, hi
        if self.observed:
            return self.running_min, self.running_max
        return tensor_range(x)

    @torch.no_grad()
    def _observe(self, lo: Tensor, hi: Tensor) -> None:
        if self.observed:
            self.running_min.lerp_(lo.to(self.running_min.dtype), 1.0 - self.momentum)
            self.running_max.lerp_(hi.to(self.running_max.dtype), 1.0 - self.momentum)
        else:
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.observed = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"


class GradQuantizer(Quantizer):
    """Identity in forward; quantises the gradient flowing back through it (stochastic).

    A layer's output comes back itself with a gradient hook on it, not a new tensor: no
    copy, and it may still be modified in place (``nn.ReLU(inplace=True)``); a hook
    registered before an in-place op receives the gradient of the value it was put on. The
    hook dies with the autograd graph. A leaf tensor (whose hooks would outlive the step)
    goes through an autograd function instead. The bit-width is the one in force at
    forward time.
    """

    role = "gradient"

    def forward(self, y: Tensor) -> Tensor:
        if not (self.active and y.requires_grad):
            return y
        assert self.bits is not None
        if not torch.compiler.is_compiling() and y.grad_fn is None:
            return _QuantizeGrad.apply(y, self.bits)
        y.register_hook(_grad_hook(self.bits, self._check if self.check_finite else None))
        return y
