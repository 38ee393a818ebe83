"""A catalogue of bad input: each is handled, and each error says what, where and how to fix.

Every dpc_fx error is a ``DPCError``; the tests pin the subclass and the message.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
import toys
from helpers import quantizers_off, reloaded
from torch import nn

import dpc_fx
from dpc_fx import (
    ConfigError,
    DPCConfig,
    DPCError,
    PassOrderError,
    PlanError,
    ShapeError,
    TraceError,
)
from dpc_fx.quant import ActQuantizer, WeightQuantizer


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return toys.mlp(4, 8, 8, 2)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return toys.small_cnn()


def test_every_error_is_a_dpc_error() -> None:
    for cls in (ConfigError, TraceError, ShapeError, PassOrderError, PlanError):
        assert issubclass(cls, DPCError)


# ---------------------------------------------------------------------- not a model


@pytest.mark.parametrize("thing", [lambda x: x, "resnet18", torch.randn(2), nn.Linear])
def test_not_an_nn_module(thing: object) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"dpc_fx\.compile: model must be an nn\.Module, got {type(thing).__name__}\.",
    ):
        dpc_fx.compile(thing)  # type: ignore[arg-type]


def test_config_of_the_wrong_type() -> None:
    with pytest.raises(
        ConfigError, match=r"config must be a DPCConfig, got dict; build one with dpc_fx\.DPCConfig"
    ):
        dpc_fx.compile(mlp(), config={"b_min": 4})  # type: ignore[arg-type]


# ------------------------------------------------------------ compiled twice: re-plan


def test_compiling_a_compiled_module_re_plans_the_model_it_came_from() -> None:
    model = mlp()
    x = torch.randn(3, 4)
    gm = dpc_fx.compile(model, x)
    again = dpc_fx.compile(gm, x, config=DPCConfig(b_min=2, b_max=3, pin_first_last=False))
    # Quantisers are never stacked: one per role per layer, on the model's own layers.
    assert len([m for m in again.modules() if isinstance(m, WeightQuantizer)]) == 3
    assert [str(m.bits) for m in dpc_fx.layers(again)] == ["3/3/8", "3/3/8", "3/3/8"]
    # Re-planning with the same config gives the same plan as compiling the model.
    assert dpc_fx.plan_of(dpc_fx.compile(gm, x)) == dpc_fx.plan_of(gm)
    assert list(dpc_fx.model_state_dict(again)) == list(model.state_dict())
    assert again.get_parameter("0.weight") is model[0].weight


def test_a_compiled_module_without_its_model_is_refused() -> None:
    gm = dpc_fx.compile(mlp())
    del gm.meta["_dpc_fx"], gm.__dict__["_dpc_fx"]  # its Compiled record, model and all
    with pytest.raises(
        ConfigError,
        match=r"dpc_fx\.compile: this Sequential was compiled by dpc_fx, but it does not hold the model it was "
        r"compiled from; compile the original model instead\.",
    ):
        dpc_fx.compile(gm)


# ------------------------------------------------------------------- invalid config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"b_min": 0}, r"DPCConfig: b_min=0 is not a bit-width; use an int from 1 to 32\."),
        ({"b_max": 33}, r"DPCConfig: b_max=33 is not a bit-width; use an int from 1 to 32\."),
        ({"grad_bits": 0}, r"grad_bits=0 is not a bit-width; use an int from 1 to 32 \(or None"),
        (
            {"b_min": 7, "b_max": 5},
            r"b_min=7 is greater than b_max=5; lower b_min or raise b_max\.",
        ),
        ({"capacity": "flops"}, r"DPCConfig: capacity='flops' is not one of 'params', 'macs'\."),
        ({"budget": 0.0}, r"DPCConfig: budget=0\.0 is outside \(0, 1\); e\.g\. budget=0\.3"),
        ({"budget": 1.0}, r"DPCConfig: budget=1\.0 is outside \(0, 1\)"),
        ({"budget": -0.2}, r"DPCConfig: budget=-0\.2 is outside \(0, 1\)"),
        ({"delta": 0}, r"DPCConfig: delta=0 is outside \(0, 1\]; try delta=1\.0\."),
    ],
)
def test_invalid_config(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DPCConfig(**fields)  # type: ignore[arg-type]


def test_capacity_by_macs_without_inputs_says_to_pass_them() -> None:
    with pytest.raises(
        ConfigError,
        match=r"capacity='macs' needs the layers' MACs, but layer '0' was measured without "
        r"example inputs; pass example_inputs to dpc_fx\.compile or use capacity='params'\.",
    ):
        dpc_fx.compile(mlp(), config=DPCConfig(capacity="macs"))


# ------------------------------------------------------- inputs that do not fit the model


def test_wrong_shape_names_the_failing_layer_and_shapes() -> None:
    with pytest.raises(
        ShapeError,
        match=r"example inputs do not fit the model: node '_0' \(module '0'\) failed on inputs "
        r"\[input_1: \(3, 5\) float32\] with RuntimeError: .*Check the shape and dtype",
    ):
        dpc_fx.compile(mlp(), torch.randn(3, 5))


def test_wrong_shape_deep_inside_a_torchvision_model() -> None:
    with pytest.raises(
        ShapeError,
        match=r"node 'conv1' \(module 'conv1'\) failed on inputs \[x: \(2, 1, 32, 32\) float32\]",
    ):
        dpc_fx.compile(torchvision.models.resnet18(), torch.randn(2, 1, 32, 32))


def test_wrong_dtype_names_the_input_and_the_dtype_the_layer_wants() -> None:
    with pytest.raises(
        ShapeError,
        match=r"example inputs: input 'input' reaches layer '0' as int64, but the layer computes "
        r"in float32; pass it as that dtype \(x\.to\(torch\.float32\)\)",
    ):
        dpc_fx.compile(convnet(), torch.ones(2, 3, 8, 8, dtype=torch.long))


def test_half_precision_input_to_a_float_model_names_the_layer() -> None:
    # Fake tensors let float16 @ float32 through; the capacity pass checks it.
    with pytest.raises(
        ShapeError,
        match=r"node '_0' \(module '0'\) failed on inputs \[input_1: \(3, 4\) float16\] with "
        r"RuntimeError: mixed dtypes torch.float16 and torch.float32 in one layer",
    ):
        dpc_fx.compile(mlp(), torch.randn(3, 4, dtype=torch.float16))


def test_wrong_type_of_input() -> None:
    with pytest.raises(
        ShapeError,
        match=r"node '_0' \(module '0'\) failed on inputs \[\] with TypeError: linear\(\): "
        r"argument 'input' \(position 1\) must be Tensor, not str",
    ):
        dpc_fx.compile(mlp(), "a string")


def test_too_many_inputs() -> None:
    with pytest.raises(
        ShapeError,
        match=r"Sequential\.forward takes 1\.\.1 positional inputs \(input_1\), got 2; pass a "
        r"tuple with one tensor per input\.",
    ):
        dpc_fx.compile(mlp(), (torch.randn(3, 4), torch.randn(3, 4)))


# ------------------------------------------------------------------ nothing to quantise


def test_a_model_without_matmul_like_layers_warns_and_is_unchanged() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.0))
    with pytest.warns(
        UserWarning,
        match=r"Sequential has no layer to quantise \(0 matmul-like layers, all kept in full "
        r"precision\); the compiled module computes exactly what the model does\.",
    ):
        gm = dpc_fx.compile(model, torch.randn(3, 4))
    x = torch.randn(5, 4)
    model.eval()
    gm.eval()
    assert torch.equal(gm(x), model(x))
    assert dpc_fx.layers(gm) == []


# ------------------------------------------------------------------- odd tensor values


def test_one_inf_stays_in_its_own_sample() -> None:
    model = mlp()
    gm = dpc_fx.compile(model, torch.randn(3, 4))
    x = torch.randn(3, 4)
    x[0, 0] = float("inf")
    out = gm(x)
    assert not torch.isfinite(out[0]).all()  # visible, as in the model itself
    assert torch.isfinite(out[1:]).all()  # the range came from the finite values


def test_one_nan_stays_in_its_own_sample() -> None:
    gm = dpc_fx.compile(mlp(), torch.randn(3, 4))
    x = torch.randn(3, 4)
    x[0, 1] = float("nan")
    out = gm(x)
    assert torch.isnan(out[0]).all()
    assert torch.isfinite(out[1:]).all()


def test_nan_in_a_weight_leaves_the_other_channels_alone() -> None:
    model = mlp()
    gm = dpc_fx.compile(model, torch.randn(3, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # shared with gm
    (quantiser,) = [m for m in gm.modules() if isinstance(m, WeightQuantizer)]  # layer '2'
    w = quantiser(model[2].weight)
    assert torch.isnan(w[0, 0]) and torch.isfinite(w[1:]).all() and torch.isfinite(w[0, 1:]).all()


def test_check_finite_names_the_layer_holding_nan() -> None:
    """With ``DPCConfig(check_finite=True)`` a quantiser that meets NaN or Inf raises instead
    of quantising around it. Layer '0' is pinned (no quantiser): layer '2' meets the NaN."""
    gm = dpc_fx.compile(mlp(), torch.randn(3, 4), config=DPCConfig(check_finite=True))
    gm(torch.randn(3, 4))  # finite: no error
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    with pytest.raises(DPCError, match=r"layer '2'.*NaN or Inf"):
        gm(x)


@pytest.mark.parametrize(
    "make",
    [torch.zeros, lambda *s: torch.full(s, 3.0), lambda *s: torch.randn(*s)[:0]],
    ids=["zeros", "constant", "empty batch"],
)
def test_zero_constant_and_empty_inputs(make: object) -> None:
    model = mlp()
    gm = dpc_fx.compile(model, torch.randn(3, 4))
    x = make(3, 4)  # type: ignore[operator]
    out = gm(x)
    assert out.shape == model(x).shape
    assert torch.isfinite(out).all()
    if x.numel():
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None)


def test_zero_weights() -> None:
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    gm = dpc_fx.compile(model, torch.randn(3, 4))
    assert torch.equal(gm(torch.randn(2, 4)), torch.zeros(2, 2))


# ------------------------------------------------------------ layouts, dtypes, modes


def test_batch_size_one_in_train_and_eval() -> None:
    model = convnet()
    x = torch.randn(1, 3, 8, 8)
    gm = dpc_fx.compile(model, x)
    gm(x).sum().backward()
    gm.eval()
    assert gm(x).shape == (1, 3)


def test_channels_last_inputs_and_model() -> None:
    model = convnet().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    gm = dpc_fx.compile(model, x)
    model.eval()
    gm.eval()
    off = quantizers_off(copy.deepcopy(gm))
    torch.testing.assert_close(off(x), model(x))
    assert torch.isfinite(gm(x)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float64_and_bfloat16_models(dtype: torch.dtype) -> None:
    model = convnet().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    gm = dpc_fx.compile(model, x)
    out = gm(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in gm.parameters())


def test_eval_before_any_training_step_uses_each_batch_range() -> None:
    gm = dpc_fx.compile(convnet(), torch.randn(2, 3, 8, 8))
    gm.eval()
    x = torch.randn(2, 3, 8, 8)
    a, b = gm(x), gm(x)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not any(m.observed for m in gm.modules() if isinstance(m, ActQuantizer))


# -------------------------------------------------------------------- checkpoints


def test_state_dict_loads_into_the_original_class_and_back() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    gm = dpc_fx.compile(model, torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        gm.get_parameter("fc.bias").add_(1.0)  # a "trained" change
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(dpc_fx.model_state_dict(gm))
    assert torch.equal(fresh.fc.bias, model.fc.bias)
    other = dpc_fx.compile(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    other.load_state_dict(fresh.state_dict())
    other.eval(), gm.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(other(x), gm(x))


def test_torch_save_and_load_round_trip_bit_exactly_with_the_plan() -> None:
    model = convnet()
    x = torch.randn(4, 3, 8, 8)
    gm = dpc_fx.compile(model, x)
    gm(x).sum().backward()  # one training step's worth of running ranges
    gm.eval()
    loaded = reloaded(gm)
    assert torch.equal(loaded(x), gm(x))
    assert list(dpc_fx.model_state_dict(loaded)) == list(model.state_dict())
    assert dpc_fx.plan_of(loaded) == dpc_fx.plan_of(gm)
    assert dpc_fx.plan_of(loaded).fingerprint == dpc_fx.plan_of(gm).fingerprint
    assert dpc_fx.coverage(loaded) == dpc_fx.coverage(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replanned = dpc_fx.compile(loaded, x)  # the loaded module still knows its model
    assert dpc_fx.plan_of(replanned) == dpc_fx.plan_of(gm)


def test_coverage_of_a_module_dpc_fx_did_not_compile() -> None:
    with pytest.raises(
        ConfigError,
        match=r"coverage: this Sequential was not compiled by dpc_fx\.compile; pass the module "
        r"compile returned\.",
    ):
        dpc_fx.coverage(mlp())
