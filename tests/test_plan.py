"""Plans: extracted from a compiled module, saved as JSON, loaded, re-applied exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import dpc_fx
from dpc_fx import Bits, DPCConfig, Plan


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


X = torch.randn(2, 3, 32, 32)


def test_round_trip_through_json_reapplies_identically(resnet18: nn.Module, tmp_path: Path) -> None:
    gm = dpc_fx.compile(resnet18, X, config=DPCConfig(budget=0.16))
    plan = dpc_fx.plan_of(gm)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert (
        loaded.config.b_max == dpc_fx.plan_of(gm).config.b_max
    )  # the resolved config travels with it

    again = dpc_fx.compile(resnet18, X, plan=loaded)
    assert dpc_fx.plan_of(again) == plan
    assert [m.bits for m in dpc_fx.layers(again)] == [m.bits for m in dpc_fx.layers(gm)]
    gm.eval()
    again.eval()
    assert torch.equal(gm(X), again(X))


def test_plan_json_is_readable(resnet18: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    dpc_fx.plan_of(dpc_fx.compile(resnet18, X)).save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "dpc_fx.plan" and data["version"] == 1
    assert data["layers"]["conv1"] == "fp/fp/fp"
    assert data["layers"]["layer1.0.conv1"] == "7/7/8"
    assert len(data["layers"]) == 21


def test_edited_plan_applies_exactly(resnet18: nn.Module) -> None:
    plan = dpc_fx.plan_of(dpc_fx.compile(resnet18, X))
    layers = dict(plan.layers, **{"layer4.1.conv2": Bits(3, 5, 6), "fc": Bits(8, 8, 8)})
    edited = Plan(layers, plan.config, plan.fingerprint)
    gm = dpc_fx.compile(resnet18, X, plan=edited)
    assert dpc_fx.plan_of(gm).layers == layers
    assert gm.dpc.layer4_1_conv2.weight_q.bits == 3
    assert gm.dpc.layer4_1_conv2.act_q.bits == 5
    assert gm.dpc.layer4_1_conv2.grad_q.bits == 6
    assert plan.diff(edited) == {
        "layer4.1.conv2": (plan.layers["layer4.1.conv2"], Bits(3, 5, 6)),
        "fc": (Bits(None, None, None), Bits(8, 8, 8)),
    }


def test_mismatched_plan_lists_the_layers(resnet18: nn.Module) -> None:
    plan = dpc_fx.plan_of(dpc_fx.compile(resnet18, X))
    layers = {k: v for k, v in plan.layers.items() if k != "layer2.0.conv1"}
    layers["head.proj"] = Bits(8, 8, 8)
    with pytest.raises(
        dpc_fx.PlanError,
        match=r"in the plan but not in the model: \['head.proj'\]; "
        r"layers in the model but not in the plan: \['layer2.0.conv1'\]",
    ):
        dpc_fx.compile(resnet18, X, plan=Plan(layers, plan.config, plan.fingerprint))


def test_plan_of_another_width_warns(resnet18: nn.Module) -> None:
    plan = dpc_fx.plan_of(dpc_fx.compile(resnet18, X))
    wider = torchvision.models.resnet18(num_classes=100)
    with pytest.warns(UserWarning, match="other parameter counts"):
        dpc_fx.compile(wider, X, plan=plan)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"format": "other"}', "not a dpc_fx plan"),
        ('{"format": "dpc_fx.plan", "version": 99, "layers": {}}', "version 99 is not supported"),
        (
            '{"format": "dpc_fx.plan", "version": 1, "layers": {"fc": "9/x/8"}}',
            "not written as w/a/g",
        ),
        (
            '{"format": "dpc_fx.plan", "version": 1, "layers": {}, "config": {"bmin": 3}}',
            "unknown field",
        ),
    ],
)
def test_malformed_plan_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(dpc_fx.PlanError, match=message):
        Plan.load(path)


def test_plan_must_be_a_plan(resnet18: nn.Module) -> None:
    with pytest.raises(dpc_fx.PlanError, match="plan must be a dpc_fx.Plan"):
        dpc_fx.compile(resnet18, X, plan={"fc": "8/8/8"})  # type: ignore[arg-type]


def test_plan_survives_torch_save(resnet18: nn.Module, tmp_path: Path) -> None:
    gm = dpc_fx.compile(resnet18, X)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    assert dpc_fx.plan_of(loaded) == dpc_fx.plan_of(gm)
    assert dpc_fx.plan_of(loaded).fingerprint == dpc_fx.plan_of(gm).fingerprint
