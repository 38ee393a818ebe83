"""Pass 1, trace: nn.Module -> GraphModule, and the errors it raises."""

from __future__ import annotations

import inspect
import sys
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from helpers import check_pass, compile_quiet, examples, quantizers_off
from hypothesis import given
from strategies import models
from torch import Tensor, nn
from toys import GatedNet

import dpc_fx
from dpc_fx import ConfigError, TraceError
from dpc_fx.meta import graph_info
from dpc_fx.passes import trace
from dpc_fx.passes.trace import rows


class RootDataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        if y.max() > 1:
            y = y / 2
        return y


@examples(25)
@given(models())
def test_trace_is_pure_and_computes_the_same_function(model_x: tuple[nn.Module, Tensor]) -> None:
    model, x = model_x
    gm = check_pass(trace, model, inputs=(x,))
    ops = {n.op for n in gm.graph.nodes}
    assert ops <= {
        "placeholder",
        "call_module",
        "call_function",
        "call_method",
        "get_attr",
        "output",
    }
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    assert not any("dpc" in n.meta for n in gm.graph.nodes), "trace measures nothing"


def test_trace_shares_submodules_and_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = trace(model)
    assert gm.get_submodule("0") is model[0]
    assert gm.get_parameter("2.weight") is model[2].weight
    assert [n.op for n in gm.graph.nodes] == [
        "placeholder",
        "call_module",
        "call_module",
        "call_module",
        "output",
    ]


def test_untraceable_submodule_raises_trace_error_naming_its_path() -> None:
    with pytest.raises(
        TraceError,
        match=r"could not trace GatedNet: submodule 'body\.1\.gate' \(Gate\) failed with "
        r"TraceError: symbolically traced variables cannot be used as inputs to control flow",
    ) as info:
        trace(GatedNet(4))
    # FX's own error is kept as the cause.
    assert isinstance(info.value.__cause__, torch.fx.proxy.TraceError)
    assert isinstance(info.value, dpc_fx.DPCError)


def test_untraceable_root_forward_is_named_as_such() -> None:
    with pytest.raises(
        TraceError,
        match=r"could not trace RootDataDependent: the forward of RootDataDependent itself failed",
    ):
        trace(RootDataDependent())


def test_leaf_modules_keep_an_untraceable_submodule_whole() -> None:
    model = GatedNet(4)
    gm = check_pass(trace, model, leaf_modules=("body.1.gate",), inputs=(torch.randn(3, 4),))
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["stem", "body.0", "body.1.lin", "body.1.gate", "body.2", "head"]


def test_leaf_modules_path_that_does_not_exist_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"trace: leaf_modules \['body\.9', 'nope'\] are not submodules of GatedNet; "
        r"use paths as model\.named_modules\(\) lists them\.",
    ):
        trace(GatedNet(4), leaf_modules=("nope", "body.1.gate", "body.9"))


@pytest.mark.parametrize("not_a_module", [lambda x: x, "resnet18", torch.randn(2)])
def test_not_a_module_is_a_config_error(not_a_module: object) -> None:
    name = type(not_a_module).__name__
    with pytest.raises(
        ConfigError, match=rf"trace: expected an nn\.Module, got {name}; pass the model object"
    ):
        trace(not_a_module)  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=rf"dpc_fx\.compile: model must be an nn\.Module, got {name}\."
    ):
        dpc_fx.compile(not_a_module)  # type: ignore[arg-type]


def test_concrete_args_specialise_a_flag() -> None:
    class Flagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: Tensor, use_b: bool = True) -> Tensor:
            return self.b(x) if use_b else self.a(x)

    gm = trace(Flagged(), concrete_args={"use_b": False})
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_module"] == ["a"]


def test_trace_error_suggests_a_fix_that_works() -> None:
    """The message proposes ``DPCConfig(leaf_modules=(...))``; following it compiles the
    model with that submodule kept whole, and nothing left to warn about."""
    model = GatedNet(4)
    with pytest.raises(TraceError) as info:
        trace(model)
    assert "DPCConfig(leaf_modules=('body.1.gate',))" in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = dpc_fx.compile(model, config=dpc_fx.DPCConfig(leaf_modules=("body.1.gate",)))
    assert any(n.op == "call_module" and n.target == "body.1.gate" for n in gm.graph.nodes)
    x = torch.randn(3, 4)
    assert gm(x).shape == model(x).shape


def test_compile_keeps_untraceable_submodules_as_leaves() -> None:
    """DESIGN.md, pipeline step 1: an untraceable submodule does not end the run; it is
    kept whole, its traceable siblings and parent are compiled, and compile says so."""
    model = GatedNet(4)
    with pytest.warns(
        UserWarning,
        match=r"GatedNet: torch\.fx cannot trace submodule 'body\.1\.gate' \(Gate\): "
        r"TraceError: .*its traceable children that the example inputs reach are compiled",
    ):
        gm = dpc_fx.compile(model, torch.randn(3, 4))
    assert [m.layer for m in dpc_fx.layers(gm)] == [
        "stem",
        "body.0",
        "body.1.lin",
        "body.2",
        "head",
    ]
    assert sum(not m.pinned for m in dpc_fx.layers(gm)) == 3
    x = torch.randn(3, 4)
    assert torch.equal(quantizers_off(gm)(x), model(x))


def test_compile_runs_an_untraceable_root_as_it_is() -> None:
    model = RootDataDependent()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = dpc_fx.compile(model)
    messages = " ".join(str(w.message) for w in caught)
    assert "cannot trace its forward (RootDataDependent)" in messages
    x = torch.randn(3, 4) * 3
    assert torch.equal(gm(x), model(x))


def test_mode_dependent_torchvision_modules_stay_calls() -> None:
    """Stochastic depth branches on ``self.training``; traced into, FX would freeze the
    branch of the trace's mode, and a model compiled in train mode would keep dropping
    residual branches in eval."""
    from torchvision.ops import StochasticDepth

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = StochasticDepth(0.5, "row")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop(self.fc(x))

    model = Residual().train()
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "drop"]
    x = torch.randn(64, 4)
    assert torch.equal(gm.eval()(x), model.eval()(x))


class NoisyIn(nn.Module):
    """Adds noise in training only, with no layers of its own."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * torch.randn_like(x) if self.training else x


class AuxHead(nn.Module):
    """A second output in training only, as GoogLeNet's auxiliary classifiers."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = NoisyIn()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.aux = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        h = self.body(self.noise(x))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_code_that_branches_on_the_mode_stays_a_call_or_is_named() -> None:
    model = AuxHead().train()
    with pytest.warns(
        UserWarning,
        match=r"AuxHead: the forward of AuxHead itself branches on self\.training, and "
        r"torch\.fx records the branch of the mode it traces in \(training\); the traced "
        r"module runs that branch in both modes\. dpc_fx\.compile keeps such modules whole",
    ):
        gm = trace(model)
    assert list(graph_info(gm).mode_branches) == [""]
    # The noise has no layers: it stays a call and follows the mode at run time.
    assert "noise" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    x = torch.randn(8, 4)
    assert torch.equal(gm.eval()(x)[0], model.eval()(x))  # still the training branch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recorded, not warned
        again = trace(model.train(), mode_branches="record")
    assert list(graph_info(again).mode_branches) == [""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inference = trace(model.eval())
    assert torch.equal(inference(x), model(x))


class WithAux(nn.Module):
    """AuxHead inside a model: the branching module is a submodule, with a BatchNorm
    before it (running statistics the compile must not touch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.block = AuxHead()

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.block(self.stem(x))


@pytest.mark.parametrize("model", [AuxHead, WithAux])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_keeps_mode_branching_code_whole_so_both_modes_run(
    model: type[nn.Module], mode: str
) -> None:
    """Compiled in either mode, the module runs the training branch in training (its
    auxiliary layer quantised and reached by gradients) and the eval branch in eval."""
    torch.manual_seed(0)
    net = model()
    getattr(net, mode)()
    x = torch.randn(8, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"\(AuxHead\) is kept whole: its code branches on self"):
        gm = dpc_fx.compile(net, x, config=dpc_fx.DPCConfig(pin_first_last=False))
    assert torch.equal(torch.get_rng_state(), rng)  # the training-mode example run left
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # no trace
    aux = "aux" if model is AuxHead else "block.aux"
    found = {m.layer: m for m in dpc_fx.layers(gm)}
    assert not found[aux].bits.full_precision
    assert found[aux].module_type == "Linear"  # a part that is a Linear itself keeps its class
    cov = dpc_fx.coverage(gm)
    assert cov.compiled == cov.layers == cov.quantised
    # Only the branching module is kept whole; the model around it, whose output differs
    # between modes only through it, traces.
    assert [leaf.path for leaf in cov.leaves] == (["block"] if model is WithAux else [""])
    out, side = gm.train()(x)
    (out.sum() + side.sum()).backward()
    assert net.get_submodule(aux).weight.grad is not None
    assert isinstance(gm.eval()(x), Tensor)
    assert torch.allclose(gm(x), net.eval()(x), atol=0.3)  # quantised, so only close


def test_only_models_whose_code_mentions_training_are_traced_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace_module = sys.modules["dpc_fx.passes.trace"]
    modes: list[bool | None] = []
    inner = trace_module._trace

    def counted(*args: object, training: bool | None = None, **kwargs: object) -> object:
        modes.append(training)
        return inner(*args, training=training, **kwargs)

    monkeypatch.setattr(trace_module, "_trace", counted)
    trace(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)))  # torch.nn only
    assert modes == [None]
    modes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace(AuxHead().train())  # compared in eval, traced again with the noise a call
    assert modes == [None, False, None]
    modes.clear()
    trace(FunctionalDropout().train())  # compared in eval: dropout follows the mode in both
    assert modes == [None, False]


class FunctionalDropout(nn.Module):
    """``F.dropout(x, p, training=self.training)``, in the model and in a submodule, and
    optionally a dropout that stays on in eval (Monte Carlo dropout)."""

    def __init__(self, always_on: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)
        self.block = nn.ModuleDict({"lin": nn.Linear(16, 16)})
        self.always_on = always_on

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(torch.relu(self.a(x)), p=0.5, training=self.training)
        h = F.dropout(self.block["lin"](h), 0.3, self.training)
        if self.always_on:
            h = F.dropout(h, p=0.2, training=True)
        return self.b(h)


def test_dropout_on_self_training_follows_the_mode_in_one_graph() -> None:
    torch.manual_seed(0)
    model, x = FunctionalDropout(), torch.randn(64, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced whole: no mode-branch leaf, no warning
        gm = dpc_fx.compile(model, x, config=dpc_fx.DPCConfig(pin_first_last=False))
    assert isinstance(gm, torch.fx.GraphModule) and dpc_fx.coverage(gm).traced
    reference = quantizers_off(gm)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert torch.equal(reference(x), expected)  # dropout in training only, same draws


def test_a_dropout_that_stays_on_in_eval_keeps_the_model_whole() -> None:
    """A literal ``training=True`` looks like ``self.training`` when traced in training
    mode; the trace in eval mode tells them apart."""
    torch.manual_seed(0)
    model, x = FunctionalDropout(always_on=True), torch.randn(64, 4)
    with pytest.warns(UserWarning, match=r"its forward \(FunctionalDropout\) is kept whole"):
        gm = dpc_fx.compile(model, x, config=dpc_fx.DPCConfig(pin_first_last=False))
    gm.eval()
    assert not torch.equal(gm(x), gm(x))  # still dropping in eval


class Filled(nn.Module):
    """No layers; in training a constant of another type (the same value) than in eval."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.full(x.shape, 3 if self.training else 3.0)


def test_a_constant_of_another_type_between_modes_is_a_branch() -> None:
    """``3 == 3.0`` in Python, but they make tensors of different dtypes: the modes'
    traces are compared by type as well as value, so the module stays a call."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.fill = nn.Linear(4, 4), Filled()

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.fc(x), self.fill(x)

    model = Model().train()
    gm = trace(model)
    assert "fill" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    x = torch.randn(2, 4)
    assert gm.eval()(x)[1].dtype == model.eval()(x)[1].dtype == torch.float32
    assert gm.train()(x)[1].dtype == torch.int64


class PositionalDrop(nn.Module):
    """Monte Carlo dropout with a positional literal flag: its code never names the mode
    (the word is not in its source), yet the literal equals the flag in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.dropout(x, 0.5, True))


def test_a_literal_dropout_flag_is_told_apart_without_training_in_the_source() -> None:
    """A flag read at run time is one the trace may have mistaken: the other mode's trace
    is compared even when no class's source suggests it."""
    assert "training" not in inspect.getsource(PositionalDrop)
    torch.manual_seed(0)
    model, x = PositionalDrop().train(), torch.randn(64, 4)
    gm = compile_quiet(model, x, config=dpc_fx.DPCConfig(pin_first_last=False))
    gm.eval()
    assert not torch.equal(gm(x), gm(x))  # still dropping in eval


class Unpacked(nn.Module):
    """Rows read by unpacking (``q, k, v = ...``), sizes read by unpacking, and a tuple
    result unpacked."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, d).permute(2, 0, 1, 3)
        top, where = torch.max(q * k, dim=-1)
        return v * top.unsqueeze(-1) + where.unsqueeze(-1)


def test_rows_read_by_unpacking_come_from_one_unbind_as_in_eager() -> None:
    """``q, k, v = qkv`` runs as eager PyTorch runs it: one ``unbind`` (one ``stack`` of the
    gradients in backward, not a zero-filled copy of ``qkv`` per row); values and gradients
    are the model's bit for bit. Sizes unpacked are read as they were; a tuple unpacked
    passes through ``rows`` as it is."""
    torch.manual_seed(0)
    model, x = Unpacked(), torch.randn(2, 5, 8)
    gm = trace(model)
    unbinds = [n for n in gm.graph.nodes if n.target is rows]
    # q, k and v; torch.max's (values, indices), which rows passes through; not the sizes
    assert sorted(len(n.users) for n in unbinds) == [2, 3]
    outs = []
    for m in (model, gm):
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        outs.append([y.detach(), *(p.grad for p in m.parameters())])
    for u, v in zip(*outs, strict=True):
        assert torch.equal(u, v)
    # A tensor of more rows than are read keeps its selects (no unbind of every row).
    many = torch.zeros(5, 2)
    assert rows(many, 2) is many and len(rows(many[:2], 2)) == 2
