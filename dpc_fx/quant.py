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

from typing import Any

import torch
from torch import Tensor, nn

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


def tensor_range(x: Tensor, channel_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of the finite values of ``x``, per tensor or per slice along ``channel_dim``.

    The results broadcast against ``x``. Where a slice has no finite value the range is
    ``[0, 0]``.
    """
    x = x.detach()
    if channel_dim is None:
        lo, hi = torch.aminmax(x)
    else:
        flat = x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
        lo, hi = torch.aminmax(flat, dim=1)
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        lo, hi = lo.view(shape), hi.view(shape)
    if torch.isfinite(lo).all() and torch.isfinite(hi).all():
        return lo, hi
    return _finite_range(x, channel_dim)


def _finite_range(x: Tensor, channel_dim: int | None) -> tuple[Tensor, Tensor]:
    """The slow path of :func:`tensor_range`, for tensors holding ``inf`` or ``nan``."""
    finite = torch.isfinite(x)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo_src = torch.where(finite, x, inf)
    hi_src = torch.where(finite, x, -inf)
    if channel_dim is None:
        lo, hi = lo_src.amin(), hi_src.amax()
    else:
        dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
        lo, hi = lo_src.amin(dim=dims, keepdim=True), hi_src.amax(dim=dims, keepdim=True)
    empty = lo > hi  # no finite value in this slice
    zero = x.new_zeros(())
    return torch.where(empty, zero, lo), torch.where(empty, zero, hi)


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
    rounding rounds up with probability equal to the fractional part, so it is unbiased.
    """
    if lo is None or hi is None:
        lo, hi = tensor_range(x, channel_dim)
    levels = float(2**bits - 1)
    span = hi - lo
    scale = torch.where(span > 0, span / levels, torch.ones_like(span))
    q = (x - lo) / scale
    if stochastic:
        q = torch.floor(q + torch.rand_like(q))
    else:
        q = torch.round(q)
    return q.clamp_(0.0, levels) * scale + lo


class _FakeQuantSTE(torch.autograd.Function):
    """Nearest-rounding fake-quantise in forward, straight-through in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int, lo: Tensor, hi: Tensor) -> Tensor:
        return fake_quantize(x, bits, lo, hi)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


class _QuantizeGrad(torch.autograd.Function):
    """Identity in forward; stochastic per-tensor fake-quantise of the gradient in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int) -> Tensor:
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if grad.numel() == 0:
            return grad, None
        return fake_quantize(grad, ctx.bits, stochastic=True), None


class Quantizer(nn.Module):
    """Base of the three quantiser roles. ``bits`` may be changed between steps."""

    role = "tensor"

    def __init__(self, bits: int | None) -> None:
        super().__init__()
        self.bits = bits

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
        assert self.bits is not None
        channel_dim = self.channel_dim if w.dim() > 0 else None
        lo, hi = tensor_range(w, channel_dim)
        return _FakeQuantSTE.apply(w, self.bits, lo, hi)

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
        if self.training:
            lo, hi = tensor_range(x)
            self._observe(lo, hi)
        elif self.observed:
            lo, hi = self.running_min.to(x.dtype), self.running_max.to(x.dtype)
        else:
            lo, hi = tensor_range(x)
        return _FakeQuantSTE.apply(x, self.bits, lo, hi)

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
    """Identity in forward; quantises the gradient flowing back through it (stochastic)."""

    role = "gradient"

    def forward(self, y: Tensor) -> Tensor:
        if not self.active or not y.requires_grad:
            return y
        return _QuantizeGrad.apply(y, self.bits)
