"""The lower pass: 8-bit linear layers on torch._int_mm, matching the simulated graph.

Tolerance: every quantised value (codes, scales, offsets) is the same in both graphs, and
both draw the same stochastic-rounding noise; they differ only in how sums are rounded
(exact int32 products plus fp32 corrections against fp32 products of dequantised values),
about 1e-6 relative per layer. In backward such a difference can move an element of the next
layer's incoming gradient across a rounding boundary, changing it by one gradient step
(range / 255), so gradients are compared to within a few steps of their range.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import assigned as assign
from helpers import fit, reloaded
from torch import nn

import dpc_fx
from dpc_fx import DPCConfig
from dpc_fx.int8 import Int8Linear
from dpc_fx.passes import capacity, lower, rewrite, trace
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer

LOWER = DPCConfig(b_min=8, b_max=8, grad_bits=8, lower=True, pin_first_last=False)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32), nn.GELU(), nn.Linear(32, 10)
    )


def simulated_and_lowered(model: nn.Module, x: torch.Tensor, config: DPCConfig = LOWER):
    sim = rewrite(assign(capacity(trace(model), x), config))
    return sim, lower(sim)


def grads(
    model: nn.Module, gm: nn.Module, x: torch.Tensor, seed: int = 5
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)
    y = gm(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def test_lowered_graph_structure() -> None:
    model = mlp()
    x = torch.randn(4, 7, 32)
    sim, low = simulated_and_lowered(model, x)
    fused = [
        n
        for n in low.graph.nodes
        if n.op == "call_module" and isinstance(low.get_submodule(n.target), Int8Linear)
    ]
    assert len(fused) == 3
    quantisers = [
        n
        for n in low.graph.nodes
        if n.op == "call_module" and str(n.target).startswith("dpc.") and n not in fused
    ]
    assert quantisers == []
    assert all(m.lowered for m in dpc_fx.layers(low))
    assert not any(m.lowered for m in dpc_fx.layers(sim))
    assert list(dpc_fx.model_state_dict(low)) == list(model.state_dict())
    assert "linear" in sim.code and "linear" not in low.code  # the input module is left alone


def test_lowered_matches_simulated_forward_and_backward() -> None:
    model = mlp()
    x = torch.randn(16, 32)
    sim, low = simulated_and_lowered(model, x)
    y_sim, g_sim = grads(model, sim, x)
    y_low, g_low = grads(model, low, x)
    assert torch.allclose(y_low, y_sim, rtol=0, atol=1e-5 * float(y_sim.abs().max()))
    for a, b in zip(g_sim, g_low, strict=True):
        assert torch.allclose(b, a, rtol=0, atol=3 / 255 * float(a.abs().max())), (
            (a - b).abs().max()
        )


def test_lowered_trains_like_simulated() -> None:
    x, target = torch.randn(64, 32), torch.randint(0, 10, (64,))
    curves = []
    for lowered in (False, True):
        model = mlp()
        gm = dpc_fx.compile(model, x, config=LOWER.replace(lower=lowered))
        opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
        torch.manual_seed(0)
        curves.append(fit(gm, x, target, nn.functional.cross_entropy, opt, steps=40))
    sim, low = curves
    assert low[-1] < 0.5 * low[0]
    assert abs(low[-1] - sim[-1]) < 0.05 * sim[0]


def test_only_8bit_linears_are_lowered() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    x = torch.randn(3, 2, 8)
    config = DPCConfig(pin_first_last=False, lower=True, overrides={"4": 12, "2": 8, "0": 8})
    gm = dpc_fx.compile(model, x, config=config)
    lowered = {m.layer: m.lowered for m in dpc_fx.layers(gm)}
    assert lowered == {"0": False, "2": True, "4": False}  # conv, 8-bit linear, 12-bit linear


def test_schedule_above_8_bits_falls_back_to_simulation() -> None:
    model = mlp()
    x = torch.randn(8, 32)
    _, low = simulated_and_lowered(model, x)
    layer = low.dpc.get_submodule("_2")
    layer.act_q.bits = 10
    y = low(x)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert low.dpc.get_submodule("_0").act_q.observed


def test_lowered_module_saves_and_loads() -> None:
    model = mlp()
    x = torch.randn(8, 32)
    gm = dpc_fx.compile(model, x, config=LOWER)
    gm.train()
    gm(x)
    gm.eval()
    loaded = reloaded(gm)
    assert torch.equal(loaded(x), gm(x))
    assert dpc_fx.plan_of(loaded) == dpc_fx.plan_of(gm)
    assert torch.equal(copy.deepcopy(gm)(x), gm(x))


def test_lowered_eval_uses_running_range() -> None:
    model = mlp()
    x = torch.randn(8, 32)
    gm = dpc_fx.compile(model, x, config=LOWER)
    gm(x * 10)  # training step: the running range follows the batch
    gm.eval()
    act = gm.dpc.get_submodule("_0").act_q
    assert act.observed and float(act.running_max) > 5
    out = gm(x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_narrow_bit_widths_lower_exactly_too(bits: int) -> None:
    model = mlp()
    x = torch.randn(16, 32)
    config = LOWER.replace(b_min=bits, b_max=bits, grad_bits=bits)
    sim, low = simulated_and_lowered(model, x, config)
    y_sim, _ = grads(model, sim, x)
    y_low, _ = grads(model, low, x)
    assert torch.allclose(y_low, y_sim, rtol=0, atol=1e-5 * float(y_sim.abs().max()))


@pytest.mark.parametrize("bits", [4, 7, 8])
def test_the_u8s8_kernel_gives_the_int_mm_products_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    """Where oneDNN's u8 x s8 kernel is exact at a width (here: 7 bits or fewer on a CPU
    without VNNI), a lowered layer runs its three products on it, and every output and
    gradient equals the ``torch._int_mm`` path's, bit for bit; where it is not, it is not
    used."""
    from dpc_fx import int8

    model = mlp()
    x = torch.randn(16, 32)
    config = LOWER.replace(b_min=bits, b_max=bits, grad_bits=8)
    _, low = simulated_and_lowered(model, x, config)
    exact = int8._u8s8_exact(bits)  # asked once, before the count
    calls: list[int] = []
    product = int8._u8s8_product
    monkeypatch.setattr(int8, "_u8s8_product", lambda *a: calls.append(1) or product(*a))
    y_u8s8, g_u8s8 = grads(model, low, x)
    assert len(calls) == (9 if exact else 0)  # 3 layers x 3 products
    monkeypatch.setattr(int8, "_u8s8_exact", lambda b: False)
    y_int_mm, g_int_mm = grads(model, low, x)
    assert torch.equal(y_u8s8, y_int_mm)
    assert all(torch.equal(a, b) for a, b in zip(g_u8s8, g_int_mm, strict=True))


@pytest.mark.parametrize("bits", [4, 7, 8])
def test_the_native_codes_give_the_torch_kernels_steps_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    """A lowered layer's codes (input, weight, and the gradient's stochastic ones) come from
    the native loops where they can; every output and gradient equals the compiled torch
    kernels', bit for bit, the stochastic rounding's noise included."""
    from dpc_fx import int8, native

    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable()}")
    model = mlp()
    x = torch.randn(16, 32)
    config = LOWER.replace(b_min=bits, b_max=bits, grad_bits=bits)
    _, low = simulated_and_lowered(model, x, config)
    calls: list[str] = []
    for name in ("int8_codes", "int8_stochastic"):
        fn = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, n=name, f=fn: calls.append(n) or f(*a))
    y_native, g_native = grads(model, low, x)
    # 3 layers: the input's codes, the weight's, the weight's again; the gradient's
    assert sorted(calls) == ["int8_codes"] * 9 + ["int8_stochastic"] * 3
    monkeypatch.setattr(int8, "_native", lambda x: False)
    y_torch, g_torch = grads(model, low, x)
    assert torch.equal(y_native, y_torch)
    assert all(torch.equal(a, b) for a, b in zip(g_native, g_torch, strict=True))


def test_the_u8s8_kernel_is_asked_whether_it_is_exact_on_the_overflowing_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel that sums pairs of products in 16 bits (saturating) fails the probe at
    8 bits and passes it at 7: the probe holds the products that overflow first."""
    from dpc_fx import int8

    def saturating(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        ua = qa.to(torch.int32) + 128
        pairs = (ua[:, 0::2, None] * qb[0::2].to(torch.int32)) + (
            ua[:, 1::2, None] * qb[1::2].to(torch.int32)
        )
        pairs = pairs.clamp(-32768, 32767) - 128 * (qb[0::2] + qb[1::2]).to(torch.int32)
        return pairs.sum(1).float()

    monkeypatch.setattr(int8, "_U8S8", {})
    monkeypatch.setattr(int8, "_u8s8_product", saturating)
    assert not int8._u8s8_exact(8)
    assert int8._u8s8_exact(7)


def int8_layer(bits: int = 8) -> Int8Linear:
    return Int8Linear(ActQuantizer(bits), WeightQuantizer(bits, None), GradQuantizer(bits))


def layer_step(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seed: int = 3
) -> list[torch.Tensor]:
    """Output, dx, dw and db of one step of ``layer``, with seeded gradient rounding."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = layer(x, weight, bias)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    assert x.grad is not None and weight.grad is not None and bias.grad is not None
    return [y.detach(), x.grad, weight.grad, bias.grad]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bad_weight", [False, True], ids=["finite", "inf-weight"])
def test_a_parameter_weight_requantised_in_backward_gives_the_same_bits(
    bits: int, bad_weight: bool
) -> None:
    """A parameter weight is quantised again in backward; a plain tensor keeps its codes
    from forward. Both must give the same output and gradients, bit for bit (``nan`` where
    an ``inf`` in the weight spoils them, in the same places)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 40), torch.randn(24, 40), torch.randn(24)
    if bad_weight:
        w[7, 3] = float("inf")
    param = nn.Parameter(w.clone())
    plain = w.clone().requires_grad_()
    bias_a, bias_b = nn.Parameter(b.clone()), nn.Parameter(b.clone())
    kept = layer_step(int8_layer(bits), x, plain, bias_a)
    again = layer_step(int8_layer(bits), x, param, bias_b)
    for name, a, r in zip(["y", "dx", "dw", "db"], kept, again, strict=True):
        torch.testing.assert_close(r, a, rtol=0, atol=0, equal_nan=True, msg=name)
    # The inf spoils its output column and all of dx, and nothing else.
    assert kept[0][..., 7].isnan().all() == bad_weight and kept[1].isnan().all() == bad_weight
    assert kept[0][..., :7].isfinite().all() and kept[2].isfinite().all()


def kept_by(fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """The tensors autograd keeps for backward while ``fn`` runs."""
    kept: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return kept


def test_a_lowered_layer_keeps_input_codes_and_the_parameter_not_weight_codes() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 40, requires_grad=True)
    weight, bias = nn.Parameter(torch.randn(24, 40)), nn.Parameter(torch.randn(24))
    layer = int8_layer()
    kept = kept_by(lambda: layer(x, weight, bias))
    int8 = [t for t in kept if t.dtype == torch.int8]
    assert [t.shape for t in int8] == [x.shape]  # the input's codes, no weight codes
    # Apart from the parameter itself (kept anyway), floats are only the 0-d scales and
    # offsets: no float copy of the input or the weight.
    floats = [t for t in kept if t.is_floating_point() and t is not weight]
    assert all(t.dim() == 0 for t in floats), [(t.dtype, t.shape) for t in floats]
    assert any(t is weight for t in kept)

    # The check can fail: a weight that is not a parameter is kept as its int8 codes.
    plain = weight.detach().clone().requires_grad_()
    kept = kept_by(lambda: layer(x, plain, bias))
    assert sorted(t.shape for t in kept if t.dtype == torch.int8) == [plain.shape, x.shape]


def test_a_lowered_model_keeps_no_int8_copy_of_its_weights() -> None:
    model = mlp()
    x = torch.randn(16, 32)
    _, low = simulated_and_lowered(model, x)
    kept = kept_by(lambda: low(x))
    weights = {p.shape for name, p in model.named_parameters() if name.endswith("weight")}
    int8 = [t.shape for t in kept if t.dtype == torch.int8]
    assert int8 == [torch.Size([16, 32]), torch.Size([16, 96]), torch.Size([16, 32])]
    assert not weights & set(int8)


def test_a_lowered_model_compiles_whole_with_the_eager_forward() -> None:
    """Under ``torch.compile`` the lowered layers trace (``torch._int_mm``, no branch on
    values): no graph break, and the eager forward, which runs the u8 x s8 kernel where it
    is exact, bit for bit (two linear layers and nothing between: no op of inductor's own)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 10))
    x = torch.randn(16, 32)
    gm = dpc_fx.compile(model, x, config=LOWER.replace(b_min=7, b_max=7))
    explained = torch._dynamo.explain(copy.deepcopy(gm))(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    eager = gm(x)
    assert torch.equal(torch.compile(copy.deepcopy(gm))(x), eager)
