"""End to end: dpc_fx.compile on random and real models, numerics, training, persistence."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ROLES,
    backward_grads,
    compile_quiet,
    examples,
    fit,
    quantizer_modules,
    quantizer_nodes,
    quantizers_off,
    relative_l2,
    reloaded,
)
from hypothesis import given
from hypothesis import strategies as st
from strategies import models
from torch import Tensor, nn
from toys import mlp, small_cnn

import dpc_fx
from dpc_fx import Bits, ConfigError, DPCConfig
from dpc_fx.quant import ActQuantizer, Quantizer


def quantised_layers(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the per-layer quantiser holders under ``gm.dpc``."""
    holder = getattr(gm, "dpc", None)
    return [] if holder is None else [name for name, _ in holder.named_children()]


# ---------------------------------------------------------------- graph equivalence


@examples(100)
@given(models(), st.booleans())
def test_with_quantisers_off_outputs_and_gradients_are_exactly_the_originals(
    model_x: tuple[nn.Module, Tensor], training: bool
) -> None:
    model, x = model_x
    model.train(training)
    reference = copy.deepcopy(model)  # batch norm updates its statistics in both runs
    gm = quantizers_off(compile_quiet(model, x, config=DPCConfig(b_min=2, pin_first_last=False)))
    assert quantizer_modules(gm, ROLES["act_q"]), "something was quantised before switching off"
    weight = torch.randn(reference(x.clone()).shape, generator=torch.Generator().manual_seed(7))
    reference.load_state_dict(model.state_dict())  # undo the statistics update just above

    y_ref, g_ref, gx_ref = backward_grads(reference, x, weight)
    y, g, gx = backward_grads(gm, x, weight)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert (g[name] is None) == (g_ref[name] is None), name
        if g[name] is not None:
            assert torch.equal(g[name], g_ref[name]), name


def test_shared_parameters_grads_match_one_after_the_other() -> None:
    """The compiled module shares the original's parameters: compare in turn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, w = torch.randn(5, 4), torch.randn(5, 3)
    gm = quantizers_off(dpc_fx.compile(model, x))
    assert gm.get_parameter("2.weight") is model[2].weight
    y_ref, g_ref, _ = backward_grads(model, x, w)
    y, g, _ = backward_grads(gm, x, w)
    assert torch.equal(y, y_ref)
    assert all(torch.equal(g[k], g_ref[k]) for k in g_ref)


def test_quantisation_changes_the_numbers() -> None:
    """The counterpart of the equivalence test: with quantisers on, outputs and gradients
    move (so the equivalence above is not vacuous)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    x, w = torch.randn(8, 4), torch.randn(8, 3)
    gm = dpc_fx.compile(model, x, config=DPCConfig(b_min=2, b_max=3, grad_bits=2))
    y_ref, g_ref, _ = backward_grads(model, x, w)
    y, g, _ = backward_grads(gm, x, w)
    assert not torch.equal(y, y_ref) and 0 < relative_l2(y, y_ref) < 0.5
    assert not torch.equal(g["0.weight"], g_ref["0.weight"])


@examples(30)
@given(models())
def test_a_quantised_training_step_runs_on_random_models(model_x: tuple[nn.Module, Tensor]) -> None:
    model, x = model_x
    gm = compile_quiet(model, x, config=DPCConfig(b_min=2, b_max=8, pin_first_last=False))
    y = gm(x)
    assert y.shape == model(x).shape and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(q.observed for q in quantizer_modules(gm, ROLES["act_q"]))


def test_in_place_activation_after_a_quantised_layer_trains() -> None:
    """An in-place ReLU after a quantised layer gives the gradients an out-of-place one
    gives, bit for bit (same seed: the same stochastic rounding)."""

    def build(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(4, 8),
            nn.ReLU(inplace=inplace),
            nn.Linear(8, 8),
            nn.ReLU(inplace=inplace),
            nn.Linear(8, 2),
        )

    x, w = torch.randn(3, 4), torch.randn(3, 2)
    got = []
    for inplace in (True, False):
        gm = dpc_fx.compile(build(inplace), torch.randn(2, 4))
        assert gm.dpc._2.grad_q.active
        torch.manual_seed(1)
        got.append(backward_grads(gm, x, w))
    (y, g, dx), (y_ref, g_ref, dx_ref) = got
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert g.keys() == g_ref.keys() and all(torch.equal(g[k], g_ref[k]) for k in g)


# ------------------------------------------------------------------------ determinism


@examples(25)
@given(models())
def test_compiling_is_deterministic(model_x: tuple[nn.Module, Tensor]) -> None:
    model, x = model_x
    a, b = compile_quiet(model, x), compile_quiet(model, x)
    assert dpc_fx.layers(a) == dpc_fx.layers(b)
    assert [m.bits for m in dpc_fx.layers(a)] == [m.bits for m in dpc_fx.layers(b)]
    assert a.code == b.code
    assert dpc_fx.layers(compile_quiet(model)) == dpc_fx.layers(compile_quiet(model))


# --------------------------------------------------------------------------- training


def test_training_a_compiled_mlp_with_adam_reduces_the_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 1)) + 0.5 * x[:, :1] ** 2
    model = mlp(8, 32, 32, 32, 1)
    gm = dpc_fx.compile(model, x)
    assert [str(m.bits) for m in dpc_fx.layers(gm)] == ["fp/fp/fp", "6/6/8", "6/6/8", "fp/fp/fp"]
    losses = fit(gm, x, y, F.mse_loss, torch.optim.Adam(gm.parameters(), lr=1e-2), steps=30)
    assert losses[-1] < 0.7 * losses[0], losses


def test_training_a_compiled_cnn_with_sgd_reduces_the_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16)
    y = (x[:, 0, :8].sum(1) > x[:, 0, 8:].sum(1)).long()
    model = nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Conv1d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(64, 2),
    )
    gm = dpc_fx.compile(model, x, config=DPCConfig(b_min=3, b_max=6))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    losses = fit(gm, x, y, F.cross_entropy, opt, steps=30)
    assert losses[-1] < 0.7 * losses[0], losses
    assert gm.dpc._3.act_q.observed and gm.dpc._3.act_q.running_max > 0


# ------------------------------------------------------------------------ persistence


def trained_pair() -> tuple[nn.Module, torch.fx.GraphModule, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )
    x = torch.randn(4, 2, 5, 5)
    gm = dpc_fx.compile(model, x)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(2):  # running ranges and batch-norm statistics move away from their init
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    return model, gm.eval(), x


def test_state_dict_keys_and_strict_loading_both_ways() -> None:
    """The model's keys, in its order, then the quantisers' state under ``dpc.``."""
    model, gm, x = trained_pair()
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())
    extra = [k for k in gm.state_dict() if k not in model.state_dict()]
    assert extra and all(k.startswith("dpc.") for k in extra)
    assert list(gm.state_dict()) == list(model.state_dict()) + extra
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        nn.init.normal_(p)
    fresh.load_state_dict(dpc_fx.model_state_dict(gm), strict=True)
    assert torch.equal(fresh.eval()(x), model.eval()(x))

    other = dpc_fx.compile(copy.deepcopy(fresh).train(), x)
    for p in other.parameters():
        nn.init.zeros_(p)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(quantizers_off(other.eval())(x), model(x))


def test_deepcopy_and_torch_save_round_trip_give_identical_outputs() -> None:
    _, gm, x = trained_pair()
    expected = gm(x)
    loaded = reloaded(gm)
    copied = copy.deepcopy(gm)
    for other in (copied, loaded):
        assert torch.equal(other(x), expected)
        assert not other.training
    assert dpc_fx.layers(copied) == dpc_fx.layers(gm)
    # The quantisers (and their running ranges) came along.
    assert len(quantizer_modules(loaded, ROLES["act_q"])) == 2
    assert loaded.dpc._3.act_q.observed


def test_layer_records_survive_torch_save() -> None:
    """torch.load rebuilds the graph from code (GraphModule.__reduce__), which drops node
    metadata; the records must come back all the same."""
    _, gm, _ = trained_pair()
    loaded = reloaded(gm)
    assert dpc_fx.layers(loaded) == dpc_fx.layers(gm)
    assert dpc_fx.cost(loaded).total == dpc_fx.cost(gm).total
    assert dpc_fx.plan_of(loaded) == dpc_fx.plan_of(gm)


class WithSpares(nn.Module):
    """Holds a parameter, a buffer and a submodule that forward does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.aux_head = nn.Linear(4, 7)
        self.temperature = nn.Parameter(torch.ones(()))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_state_dict_keys_include_parts_forward_does_not_use() -> None:
    model = WithSpares()
    gm = dpc_fx.compile(model, torch.randn(2, 4))
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())


# ---------------------------------------------------------------------------- resnet18


def test_resnet18_layers_and_quantisers(resnet18_compiled) -> None:
    model, gm, _ = resnet18_compiled
    convs_and_linears = [
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    metas = dpc_fx.layers(gm)
    assert [m.layer for m in metas] == convs_and_linears and len(metas) == 21
    assert [m.layer for m in metas if m.pinned] == ["conv1", "fc"]
    for role in ROLES:
        assert len(quantizer_nodes(gm, role)) == 19
    bits = {m.bits.w for m in metas if not m.pinned}
    assert bits <= set(range(4, 9)) and len(bits) > 1, "DPC spreads the widths"
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())


def test_resnet18_output_is_close_to_fp32_in_eval(resnet18_compiled) -> None:
    model, gm, x = resnet18_compiled
    model, gm = copy.deepcopy(model).eval(), copy.deepcopy(gm).eval()
    with torch.no_grad():
        rel = relative_l2(gm(x), model(x))
    assert 0 < rel < 0.5, rel


def test_resnet18_training_step(resnet18_compiled) -> None:
    _, gm, x = resnet18_compiled
    gm = copy.deepcopy(gm).train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    conv = gm.get_submodule("layer1.0.conv1")
    before = conv.weight.detach().clone()
    loss = F.cross_entropy(gm(x), torch.tensor([1, 7]))
    loss.backward()
    grads = [p.grad for p in gm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(conv.weight, before)
    assert gm.dpc.layer1_0_conv1.act_q.observed


# ----------------------------------------------------------------------- API behaviour


def test_nothing_to_quantise_warns_and_computes_exactly_the_model() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(
        UserWarning,
        match=r"Sequential has no layer to quantise \(2 matmul-like layers, all kept in full precision\)",
    ):
        gm = dpc_fx.compile(model)
    assert quantised_layers(gm) == []
    assert not any(isinstance(m, Quantizer) for m in gm.modules())
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))


def test_32_bits_everywhere_is_full_precision() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"no layer to quantise"):
        gm = dpc_fx.compile(model, config=DPCConfig(b_min=32, b_max=32, grad_bits=32))
    assert quantised_layers(gm) == []


def test_compiling_a_compiled_module_replans_its_source() -> None:
    """Quantisers are never stacked: compiling a compiled module plans the model it came
    from again."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = dpc_fx.compile(model)
    again = dpc_fx.compile(gm, config=DPCConfig(b_min=3, b_max=3))
    assert [str(m.bits) for m in dpc_fx.layers(again)] == ["fp/fp/fp", "3/3/8", "fp/fp/fp"]
    assert sum(isinstance(m, Quantizer) for m in again.modules()) == 3
    assert again.get_parameter("2.weight") is model[2].weight
    assert [str(m.bits) for m in dpc_fx.layers(gm)] == ["fp/fp/fp", "6/6/8", "fp/fp/fp"]


def test_a_deep_copy_of_a_compiled_module_can_be_replanned() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    copied = copy.deepcopy(dpc_fx.compile(model))
    again = dpc_fx.compile(copied, config=DPCConfig(b_min=3, b_max=3))
    assert [str(m.bits) for m in dpc_fx.layers(again)] == ["fp/fp/fp", "3/3/8", "fp/fp/fp"]
    assert again.get_parameter("2.weight") is copied.get_parameter("2.weight")


def test_the_original_model_is_not_modified() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.named_modules())
    dpc_fx.compile(model, torch.randn(2, 4))
    assert list(model.named_modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "dpc")


def test_cost_hand_computed() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = dpc_fx.compile(model, torch.randn(2, 4))
    c = dpc_fx.cost(gm)
    assert [(r.layer, r.macs, r.bits) for r in c.layers] == [
        ("0", 64, Bits(None, None, None)),
        ("2", 128, Bits(6, 6, 8)),
        ("4", 32, Bits(None, None, None)),
    ]
    fp = 3 * 32 * 32
    assert c.layers[1].forward == 128 * 6 * 6
    assert c.layers[1].total == 128 * (6 * 6 + 6 * 8 + 6 * 8)
    assert c.fp32 == fp * (64 + 128 + 32)
    assert c.static8 == fp * (64 + 32) + 3 * 64 * 128
    assert c.total == fp * (64 + 32) + 128 * 132
    assert c.saving_vs_fp32 == pytest.approx(1 - c.total / c.fp32)
    assert c.saving_vs_8bit == pytest.approx(1 - (fp * 96 + 128 * 132) / (fp * 96 + 192 * 128))
    assert c.forward_saving_vs_fp32 == pytest.approx(1 - (1024 * 96 + 36 * 128) / (1024 * 224))
    assert "saving_vs_fp32=" in repr(c)


def test_show_renders_every_layer() -> None:
    from rich.console import Console

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = dpc_fx.compile(model, torch.randn(2, 4))
    out = io.StringIO()
    dpc_fx.show(gm, console=Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    rows = {
        cells[2]: cells[9:12]
        for line in text.splitlines()
        if len(cells := [c.strip() for c in line.split("│")]) > 12
    }
    assert rows == {
        "0 (pinned)": ["fp", "fp", "fp"],
        "2": ["6", "6", "8"],
        "4 (pinned)": ["fp", "fp", "fp"],
    }
    assert "3 matmul-like layers: 1 quantised, 2 pinned" in text


def test_plan_round_trip_reproduces_the_bits(tmp_path) -> None:
    model = mlp(4, 8, 16, 8, 2)
    gm = dpc_fx.compile(model, config=DPCConfig(b_min=3, b_max=7))
    plan = dpc_fx.plan_of(gm)
    plan.save(tmp_path / "plan.json")
    loaded = dpc_fx.Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    again = dpc_fx.compile(model, plan=loaded)
    assert [m.bits for m in dpc_fx.layers(again)] == [m.bits for m in dpc_fx.layers(gm)]


def test_compile_without_inputs_works_and_numbers_need_inputs() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = dpc_fx.compile(model)
    assert all(m.macs is None for m in dpc_fx.layers(gm))
    assert gm(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(ConfigError, match=r"capacity='macs' needs the layers' MACs"):
        dpc_fx.compile(model, config=DPCConfig(capacity="macs"))


def test_empty_batch_runs_forward_and_backward() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4, 2),
    )
    gm = dpc_fx.compile(model, torch.randn(2, 2, 8))
    x = torch.randn(0, 2, 8, requires_grad=True)
    y = gm(x)
    assert y.shape == (0, 2)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert not gm.dpc._2.act_q.observed, "an empty batch says nothing about the range"


class OutOfOrder(nn.Module):
    """Declares its parts in another order than forward uses them (and a block with its own
    parameter), as many models do: heads first, stems last."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.block = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
        self.gain = nn.Parameter(torch.ones(4))
        self.stem = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block["a"](self.block["b"](self.stem(x))) * self.gain
        return self.head(self.mid(torch.relu(h)))


def test_parameters_keep_the_original_order() -> None:
    torch.manual_seed(0)
    model, x = OutOfOrder(), torch.randn(3, 4)
    gm = dpc_fx.compile(model, x)
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]

    # What the order is for: optimizer checkpoints carry state by parameter index.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    resumed = torch.optim.Adam(gm.parameters(), lr=1e-2)
    resumed.load_state_dict(opt.state_dict())
    for name, p in gm.named_parameters():
        assert resumed.state[p]["exp_avg"].shape == p.shape, name


class Named(nn.Module):
    """A model whose own submodule is called ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.add_module(name, nn.Linear(4, 4))
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        h = getattr(self, self.name)(self.a(x))
        return self.c(self.b(torch.relu(h)))


def test_a_user_submodule_named_dpc_is_left_alone() -> None:
    model, x = Named("dpc"), torch.randn(3, 4)
    try:
        gm = dpc_fx.compile(model, x)
    except ConfigError as e:  # refusing with a clear message would do too
        assert "'dpc'" in str(e)
        return
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())
    assert torch.equal(quantizers_off(gm)(x), model(x))


@pytest.mark.parametrize("name", ["graph", "code", "meta", "recompile"])
def test_a_submodule_named_like_a_graph_module_attribute_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"submodule named '{name}'.*nn.Sequential\(model\)"):
        dpc_fx.compile(Named(name), torch.randn(3, 4))
    # As the error says: one level down, the name is free.
    gm = dpc_fx.compile(nn.Sequential(Named(name)), torch.randn(3, 4))
    assert f"0.{name}.weight" in gm.state_dict()


def test_check_finite_names_the_layer_whose_gradient_is_not_finite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = dpc_fx.compile(model, torch.randn(3, 4), config=DPCConfig(check_finite=True))
    out = gm(torch.randn(3, 4))
    with pytest.raises(
        dpc_fx.errors.NonFiniteError,
        match=r"layer '2': its gradient holds NaN or Inf \(\d+ of 24 values\)",
    ):
        (out * torch.tensor([float("inf"), 1.0])).sum().backward()


def test_trains_under_autocast() -> None:
    """Mixed precision as users run it: activations and gradients in bfloat16, weights in
    float32; the quantisers work in float32 and hand back each tensor's own dtype."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 3, (8,))
    gm = dpc_fx.compile(small_cnn(), x, config=DPCConfig(pin_first_last=False))
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gm(x)
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters())
    ranges = quantizer_modules(gm, ActQuantizer)
    assert ranges and all(q.observed and q.running_max > q.running_min for q in ranges)
    assert all(q.running_min.dtype == torch.float32 for q in ranges)
