"""Every hypothesis generator of the test suite.

The model strategies build whole, symbolically traceable models from a *spec*: a tuple of
small frozen records drawn by hypothesis. ``__init__`` builds modules from the spec and
``forward`` loops over it with plain Python control flow, which ``torch.fx`` traces fine.
Specs print readably, so a shrunk failure says which model broke.

    >>> import torch
    >>> model = SpecMLP(MLPSpec(4, (Dense("einsum", 4, 3, "relu", False, False),)), seed=0)
    >>> model(torch.randn(2, 4)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

# ---------------------------------------------------------------------------------- bits


def bits(*, lo: int = 1, hi: int = 16) -> st.SearchStrategy[int]:
    """A bit-width in ``[lo, hi]``."""
    return st.integers(lo, hi)


@st.composite
def bit_bounds(draw: st.DrawFn, *, lo: int = 1, hi: int = 16) -> tuple[int, int]:
    """``(b_min, b_max)`` with ``lo <= b_min <= b_max <= hi``."""
    b_min = draw(st.integers(lo, hi))
    return b_min, draw(st.integers(b_min, hi))


deltas = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


@st.composite
def configs(draw: st.DrawFn, **fixed: object) -> object:
    """A valid ``DPCConfig`` (capacity by parameters, so it works without inputs)."""
    from dpc_fx import DPCConfig

    b_min, b_max = draw(bit_bounds())
    fields: dict[str, object] = {
        "policy": draw(st.sampled_from(["dpc", "uniform"])),
        "b_min": b_min,
        "b_max": b_max,
        "grad_bits": draw(st.none() | bits()),
        "delta": draw(deltas),
        "centre": draw(st.sampled_from(["median", "mean"])),
        "pin_first_last": draw(st.booleans()),
    }
    fields.update(fixed)
    return DPCConfig(**fields)  # type: ignore[arg-type]


capacity_lists = st.lists(
    st.integers(1, 10**7).map(float) | st.floats(1e-3, 1e9, allow_nan=False),
    min_size=1,
    max_size=12,
)

# ------------------------------------------------------------------------------- tensors


def shapes(*, min_dims: int = 1, max_dims: int = 4, max_side: int = 6) -> st.SearchStrategy:
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def float_tensors(
    draw: st.DrawFn,
    *,
    min_dims: int = 1,
    max_dims: int = 4,
    max_side: int = 6,
    magnitude: float = 1e3,
) -> Tensor:
    """A float32 tensor whose elements hypothesis chooses (and shrinks) one by one."""
    shape = draw(shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side))
    n = math.prod(shape)
    elements = st.floats(-magnitude, magnitude, allow_nan=False, allow_subnormal=False, width=32)
    values = draw(st.lists(elements, min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@st.composite
def random_tensors(
    draw: st.DrawFn, *, min_dims: int = 1, max_dims: int = 4, max_side: int = 8
) -> Tensor:
    """A seeded random tensor with a drawn scale and offset (cheap for big-ish shapes)."""
    shape = draw(shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 1.0, -5.0]))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale + offset * scale


SpecialKind = Literal["zeros", "constant", "one_inf", "one_neg_inf", "one_nan", "two_values"]
SPECIAL_KINDS: tuple[SpecialKind, ...] = (
    "zeros",
    "constant",
    "one_inf",
    "one_neg_inf",
    "one_nan",
    "two_values",
)


def special_tensor(kind: SpecialKind, shape: tuple[int, ...], *, value: float = 3.5) -> Tensor:
    """A tensor of a degenerate kind: all zeros, constant, or random with one bad element."""
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, value)
    g = torch.Generator().manual_seed(len(shape) * 31 + sum(shape))
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    if kind == "one_inf":
        flat[flat.numel() // 2] = float("inf")
    elif kind == "one_neg_inf":
        flat[flat.numel() // 2] = float("-inf")
    elif kind == "one_nan":
        flat[flat.numel() // 2] = float("nan")
    elif kind == "two_values":
        x = torch.where(x > 0, torch.tensor(value), torch.tensor(-value))
    return x


@st.composite
def special_tensors(draw: st.DrawFn, *, min_dims: int = 1, max_dims: int = 4) -> Tensor:
    kind = draw(st.sampled_from(SPECIAL_KINDS))
    shape = draw(shapes(min_dims=min_dims, max_dims=max_dims))
    value = draw(st.sampled_from([0.0, 1.0, -2.5, 1e4, 1e-6]))
    return special_tensor(kind, shape, value=value)


# --------------------------------------------------------------------------- MLP models

DenseKind = Literal["linear", "f_linear", "at", "matmul", "mm", "addmm", "bmm", "einsum"]
DENSE_KINDS: tuple[DenseKind, ...] = (
    "linear",
    "f_linear",
    "at",
    "matmul",
    "mm",  # the method, x.mm(w)
    "addmm",  # the method, b.addmm(x, w)
    "bmm",
    "einsum",
)


@dataclass(frozen=True)
class Dense:
    """One dense layer: how it multiplies (module, functional, ``@``, ...), widths, extras."""

    kind: DenseKind
    d_in: int
    d_out: int
    act: Literal["relu", "gelu"] | None
    residual: bool  # only when d_in == d_out
    bias: bool  # only for "linear" and "f_linear"


@dataclass(frozen=True)
class MLPSpec:
    d_in: int
    layers: tuple[Dense, ...]

    @property
    def d_out(self) -> int:
        return self.layers[-1].d_out


def _activation(x: Tensor, act: str | None) -> Tensor:
    if act == "relu":
        return torch.relu(x)
    if act == "gelu":
        return F.gelu(x)
    return x


class SpecMLP(nn.Module):
    """An MLP built from an :class:`MLPSpec`; parameters come from ``seed``."""

    def __init__(self, spec: MLPSpec, *, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.dense = nn.ModuleDict()
            for i, layer in enumerate(spec.layers):
                d_in, d_out = layer.d_in, layer.d_out
                if layer.kind == "linear":
                    self.dense[str(i)] = nn.Linear(d_in, d_out, bias=layer.bias)
                elif layer.kind == "f_linear":
                    self.register_parameter(
                        f"w{i}", nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
                    )
                    b = nn.Parameter(torch.randn(d_out) * 0.1) if layer.bias else None
                    self.register_parameter(f"b{i}", b)
                else:  # x @ w with w: (d_in, d_out)
                    self.register_parameter(
                        f"w{i}", nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
                    )
                    if layer.kind == "addmm":
                        self.register_parameter(f"b{i}", nn.Parameter(torch.randn(d_out) * 0.1))

    def _dense(self, i: int, layer: Dense, x: Tensor) -> Tensor:
        if layer.kind == "linear":
            return self.dense[str(i)](x)
        w = getattr(self, f"w{i}")
        if layer.kind == "f_linear":
            return F.linear(x, w, getattr(self, f"b{i}"))
        if layer.kind == "at":
            return x @ w
        if layer.kind == "matmul":
            return torch.matmul(x, w)
        if layer.kind == "mm":
            return x.mm(w)
        if layer.kind == "addmm":
            return getattr(self, f"b{i}").addmm(x, w)
        if layer.kind == "bmm":
            return torch.bmm(x.unsqueeze(1), w.unsqueeze(0).expand(x.shape[0], -1, -1)).squeeze(1)
        return torch.einsum("bij,jk->bik", x.unsqueeze(1), w).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.spec.layers):
            y = _activation(self._dense(i, layer, x), layer.act)
            x = x + y if layer.residual else y
        return x

    def extra_repr(self) -> str:
        return repr(self.spec)


@st.composite
def mlp_specs(
    draw: st.DrawFn,
    *,
    min_depth: int = 1,
    max_depth: int = 5,
    kinds: tuple[DenseKind, ...] = DENSE_KINDS,
    max_width: int = 8,
) -> MLPSpec:
    d_in = draw(st.integers(1, max_width))
    layers, d = [], d_in
    for _ in range(draw(st.integers(min_depth, max_depth))):
        kind = draw(st.sampled_from(kinds))
        d_out = d if draw(st.booleans()) else draw(st.integers(1, max_width))
        act = draw(st.sampled_from(["relu", "gelu", None]))
        residual = d_out == d and draw(st.booleans())
        bias = kind in ("linear", "f_linear") and draw(st.booleans())
        layers.append(Dense(kind, d, d_out, act, residual, bias))
        d = d_out
    return MLPSpec(d_in, tuple(layers))


# --------------------------------------------------------------------------- CNN models


@dataclass(frozen=True)
class Conv:
    """A conv block: conv (or transposed conv), optional batch norm, activation, a parallel
    branch summed in, a residual add."""

    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    groups: int
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"]
    transposed: bool
    output_padding: int  # transposed only: < max(stride, dilation)
    batch_norm: bool
    act: Literal["relu", "gelu"] | None
    branch: bool
    residual: bool


@dataclass(frozen=True)
class Pool:
    kind: Literal["max", "avg"]


@dataclass(frozen=True)
class CNNSpec:
    dims: Literal[1, 2]
    c_in: int
    size: int  # input length (1-D) or height = width (2-D)
    blocks: tuple[Conv | Pool, ...]
    c_last: int
    size_last: int
    n_out: int


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {
    (1, "max"): nn.MaxPool1d,
    (2, "max"): nn.MaxPool2d,
    (1, "avg"): nn.AvgPool1d,
    (2, "avg"): nn.AvgPool2d,
}


class ConvBlock(nn.Module):
    def __init__(self, dims: int, block: Conv) -> None:
        super().__init__()
        self.block = block
        self.conv = self._conv(dims, block)
        self.branch = self._conv(dims, block) if block.branch else None
        self.bn = _BN[dims](block.c_out) if block.batch_norm else None

    @staticmethod
    def _conv(dims: int, b: Conv) -> nn.Module:
        if b.transposed:
            return _CONV_T[dims](
                b.c_in,
                b.c_out,
                b.kernel,
                stride=b.stride,
                padding=b.padding,
                output_padding=b.output_padding,
                dilation=b.dilation,
                groups=b.groups,
            )
        return _CONV[dims](
            b.c_in,
            b.c_out,
            b.kernel,
            stride=b.stride,
            padding=b.padding,
            dilation=b.dilation,
            groups=b.groups,
            padding_mode=b.padding_mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.branch is not None:
            y = y + self.branch(x)
        if self.bn is not None:
            y = self.bn(y)
        y = _activation(y, self.block.act)
        return x + y if self.block.residual else y


class SpecCNN(nn.Module):
    """A 1-D or 2-D CNN built from a :class:`CNNSpec`, with a flatten + Linear head."""

    def __init__(self, spec: CNNSpec, *, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            blocks: list[nn.Module] = []
            for b in spec.blocks:
                if isinstance(b, Pool):
                    blocks.append(_POOL[spec.dims, b.kind](2))
                else:
                    blocks.append(ConvBlock(spec.dims, b))
            self.features = nn.ModuleList(blocks)
            self.head = nn.Linear(spec.c_last * spec.size_last**spec.dims, spec.n_out)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.features:
            x = block(x)
        return self.head(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return repr(self.spec)


def _conv_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_t_size(size: int, k: int, s: int, p: int, d: int, op: int) -> int:
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


@st.composite
def conv_blocks(draw: st.DrawFn, c: int, size: int, *, max_channels: int = 8, max_size: int = 16):
    """One block that fits input channels ``c`` and spatial ``size``, with its output
    ``(block, channels, size)``; ``None`` when nothing fits."""
    if size >= 2 and draw(st.integers(0, 5)) == 0:
        return Pool(draw(st.sampled_from(["max", "avg"]))), c, size // 2
    transposed = draw(st.integers(0, 4)) == 0
    c_out = c if draw(st.booleans()) else draw(st.integers(1, max_channels))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0 and c_out % g == 0]))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
    output_padding = 0
    if transposed:
        padding = draw(st.integers(0, (dilation * (kernel - 1)) // 2))
        output_padding = draw(st.integers(0, max(stride, dilation) - 1))
        out = _conv_t_size(size, kernel, stride, padding, dilation, output_padding)
        mode = "zeros"
    else:
        padding = draw(st.integers(0, kernel // 2 * dilation))
        out = _conv_size(size, kernel, stride, padding, dilation)
        # reflect and circular padding need padding < size
        modes = ["zeros", "replicate"] + (["reflect", "circular"] if padding < size else [])
        mode = draw(st.sampled_from(modes)) if padding > 0 else "zeros"
    if not 1 <= out <= max_size:
        return None
    residual = c_out == c and out == size and draw(st.booleans())
    block = Conv(
        c_in=c,
        c_out=c_out,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        transposed=transposed,
        output_padding=output_padding,
        batch_norm=draw(st.booleans()),
        act=draw(st.sampled_from(["relu", "gelu", None])),
        branch=draw(st.integers(0, 3)) == 0,
        residual=residual,
    )
    return block, c_out, out


@st.composite
def cnn_specs(draw: st.DrawFn, *, dims: int | None = None, max_blocks: int = 4) -> CNNSpec:
    dims = dims or draw(st.sampled_from([1, 2]))
    c_in = draw(st.integers(1, 4))
    size = draw(st.integers(3, 16 if dims == 1 else 8))
    blocks, c, s = [], c_in, size
    for _ in range(draw(st.integers(1, max_blocks))):
        drawn = draw(conv_blocks(c, s))
        if drawn is None:
            continue
        block, c, s = drawn
        blocks.append(block)
    return CNNSpec(dims, c_in, size, tuple(blocks), c, s, draw(st.integers(1, 5)))


# ---------------------------------------------------------------------- model + input


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**16)


def batches(*, lo: int = 2, hi: int = 4) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


def _input(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


@st.composite
def mlps(draw: st.DrawFn, **spec_kwargs: object) -> tuple[nn.Module, Tensor]:
    """``(model, x)``: a random MLP and a batch for it."""
    spec = draw(mlp_specs(**spec_kwargs))  # type: ignore[arg-type]
    seed = draw(seeds())
    return SpecMLP(spec, seed=seed), _input((draw(batches()), spec.d_in), seed)


@st.composite
def cnns(draw: st.DrawFn, *, dims: int | None = None) -> tuple[nn.Module, Tensor]:
    """``(model, x)``: a random 1-D or 2-D CNN and a batch for it."""
    spec = draw(cnn_specs(dims=dims))
    seed = draw(seeds())
    shape = (draw(batches()), spec.c_in) + (spec.size,) * spec.dims
    return SpecCNN(spec, seed=seed), _input(shape, seed)


def models() -> st.SearchStrategy[tuple[nn.Module, Tensor]]:
    """``(model, x)`` from any family: MLPs, 1-D CNNs, 2-D CNNs."""
    return st.one_of(mlps(), cnns(dims=1), cnns(dims=2))


# ------------------------------------------------------------------ quantised models


def role_bits(*, hi: int = 8) -> st.SearchStrategy[int | None]:
    """One role's bit-width: full precision (``None``) or ``1..hi`` bits."""
    return st.none() | bits(lo=1, hi=hi)


def layer_bits(*, hi: int = 8) -> st.SearchStrategy[object]:
    """A ``Bits(w, a, g)`` whose three roles are drawn independently (any may be ``None``)."""
    from dpc_fx import Bits

    return st.builds(Bits, role_bits(hi=hi), role_bits(hi=hi), role_bits(hi=hi))


def layer_count(spec: MLPSpec | CNNSpec) -> int:
    """How many matmul-like layers a model built from ``spec`` has, in the spec's terms:
    one per dense layer; one per conv block (two with a branch) plus the linear head."""
    if isinstance(spec, MLPSpec):
        return len(spec.layers)
    convs = [b for b in spec.blocks if isinstance(b, Conv)]
    return sum(1 + b.branch for b in convs) + 1


@st.composite
def planned_models(draw: st.DrawFn) -> tuple[nn.Module, Tensor, tuple[object, ...]]:
    """``(model, x, bits)``: a model from any family, a batch for it, and one drawn
    ``Bits`` per matmul-like layer in the order the layers run (the makings of a plan)."""
    model, x = draw(models())
    n = layer_count(model.spec)  # type: ignore[arg-type]
    return model, x, tuple(draw(st.lists(layer_bits(), min_size=n, max_size=n)))
