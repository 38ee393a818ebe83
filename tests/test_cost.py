"""The cost model against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpc_fx
from dpc_fx import Bits, DPCConfig
from dpc_fx.cost import bitops


def two_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))


def test_bitops_formula() -> None:
    assert bitops(10, Bits(4, 6, 8)) == (10 * 4 * 6, 10 * 4 * 8, 10 * 6 * 8)
    assert bitops(10, Bits(None, None, None)) == (10 * 32 * 32,) * 3


def test_two_layer_model_by_hand() -> None:
    # Layer "0": 3x4 @ 4x8 = 96 MACs at w/a/g 4/6/8; layer "2": 3x8 @ 8x2 = 48 MACs in fp32.
    config = DPCConfig(pin_first_last=False, overrides={"0": (4, 6, 8), "2": None})
    c = dpc_fx.cost(dpc_fx.compile(two_layers(), torch.randn(3, 4), config=config))

    first, last = c.layers
    assert (first.layer, first.macs, first.bits) == ("0", 96, Bits(4, 6, 8))
    assert (first.forward, first.input_grad, first.weight_grad) == (2304, 3072, 4608)
    assert (last.macs, last.total) == (48, 48 * 32 * 32 * 3)
    assert c.total == 9984 + 147456
    assert c.forward == 2304 + 48 * 1024
    assert c.fp32 == (96 + 48) * 3072
    assert c.static8 == 96 * 192 + 147456  # full-precision layers stay at 32 in the baseline
    assert c.saving_vs_fp32 == pytest.approx(1 - 157440 / 442368)
    assert c.saving_vs_8bit == pytest.approx(1 - 157440 / 165888)


def test_uniform_8bit_saves_nothing_against_8bit() -> None:
    config = DPCConfig(policy="uniform", b_min=8, b_max=8, pin_first_last=False)
    c = dpc_fx.cost(dpc_fx.compile(two_layers(), torch.randn(3, 4), config=config))
    assert c.saving_vs_8bit == pytest.approx(0.0)
    assert c.saving_vs_fp32 == pytest.approx(1 - 64 / 1024)


def test_cost_needs_macs() -> None:
    gm = dpc_fx.compile(two_layers(), config=DPCConfig(pin_first_last=False))
    with pytest.raises(
        dpc_fx.PassOrderError, match="compiled without example inputs.*example_inputs"
    ):
        dpc_fx.cost(gm)
