"""The quantisers: levels, error bounds, rounding, ranges, degenerate tensors, eval mode.

PyTorch is the reference where it has one (``torch.fake_quantize_per_tensor_affine``
rounds the same way on a shared grid); elsewhere the bounds come from the definition.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import examples, reloaded
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import (
    SPECIAL_KINDS,
    bits,
    float_tensors,
    random_tensors,
    shapes,
    special_tensor,
    special_tensors,
)
from torch import Tensor

from dpc_fx.quant import (
    ActQuantizer,
    GradQuantizer,
    Quantizer,
    WeightQuantizer,
    fake_quantize,
    tensor_range,
)

EPS = torch.finfo(torch.float32).eps


def tolerance(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Float slack for ``q * scale + lo``: a little of the range plus a few ulps of ``x``."""
    return 1e-6 * (hi - lo) + 4 * EPS * torch.maximum(lo.abs(), hi.abs())


def check_levels_and_error(x: Tensor, xq: Tensor, b: int, channel_dim: int | None) -> None:
    """At most 2**b distinct values per channel (or per tensor), each within half a step."""
    if channel_dim is None:
        slices = [(x.reshape(-1), xq.reshape(-1))]
    else:
        xs, qs = x.movedim(channel_dim, 0), xq.movedim(channel_dim, 0)
        slices = [(xs[i].reshape(-1), qs[i].reshape(-1)) for i in range(xs.shape[0])]
    for xc, qc in slices:
        lo, hi = xc.min(), xc.max()
        step = (hi - lo) / (2**b - 1)
        assert qc.unique().numel() <= 2**b
        assert (qc >= lo - tolerance(xc, lo, hi)).all() and (qc <= hi + tolerance(xc, lo, hi)).all()
        err = (qc - xc).abs().max()
        assert err <= step / 2 + tolerance(xc, lo, hi), (err, step)


# ---------------------------------------------------------------------- fake_quantize


def test_docstring_example() -> None:
    x = torch.tensor([0.0, 0.1, 0.52, 1.0])
    assert torch.allclose(fake_quantize(x, 2), torch.tensor([0.0, 0.0, 2 / 3, 1.0]))


@examples(150)
@given(x=float_tensors() | random_tensors(), b=bits())
def test_per_tensor_levels_and_half_step_error(x: Tensor, b: int) -> None:
    xq = fake_quantize(x, b)
    assert xq.shape == x.shape and xq.dtype == x.dtype
    check_levels_and_error(x, xq, b, None)


@examples(100)
@given(x=float_tensors(min_dims=2) | random_tensors(min_dims=2), b=bits(), data=st.data())
def test_per_channel_levels_and_half_step_error(x: Tensor, b: int, data: st.DataObject) -> None:
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1), label="channel_dim")
    check_levels_and_error(x, fake_quantize(x, b, channel_dim=dim), b, dim)


@examples(60)
@given(x=random_tensors(min_dims=2), b=bits(lo=2, hi=8))
def test_matches_torch_fake_quantize_per_channel(x: Tensor, b: int) -> None:
    """Same grid as torch's affine fake-quantise with scale = range / levels, zero point
    lo / scale (when that is an integer the two grids coincide exactly)."""
    lo, hi = tensor_range(x, 0)
    levels = 2**b - 1
    scale = ((hi - lo) / levels).reshape(-1)
    assume(bool((scale > 0).all()))  # constant channels are checked elsewhere
    # Shift x so that lo sits on an integer multiple of the scale: zero point 0.
    shifted = x - lo
    ref = torch.fake_quantize_per_channel_affine(
        shifted, scale, torch.zeros_like(scale, dtype=torch.int32), 0, 0, levels
    )
    ours = fake_quantize(x, b, channel_dim=0) - lo
    step = scale.view(-1, *[1] * (x.dim() - 1))
    # torch multiplies by 1/scale where we divide: only ties may round differently.
    position = shifted / step
    clear = ((position - position.floor()) - 0.5).abs() > 1e-3
    tol = 1e-5 * float((hi - lo).max())
    assert ((ours - ref).abs() <= tol)[clear].all()
    assert ((ours - ref).abs() <= step + tol).all()


def test_one_bit_uses_the_two_ends() -> None:
    x = torch.tensor([-1.0, 0.9, 1.1, 3.0])  # the threshold is the middle, 1.0
    assert fake_quantize(x, 1).tolist() == [-1.0, -1.0, 3.0, 3.0]


@examples(50)
@given(x=random_tensors(), b=bits())
def test_given_range_clamps(x: Tensor, b: int) -> None:
    lo, hi = torch.tensor(-0.5), torch.tensor(0.5)
    xq = fake_quantize(x, b, lo, hi)
    assert (xq >= lo).all() and (xq <= hi + 1e-6).all()
    inside = (x >= lo) & (x <= hi)
    assert ((xq - x).abs()[inside] <= (hi - lo) / (2**b - 1) / 2 + 1e-6).all()


def test_a_zero_width_given_range_clamps_too() -> None:
    x = torch.tensor([3.5, 4.0, 5.7, 10.0, -2.0])
    assert torch.equal(
        fake_quantize(x, 4, torch.tensor(3.5), torch.tensor(3.5)), torch.full_like(x, 3.5)
    )


def test_eval_after_constant_training_batches_stays_in_the_running_range() -> None:
    q = ActQuantizer(4).train()
    q(torch.zeros(2, 3))
    q.eval()
    y = q(torch.tensor([0.0, 0.4, 0.6, 3.2, 100.0]))
    assert (y >= q.running_min).all() and (y <= q.running_max).all()


# ------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased() -> None:
    torch.manual_seed(0)
    b, draws = 3, 4000
    # The per-tensor range is [0, 7], so the grid is the integers; the rest sit between.
    x = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 3.3, 6.75, 7.0])
    samples = fake_quantize(x.expand(draws, -1).contiguous(), b, stochastic=True)
    assert set(samples.unique().tolist()) <= set(range(8))
    frac = x - x.floor()
    std = (frac * (1 - frac)).sqrt()  # per element, in units of one step
    mean_err = (samples - x).mean(dim=0)
    assert (mean_err.abs() <= 5 * std / draws**0.5 + 1e-6).all(), mean_err
    # Not nearest rounding: 0.25 goes up about a quarter of the time.
    assert 0.2 < (samples[:, 2] == 1).float().mean() < 0.3
    # Only the two neighbouring levels are ever used.
    assert ((samples - x).abs() < 1).all()


def test_grad_quantizer_backward_is_unbiased_and_forward_is_identity() -> None:
    torch.manual_seed(1)
    b, draws = 2, 3000
    g = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.1, 3.0])  # levels 0, 1, 2, 3
    q = GradQuantizer(b)
    x = torch.randn(6, requires_grad=True)
    y = q(x)
    assert torch.equal(y, x)
    seen = []
    for _ in range(draws):
        x.grad = None
        q(x).backward(g)
        assert x.grad is not None
        seen.append(x.grad.clone())
    grads = torch.stack(seen)
    assert set(grads.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    frac = g - g.floor()
    bound = 5 * (frac * (1 - frac)).sqrt() / draws**0.5 + 1e-6
    assert ((grads.mean(0) - g).abs() <= bound).all(), grads.mean(0) - g
    assert grads[:, 1].std() > 0, "stochastic, not nearest"


def test_stochastic_rounding_is_reproducible_under_manual_seed() -> None:
    g = torch.linspace(-1, 1, 101)

    def grad(seed: int) -> Tensor:
        torch.manual_seed(seed)
        x = torch.zeros(101, requires_grad=True)
        GradQuantizer(3)(x).backward(g)
        assert x.grad is not None
        return x.grad

    assert torch.equal(grad(0), grad(0))
    assert not torch.equal(grad(0), grad(1))


@examples(40)
@given(x=random_tensors(), b=bits())
def test_stochastic_rounding_stays_within_one_step(x: Tensor, b: int) -> None:
    xq = fake_quantize(x, b, stochastic=True)
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (2**b - 1)
    assert xq.unique().numel() <= 2**b
    assert ((xq - x).abs() <= step + tolerance(x, lo, hi)).all()


# ------------------------------------------------------------------------ the modules


@examples(60)
@given(w=float_tensors(min_dims=2, max_dims=4) | random_tensors(min_dims=2), b=bits())
def test_weight_quantizer_per_output_channel(w: Tensor, b: int) -> None:
    w = w.requires_grad_(True)
    wq = WeightQuantizer(b)(w)
    check_levels_and_error(w.detach(), wq.detach(), b, 0)
    g = torch.randn_like(w)
    wq.backward(g)
    assert torch.equal(w.grad, g), "straight-through estimator"


@examples(60)
@given(x=float_tensors() | random_tensors(), b=bits())
def test_act_quantizer_per_tensor_in_training(x: Tensor, b: int) -> None:
    q = ActQuantizer(b).train()
    x = x.requires_grad_(True)
    xq = q(x)
    check_levels_and_error(x.detach(), xq.detach(), b, None)
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert q.running_min == x.min() and q.running_max == x.max()


@pytest.mark.parametrize("cls", [ActQuantizer, WeightQuantizer, GradQuantizer])
@pytest.mark.parametrize("off", [None, 32])
def test_bits_none_or_32_is_the_identity(cls: type[Quantizer], off: int | None) -> None:
    q = cls(4)
    x = torch.randn(3, 5, requires_grad=True)
    assert not torch.equal(q(x), x) or cls is GradQuantizer
    q.bits = off
    assert not q.active
    assert q(x) is x


def test_bits_can_change_between_steps() -> None:
    q = WeightQuantizer(8)
    w = torch.randn(4, 16)
    fine = q(w).unique().numel()
    q.bits = 1
    assert q(w).unique().numel() <= 2 * 4 < fine
    assert "bits=1" in repr(q) and "channel_dim=0" in repr(q)


def test_grad_quantizer_output_can_be_modified_in_place() -> None:
    """The quantised gradient is that of the value the quantiser saw: an in-place ReLU on
    its output gives what an out-of-place one gives (same seed, same rounding)."""
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    got = []
    for relu in (torch.relu_, torch.relu):
        x.grad = None
        torch.manual_seed(0)
        (relu(GradQuantizer(2)(x * 1)) * w).sum().backward()
        assert x.grad is not None
        got.append(x.grad)
    assert torch.equal(got[0], got[1])
    assert got[0].unique().numel() <= 4  # 2 bits: it was quantised


# -------------------------------------------------------------------- degenerate tensors


def run_role(role: str, x: Tensor, b: int, *, training: bool = True) -> tuple[Tensor, Tensor]:
    """Forward and backward of one quantiser role; for the gradient role the special
    tensor is the incoming gradient."""
    x = x.clone()
    if role == "grad":
        leaf = torch.randn(x.shape, requires_grad=True)
        y = GradQuantizer(b)(leaf)
        y.backward(x)
        return y.detach(), leaf.grad
    leaf = x.requires_grad_(True)
    q = ActQuantizer(b) if role == "act" else WeightQuantizer(b)
    q.train(training)
    y = q(leaf)
    upstream = torch.ones_like(y)
    y.backward(upstream)
    return y.detach(), leaf.grad


@examples(120)
@given(
    x=special_tensors(),
    b=bits(),
    role=st.sampled_from(["act", "weight", "grad"]),
    training=st.booleans(),
)
def test_degenerate_tensors_keep_their_non_finite_values_in_place(
    x: Tensor, b: int, role: str, training: bool
) -> None:
    y, g = run_role(role, x, b, training=training)
    assert g is not None and g.shape == x.shape
    quantised = g if role == "grad" else y
    finite = torch.isfinite(x)
    # Infinities and nan pass through where they were (an overflow stays visible, as in
    # the unquantised layer) and do not spread to the other elements.
    assert torch.isfinite(quantised[finite]).all(), (x, quantised)
    assert torch.equal(quantised[~finite].nan_to_num(), x[~finite].nan_to_num())
    other = y if role == "grad" else g
    assert torch.isfinite(other).all()


@pytest.mark.parametrize("role", ["act", "weight", "grad"])
@pytest.mark.parametrize("kind", ["zeros", "constant"])
def test_constant_tensors_come_back_unchanged(role: str, kind: str) -> None:
    x = special_tensor(kind, (3, 4), value=-2.5)
    y, g = run_role(role, x, 4)
    assert torch.equal(g if role == "grad" else y, x)


def test_infinities_pass_through_and_the_range_is_the_finite_values() -> None:
    x = torch.tensor([0.0, 1.0, float("inf"), float("-inf"), 3.0])
    assert fake_quantize(x, 2).tolist() == [0.0, 1.0, float("inf"), float("-inf"), 3.0]
    lo, hi = tensor_range(torch.tensor([[1.0, float("nan")], [float("inf"), float("-inf")]]), 0)
    assert lo.tolist() == [[1.0], [0.0]] and hi.tolist() == [[1.0], [0.0]]


@pytest.mark.parametrize("role", ["act", "weight", "grad"])
@pytest.mark.parametrize("shape", [(0, 4), (0, 3, 5, 5), (4, 0)])
def test_empty_tensors_pass(role: str, shape: tuple[int, ...]) -> None:
    y, g = run_role(role, torch.empty(shape), 4)
    assert y.shape == shape and g.shape == shape


def test_act_quantizer_ignores_empty_batches_for_its_running_range() -> None:
    q = ActQuantizer(4).train()
    q(torch.empty(0, 3))
    assert not q.observed


# ------------------------------------------------------------------------- eval mode


def test_eval_before_any_training_step_uses_the_batch_range() -> None:
    q = ActQuantizer(3).eval()
    x = torch.linspace(-2, 5, 50)
    assert torch.equal(q(x), fake_quantize(x, 3))
    assert not q.observed


def test_eval_after_training_uses_the_running_range() -> None:
    q = ActQuantizer(4)
    q.train()
    q(torch.tensor([0.0, 1.0]))  # first batch: the running range is the batch's
    q(torch.tensor([-1.0, 3.0]))  # then 0.9 * running + 0.1 * batch
    assert q.running_min.item() == pytest.approx(-0.1)
    assert q.running_max.item() == pytest.approx(1.2)
    q.eval()
    x = torch.linspace(-4, 4, 33)
    y = q(x)
    assert torch.equal(y, fake_quantize(x, 4, q.running_min, q.running_max))
    assert y.min().item() == pytest.approx(-0.1) and y.max().item() == pytest.approx(1.2)
    # Eval does not move the running range.
    q(torch.full((3,), 100.0))
    assert q.running_max.item() == pytest.approx(1.2)


def test_running_range_survives_copy_pickle_and_state_dict() -> None:
    q = ActQuantizer(4).train()
    q(torch.tensor([-2.0, 6.0]))
    q.eval()
    x = torch.linspace(-8, 8, 17)
    for other in (copy.deepcopy(q), reloaded(q)):
        assert torch.equal(other(x), q(x))
    assert list(q.state_dict()) == ["running_min", "running_max", "seen"]
    fresh = ActQuantizer(4).eval()
    fresh.load_state_dict(q.state_dict())
    assert fresh.observed and torch.equal(fresh(x), q(x))


@examples(30)
@given(shape=shapes(min_dims=2, max_dims=3), kind=st.sampled_from(SPECIAL_KINDS))
def test_act_quantizer_eval_after_degenerate_training_batch(
    shape: tuple[int, ...], kind: str
) -> None:
    q = ActQuantizer(4).train()
    q(special_tensor(kind, shape))  # type: ignore[arg-type]
    q.eval()
    y = q(torch.randn(shape))
    assert torch.isfinite(y).all()
    assert torch.isfinite(q.running_min) and torch.isfinite(q.running_max)


# ------------------------------------------------------------------ the fused kernels


def both_modes(monkeypatch: pytest.MonkeyPatch, fn) -> tuple[Tensor, Tensor]:
    """``fn()`` with the compiled kernels and with the eager ones, from the same seed."""
    out = []
    for mode in ("fused", "eager"):
        monkeypatch.setenv("DPC_FX_KERNELS", mode)
        torch.manual_seed(5)
        out.append(fn())
    return out[0], out[1]


@pytest.mark.usefixtures("fused_kernels")
def test_fused_kernels_match_the_eager_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * 4 + 1
    w[2] = 0.5  # a constant channel
    w[4, 0, 0, 0] = float("inf")
    for fn in (
        lambda: fake_quantize(w, 4, channel_dim=0),
        lambda: fake_quantize(w, 3),
        lambda: fake_quantize(w, 5, stochastic=True),
    ):
        fused, eager = both_modes(monkeypatch, fn)
        assert torch.allclose(fused, eager, atol=1e-5, rtol=0), (fused - eager).abs().max()


@pytest.mark.usefixtures("fused_kernels")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_training_act_quantiser_is_quantising_over_the_batch_range(layout: str) -> None:
    """In training the range is measured inside the quantising kernel: the same values, bit
    for bit, as measuring it first and quantising over it, in any memory layout."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, 5, 7) * 3 + 1
    x = {
        "contiguous": x,
        "channels_last": x.to(memory_format=torch.channels_last),
        "transposed": x.transpose(1, 3),
    }[layout]
    q = ActQuantizer(5).train()
    out = q(x)
    lo, hi = tensor_range(x)
    assert out.shape == x.shape
    assert torch.equal(out, fake_quantize(x, 5, lo, hi))
    assert q.running_min == lo and q.running_max == hi


def _strided_inputs() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "channels_last": torch.randn(2, 4, 3, 3, generator=g).to(memory_format=torch.channels_last),
        "transposed": torch.randn(2, 4, 3, 3, generator=g).transpose(1, 3),
        # max-pooling a channels-last map down to 1x1: contiguous and channels-last at
        # once, and a convolution reads the strides as channels-last
        "pooled to 1x1": F.max_pool2d(
            torch.randn(2, 2, 2, 2, generator=g).to(memory_format=torch.channels_last), 2
        ),
    }


@pytest.mark.parametrize("layout", list(_strided_inputs()))
def test_quantisers_keep_the_strides_of_a_dense_input(layout: str) -> None:
    """An elementwise torch op keeps a dense input's strides, and so do the quantisers: the
    convolution after one picks its algorithm, and so its summation order, from them."""
    x = _strided_inputs()[layout]
    lo, hi = tensor_range(x)
    outputs = {
        "measured": fake_quantize(x, 3),
        "given range": fake_quantize(x, 3, lo, hi),
        "stochastic": fake_quantize(x, 3, stochastic=True),
        "training": ActQuantizer(3).train()(x),
        "eval": ActQuantizer(3).eval()(x),
    }
    for name, out in outputs.items():
        assert out.stride() == (x * 2).stride() == x.stride(), name
    assert torch.equal(outputs["measured"], fake_quantize(x.contiguous(), 3, lo, hi))


def test_quantisers_give_a_view_dense_in_no_order_back_contiguous() -> None:
    """A view that no order of its dimensions makes dense (the query heads of a fused qkv
    projection) is copied to be quantised; what comes back is contiguous, so the product
    after it reads it without another copy, forward and backward. The values are those of
    the contiguous copy's."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3, 4, 8, generator=g).permute(2, 0, 3, 1, 4)
    x = qkv[0]  # (2, 4, 5, 8), rows 3x apart
    assert not x.is_contiguous() and not x.transpose(1, 2).is_contiguous()
    lo, hi = tensor_range(x)
    outputs = {
        "measured": fake_quantize(x, 3),
        "stochastic": fake_quantize(x, 3, stochastic=True),
        "training": ActQuantizer(3).train()(x),
    }
    for name, out in outputs.items():
        assert out.is_contiguous(), name
    assert torch.equal(outputs["measured"], fake_quantize(x.contiguous(), 3, lo, hi))


@pytest.mark.usefixtures("fused_kernels")
def test_fused_weight_quantiser_handles_every_layer_kind() -> None:
    """Weights of every layer kind through the compiled kernels: nine (rank, channel_dim)
    variants, one more than dynamo's default recompile limit."""
    weights = [
        ((8, 4), 0),  # Linear
        ((8, 4, 3), 0),  # Conv1d
        ((8, 4, 3, 3), 0),  # Conv2d
        ((8, 4, 3, 3, 3), 0),  # Conv3d
        ((4, 8, 3), 1),  # ConvTranspose1d
        ((4, 8, 3, 3), 1),  # ConvTranspose2d
        ((4, 8, 3, 3, 3), 1),  # ConvTranspose3d
        ((4, 8), -1),  # x @ w
        ((2, 4, 8), -1),  # a batched weight
    ]
    for shape, dim in weights:
        w = torch.randn(shape)
        check_levels_and_error(w, WeightQuantizer(4, dim)(w), 4, dim)
