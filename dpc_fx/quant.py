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

Ranges come from the finite values only, so one ``inf`` or ``nan`` does not spoil the grid
of a whole tensor, and the non-finite values themselves pass through unchanged, forward and
backward, as they pass through the layer: an overflow stays visible (AMP's ``GradScaler``
skips the step). A constant tensor (``hi == lo``) comes back unchanged.

State that decides what a layer computes (the running range and whether one was observed)
lives in persistent buffers: it is in the ``state_dict``, moves with ``share_memory()`` and
DDP's buffer broadcast. A checkpoint without it (a plain model's) loads and leaves it as it
is; :func:`model_state_dict` gives the plain model's checkpoint of a compiled module.

>>> x = torch.tensor([0.0, 0.1, 0.52, 1.0])
>>> fake_quantize(x, 2)          # levels 0, 1/3, 2/3, 1
tensor([0.0000, 0.0000, 0.6667, 1.0000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dpc_fx import kernels, native
from dpc_fx.errors import NonFiniteError

__all__ = [
    "ActQuantizer",
    "GradQuantizer",
    "Quantizer",
    "WeightQuantizer",
    "fake_quantize",
    "model_state_dict",
    "tensor_range",
]


def is_active(bits: int | None) -> bool:
    """Whether ``bits`` asks for quantisation at all (``None`` and 32 do not)."""
    return bits is not None and bits < 32


def _working(x: Tensor) -> Tensor:
    """Half-precision tensors are quantised in float32: their own mantissa cannot count levels."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _flat(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as a 1-D view in memory order (a copy only if its memory is not dense) and the
    way back.

    Per-tensor kernels do not care about shape; giving them one rank keeps the number of
    compiled variants small. The way back gives a dense ``x``'s own strides, as an
    elementwise torch op would: a tensor with dimensions of size one is both contiguous
    and channels-last, and the convolution after a quantiser picks its algorithm (and so
    its rounding) from those strides.
    """
    if torch.compiler.is_compiling():  # the outer compiler traces shapes; nothing to save
        return x, lambda out: out
    size, stride = x.shape, x.stride()
    if x.is_contiguous():
        return x.view(-1), lambda out: out.as_strided(size, stride)
    order = sorted(range(x.dim()), key=lambda d: -stride[d])
    dense = x.permute(order)
    if dense.is_contiguous():
        return dense.view(-1), lambda out: out.as_strided(size, stride)
    # Dense in no order (a view of every third head, say): copied contiguous, and so is the
    # way back, which a product after it then reads without copying it again.
    return x.contiguous().view(-1), lambda out: out.view(size)


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
    if channel_dim is not None and x.dim() > 0 and lo is None:
        if stochastic:
            raise ValueError("fake_quantize: stochastic rounding is per tensor; drop channel_dim")
        rows, back = _rows(work, channel_dim)
        if native.usable(rows):
            return back(native.fake_quant_rows(rows, bits)).to(x.dtype)
        return back(kernels.fake_quant_channels(rows, kernels.levels_tensor(bits, work))).to(
            x.dtype
        )
    levels = kernels.levels_tensor(bits, work)
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
        seed = kernels.new_seed()
        if native.usable(flat):
            out = native.stochastic(flat, bits, int(seed))
        else:
            out = kernels.measured_stochastic(flat, levels, seed)
    elif native.usable(flat):
        assert lo is not None and hi is not None  # measured above when either is missing
        out, _ = native.quantize(flat, float(lo), float(hi), bits, packed=False)
    else:
        assert lo is not None and hi is not None
        out = kernels.fake_quant(
            flat, lo.reshape(()).to(work.dtype), hi.reshape(()).to(work.dtype), levels
        )
    return back(out).to(x.dtype)


def _measured_fake_quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` quantised per tensor over its own finite range, in one kernel: ``(x_hat, lo,
    hi)``; ``x`` must not be empty."""
    work = _working(x.detach())
    flat, back = _flat(work)
    if native.usable(flat):
        out, _, span, _ = native.quantize_measured(flat, bits, packed=False)
        return back(out).to(x.dtype), span[0], span[1]
    out, lo, hi = kernels.measured_fake_quant(flat, kernels.levels_tensor(bits, work))
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


def _quantize_grad(grad: Tensor, bits: int, pool: native._Pool | None = None) -> Tensor:
    """``grad`` stochastically rounded (``fake_quantize(grad, bits, stochastic=True)``); on
    the native loops straight, into a buffer of ``pool`` if given (a fused layer's, which
    hands it back)."""
    if grad.numel() == 0:
        return grad
    if native.usable(grad):  # the common case, without fake_quantize's dispatch
        out = None if pool is None else pool.take(grad.numel())
        seed = int(kernels.new_seed())
        return native.stochastic(grad.detach().view(-1), bits, seed, out=out).view(grad.shape)
    return fake_quantize(grad, bits, stochastic=True)


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

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A plain model's checkpoint has none of a quantiser's state: keep the current state
        # rather than call it missing, so it loads with strict=True. Part of it missing is
        # a damaged checkpoint and reported as usual.
        if not any(key.startswith(prefix) for key in state_dict):
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
    or the batch's own if no training batch was seen yet. The running range and the flag
    ``seen`` (read it as :attr:`observed`) are buffers, like batch norm's running statistics:
    in the ``state_dict``, in ``share_memory()``, broadcast by DDP.
    """

    role = "activation"
    running_min: Tensor
    running_max: Tensor
    seen: Tensor

    def __init__(self, bits: int | None, momentum: float = 0.9) -> None:
        super().__init__(bits)
        self.momentum = momentum
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    @property
    def observed(self) -> bool:
        """Whether a training batch has set the running range."""
        return bool(self.seen)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Modules pickled before the flag was a buffer kept it as a plain attribute.
        observed = state.pop("observed", None)
        super().__setstate__(state)
        if "seen" not in self._buffers:
            self._non_persistent_buffers_set.clear()
            self.register_buffer("seen", torch.tensor(bool(observed)))

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
        if torch.compiler.is_compiling():  # no branch on a tensor: no graph break
            lo, hi = tensor_range(x)
            return torch.where(self.seen, self.running_min, lo), torch.where(
                self.seen, self.running_max, hi
            )
        if self.observed:
            return self.running_min, self.running_max
        return tensor_range(x)

    def _observe(self, lo: Tensor, hi: Tensor) -> None:
        if torch.is_grad_enabled():  # (a fused layer's forward runs without: no context)
            with torch.no_grad():
                return self._observe(lo, hi)
        if lo.dtype != self.running_min.dtype:
            lo, hi = lo.to(self.running_min.dtype), hi.to(self.running_max.dtype)
        if torch.compiler.is_compiling():
            weight = torch.where(self.seen, 1.0 - self.momentum, 1.0)
            self.running_min.lerp_(lo, weight)
            self.running_max.lerp_(hi, weight)
        elif self.observed:  # (one dispatch for both, the same lerp)
            running = [self.running_min, self.running_max]
            torch._foreach_lerp_(running, [lo, hi], 1.0 - self.momentum)
        else:
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
        self.seen.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"


def model_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The ``state_dict`` of a compiled ``module`` without the quantisers' state: the
    checkpoint of the model it was compiled from, which that model loads with ``strict=True``.

    >>> import dpc_fx
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
    ...                       nn.Linear(8, 2))
    >>> gm = dpc_fx.compile(model, torch.randn(2, 4))
    >>> [k for k in gm.state_dict() if k.startswith("dpc.")]
    ['dpc._2.act_q.running_min', 'dpc._2.act_q.running_max', 'dpc._2.act_q.seen']
    >>> model.load_state_dict(dpc_fx.model_state_dict(gm))
    <All keys matched successfully>
    """
    state = module.state_dict()
    owned = tuple(f"{name}." for name, m in module.named_modules() if isinstance(m, Quantizer))
    for key in [k for k in state if k.startswith(owned)]:
        del state[key]
    return state


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
