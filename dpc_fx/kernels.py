"""The quantisers' arithmetic, written once in plain torch ops and fused with ``torch.compile``.

Each kernel reads its input once to measure the range and once more to quantise: the two
memory passes that are the floor for a quantiser whose range depends on the whole tensor.
Eager PyTorch would make a temporary for every op (about eight passes); compiled, the
range is one fused reduction and the quantise-dequantise one fused pointwise loop.

The kernels are compiled lazily on first use, once per dtype (shapes are dynamic; callers
pass per-tensor inputs as 1-D views and per-channel ones as matrices, so ranks do not
multiply the variants).
On float32 CPU tensors the quantisers mostly run the same arithmetic as native loops
instead (:mod:`dpc_fx.native`), which cost a few microseconds a call where a compiled kernel
costs about thirty. ``DPC_FX_KERNELS`` chooses: ``native`` (the default: native loops where
they apply, these kernels compiled for the rest), ``fused`` (these kernels, compiled),
``eager`` (these kernels, uncompiled: slower, and needs no C compiler), or ``native+eager``.
Every choice gives the same results. Inside a ``torch.compile`` of the user's own model
these kernels are traced as plain ops, so the model's compiler can fuse them further.

Ranges ignore ``inf``/``nan``; an empty or all-non-finite slice gets the range [0, 0];
a constant slice (``hi == lo``) comes back unchanged. Non-finite values themselves pass
through every quantiser unchanged (a select in the same fused loop, no extra memory pass):
one ``inf`` must stay visible to whoever checks for overflow, AMP's ``GradScaler`` above
all, as it would be without quantisation. The integer kernels cannot hold ``inf`` in a code
and report the rows and columns that held one instead.

Stochastic rounding draws its uniform noise from a counter-based hash of the element index
and a seed taken from torch's default generator (offset by the rank in a distributed run):
the same in eager and compiled code, and reproducible under ``torch.manual_seed``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "channel_range",
    "dequantize_codes",
    "fake_quant",
    "fake_quant_channels",
    "fake_quant_in_range",
    "fake_quant_stochastic",
    "fake_quant_stochastic_in_range",
    "fake_quant_tensor",
    "finite_range",
    "fused",
    "measured_codes",
    "measured_fake_quant",
    "measured_stochastic",
    "packed_bytes",
    "quantize_codes",
    "quantize_codes_channels",
    "quantize_codes_in_range",
    "quantize_codes_tensor",
    "tensor_range",
]

F = TypeVar("F", bound=Callable[..., Any])


def _mode() -> str:
    """``"eager"`` or ``"fused"``: how these kernels run (see the module's docstring)."""
    return "eager" if "eager" in os.environ.get("DPC_FX_KERNELS", "native").split("+") else "fused"


def fused(fn: F) -> F:
    """``fn`` compiled with ``torch.compile(dynamic=True)`` on first call.

    Runs ``fn`` itself when ``DPC_FX_KERNELS`` names ``eager``, while another
    ``torch.compile`` is tracing (so the outer compiler sees plain ops), and, with a warning,
    from then on if compiling fails (no C compiler, say): the results are the same, only
    slower.
    """
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        if torch.compiler.is_compiling() or _mode() == "eager" or _broken:
            return fn(*args)
        if not compiled:
            # A CPU build of torch warns that it found no CUDA runtime when inductor first
            # loads its C++ toolchain: noise for our users, who asked for neither.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            compiled.append(torch.compile(fn, dynamic=True))
        try:
            return compiled[0](*(_unviewed(a) for a in args))
        except Exception as e:  # a compiler failure must not stop training
            if isinstance(e, (ValueError, TypeError, IndexError)):
                raise
            _broken.append(f"{type(e).__name__}: {e}")
            warnings.warn(
                f"dpc_fx: compiling the quantisation kernels failed ({_broken[0][:200]}); "
                "running them uncompiled (DPC_FX_KERNELS=eager silences this).",
                stacklevel=2,
            )
            return fn(*args)

    return wrapper  # type: ignore[return-value]


_broken: list[str] = []


def _unviewed(a: Any) -> Any:
    """A view passed as it is makes dynamo guard on its base's strides (it rebuilds the view
    from the base), so every new base layout (a new model's activation ranks and shapes)
    compiles the kernel again, up to the recompile limit. ``detach()`` gives the same
    memory as a tensor without a base: one compiled variant serves every layout."""
    if isinstance(a, Tensor) and a._base is not None and not a.requires_grad:
        return a.detach()
    return a


def _minmax(x: Tensor, dims: list[int] | None) -> tuple[Tensor, Tensor]:
    finite = torch.isfinite(x)
    lo_src = torch.where(finite, x, float("inf"))
    hi_src = torch.where(finite, x, float("-inf"))
    if dims is None:
        lo, hi = lo_src.amin(), hi_src.amax()
    else:
        lo, hi = lo_src.amin(dim=dims, keepdim=True), hi_src.amax(dim=dims, keepdim=True)
    empty = lo > hi  # no finite value in this slice
    return torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)


def _scale(lo: Tensor, hi: Tensor, levels: Tensor) -> Tensor:
    span = hi - lo
    return torch.where(span > 0, span / levels, 1.0)


def _finite(x: Tensor) -> Tensor:
    # ``isfinite`` lowers to more vector ops than this one compare (false for inf and nan).
    return x.abs() < float("inf")


def _dequant(x: Tensor, q: Tensor, lo: Tensor, scale: Tensor, levels: Tensor, hi: Tensor) -> Tensor:
    """Codes ``q`` of ``x`` clamped into a given range and mapped back; ``inf``/``nan`` of
    ``x`` are kept, not clamped into the range: an overflow must stay an overflow."""
    top = torch.where(hi > lo, levels, 0.0)  # an empty range [lo, lo] has one level
    return torch.where(_finite(x), torch.minimum(q.clamp_min(0.0), top) * scale + lo, x)


# Over the tensor's own range no clamp is needed: ``x - lo`` is never negative and
# ``(x - lo) / scale`` exceeds ``levels`` by rounding error at most, which nearest rounding
# removes. Without the clamp an ``inf`` or ``nan`` passes through the arithmetic unchanged,
# and the kernel does less work than with it.


def _uniform(x: Tensor, seed: Tensor) -> Tensor:
    """Uniform [0, 1) noise shaped like ``x``: a murmur3-style mix of (index, seed).

    The mix is 32-bit arithmetic, and runs as such: int32 products wrap modulo 2**32 (one
    vector multiply each; int64 products are emulated on CPUs without AVX-512), and a
    right shift is made logical by masking the sign bits an arithmetic shift brings in.
    The constants are the murmur3 ones written as signed int32.
    """
    h = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    h = (h.to(torch.int32) ^ seed.to(torch.int32)) * _MIX[0]
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MIX[1]
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _MIX[2]
    h = h ^ ((h >> 16) & 0xFFFF)
    return ((h >> 8) & 0xFFFFFF).to(x.dtype) * (1.0 / (1 << 24))


# 0x9E3779B1, 0x85EBCA6B and 0xC2B2AE35 as int32 (each minus 2**32).
_MIX = (0x9E3779B1 - (1 << 32), 0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32))


@fused
def tensor_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max of the finite values of ``x``, as 0-d tensors."""
    return _minmax(x, None)


@fused
def channel_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max of the finite values of each row of the matrix ``x``, shaped (rows, 1)."""
    return _minmax(x, [1])


@fused
def fake_quant(x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor) -> Tensor:
    """Nearest-rounding quantise-dequantise of ``x`` onto ``levels + 1`` steps of [lo, hi]."""
    scale = _scale(lo, hi, levels)
    return _dequant(x, torch.round((x - lo) / scale), lo, scale, levels, hi)


@fused
def fake_quant_tensor(x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor range and nearest-rounding quantise in one call: ``(x_hat, lo, hi)``."""
    lo, hi = _minmax(x, None)
    scale = _scale(lo, hi, levels)
    return torch.round((x - lo) / scale) * scale + lo, lo, hi


@fused
def fake_quant_channels(x: Tensor, levels: Tensor) -> Tensor:
    """Per-row range of the matrix ``x`` and nearest-rounding quantise, in one call."""
    lo, hi = _minmax(x, [1])
    scale = _scale(lo, hi, levels)
    return torch.round((x - lo) / scale) * scale + lo


@fused
def fake_quant_stochastic(x: Tensor, levels: Tensor, seed: Tensor) -> Tensor:
    """Per-tensor range and stochastic-rounding quantise (unbiased within the range)."""
    lo, hi = _minmax(x, None)
    scale = _scale(lo, hi, levels)
    q = torch.floor((x - lo) / scale + _uniform(x, seed))
    # Noise near 1 on the top value can round one step past it: take that step back (an
    # ``inf`` stays ``inf``). Nothing rounds below 0.
    q = q - (q > torch.where(hi > lo, levels, 0.0)).to(q.dtype)
    return q * scale + lo


def finite_range(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(lo, hi)`` of a CPU tensor whose every value is finite, by ATen's ``aminmax``; or
    ``None`` (empty, off the CPU, inside ``torch.compile``, or holding ``inf``/``nan``), for
    the caller to run the kernel that measures the finite range itself.

    ``aminmax`` is vectorised on every thread, where inductor's CPU code reduces to a scalar
    on one: 3.4x faster on 4M floats, measured side by side. Min and max are exact, so the
    range is the kernels' own bit for bit; an ``inf`` or ``nan`` anywhere shows in it (NaN
    propagates), and reading the two values back costs no device sync on the CPU.
    """
    if x.device.type != "cpu" or x.numel() == 0 or torch.compiler.is_compiling():
        return None
    lo, hi = torch.aminmax(x)
    return (lo, hi) if math.isfinite(lo.item()) and math.isfinite(hi.item()) else None


# Over a finite tensor and its own range nothing needs clamping or passing through: the
# kernels below are the ones above without the masks, for the finite_range fast path.


@fused
def fake_quant_in_range(x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor) -> Tensor:
    """:func:`fake_quant_tensor`'s output for a finite ``x`` and its own range."""
    scale = _scale(lo, hi, levels)
    return torch.round((x - lo) / scale) * scale + lo


@fused
def quantize_codes_in_range(
    x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_codes_tensor`'s codes and output for a finite ``x`` and its own
    range: ``(codes, x_hat)``."""
    scale = _scale(lo, hi, levels)
    q = torch.round((x - lo) / scale)
    return q.to(torch.uint8), q * scale + lo


@fused
def fake_quant_stochastic_in_range(
    x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor, seed: Tensor
) -> Tensor:
    """:func:`fake_quant_stochastic` for a finite ``x`` and its own range."""
    scale = _scale(lo, hi, levels)
    q = torch.floor((x - lo) / scale + _uniform(x, seed))
    q = q - (q > torch.where(hi > lo, levels, 0.0)).to(q.dtype)
    return q * scale + lo


def measured_fake_quant(x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fake_quant_tensor`, by :func:`finite_range` and the unmasked kernel where it
    can: ``(x_hat, lo, hi)``."""
    measured = finite_range(x)
    if measured is None:
        return fake_quant_tensor(x, levels)
    return fake_quant_in_range(x, *measured, levels), *measured


def measured_codes(x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`quantize_codes_tensor`, by :func:`finite_range` and the unmasked kernel where
    it can: ``(codes, x_hat, lo, hi, bad)``."""
    measured = finite_range(x)
    if measured is None:
        return quantize_codes_tensor(x, levels)
    codes, out = quantize_codes_in_range(x, *measured, levels)
    return codes, out, *measured, torch.zeros((), dtype=torch.bool)


def measured_stochastic(x: Tensor, levels: Tensor, seed: Tensor) -> Tensor:
    """:func:`fake_quant_stochastic`, by :func:`finite_range` and the unmasked kernel where
    it can."""
    measured = finite_range(x)
    if measured is None:
        return fake_quant_stochastic(x, levels, seed)
    return fake_quant_stochastic_in_range(x, *measured, levels, seed)


def _uint8_codes(
    x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(uint8 codes, x_hat, bad)``: the codes :func:`fake_quant` rounds ``x`` to over
    ``[lo, hi]`` (levels <= 255: a code fits a byte), its output (``inf``/``nan`` passed
    through), and whether ``x`` held a non-finite value, which no code can carry."""
    scale = _scale(lo, hi, levels)
    finite = _finite(x)
    q = torch.minimum(
        torch.round((x - lo) / scale).clamp_min(0.0), torch.where(hi > lo, levels, 0.0)
    )
    q = torch.where(finite, q, 0.0)
    return q.to(torch.uint8), torch.where(finite, q * scale + lo, x), ~finite.all()


@fused
def quantize_codes(
    x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fake_quant` that also returns its uint8 codes: ``(codes, x_hat, bad)``."""
    return _uint8_codes(x, lo, hi, levels)


@fused
def quantize_codes_tensor(
    x: Tensor, levels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`fake_quant_tensor` that also returns its uint8 codes:
    ``(codes, x_hat, lo, hi, bad)``."""
    lo, hi = _minmax(x, None)
    codes, out, bad = _uint8_codes(x, lo, hi, levels)
    return codes, out, lo, hi, bad


@fused
def quantize_codes_channels(
    x: Tensor, levels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`fake_quant_channels` that also returns its uint8 codes and the (rows, 1)
    ranges: ``(codes, x_hat, lo, hi, bad)``."""
    lo, hi = _minmax(x, [1])
    codes, out, bad = _uint8_codes(x, lo, hi, levels)
    return codes, out, lo, hi, bad


def dequantize_codes(q: Tensor, lo: Tensor, hi: Tensor, levels: Tensor, bad: Tensor) -> Tensor:
    """The floats that ``q`` (from a ``quantize_codes*`` kernel over ``[lo, hi]``) stands for;
    all ``nan`` where the quantised tensor held a non-finite value (``bad``), so the
    gradients computed from it are non-finite too, as they are without quantisation.

    Eager ATen on purpose, not a compiled kernel: inductor's CPU code loads uint8 through a
    partial-vector path that made the compiled form 5x slower than these three vectorised
    passes (0.85 ms against 0.16 ms for a million codes, measured side by side). The same
    ``q * scale + lo`` as the kernels compute, so the floats are the same bit for bit.
    """
    out = q.to(lo.dtype).mul_(_scale(lo, hi, levels)).add_(lo)
    if out.device.type == "cpu":  # reading the flag costs no device sync: skip the pass
        return out.fill_(float("nan")) if bool(bad) else out
    return out.masked_fill_(bad, float("nan"))


def _grouping(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packed group: 2 codes a byte at 4 bits or fewer, 4 codes in 3
    bytes at 5 or 6 bits, a code a byte above."""
    return (2, 1) if bits <= 4 else (4, 3) if bits <= 6 else (1, 1)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes :func:`dpc_fx.fused.pack` keeps for ``numel`` codes of ``bits`` bits."""
    codes, nbytes = _grouping(bits)
    return numel // codes * nbytes + numel % codes  # not divmod: numel may be symbolic


_LEVELS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def levels_tensor(bits: int, like: Tensor) -> Tensor:
    """``2**bits - 1`` as a 0-d tensor (a tensor, so new bit-widths do not recompile)."""
    if torch.compiler.is_compiling():  # a constant of the traced graph; no cache to mutate
        return torch.full((), float(2**bits - 1), dtype=like.dtype, device=like.device)
    key = (bits, like.dtype, like.device)
    if key not in _LEVELS:
        _LEVELS[key] = torch.tensor(float(2**bits - 1), dtype=like.dtype, device=like.device)
    return _LEVELS[key]


def new_seed() -> Tensor:
    """A seed for :func:`fake_quant_stochastic` from torch's default generator, offset by
    the process's rank under ``torch.distributed``: ranks seeded alike (as DDP scripts do,
    for identical initial weights) still round their gradients with independent noise,
    and a run stays reproducible under ``torch.manual_seed``. Rank 0 and single-process
    runs get the generator's draw unchanged."""
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    rank = _rank()
    return (seed + rank * _RANK_STRIDE) % (2**31 - 1) if rank else seed


_RANK_STRIDE = 0x2545F491  # 2**31 - 1 is prime: distinct ranks get distinct offsets


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@fused
def quantize_int8(
    x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer codes of :func:`fake_quant`, shifted into int8: ``(codes, scale, mid, bad)``.

    ``x_hat = scale * codes + mid`` reproduces :func:`fake_quant`'s output (for ``levels`` up
    to 255, i.e. at most 8 bits), so integer matmuls of codes give the simulated products.
    A code cannot hold ``inf`` or ``nan``: ``bad`` (bool, shaped (rows, 1)) says which rows
    held one, for the caller to make their products non-finite as float products would be.
    Callers pass matrices (one compiled variant for every shape).
    """
    scale = _scale(lo, hi, levels)
    q, mid, finite = _codes(x, torch.round((x - lo) / scale), lo, hi, scale, levels)
    return q, scale, mid, ~finite.all(1, keepdim=True)


@fused
def quantize_int8_stochastic(
    x: Tensor, levels: Tensor, seed: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-tensor range, stochastic rounding, int8 codes of a matrix: ``(codes, scale, mid,
    bad rows, bad columns)``, the last two shaped (rows, 1) and (1, columns)."""
    lo, hi = _minmax(x, None)
    scale = _scale(lo, hi, levels)
    q, mid, finite = _codes(
        x, torch.floor((x - lo) / scale + _uniform(x, seed)), lo, hi, scale, levels
    )
    return q, scale, mid, ~finite.all(1, keepdim=True), ~finite.all(0, keepdim=True)


def _codes(
    x: Tensor, q: Tensor, lo: Tensor, hi: Tensor, scale: Tensor, levels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(int8 codes, mid, finite mask)``; a non-finite value gets a defined code (its
    flag, not the code, carries it)."""
    offset = torch.floor(levels / 2 + 0.5)
    finite = _finite(x)
    q = torch.minimum(q.clamp_min(0.0), torch.where(hi > lo, levels, 0.0))
    q = torch.where(finite, q, offset)
    return (q - offset).to(torch.int8), lo + scale * offset, finite
