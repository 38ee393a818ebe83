"""Linear layers trained with real 8-bit integer matmuls.

A quantised value is ``x_hat = s * q + m`` with an int8 code ``q``, a scale ``s`` and an
offset ``m`` (the asymmetric quantiser of :mod:`dpc_fx.quant`, shifted into int8). For
``y = x_hat @ w_hat.T`` with per-tensor ``(s_x, m_x)`` and ``(s_w, m_w)`` and inner size K:

    y = s_x s_w (Qx @ Qw.T) + s_x m_w rowsum(Qx) + m_x s_w rowsum(Qw) + K m_x m_w

The integer product is exact (int32 accumulation); the three corrections are cheap. It runs
on the CPU's u8 x s8 kernel (oneDNN's quantised linear) where that is exact at the second
operand's bits, which a probe on the products that overflow first decides once per width:
without VNNI the kernel sums pairs of products in 16 bits, so 8-bit codes may saturate and 7
bits or fewer cannot. Elsewhere it runs on ``torch._int_mm``, fast only with int8
dot-product instructions (VNNI, AMX) or on a GPU. Both give the same products. Backward
does the same for ``dx = g_hat @ w_hat`` and ``dw = g_hat.T @ x_hat`` with the stochastically
rounded output gradient ``g_hat``. Every quantised value equals what the simulated graph
uses, so the two differ only by float rounding of the sums (see tests/test_lower.py).

Saved for backward: the int8 codes of the input (a quarter of fp32's memory) and, for a weight
that is an ``nn.Parameter`` (kept anyway), the parameter itself: backward quantises it again,
with the same kernels and nearest rounding, so it gets the same codes. Any other weight is
kept as its int8 codes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dpc_fx import kernels, native
from dpc_fx.config import DPCConfig
from dpc_fx.meta import LayerMeta
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer

__all__ = ["Int8Linear", "lowerable"]


def lowerable(meta: LayerMeta, config: DPCConfig | None) -> bool:
    """Whether ``lower`` will run this layer on integer kernels under ``config``."""
    bits = meta.bits
    return (
        config is not None
        and config.lower
        and meta.op == "linear"
        and bits is not None
        and all(b is not None and b <= 8 for b in (bits.w, bits.a, bits.g))
    )


@kernels.fused
def _combine(
    y: Tensor,
    rows: Tensor,
    cols: Tensor,
    sa: Tensor,
    ma: Tensor,
    sb: Tensor,
    mb: Tensor,
    k: int,
    bias: Tensor | None,
) -> None:
    """The float product, written over the integer product ``y`` (as floats) in one pass:
    no new (n, j) tensor, whose pages a large product would fault in afresh. What depends
    on the column alone is summed first, a vector, so a pass over ``y`` adds two terms."""
    column = ma * sb * cols.float() + k * ma * mb
    column = column if bias is None else column + bias
    y.copy_(sa * sb * y + sa * mb * rows.unsqueeze(1).float() + column)


def _factors(sa: Tensor, ma: Tensor, sb: Tensor, mb: Tensor, k: int) -> tuple[float, ...]:
    """:func:`_combine`'s four scalar factors ``(sa*sb, sa*mb, ma*sb, k*ma*mb)``, rounded to
    float32 as its ops round them: what the native pass (``native.int8_combine``) takes to
    give its values bit for bit."""
    return tuple(torch.stack([sa * sb, sa * mb, ma * sb, k * ma * mb]).float().tolist())


def _sums(q: Tensor, dim: int) -> Tensor:
    """``q.sum(dim)`` of int8 codes, as int32."""
    sums = native.int8_sums(q, dim)
    return q.sum(dim, dtype=torch.int32) if sums is None else sums


def _dequantised_product(
    acc: Tensor,
    qa: Tensor,
    qb: Tensor,
    sa: Tensor,
    ma: Tensor,
    sb: Tensor,
    mb: Tensor,
    bias: Tensor | None,
    bad: tuple[Tensor, Tensor],
    rows: Tensor | None = None,
) -> Tensor:
    """The float product (plus ``bias``) from the integer product ``acc = qa @ qb`` (int32,
    or float32 that this takes over); ``nan`` in the rows and columns that ``bad`` (a
    column and a row of flags, broadcast against the product) says held ``inf``/``nan`` in an
    operand, as the float product would be non-finite there: an overflow stays visible. The
    codes' row and column sums run on the native loops where they can (ATen casts a whole
    int8 matrix before it sums it); ``rows``: ``qa``'s, where the caller has them."""
    y = acc if acc.dtype == torch.float32 else acc.float()
    rows, cols = _sums(qa, 1) if rows is None else rows, _sums(qb, 0)
    # The native pass where it takes the tensors (asked before the factors are read), else
    # the compiled kernel: the same values.
    factors = _factors(sa, ma, sb, mb, qa.shape[1]) if native.usable(y) else None
    if factors is None or not native.int8_combine(y, rows, cols, factors, bias):
        _combine(y, rows, cols, sa, ma, sb, mb, qa.shape[1], bias)
    bad_rows, bad_cols = bad
    if torch.compiler.is_compiling():  # no branch on values in a trace
        return torch.where(bad_rows | bad_cols, float("nan"), y)
    if bad_rows.any() or bad_cols.any():  # two vectors: no (n, j) mask on the clean path
        y.masked_fill_(bad_rows | bad_cols, float("nan"))
    return y


# The codes come from the native loops where they can take the matrix (a dense float32 one
# on the CPU, outside a torch.compile trace, free of inf and nan), else from the compiled
# torch kernels; both give the same codes, scale and offset (tests/test_lower.py).


def _native(x: Tensor) -> bool:
    return not torch.compiler.is_compiling() and x.dtype == torch.float32 and native.usable(x)


def _scale_mid(lo: Tensor, hi: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' ``scale`` and ``mid`` (``x_hat = scale * code + mid``) of a range."""
    scale = kernels._scale(lo, hi, levels)
    return scale, lo + scale * torch.floor(levels / 2 + 0.5)


def _codes(x: Tensor, lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, ...]:
    """``(codes, scale, mid, bad rows)`` of the matrix ``x``."""
    levels = kernels.levels_tensor(bits, x)
    if _native(x):
        codes = native.int8_codes(x, float(lo), float(hi), bits)
        if codes is not None:
            clean = torch.zeros(x.shape[0], 1, dtype=torch.bool)
            return codes, *_scale_mid(lo, hi, levels), clean
    return kernels.quantize_int8(x, lo, hi, levels)


def _weight_codes(weight: Tensor, bits: int) -> tuple[Tensor, ...]:
    """``(codes, scale, mid, bad rows)`` of ``weight`` over its own per-tensor range."""
    w = weight.detach().float().contiguous()
    if _native(w):
        span, bad = native.range_of(w.view(-1))
        if not bad:
            return _codes(w, span[0], span[1], bits)
    lo, hi = kernels.tensor_range(w.view(-1))
    return _codes(w, lo, hi, bits)


def _codes_stochastic(x: Tensor, bits: int) -> tuple[Tensor, ...]:
    """``(codes, scale, mid, bad rows, bad columns)`` of the matrix ``x``."""
    levels = kernels.levels_tensor(bits, x)
    seed = kernels.new_seed()
    if _native(x):
        found = native.int8_stochastic(x, bits, int(seed))
        if found is not None:
            codes, span = found
            rows = torch.zeros(x.shape[0], 1, dtype=torch.bool)
            cols = torch.zeros(1, x.shape[1], dtype=torch.bool)
            return codes, *_scale_mid(span[0], span[1], levels), rows, cols
    return kernels.quantize_int8_stochastic(x, levels, seed)


# The x86 CPU's own int8 kernel, oneDNN's u8 x s8 linear (the quantised backend's), is
# several times faster than torch._int_mm on a CPU without VNNI, but there it sums pairs of
# u8 x s8 products in 16 bits: exact only while |s8| <= 64, i.e. for the codes of 7 bits or
# fewer. Whether it is exact at a width is asked once, on the products that overflow first.
_U8S8: dict[int, bool] = {}


def _u8s8_exact(bits: int) -> bool:
    """Whether :func:`_u8s8_product` gives the exact integer product for s8 codes of
    ``bits`` bits (and any u8 operand) on this machine."""
    if bits not in _U8S8:
        half = 1 << (bits - 1)
        a = torch.tensor([[127] * 64, [-128] * 64, [127, -128] * 32], dtype=torch.int8)
        b = torch.stack([torch.full((64,), half - 1), torch.full((64,), -half)]).t()
        rand = torch.randint(-half, half, (64, 6), generator=torch.Generator().manual_seed(0))
        b = torch.cat([b, rand], 1).to(torch.int8)  # (not torch's generator: no draw moved)
        try:
            exact = torch.equal(_u8s8_product(a, b), torch._int_mm(a, b).float())
        except (AttributeError, RuntimeError, TypeError):  # no oneDNN, or another signature
            exact = False
        _U8S8[bits] = exact
    return _U8S8[bits]


def _dense(q: Tensor, flip: int = 0) -> Tensor:
    """The int8 matrix ``q`` made dense, each byte XOR-ed with ``flip``: a transposed view
    in one native pass where the loops take it."""
    if q.is_contiguous():
        return q if flip == 0 else (q.view(torch.uint8) ^ flip).view(torch.int8)
    dense = native.int8_transpose(q.t(), flip)
    if dense is not None:
        return dense
    return (q if flip == 0 else (q.view(torch.uint8) ^ flip).view(torch.int8)).contiguous()


def _u8s8_product(qa: Tensor, qb: Tensor) -> Tensor:
    """``qa @ qb`` for int8 ``qa`` (n, k) and ``qb`` (k, j), in float32, on oneDNN's u8 x s8
    linear: ``qa`` shifted into u8 (its zero point 128), ``qb`` the weight, prepacked. Both
    dense: the kernel reads a transposed view as if it were dense, silently."""
    ua = _dense(qa, 128).view(torch.uint8)
    w = _dense(qb.t())
    return _u8s8_packed(ua, torch.ops.onednn.qlinear_prepack(w, list(ua.shape)), w.shape[0])


def _u8s8_packed(ua: Tensor, packed: Tensor, j: int) -> Tensor:
    """``(ua - 128) @ w.T`` in float32 for the u8 matrix ``ua`` and ``j`` output columns of
    a weight ``w`` prepacked by ``torch.ops.onednn.qlinear_prepack``."""
    ones, zeros = torch.ones(j), torch.zeros(j, dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(  # type: ignore[no-any-return]
        ua, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _product(
    qa: Tensor,
    sa: Tensor,
    ma: Tensor,
    qb: Tensor,
    sb: Tensor,
    mb: Tensor,
    bad: tuple[Tensor, Tensor],
    bias: Tensor | None = None,
    b_bits: int = 8,
    rows: Tensor | None = None,
) -> Tensor:
    """``(sa*qa + ma) @ (sb*qb + mb) + bias`` for int8 codes ``qa`` (n, k) and ``qb`` (k, j),
    ``qb`` of ``b_bits`` bits; ``nan`` in the rows and columns that ``bad`` (flags of shape
    (n, 1) and (1, j), or anything that broadcasts so) marks. The
    integer product is exact either way: on oneDNN's u8 x s8 kernel where that is exact at
    ``b_bits`` on this CPU, else on ``torch._int_mm``. ``rows``: ``qa``'s row sums (int32),
    where the caller has them."""
    # (Not inside a torch.compile trace: the probe runs kernels, and _int_mm traces.)
    u8s8 = qa.device.type == "cpu" and not torch.compiler.is_compiling() and _u8s8_exact(b_bits)
    acc = _u8s8_product(qa, qb) if u8s8 else torch._int_mm(qa, qb)
    return _dequantised_product(acc, qa, qb, sa, ma, sb, mb, bias, bad, rows)


class _Int8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lo: Tensor,
        hi: Tensor,
        a_bits: int,
        w_bits: int,
        g_bits: int,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        qx, sx, mx, bad_x = _codes(x2, lo, hi, a_bits)
        w_codes = _weight_codes(weight, w_bits)
        qw, sw, mw, bad_w = w_codes
        b = None if bias is None else bias.float()
        y = _product(qx, sx, mx, qw.t(), sw, mw, (bad_x, bad_w.t()), b, w_bits)
        # A parameter is kept anyway: backward quantises it again (nearest rounding is
        # deterministic, so the same codes) rather than keep its codes beside it. Autograd's
        # version check still catches a parameter changed in place before backward.
        kept = (weight,) if isinstance(weight, nn.Parameter) else w_codes
        ctx.save_for_backward(qx, sx, mx, bad_x, *kept)
        ctx.g_bits, ctx.w_bits, ctx.a_bits, ctx.x_shape = g_bits, w_bits, a_bits, x.shape
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, sx, mx, bad_x, *kept = ctx.saved_tensors
        qw, sw, mw, bad_w = _weight_codes(kept[0], ctx.w_bits) if len(kept) == 1 else kept
        g = grad.reshape(-1, grad.shape[-1]).float().contiguous()
        qg, sg, mg, g_rows, g_cols = _codes_stochastic(g, ctx.g_bits)
        # A bad input row spoils every column of dw, a bad weight row every column of dx.
        dx = _product(qg, sg, mg, qw, sw, mw, (g_rows, bad_w.any()), b_bits=ctx.w_bits)
        dx = dx.reshape(ctx.x_shape).to(ctx.dtypes[0])
        g_sums = _sums(qg, 0)  # dw's row sums, and the bias's gradient
        dw = _product(
            qg.t(), sg, mg, qx, sx, mx, (g_cols.t(), bad_x.any()), b_bits=ctx.a_bits, rows=g_sums
        )
        dw = dw.to(ctx.dtypes[1])
        db = None
        if ctx.has_bias:
            db = sg * g_sums.float() + qg.shape[0] * mg
            db = torch.where(g_cols.view(-1), float("nan"), db).to(ctx.dtypes[1])
        return dx, dw, db, None, None, None, None, None


class Int8Linear(nn.Module):
    """A lowered linear layer: owns the layer's three quantisers, runs integer products.

    Called in the graph as ``self.dpc.<layer>(x, weight, bias)`` in place of the simulated
    ``act_q -> weight_q -> linear -> grad_q`` chain. The quantisers keep their roles: their
    ``bits`` are read on every call (so schedules work) and ``act_q`` keeps the running range.
    """

    def __init__(self, act_q: ActQuantizer, weight_q: WeightQuantizer, grad_q: GradQuantizer):
        super().__init__()
        self.act_q, self.weight_q, self.grad_q = act_q, weight_q, grad_q

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        bits = (self.act_q.bits, self.weight_q.bits, self.grad_q.bits)
        if x.numel() == 0 or any(b is None or b > 8 for b in bits):
            # Schedules may lift a layer above 8 bits: fall back to the simulated chain.
            y = nn.functional.linear(self.act_q(x), self.weight_q(weight), bias)
            return self.grad_q(y)
        lo, hi = self.act_q.range_for(x)
        return _Int8LinearFn.apply(x, weight, bias, lo.float(), hi.float(), *bits)
