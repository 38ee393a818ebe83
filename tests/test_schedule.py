"""CPT's cyclic precision on top of DPC: bits change between steps, the graph does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import mlp

import dpc_fx
from dpc_fx import CyclicSchedule, DPCConfig


def compiled() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = mlp(16, 64, 64, 8, 4)
    return dpc_fx.compile(model, torch.randn(4, 16))


def test_base_rises_over_each_cycle() -> None:
    sched = CyclicSchedule(compiled(), low=3, high=8, period=10)
    bases = [sched.base(t) for t in range(20)]
    assert bases[0] == 3 and bases[10] == 3
    assert bases[:10] == sorted(bases[:10]) and max(bases) == 8


def test_schedule_keeps_dpc_offsets() -> None:
    gm = compiled()
    planned = [m.bits.w for m in dpc_fx.layers(gm) if m.bits and m.bits.w]
    assert planned == [6, 8]  # the wide layer gets fewer bits than the narrow one
    sched = CyclicSchedule(gm, low=2, high=8, period=8)
    sched.t = 4  # mid-cycle: base 5; offsets -1 / +1 around the plan's median 7
    assert sched.bits() == [4, 6]


def test_bits_change_forward_and_backward_without_recompiling() -> None:
    gm = compiled()
    code, graph = gm.code, gm.graph
    sched = CyclicSchedule(gm, low=2, high=8, period=3)  # bases 2, 4, 7
    x = torch.randn(4, 16)
    outputs, grads, used = [], [], []
    for _ in range(3):
        gm.zero_grad()
        torch.manual_seed(1)  # same stochastic rounding draws each step
        y = gm(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append(gm.get_submodule("2").weight.grad.clone())
        used.append(gm.dpc.get_submodule("_2").weight_q.bits)
        sched.step()
    assert used == [2, 3, 6]
    assert not torch.equal(outputs[0], outputs[1])
    assert not torch.equal(grads[0], grads[1])
    assert gm.code == code and gm.graph is graph
    assert gm.dpc.get_submodule("_2").grad_q.bits == 8  # gradients stay as planned


def test_lowered_layers_are_scheduled_too() -> None:
    """A lowered linear layer reads its quantisers' bits on every call: the schedule sets
    them like any other layer's (and above 8 bits the layer runs simulated)."""
    torch.manual_seed(0)
    config = DPCConfig(b_min=4, b_max=8, grad_bits=8, lower=True, pin_first_last=False)
    gm = dpc_fx.compile(mlp(16, 64, 64, 8, 4), torch.randn(4, 16), config=config)
    lowered = [m.layer for m in dpc_fx.layers(gm) if m.lowered]
    assert len(lowered) == 4
    sched = CyclicSchedule(gm, low=3, high=8, period=4)
    assert len(sched.bits()) == 4
    for _ in range(3):
        sched.step()
        held = [q.bits for m in gm.dpc.children() for q in (m.act_q, m.weight_q)]
        assert sorted(set(held)) == sorted(set(sched.bits()))
        gm(torch.randn(4, 16)).sum().backward()


def test_state_dict_resumes() -> None:
    gm = compiled()
    sched = CyclicSchedule(gm, low=3, high=8, period=6)
    for _ in range(4):
        sched.step()
    other = CyclicSchedule(gm, low=3, high=8, period=6)
    other.load_state_dict(sched.state_dict())
    assert other.bits() == sched.bits() and other.t == 4


def test_bad_schedule_arguments() -> None:
    gm = compiled()
    with pytest.raises(dpc_fx.ConfigError, match="need 1 <= low <= high <= 32"):
        CyclicSchedule(gm, low=8, high=3)
    with pytest.raises(dpc_fx.ConfigError, match="period=0 must be a positive int"):
        CyclicSchedule(gm, period=0)
    with pytest.warns(UserWarning, match="no layer to quantise"):
        fp = dpc_fx.compile(nn.Sequential(nn.Linear(2, 2)), config=DPCConfig(overrides={"0": None}))
    with pytest.raises(dpc_fx.ConfigError, match="no quantised layers to schedule"):
        CyclicSchedule(fp)
