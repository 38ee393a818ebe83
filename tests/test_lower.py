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

import pytest
import torch
from helpers import assigned as assign
from helpers import fit, reloaded
from torch import nn

import dpc_fx
from dpc_fx import DPCConfig
from dpc_fx.int8 import Int8Linear
from dpc_fx.passes import capacity, lower, rewrite, trace

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
