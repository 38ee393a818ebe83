"""Automatic fallback: models torch.fx cannot trace whole compile part by part."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx
from helpers import quantizers_off, reloaded
from torch import Tensor, nn
from toys import GatedNet

import dpc_fx
import dpc_fx.parts
from dpc_fx import DPCConfig, ShapeError
from dpc_fx.cli import main
from dpc_fx.errors import TraceError
from dpc_fx.quant import ActQuantizer


class Detector(nn.Module):
    """Its own forward iterates over a list of images and branches on values, as torchvision's
    detection models do; its children trace, one of them only in part."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.neck = GatedNet()
        self.heads = nn.ModuleList([nn.Linear(2, 3), nn.Linear(2, 3)])

    def forward(self, images: list[Tensor], scale: dict[str, Tensor]) -> dict[str, Tensor]:
        feats = [self.backbone(img[None]).mean((2, 3)) for img in images]
        x = torch.cat(feats)[:, :4] * scale["w"]
        y = self.neck(x)
        if y.mean() > 100:  # never taken
            y = y * 0
        return {"a": self.heads[0](y), "b": self.heads[1](y)}


def detector_inputs() -> tuple[list[Tensor], dict[str, Tensor]]:
    return [torch.randn(3, 12, 12), torch.randn(3, 10, 10)], {"w": torch.tensor(2.0)}


class PositiveMean(nn.Module):
    """Traces fine, but its graph cannot run on fake tensors (a data-dependent shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        return y * y[y > 0].mean()


class RunsButGraphDoesNot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = PositiveMean()
        self.c = nn.Linear(4, 4)
        self.d = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.d(self.c(self.b(self.a(x))))


def compile_recording(
    model: nn.Module, *args: object, **kwargs: object
) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = dpc_fx.compile(model, *args, **kwargs)  # type: ignore[arg-type]
    return gm, [str(w.message) for w in caught]


def test_an_untraceable_submodule_is_kept_whole_and_the_rest_is_compiled() -> None:
    torch.manual_seed(0)
    model = GatedNet()
    x = torch.randn(5, 4)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(
        UserWarning,
        match=r"GatedNet: torch\.fx cannot trace submodule 'body\.1\.gate' \(Gate\): TraceError: "
        r"symbolically traced variables cannot be used as inputs to control flow\. It runs as it "
        r"is, in full precision \(0\.0% of the model's MACs\)",
    ):
        gm = dpc_fx.compile(model, x)
    assert [m.layer for m in dpc_fx.layers(gm)] == [
        "stem",
        "body.0",
        "body.1.lin",
        "body.2",
        "head",
    ]
    assert [str(m.bits) for m in dpc_fx.layers(gm)][1:4] == ["6/6/8"] * 3
    assert isinstance(gm, torch.fx.GraphModule)
    assert any(n.op == "call_module" and n.target == "body.1.gate" for n in gm.graph.nodes)
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "dpc")
    assert torch.equal(quantizers_off(copy.deepcopy(gm))(x), model(x))
    cov = dpc_fx.coverage(gm)
    assert (cov.traced, cov.layers, cov.compiled, cov.quantised) == (False, 5, 5, 3)
    assert [leaf.path for leaf in cov.leaves] == ["body.1.gate"]
    assert str(cov).splitlines()[1] == (
        "  leaf 'body.1.gate' (Gate), 0.0% of MACs in full precision: TraceError: "
        "symbolically traced variables cannot be used as inputs to control flow"
    )


def test_a_model_whose_own_forward_cannot_be_traced_keeps_its_class() -> None:
    torch.manual_seed(0)
    model = Detector()
    inputs = detector_inputs()
    gm, caught = compile_recording(model, inputs)
    assert type(gm) is Detector and gm is not model
    assert [w.split(": ")[2] for w in caught] == [
        "torch.fx cannot trace its forward (Detector)",
        "torch.fx cannot trace submodule 'neck.body.1.gate' (Gate)",
    ]
    # One plan over all parts, in model order, with full paths: first and last pinned.
    layers = dpc_fx.layers(gm)
    assert [m.layer for m in layers] == [
        "backbone.0",
        "backbone.2",
        "neck.stem",
        "neck.body.0",
        "neck.body.1.lin",
        "neck.body.2",
        "neck.head",
        "heads.0",
        "heads.1",
    ]
    assert [m.pinned for m in layers] == [True] + [False] * 7 + [True]
    assert isinstance(gm.backbone, torch.fx.GraphModule) and isinstance(
        gm.heads[0], torch.fx.GraphModule
    )
    assert isinstance(gm.neck, torch.fx.GraphModule)  # traced with its leaf kept whole
    assert gm.get_submodule("neck.body.1.gate") is model.neck.body[1].gate
    assert type(model.neck) is GatedNet and not hasattr(model, "dpc")  # the model is untouched
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())
    expected, got = model(*inputs), quantizers_off(copy.deepcopy(gm))(*inputs)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    cov = dpc_fx.coverage(gm)
    assert (cov.layers, cov.compiled, cov.quantised) == (9, 9, 7)
    assert [leaf.path for leaf in cov.leaves] == ["", "neck.body.1.gate"]
    assert cov.macs_share is not None and 0.5 < cov.macs_share < 1.0
    # plan_of, cost and a plan applied back all see every part.
    plan = dpc_fx.plan_of(gm)
    assert list(plan.layers) == [m.layer for m in layers]
    assert dpc_fx.cost(gm).saving_vs_fp32 > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = dpc_fx.compile(model, inputs, plan=plan)
    assert dpc_fx.plan_of(again) == plan


def test_the_fallback_module_trains_saves_and_loads() -> None:
    torch.manual_seed(0)
    model = Detector()
    inputs = detector_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = dpc_fx.compile(model, inputs)
    out = gm(*inputs)
    (out["a"].sum() + out["b"].pow(2).sum()).backward()
    assert all(p.grad is not None for p in gm.parameters())
    gm.eval()
    loaded = reloaded(gm)
    a, b = gm(*inputs), loaded(*inputs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dpc_fx.plan_of(loaded) == dpc_fx.plan_of(gm)
    assert dpc_fx.plan_of(loaded).fingerprint == dpc_fx.plan_of(gm).fingerprint
    fresh = Detector()
    fresh.load_state_dict(dpc_fx.model_state_dict(gm))
    gm.load_state_dict(fresh.state_dict())


def test_without_example_inputs_every_part_is_compiled_by_parameters() -> None:
    gm, caught = compile_recording(Detector())
    assert len(caught) == 2
    assert len(dpc_fx.layers(gm)) == 9
    cov = dpc_fx.coverage(gm)
    assert cov.macs is None and cov.macs_share is None and cov.leaves[0].share is None


class ReadsWeightDirectly(nn.Module):
    """A leaf whose code reads a child's weight instead of calling the child."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.called = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:
            return x
        return self.called(torch.nn.functional.linear(x, self.proj.weight))


def test_a_child_the_example_run_never_calls_is_left_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), ReadsWeightDirectly(), nn.Linear(4, 4), nn.Linear(4, 4))
    gm, _ = compile_recording(model, torch.randn(2, 4))
    assert [m.layer for m in dpc_fx.layers(gm)] == ["0", "1.called", "2", "3"]
    assert gm.get_submodule("1.proj") is model[1].proj
    cov = dpc_fx.coverage(gm)
    assert (cov.layers, cov.compiled, cov.quantised) == (5, 4, 2)


def test_a_traced_graph_that_does_not_run_is_captured_by_export() -> None:
    torch.manual_seed(0)
    model = RunsButGraphDoesNot()
    x = torch.randn(3, 4)
    gm = dpc_fx.compile(model, x)
    assert dpc_fx.coverage(gm).leaves == ()
    assert [m.layer for m in dpc_fx.layers(gm)] == ["a", "b.lin", "c", "d"]
    off = quantizers_off(copy.deepcopy(gm))
    assert torch.equal(off(x), model(x))
    x5 = torch.randn(5, 4)  # captured with a free batch size
    assert torch.equal(off(x5), model(x5))


def test_a_traced_graph_that_does_not_run_falls_back_to_its_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(module: nn.Module, *args: object) -> None:
        raise TraceError("refused", reason="refused")

    monkeypatch.setattr(dpc_fx.parts, "capture", refuse)  # torch.export cannot either
    torch.manual_seed(0)
    model = RunsButGraphDoesNot()
    x = torch.randn(3, 4)
    with pytest.warns(
        UserWarning,
        match=r"cannot trace submodule 'b' \(PositiveMean\): its traced graph does not run \(DynamicOutputShapeException",
    ):
        gm = dpc_fx.compile(model, x)
    assert [leaf.path for leaf in dpc_fx.coverage(gm).leaves] == ["b"]
    assert [m.layer for m in dpc_fx.layers(gm)] == ["a", "b.lin", "c", "d"]
    assert torch.equal(quantizers_off(copy.deepcopy(gm))(x), model(x))


def test_inputs_that_do_not_fit_a_fallback_model_name_the_module() -> None:
    with pytest.raises(
        ShapeError,
        match=r"example inputs do not fit the model: module 'backbone\.0' \(Conv2d\) failed on "
        r"example inputs \[list of 1: \(5, 12, 12\) float32, dict: w: \(\) float32\] with "
        r"RuntimeError: .*Check the shape and dtype",
    ):
        dpc_fx.compile(Detector(), ([torch.randn(5, 12, 12)], {"w": torch.tensor(1.0)}))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, batch: dict[str, Tensor], extra: list[Tensor]) -> Tensor:
        return self.c(self.b(self.a(batch["x"]) + extra[0]) * extra[1])


def test_list_and_dict_inputs_are_measured() -> None:
    model = Nested()
    inputs = ({"x": torch.randn(3, 4)}, [torch.randn(3, 4), torch.randn(3, 4)])
    gm = dpc_fx.compile(model, inputs)
    assert [m.macs for m in dpc_fx.layers(gm)] == [48, 48, 24]
    assert dpc_fx.coverage(gm).traced
    assert torch.equal(quantizers_off(copy.deepcopy(gm))(*inputs), model(*inputs))


def test_quantised_layers_are_not_stacked_inside_parts() -> None:
    gm, _ = compile_recording(Detector(), detector_inputs())
    acts = [m for m in gm.modules() if isinstance(m, ActQuantizer)]
    assert len(acts) == sum(not m.bits.full_precision for m in dpc_fx.layers(gm))  # type: ignore[union-attr]


def test_user_leaf_modules_stay_whole_in_the_fallback() -> None:
    config = DPCConfig(leaf_modules=("neck",))
    gm, caught = compile_recording(Detector(), detector_inputs(), config=config)
    assert [m.layer for m in dpc_fx.layers(gm)] == [
        "backbone.0",
        "backbone.2",
        "heads.0",
        "heads.1",
    ]
    assert gm.neck is not None and not isinstance(gm.neck, torch.fx.GraphModule)
    assert len(caught) == 1


def test_inspect_prints_the_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", "toys:GatedNet", "--input", "2,4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "coverage: 1 leaves kept whole; 3/5 matmul-like layers quantised" in out
    assert "leaf 'body.1.gate' (Gate)" in out
