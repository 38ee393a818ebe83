"""The native loops (``dpc_fx/csrc/quant.cpp``) against the torch kernels they stand in for:
the same values bit for bit, on random, constant, empty-range and
non-finite tensors, at every code width; and a model trained through them against the same
model on the eager kernels."""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch import Tensor, nn

from dpc_fx import fused, kernels, native
from dpc_fx.quant import fake_quantize

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"native kernels unavailable: {native.unavailable()}"
)

eager = lambda f: f.__wrapped__  # noqa: E731  (the torch kernel, uncompiled)


def identical(a: Tensor, b: Tensor) -> bool:
    """Equal values and ``nan`` in the same places. (Not the sign of a zero: torch's own
    ``clamp_min(-0.0, 0.0)`` gives +0 in its vector loop and -0 in its scalar one, which
    shows where a given range starts at -0.0.)"""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


@st.composite
def vectors(draw: st.DrawFn) -> Tensor:
    n = draw(st.integers(1, 3000))
    kind = draw(st.sampled_from(["randn", "relu", "constant", "zeros", "inf", "nan", "all-inf"]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if kind == "relu":
        x = x.relu()
    elif kind == "constant":
        x = torch.full((n,), -1.25)
    elif kind == "zeros":
        x = torch.zeros(n)
    elif kind == "inf":
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([float("inf"), float("-inf")]))
    elif kind == "nan":
        x[draw(st.integers(0, n - 1))] = float("nan")
    elif kind == "all-inf":
        x = torch.full((n,), float("inf"))
    return x


bits = st.integers(1, 8)


@given(vectors(), bits)
def test_range_codes_and_packing_match_the_torch_kernels(x: Tensor, b: int) -> None:
    levels = kernels.levels_tensor(b, x)
    codes, x_hat, lo, hi, bad = eager(kernels.quantize_codes_tensor)(x, levels)
    span, nonfinite = native.range_of(x)
    assert span.tolist() == [lo.item(), hi.item()] and nonfinite == bool(bad)
    out, packed = native.quantize(x, lo.item(), hi.item(), b, packed=True)
    assert identical(out, x_hat)
    assert packed is not None and torch.equal(packed, fused.pack(codes, b))
    out, packed, span, nonfinite = native.quantize_measured(x, b)  # both in one call
    assert span.tolist() == [lo.item(), hi.item()] and nonfinite == bool(bad)
    assert identical(out, x_hat) and torch.equal(packed, fused.pack(codes, b))


@given(vectors(), bits, st.floats(-2, 0.5), st.floats(0, 3))
def test_a_given_range_clamps_as_the_torch_kernel_does(
    x: Tensor, b: int, lo: float, width: float
) -> None:
    lo_t, hi_t = torch.tensor(lo), torch.tensor(lo + width)
    levels = kernels.levels_tensor(b, x)
    codes, x_hat, _ = eager(kernels.quantize_codes)(x, lo_t, hi_t, levels)
    out, packed = native.quantize(x, lo_t.item(), hi_t.item(), b, packed=True)
    assert identical(out, x_hat) and torch.equal(packed, fused.pack(codes, b))  # type: ignore[arg-type]
    plain, none = native.quantize(x, lo_t.item(), hi_t.item(), b, packed=False)
    assert none is None and identical(plain, eager(kernels.fake_quant)(x, lo_t, hi_t, levels))


@given(vectors(), bits)
def test_dequantised_codes_match_the_torch_kernels(x: Tensor, b: int) -> None:
    levels = kernels.levels_tensor(b, x)
    codes, _, lo, hi, bad = eager(kernels.quantize_codes_tensor)(x, levels)
    want = kernels.dequantize_codes(codes, lo, hi, levels, bad)
    got = native.dequantize(fused.pack(codes, b), x.numel(), b, lo.item(), hi.item(), bool(bad))
    assert identical(got, want)


@given(vectors(), bits, st.integers(0, 2**31 - 2))
def test_stochastic_rounding_is_the_same_stream(x: Tensor, b: int, seed: int) -> None:
    levels = kernels.levels_tensor(b, x)
    want = eager(kernels.fake_quant_stochastic)(x, levels, torch.tensor(seed))
    assert identical(native.stochastic(x, b, seed), want)


@given(vectors(), bits, st.integers(1, 9))
def test_per_row_weights_match_the_torch_kernel(x: Tensor, b: int, rows: int) -> None:
    x = x[: x.numel() // rows * rows].view(rows, -1) if x.numel() >= rows else x.view(1, -1)
    levels = kernels.levels_tensor(b, x)
    assert identical(native.fake_quant_rows(x, b), eager(kernels.fake_quant_channels)(x, levels))


def test_large_tensors_split_over_threads_agree() -> None:
    """Above the grain the loops run on several threads; the plane packing's remainder and
    every thread's share must still come out as one pass would."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(300_007)
        x[123_456] = float("nan")
        for b in (3, 6, 8):
            levels = kernels.levels_tensor(b, x)
            codes, x_hat, lo, hi, bad = eager(kernels.quantize_codes_tensor)(x, levels)
            span, nonfinite = native.range_of(x)
            assert span.tolist() == [lo.item(), hi.item()] and nonfinite and bool(bad)
            out, packed = native.quantize(x, lo.item(), hi.item(), b, packed=True)
            assert identical(out, x_hat) and torch.equal(packed, fused.pack(codes, b))  # type: ignore[arg-type]
            seed = torch.tensor(99)
            want = eager(kernels.fake_quant_stochastic)(x, levels, seed)
            assert identical(native.stochastic(x, b, 99), want)
    finally:
        torch.set_num_threads(threads)


_SPECIALS = torch.tensor(
    [-0.0, 0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 6.0, 6.5, 5.999]
)


def _grad(x: Tensor, seed: int) -> Tensor:
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    grad.view(-1)[:: max(1, x.numel() // 3)] = float("nan")  # where the mask stops it, too
    return grad


def _relu_both(
    x: Tensor, seed: int, six: bool = False, inplace: bool = False
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """ATen's relu (or relu6) and ours (``torch.ops.dpc_fx.relu``, or ``relu_``) on ``x``:
    each side's output and input gradient, and what the bit ReLU kept for backward. ``inplace``: both
    run in place, on a tensor computed from the leaf (as a graph's ReLU after batch norm)."""
    grad = _grad(x, seed)
    kept: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        kept.append(t)
        return t

    out = []
    top = 6.0 if six else math.inf

    def ours(h: Tensor, inplace: bool) -> Tensor:  # the operators, at any size
        return getattr(torch.ops.dpc_fx, "relu_" if inplace else "relu").default(h, top)  # type: ignore[no-any-return]

    for fn in (F.relu6 if six else F.relu, ours):
        leaf = x.clone().requires_grad_()
        hook = keep if fn is ours else (lambda t: t)
        with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
            h = leaf * 1 if inplace else leaf
            y = fn(h, inplace=inplace)
        assert (y is h) == inplace
        y.backward(grad)
        assert leaf.grad is not None
        out.append([y.detach(), leaf.grad])
    if inplace and x.numel():  # (ATen's ran in place too; ours is the C++ in-place node)
        assert "ReluInPlace" in y.grad_fn.name()
    return out[0], out[1], kept


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@given(vectors(), st.integers(0, 3000), st.integers(0, 2**16), st.booleans(), st.booleans())
def test_the_bit_relus_give_atens_values_and_gradients_bit_for_bit(
    x: Tensor, at: int, seed: int, six: bool, inplace: bool
) -> None:
    """``fused.relu`` and ``fused.relu6`` (``torch.ops.dpc_fx.relu``) against ATen's:
    outputs and input gradients equal to the bit, ``-0.0``, ``nan``, infinities, 6 and
    subnormals included, and what they keep is one bit an element.

    One exception: at a ``nan`` input ATen's relu6 gradient depends on where the element
    falls (its vector loop stops the gradient there, its scalar loop passes it); ours passes
    it, as ATen's relu does."""
    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    at = min(at, x.numel())
    x = torch.cat([x[:at], _SPECIALS, x[at:]])
    (y_aten, g_aten), (y, g), kept = _relu_both(x, seed, six, inplace)
    assert _same_bits(y_aten, y)
    if six:
        nan = torch.isnan(x)
        assert identical(g[nan], _grad(x, seed)[nan])  # ours passes it
        g_aten, g = g_aten[~nan], g[~nan]
    assert _same_bits(g_aten, g)
    assert [(t.dtype, t.numel()) for t in kept] == [(torch.uint8, (x.numel() + 7) // 8)]


def test_the_bit_relus_agree_on_several_threads_and_shapes() -> None:
    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, 100_003) * 4
        x.view(-1)[50_000 : 50_000 + len(_SPECIALS)] = _SPECIALS
        x.view(-1)[2] = float("nan")  # (relu6's gradient at a nan: see above)
        for six, inplace in itertools.product((False, True), repeat=2):
            aten, ours, _ = _relu_both(x, 0, six, inplace)
            keep = ~torch.isnan(x) if six else torch.ones_like(x, dtype=torch.bool)
            assert _same_bits(aten[0], ours[0]) and aten[0].shape == ours[0].shape
            assert _same_bits(aten[1][keep], ours[1][keep])
    finally:
        torch.set_num_threads(threads)
    # In place, the version moves as ATen's would: a tensor saved from before is caught.
    leaf = torch.randn(2048, requires_grad=True)
    h = leaf * 1
    kept = h * leaf  # keeps h
    torch.ops.dpc_fx.relu_.default(h, math.inf)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kept.sum().backward()
    # The functions the graph calls, on the operators above where they take the tensor.
    y = fused.relu6(torch.randn(2048).requires_grad_() * 1, inplace=True)
    assert "ReluInPlace" in y.grad_fn.name()  # type: ignore[union-attr]
    assert "Relu" in fused.relu(torch.randn(2048, requires_grad=True)).grad_fn.name()  # type: ignore[union-attr]
    # Where they cannot keep bits (no gradient wanted, a channels-last input whose layout
    # the next op reads, another dtype, fewer than 1024 elements) they are ATen's own.
    assert fused.relu(torch.randn(4096)).grad_fn is None
    small = torch.randn(1023, requires_grad=True)
    assert type(fused.relu(small).grad_fn).__name__ == "ReluBackward0"
    nhwc = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last).requires_grad_()
    assert fused.relu6(nhwc).is_contiguous(memory_format=torch.channels_last)
    double = torch.randn(4096, dtype=torch.float64, requires_grad=True)
    assert type(fused.relu(double).grad_fn).__name__ == "ReluBackward0"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv2(self.conv(x).relu()).relu().flatten(1))


@pytest.mark.parametrize("fuse", [True, False])
def test_training_through_native_loops_equals_the_eager_kernels(
    monkeypatch: pytest.MonkeyPatch, fuse: bool
) -> None:
    """Outputs, every gradient and the running ranges, bit for bit, over two steps (the
    second quantises against the first's running range in eval)."""
    import dpc_fx
    from dpc_fx import DPCConfig

    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    base = dpc_fx.compile(_Net(), x, config=DPCConfig(pin_first_last=False, fuse=fuse))
    native_run, eager_run = _train_in_both_modes(monkeypatch, base, x, 2, Tensor.square)
    for a, b in zip(native_run, eager_run, strict=True):
        assert identical(a.float(), b.float())


def _train_in_both_modes(
    monkeypatch: pytest.MonkeyPatch,
    base: nn.Module,
    x: Tensor,
    steps: int,
    weigh: Callable[[Tensor], Tensor],
) -> list[list[Tensor]]:
    """A copy of ``base`` trained ``steps`` steps (loss ``weigh(y).sum()``) on the native
    loops and on the eager kernels, from the same seed: per mode, every step's output and
    gradients, then the eval output and the buffers (the running ranges)."""
    results = []
    for mode in ("native+eager", "eager"):
        monkeypatch.setenv("DPC_FX_KERNELS", mode)
        model = copy.deepcopy(base).train()
        torch.manual_seed(1)
        outs = []
        for _ in range(steps):
            model.zero_grad()
            y = model(x)
            weigh(y).sum().backward()
            outs += [y.detach(), *(p.grad.clone() for p in model.parameters())]
        model.eval()
        with torch.no_grad():
            outs.append(model(x))
        outs += [b.clone() for b in model.buffers()]
        results.append(outs)
    return results


@given(st.integers(1, 70), st.integers(1, 70), st.booleans(), st.integers(0, 2**16))
def test_int8_row_and_column_sums_match_aten(
    rows: int, cols: int, transposed: bool, seed: int
) -> None:
    """The integer product's corrections: sums of int8 codes along either dimension, of a
    dense matrix or a transposed view of one, as ATen's int32 sums give them."""
    torch.manual_seed(seed)
    q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8)
    q = q.t() if transposed else q
    for dim in (0, 1):
        sums = native.int8_sums(q, dim)
        assert sums is not None and torch.equal(sums, q.sum(dim, dtype=torch.int32))
    strided = torch.zeros(4, 6, dtype=torch.int8)[:, ::2]  # neither layout dense
    assert native.int8_sums(strided, 0) is None and native.int8_sums(q.float(), 0) is None


@given(
    st.integers(1, 70),
    st.integers(1, 70),
    st.booleans(),
    st.lists(st.floats(-3.0, 3.0, width=32), min_size=4, max_size=4),
    st.integers(0, 2**16),
)
@example(300, 200, True, [0.013, 0.21, 0.0021, -0.0007], 0)  # several threads
def test_the_integer_products_float_form_matches_the_torch_kernel(
    rows: int, cols: int, with_bias: bool, scalars: list[float], seed: int
) -> None:
    """A lowered layer's float product from its integer one (scales, offsets, the codes' row
    and column sums and a bias), written in place by the native loop: the eager torch
    kernel's values bit for bit, and nothing where the loop cannot take the tensors."""
    from dpc_fx import int8

    gen = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2**20), 2**20, (rows, cols), generator=gen).float()
    row_sums = torch.randint(-(2**14), 2**14, (rows,), generator=gen, dtype=torch.int32)
    col_sums = torch.randint(-(2**14), 2**14, (cols,), generator=gen, dtype=torch.int32)
    bias = torch.randn(cols, generator=gen) if with_bias else None
    sa, ma, sb, mb = (torch.tensor(v) for v in scalars)
    k = int(torch.randint(1, 5000, (), generator=gen))
    want = acc.clone()
    eager(int8._combine)(want, row_sums, col_sums, sa, ma, sb, mb, k, bias)
    got = acc.clone()
    factors = int8._factors(sa, ma, sb, mb, k)
    assert native.int8_combine(got, row_sums, col_sums, factors, bias)
    assert torch.equal(got, want)
    # int64 sums, a strided product: left to the torch kernel, the product untouched
    before = acc.clone()
    assert not native.int8_combine(acc, row_sums.long(), col_sums, factors, bias)
    strided = torch.full((3, 8), 7.5)[:, ::2]
    three, four = row_sums.new_zeros(3), col_sums.new_zeros(4)
    assert not native.int8_combine(strided, three, four, factors, None)
    assert torch.equal(acc, before) and bool((strided == 7.5).all())


@given(vectors(), bits, st.integers(1, 5), st.integers(0, 2**31 - 2), st.floats(0.25, 1.5))
def test_int8_codes_match_the_torch_kernels(
    x: Tensor, b: int, rows: int, seed: int, shrink: float
) -> None:
    """The lowered layers' codes: nearest rounding over a given range (clamped into it) and
    stochastic rounding over the matrix's own, the int8 codes of the torch kernels bit for
    bit; a matrix holding ``inf`` or ``nan`` is left to the torch kernels, which flag its
    rows."""
    x = x[: x.numel() // rows * rows].view(rows, -1) if x.numel() >= rows else x.view(1, -1)
    levels = kernels.levels_tensor(b, x)
    lo, hi = kernels.tensor_range(x.reshape(-1))
    lo, hi = lo * shrink, hi * shrink  # a running range narrower or wider than the batch's
    finite = bool(torch.isfinite(x).all())
    codes = native.int8_codes(x, float(lo), float(hi), b)
    assert (codes is not None) == finite
    if codes is not None:
        assert torch.equal(codes, eager(kernels.quantize_int8)(x, lo, hi, levels)[0])
    found = native.int8_stochastic(x, b, seed)
    assert (found is not None) == finite
    if found is not None:
        want = eager(kernels.quantize_int8_stochastic)(x, levels, torch.tensor(seed))
        assert torch.equal(found[0], want[0])
        assert found[1].tolist() == [v.item() for v in kernels.tensor_range(x.reshape(-1))]


@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([0, 128]), st.integers(0, 2**16))
@example(520, 130, 128, 0)  # several threads, bands and blocks, with ragged edges
def test_int8_transpose_matches_aten(rows: int, cols: int, flip: int, seed: int) -> None:
    """The dense layouts of the integer kernels: an int8 matrix transposed (16 x 16 blocks
    in registers, the ragged edges byte by byte), its bytes XOR-ed with 0 or 128."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=g)
    out = native.int8_transpose(q, flip)
    want = (q.view(torch.uint8) ^ flip).view(torch.int8).t().contiguous()
    assert out is not None and out.is_contiguous() and torch.equal(out, want)
    strided = torch.zeros(4, 6, dtype=torch.int8)[:, ::2]  # not dense: the caller copies
    assert native.int8_transpose(strided, flip) is None
    assert native.int8_transpose(q.float(), flip) is None


def test_without_a_compiler_the_torch_kernels_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A failed build is reported once, and ``usable`` then sends every caller to the torch
    kernels."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DPC_FX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="native quantisation kernels are unavailable"):
        assert native.library() is None
    assert "no-such-compiler" in (native.unavailable() or "")
    assert not native.usable(torch.zeros(3))
    from dpc_fx.quant import fake_quantize

    assert torch.equal(
        fake_quantize(torch.tensor([0.0, 1.0, 2.0]), 1), torch.tensor([0.0, 0.0, 2.0])
    )


def test_the_library_is_built_once_per_source(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DPC_FX_CACHE", str(tmp_path))
    assert native.library() is not None
    built = list(tmp_path.glob("quant-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert list(tmp_path.glob("*")) == built  # loaded, not built again; no temporary left


def test_fused_and_eager_kernel_modes_skip_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in ("fused", "eager"):
        monkeypatch.setenv("DPC_FX_KERNELS", mode)
        assert native.library() is None and not native.usable(torch.zeros(2))


def test_off_linux_the_torch_kernels_run_without_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.sys, "platform", "darwin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
    assert "Linux only" in (native.unavailable() or "")


class _Wide(nn.Module):
    """Three convolutions whose inputs and outputs are all 16x64x64 per sample: every
    temporary is large enough for the pool, and each layer can reuse the last one's."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x).relu()
        return x


def test_pooled_buffers_never_change_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused layers' temporaries come from the pool and go back to it; a buffer handed
    out twice, or taken back while in use, would change an output or a gradient."""
    import dpc_fx
    from dpc_fx import DPCConfig

    torch.manual_seed(0)
    x = torch.randn(2, 16, 64, 64)
    base = dpc_fx.compile(_Wide(), x, config=DPCConfig(pin_first_last=False))
    weigh = lambda y: y * torch.linspace(-1, 1, y.numel()).view_as(y)  # noqa: E731
    native_run, eager_run = _train_in_both_modes(monkeypatch, base, x, 3, weigh)
    for a, b in zip(native_run, eager_run, strict=True):
        assert identical(a, b)


def test_the_pool_keeps_few_buffers_and_lets_a_pass_go_when_the_other_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``native.pool``, which the fused layers on the Python path use (the layer operator's
    own pool in ``csrc/layer.cpp`` keeps the same policy; the test above runs through it)."""
    import dpc_fx
    from dpc_fx import DPCConfig

    monkeypatch.setattr(native, "layers", lambda: False)

    torch.manual_seed(0)
    x = torch.randn(2, 16, 64, 64)
    model = dpc_fx.compile(_Wide(), x, config=DPCConfig(pin_first_last=False)).train()
    seen: list[tuple[str | None, int]] = []
    hook = lambda *_: seen.append((native.pool.pass_, len(native.pool.free)))  # noqa: E731
    for conv in model.dpc.children():
        conv.register_forward_hook(hook)
    y = model(x)
    forward = list(seen)
    y.sum().backward()
    assert native.pool.pass_ == "backward"
    assert all(p == "forward" for p, _ in forward)
    assert all(0 < n <= native.pool.KEEP for _, n in forward)  # reused: never more than one
    assert max(n for _, n in forward) == 1
    assert 0 < len(native.pool.free) <= native.pool.KEEP
    model(x)  # the next forward lets backward's buffers go
    assert native.pool.pass_ == "forward" and len(native.pool.free) <= 1


def test_the_quantised_weights_share_one_buffer_kept_between_steps() -> None:
    """Every layer's quantised weight, forward and backward, is written into one buffer the
    size of the largest, which ``native.held_bytes`` counts after a step: the rest of what
    backward kept for its next layer (the pool's buffers, the shared dequantised input) is
    let go when autograd's engine finishes the pass. Letting the buffer go between steps
    changes no output or gradient."""
    import dpc_fx
    from dpc_fx import DPCConfig

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    layers = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1)
    )
    model = dpc_fx.compile(layers, x, config=DPCConfig(pin_first_last=False)).train()
    largest = max(p.numel() for name, p in model.named_parameters() if name.endswith("weight"))

    def steps(release: bool) -> list[Tensor]:
        torch.manual_seed(1)
        out = []
        for _ in range(2):
            if release:
                native.release()
                assert native.held_bytes() == 0
            model.zero_grad(set_to_none=True)
            y = model(x)
            y.square().mean().backward()
            out += [y.detach(), *(p.grad.clone() for p in model.parameters())]
            assert native.held_bytes() == 4 * largest
        return out

    native.release()  # an earlier test's layers may have grown it
    for a, b in zip(steps(False), steps(True), strict=True):
        assert identical(a, b)


def test_the_pools_buffers_are_let_go_when_backward_ends() -> None:
    """Layers whose temporaries the pool serves (16x64x64 a sample) hold pool buffers while
    a pass runs; once autograd's engine has run backward, the operator holds only the
    quantised weights' buffer."""
    import dpc_fx
    from dpc_fx import DPCConfig

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    x = torch.randn(2, 16, 64, 64)
    model = dpc_fx.compile(_Wide(), x, config=DPCConfig(pin_first_last=False)).train()
    native.release()
    y = model(x)
    during = native.held_bytes()  # the last layer's quantised input, shared, and the pool's
    y.square().mean().backward()
    weight = model.get_parameter("convs.0.weight").numel()  # all three are alike
    assert during > 4 * weight and native.held_bytes() == 4 * weight


@pytest.mark.parametrize("keep", ["hook", "sum"])
def test_a_gradient_someone_else_holds_is_never_rounded_in_place(keep: str) -> None:
    """The layer operator rounds its output gradient in place only where nothing else holds
    it. A hook that keeps the gradient, and the other operand of a sum with the layer's
    output (the sum's backward gives both the same gradient tensor; the other's backward,
    made first, runs after the layer's), must each see it unrounded, and the parameters'
    gradients must be those of a run where nothing is kept."""
    import dpc_fx
    from dpc_fx import DPCConfig

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(x).relu().flatten(2).transpose(1, 2).contiguous()  # (n, 64, 8)
            return self.fc(h)  # a 3-D input: the operator's gradient is a view

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = dpc_fx.compile(Net(), x, config=DPCConfig(pin_first_last=False)).train()
    weights = torch.randn(2, 64, 5)

    def run(kept: bool) -> tuple[list[Tensor], Tensor | None]:
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        z = torch.zeros_like(weights, requires_grad=True)
        other = z * 1.0
        y = model(x)
        assert "Layer" in y.grad_fn.next_functions[0][0].name()  # the operator's node
        held: list[Tensor] = []
        if kept and keep == "hook":
            y.register_hook(held.append)
        ((y + other if kept and keep == "sum" else y) * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        if not kept:
            return grads, None
        return grads, held[0] if keep == "hook" else z.grad

    plain, _ = run(kept=False)
    grads, seen = run(kept=True)
    for a, b in zip(plain, grads, strict=True):
        assert identical(a, b)
    assert seen is not None and identical(seen, weights)  # the loss's gradient, unrounded


class _Layers(nn.Module):
    """Every kind of layer the operators take: conv1d/2d/3d (stride, dilation, groups, no
    bias) and linear on a 3-D input (run as a 2-D product)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c3 = nn.Conv3d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c1(x).relu()  # (n, 4, 8)
        y = self.c2(y.view(-1, 4, 2, 4)).relu()
        y = self.c3(y.unsqueeze(2)).squeeze(2)
        return self.fc(y.flatten(2).transpose(1, 2).contiguous())


@pytest.mark.parametrize("rank", [0, 3])
def test_the_layer_operators_equal_the_python_path_and_the_eager_kernels(
    monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    """The layer operator (``torch.ops.dpc_fx.layer``, with its C++ autograd node) gives every
    output, gradient and running range the Python path on the same loops gives, and the
    eager kernels, bit for bit; also where the incoming gradient is strided (the transpose
    before ``fc``: rounded in its own memory order, as the Python path rounds it). Under
    ``torch.distributed`` (rank 3) the operator offsets its seeds as ``kernels.new_seed``
    does."""
    import dpc_fx
    from dpc_fx import DPCConfig

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    monkeypatch.setattr(kernels, "_rank", lambda: rank)
    torch.manual_seed(0)
    x = torch.randn(4, 2, 16)
    base = dpc_fx.compile(_Layers(), x, config=DPCConfig(pin_first_last=False))
    calls, strided = [], []
    step, rounding = fused._native_step, fused._quantize_grad
    monkeypatch.setattr(fused, "_native_step", lambda *a: calls.append(1) or step(*a))

    def rounded(g: Tensor, *a: object) -> Tensor:
        if os.environ["DPC_FX_KERNELS"] == "native+eager" and not g.is_contiguous():
            strided.append(1)
        return rounding(g, *a)

    monkeypatch.setattr(fused, "_quantize_grad", rounded)
    with_ops, eager_run = _train_in_both_modes(monkeypatch, base, x, 2, Tensor.square)
    assert len(calls) == 2 * 4 and not strided  # two steps, four layers: the operator ran
    monkeypatch.setattr(native, "layers", lambda: False)
    calls.clear()
    python_path, _ = _train_in_both_modes(monkeypatch, base, x, 2, Tensor.square)
    assert not calls and strided  # the Python path on the native loops met a strided gradient
    for a, b, c in zip(with_ops, python_path, eager_run, strict=True):
        assert identical(a, b) and identical(a, c)


class _Attention(nn.Module):
    """Attention in the layouts the operator meets: a query whose heads are a transposed
    view (dense in another order), a key over half the heads (grouped-query attention), a
    value that no order of its dimensions makes dense (a slice of each head: copied), and a
    mask (``None``, causal, or boolean padding)."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mask = mask
        self.q, self.k, self.v, self.out = (nn.Linear(16, n) for n in (16, 8, 16, 16))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 8)[..., :4].transpose(1, 2)
        mask = None
        if self.mask == "padding":
            mask = torch.ones(t, t, dtype=torch.bool).index_fill_(1, torch.tensor([t - 1]), False)
        causal = self.mask == "causal"
        h = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
        return self.out(h.transpose(1, 2).reshape(b, t, 16))


def _operator_equals_both_paths(
    monkeypatch: pytest.MonkeyPatch,
    model: nn.Module,
    op: str,
    bits: tuple[int, int, int],
    rank: int,
    layers: int,
) -> None:
    """Trains ``model`` compiled (``layers`` fused layers of kind ``op`` at ``bits``) two
    steps on its operator, on the Python path and on the eager kernels, from the same seed
    (``rank``: the process's under ``torch.distributed``), and checks that the operator ran
    and that every output, gradient and running range agrees bit for bit."""
    import dpc_fx
    from dpc_fx import DPCConfig

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    monkeypatch.setattr(kernels, "_rank", lambda: rank)
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16)
    config = DPCConfig(overrides={"*": bits}, pin_first_last=False)
    base = dpc_fx.compile(model, x, config=config)
    assert [m.op for m in dpc_fx.layers(base)].count(op) == layers
    name = {"attention": "_native_attention", "matmul": "_native_product"}[op]
    calls = []
    step = getattr(fused, name)
    monkeypatch.setattr(fused, name, lambda *a: calls.append(1) or step(*a))
    with_op, eager_run = _train_in_both_modes(monkeypatch, base, x, 2, Tensor.square)
    assert len(calls) == 2 * layers  # two steps: the operator ran
    monkeypatch.setattr(native, "layers", lambda: False)
    calls.clear()
    python_path, _ = _train_in_both_modes(monkeypatch, base, x, 2, Tensor.square)
    assert not calls
    for a, b, c in zip(with_op, python_path, eager_run, strict=True):
        assert identical(a, b) and identical(a, c)


@pytest.mark.parametrize(("mask", "rank"), [("none", 0), ("causal", 3), ("padding", 0)])
def test_the_attention_operator_equals_the_python_path_and_the_eager_kernels(
    monkeypatch: pytest.MonkeyPatch, mask: str, rank: int
) -> None:
    """The attention operator (``torch.ops.dpc_fx.attention``, with its C++ autograd node)
    gives every output, gradient and running range that the Python path on the same loops
    gives, and the eager kernels, bit for bit: for inputs in every layout (a copy where
    one is not dense), grouped-query attention, each kind of mask, and a strided incoming
    gradient; under ``torch.distributed`` (rank 3) with the seeds offset."""
    _operator_equals_both_paths(monkeypatch, _Attention(mask), "attention", (6, 6, 8), rank, 1)


class _Products(nn.Module):
    """Attention written out as products of two activations, in the layouts the product
    operator meets: q and k as rows of one fused projection (dense in no order: copied), k
    transposed, the scores' softmax contiguous, and a value sliced from a wider projection;
    the product's output transposed before the last layer (its gradient strided)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.v, self.out = nn.Linear(16, 48), nn.Linear(16, 32), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, _ = self.qkv(x).view(b, t, 3, 4, 4).permute(2, 0, 3, 1, 4)
        v = self.v(x).view(b, t, 4, 8)[..., :4].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("rank", [0, 3])
def test_the_product_operator_equals_the_python_path_and_the_eager_kernels(
    monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    """The product operator (``torch.ops.dpc_fx.product``, a fused product of two
    activations with its C++ autograd node) gives every output, gradient and running range
    that the Python path on the same loops gives, and the eager kernels, bit for bit, for
    operands in every layout; under ``torch.distributed`` (rank 3) with the seeds offset."""
    _operator_equals_both_paths(monkeypatch, _Products(), "matmul", (6, 5, 8), rank, 2)


def _layer_op(x: Tensor, running: tuple[Tensor, Tensor, Tensor], weight_of_batch: float) -> Tensor:
    """A linear layer's step on the operator (4-bit input and weight, 8-bit gradient)."""
    w = torch.linspace(-1, 1, 3 * x.shape[1]).view(3, -1).requires_grad_()
    return torch.ops.dpc_fx.layer.default(  # type: ignore[no-any-return]
        x, w, None, 4, 4, 8, [], [], [], 1, *running, weight_of_batch, 0
    )


@given(
    st.floats(-1e6, 1e6, width=32),
    st.floats(0, 1e6, width=32),
    st.floats(-1e6, 1e6, width=32),
    st.floats(0, 1e6, width=32),
    st.floats(0.001, 0.999),
)
def test_the_operator_updates_the_running_range_as_foreach_lerp_does(
    lo: float, span: float, old_lo: float, old_span: float, weight: float
) -> None:
    """The layer operator writes the running range in place, without ATen ops: its values are
    ``torch._foreach_lerp_``'s bit for bit (a fused multiply-add, from ``self`` for a weight
    under a half and from ``end`` above), the first batch's range is copied, and each
    buffer's version moves as an in-place op's would. Buffers other than ActQuantizer's kind
    are refused with an error that says what it takes."""
    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    x = torch.tensor([[lo, lo + span], [lo, lo]], dtype=torch.float32)
    batch_lo, batch_hi = x.min(), x.max()
    running = (torch.tensor(old_lo), torch.tensor(old_lo + old_span), torch.tensor(False))
    versions = [t._version for t in running]
    _layer_op(x, running, weight)
    assert all(t._version > v for t, v in zip(running, versions, strict=True))
    assert running[2].item()
    assert torch.equal(running[0], batch_lo) and torch.equal(running[1], batch_hi)  # copied
    running[0].fill_(old_lo)  # seen: the next batch moves the range from here
    running[1].fill_(old_lo + old_span)
    want = [running[0].clone(), running[1].clone()]
    torch._foreach_lerp_(want, [batch_lo, batch_hi], weight)
    _layer_op(x, running, weight)
    assert torch.equal(running[0], want[0]) and torch.equal(running[1], want[1])
    doubles = (running[0].double(), running[1].double(), running[2])
    with pytest.raises(RuntimeError, match="float32 CPU tensors.*got Double"):
        _layer_op(x, doubles, weight)


def test_the_operators_seeds_are_torch_randints_draws() -> None:
    """The operator draws its stochastic rounding's seed from torch's default generator as
    ``kernels.new_seed`` does (``torch.randint``), without making a tensor: one draw a
    backward, and the same gradient as rounding with that seed."""
    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    x = torch.randn(64, 8)
    running = (torch.zeros(()), torch.zeros(()), torch.tensor(False))
    w = torch.linspace(-1, 1, 24).view(3, 8).requires_grad_()
    grad = torch.randn(64, 3)
    for seed in range(4):
        torch.manual_seed(seed)
        want_seed = int(kernels.new_seed())
        after = torch.rand(())  # where the generator stands after one draw
        torch.manual_seed(seed)
        w.grad = None
        y = torch.ops.dpc_fx.layer.default(x, w, None, 8, 8, 8, [], [], [], 1, *running, 0.1, 0)
        y.backward(grad)
        assert torch.equal(torch.rand(()), after)
        g_hat = native.stochastic(grad.reshape(-1), 8, want_seed).view(64, 3)
        assert identical(w.grad, g_hat.t().mm(fake_quantize(x, 8)))


class _SharedInput(nn.Module):
    """Layers reading one tensor: three projections of one input (as q, k and v), two
    convolutions of another, and a layer between that reads a tensor changed in place."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.a, self.b = nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(2, 3, 1)
        self.c = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(1, 2).reshape(-1, 8)  # (n*2, 8): 2 channels of 8 as rows
        y = self.q(h) + torch.cat([self.k(h), self.v(h)], 1)
        z = self.a(x) + self.b(x)  # (n, 3, 8)
        w = z.flatten(0, 1).clone()
        first = self.c(w)
        w.mul_(2)  # the same tensor, new values: quantised again
        return y.sum() + z.sum() + (first + self.c(w)).sum()


def test_layers_reading_one_tensor_share_its_codes_with_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Layers on the operator that read the same tensor at the same bits quantise it once
    and keep one set of codes between them; every output, gradient and running range is what
    quantising it per layer gives (the Python path, the eager kernels), bit for bit, and a
    tensor changed in place between two reads is quantised again."""
    import dpc_fx
    from dpc_fx import DPCConfig

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8)
    config = DPCConfig(b_min=6, b_max=6, pin_first_last=False)
    base = dpc_fx.compile(_SharedInput(), x, config=config)
    assert len({layer.act_q.bits for layer in base.dpc.children()}) == 1

    codes: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.dtype == torch.uint8:
            key = t.untyped_storage().data_ptr()
            codes[key] = codes.get(key, 0) + 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base.train()(x).backward()
    # q, k, v: one set; a, b: one set; c: one per read, as the values changed between.
    assert sorted(codes.values()) == [1, 1, 2, 3]
    with_ops, eager_run = _train_in_both_modes(monkeypatch, base, x, 2, lambda y: y)
    monkeypatch.setattr(native, "layers", lambda: False)
    python_path, _ = _train_in_both_modes(monkeypatch, base, x, 2, lambda y: y)
    for a, b, c in zip(with_ops, python_path, eager_run, strict=True):
        assert identical(a, b) and identical(a, c)


def test_where_a_compiler_is_found_the_layer_operator_builds() -> None:
    """The operator's tests skip where it cannot be built; where the native loops built (a
    C++ compiler is there), a failed operator build is a defect in ``csrc/layer.cpp`` or its
    flags, and fails here with the compiler's message rather than leaving those tests to
    skip."""
    assert native.layers(), f"the layer operator did not build: {native.unavailable()}"


def test_a_failed_operator_build_warns_once_and_the_layers_still_train(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(native, "_state", {"lib": native.library()})
    monkeypatch.setattr(native, "_registered", lambda: False)
    monkeypatch.setenv("DPC_FX_CACHE", str(tmp_path))
    broken = lambda: ((*native._FLAGS, "-DNO_SUCH_HEADER", "-include", "no-such.h"), ())  # noqa: E731
    monkeypatch.setattr(native, "_torch_flags", broken)
    with pytest.warns(UserWarning, match="operator is unavailable"):
        assert native.layers() is False
    assert "no-such.h" in (native.unavailable() or "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.layers() is False  # once
    import dpc_fx
    from dpc_fx import DPCConfig

    torch.manual_seed(0)
    x = torch.randn(4, 2, 16)
    gm = dpc_fx.compile(_Layers(), x, config=DPCConfig(pin_first_last=False)).train()
    gm(x).sum().backward()
    assert all(p.grad is not None for p in gm.parameters())


def test_under_torch_compile_the_layers_run_the_operator_with_eager_numbers() -> None:
    """Under ``torch.compile`` a layer's step is the operator's two halves
    (``layer_forward``, ``layer_backward``), opaque calls between inductor's kernels: a
    compiled step gives the eager operator's outputs, gradients and running ranges bit for
    bit, and runs no quantiser of inductor's."""
    import dpc_fx
    from dpc_fx import DPCConfig

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv1d(6, 4, 3, groups=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip
    x = torch.randn(48, 2, 16)  # (its ReLUs' outputs: 48x6x8 and 48x4x6 elements)
    eager = dpc_fx.compile(model, x, config=DPCConfig(pin_first_last=False)).train()
    twin = copy.deepcopy(eager)
    fast = torch.compile(twin)
    for step in range(2):
        torch.manual_seed(step)
        y_eager = eager(x)
        y_eager.square().sum().backward()
        torch.manual_seed(step)
        with torch.profiler.profile() as prof:
            y_fast = fast(x)
            y_fast.square().sum().backward()
        assert identical(y_eager, y_fast)
    ran = [e.name for e in prof.events()]
    assert ran.count("dpc_fx::layer_forward") == ran.count("dpc_fx::layer_backward") == 3
    # Both ReLUs feed fused layers only (the second through a flatten): they keep bits.
    assert ran.count("dpc_fx::relu_forward") == ran.count("dpc_fx::relu_backward") == 2
    for (name, a), (_, b) in zip(eager.named_parameters(), twin.named_parameters(), strict=True):
        assert a.grad is not None and identical(a.grad, b.grad), name
    for (name, a), (_, b) in zip(eager.named_buffers(), twin.named_buffers(), strict=True):
        assert identical(a, b), name


def test_the_compiled_halves_share_no_input_between_calls() -> None:
    """Inductor reuses a dead buffer for new values, written without moving its version
    counter: ``layer_forward`` quantises whatever it is given, every call (a buffer rewritten
    behind autograd's back, here through numpy, gets its own codes)."""
    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(3, 8)

    def forward() -> list[Tensor]:
        out = torch.ops.dpc_fx.layer_forward.default(x, w, None, 6, 6, [1], [0], [1], 1, 8, 0)
        return [t.clone() for t in out]

    first = forward()
    x.numpy()[:] = 2 * x.numpy()  # new values, the same storage, place and version
    second = forward()
    assert not torch.equal(first[0], second[0]) and float(second[3]) == 2 * float(first[3])
