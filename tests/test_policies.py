"""The ways a user steers the assignment: overrides, budget, automatic bounds, centre."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dpc_fx
from dpc_fx import Bits, DPCConfig
from experiments.models import MNIST1DCNN


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


X = torch.randn(1, 3, 32, 32)


def bits_of(gm: torch.fx.GraphModule) -> dict[str, Bits | None]:
    return {m.layer: m.bits for m in dpc_fx.layers(gm)}


def test_overrides_by_path_glob_and_type(resnet18: nn.Module) -> None:
    config = DPCConfig(overrides={"Conv2d": 7, "*.downsample.*": 8, "fc": (8, 6, None)})
    bits = bits_of(dpc_fx.compile(resnet18, X, config=config))
    assert bits["layer2.0.downsample.0"] == Bits(8, 8, 8)
    assert bits["layer3.1.conv2"] == Bits(7, 7, 8)
    assert bits["conv1"] == Bits(7, 7, 8)  # an override un-pins the first layer
    assert bits["fc"] == Bits(8, 6, None)


def test_later_override_wins(resnet18: nn.Module) -> None:
    config = DPCConfig(overrides=(("layer1.*", 5), ("layer1.0.conv1", None)))
    bits = bits_of(dpc_fx.compile(resnet18, X, config=config))
    assert bits["layer1.0.conv1"] == Bits(None, None, None)
    assert bits["layer1.0.conv2"] == Bits(5, 5, 8)


def test_override_matching_nothing_is_an_error(resnet18: nn.Module) -> None:
    with pytest.raises(
        dpc_fx.ConfigError, match=r"overrides \['layer9.\*'\] match no matmul-like layer"
    ):
        dpc_fx.compile(resnet18, X, config=DPCConfig(overrides={"layer9.*": 4}))


@pytest.mark.parametrize("budget", [0.16, 0.25])
def test_budget_is_met_within_one_point(resnet18: nn.Module, budget: float) -> None:
    gm = dpc_fx.compile(resnet18, X, config=DPCConfig(budget=budget))
    assert dpc_fx.cost(gm).saving_vs_8bit == pytest.approx(budget, abs=0.01)
    resolved = dpc_fx.plan_of(gm).config
    assert resolved.budget == budget and isinstance(resolved.b_min, int)
    assert min(m.bits.w for m in dpc_fx.layers(gm) if m.bits and m.bits.w) >= 3  # the floor


def test_a_budget_out_of_reach_at_the_floor_names_the_closest_saving(resnet18: nn.Module) -> None:
    # ResNet-18's integer bit-widths of at least 3 save 28.7% or 31.2%, never 29-31%.
    with pytest.raises(
        dpc_fx.ConfigError,
        match=r"budget=0.30 is out of reach.*closest saving versus static 8-bit is 0\.312 .*"
        r"pin_first_last=False\) with no layer below floor_bits=3",
    ):
        dpc_fx.compile(resnet18, X, config=DPCConfig(budget=0.3))
    # A lower floor is the user's call to make, and then the budget is met.
    gm = dpc_fx.compile(resnet18, X, config=DPCConfig(budget=0.3, floor_bits=2))
    assert dpc_fx.cost(gm).saving_vs_8bit == pytest.approx(0.3, abs=0.01)


def test_unreachable_budget_says_what_is_reachable(resnet18: nn.Module) -> None:
    with pytest.raises(
        dpc_fx.ConfigError,
        match=r"budget=0.90 is out of reach.*closest saving versus static 8-bit is 0\.\d+",
    ):
        dpc_fx.compile(resnet18, X, config=DPCConfig(budget=0.9))


def test_budget_needs_inputs(resnet18: nn.Module) -> None:
    with pytest.raises(dpc_fx.ConfigError, match="budget=0.3 needs MACs.*pass example_inputs"):
        dpc_fx.compile(resnet18, config=DPCConfig(budget=0.3))


def test_auto_b_min_keeps_weights_similar(resnet18: nn.Module) -> None:
    gm = dpc_fx.compile(resnet18, X, config=DPCConfig(b_min="auto", similarity=0.95))
    chosen = dpc_fx.plan_of(gm).config.b_min
    assert isinstance(chosen, int) and 1 <= chosen <= 8
    conv = resnet18.layer3[0].conv2.weight.detach()

    def similarity(bits: int) -> float:
        q = dpc_fx.quant.fake_quantize(conv, bits, channel_dim=0)
        return float(nn.functional.cosine_similarity(conv.flatten(), q.flatten(), dim=0))

    assert similarity(chosen) >= 0.95
    stricter = dpc_fx.compile(resnet18, X, config=DPCConfig(b_min="auto", similarity=0.999))
    assert dpc_fx.plan_of(stricter).config.b_min > chosen


def test_mean_centre_differs_from_median() -> None:
    from dpc_fx.policy import dpc_bits

    caps = [10.0, 20.0, 30.0, 10_000.0]
    assert dpc_bits(caps, b_min=4, b_max=8, centre="median") != dpc_bits(
        caps, b_min=4, b_max=8, centre="mean"
    )


def test_capacity_by_macs_ranks_by_macs(resnet18: nn.Module) -> None:
    gm = dpc_fx.compile(resnet18, X, config=DPCConfig(capacity="macs"))
    for m in dpc_fx.layers(gm):
        assert m.capacity == m.macs
    # Downsample convs are small in MACs, so they get the most bits.
    assert bits_of(gm)["layer2.0.downsample.0"] == Bits(8, 8, 8)


def test_a_budget_trades_pinning_before_going_below_the_floor() -> None:
    """The MNIST-1D CNN's pinned first and last layers hold most of its cost: a 30% budget
    used to put the middle layers at 1-2 bits (and training collapsed); the solver now
    unpins them and every layer keeps at least 3 bits."""
    torch.manual_seed(0)
    cnn = MNIST1DCNN()
    gm = dpc_fx.compile(cnn, torch.randn(4, 1, 40), config=DPCConfig(budget=0.3))
    assert dpc_fx.cost(gm).saving_vs_8bit == pytest.approx(0.3, abs=0.01)
    assert dpc_fx.plan_of(gm).config.pin_first_last is False
    assert all(m.bits is not None and (m.bits.w or 32) >= 3 for m in dpc_fx.layers(gm))
