"""Pass 2, capacity: parameters, MACs, shapes and depth of every matmul-like node."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import check_pass, examples, layer_node_list
from hypothesis import example, given
from strategies import Dense, MLPSpec, SpecMLP, mlp_specs, models
from torch import Tensor, nn
from toys import tiny_swin, tiny_vit

import dpc_fx
from dpc_fx import DPCConfig, LayerMeta, ShapeError
from dpc_fx.meta import Assignment, graph_info
from dpc_fx.passes import capacity, trace


def measure(model: nn.Module, *inputs: Tensor) -> dict[str, LayerMeta]:
    gm = check_pass(capacity, trace(model), inputs if inputs else None)
    return {m.layer: m for m in dpc_fx.layers(gm)}


# ---------------------------------------------------------------- hand-computed figures


def test_linear_params_and_macs() -> None:
    (meta,) = measure(nn.Sequential(nn.Linear(5, 7)), torch.randn(3, 5)).values()
    assert meta == LayerMeta(
        layer="0",
        op="linear",
        module_type="Linear",
        params=5 * 7 + 7,
        macs=3 * 5 * 7,
        flops=2 * 3 * 5 * 7,
        out_shape=(3, 7),
        depth=1,
    )


def test_conv2d_params_and_macs() -> None:
    # 9x9 input, kernel 3, stride 2, padding 1 -> 5x5 output.
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1))
    (meta,) = measure(model, torch.randn(2, 3, 9, 9)).values()
    assert (meta.op, meta.module_type) == ("conv2d", "Conv2d")
    assert meta.params == 6 * 3 * 3 * 3 + 6
    assert meta.out_shape == (2, 6, 5, 5)
    assert meta.macs == 2 * 6 * 5 * 5 * (3 * 3 * 3)


def test_grouped_conv_macs_count_only_in_group_channels() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, bias=False))
    (meta,) = measure(model, torch.randn(2, 4, 6, 6)).values()
    assert meta.params == 8 * 2 * 3 * 3
    assert meta.macs == 2 * 8 * 4 * 4 * (2 * 3 * 3)


def test_conv_transpose_macs() -> None:
    model = nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2))
    (meta,) = measure(model, torch.randn(2, 4, 5)).values()
    assert meta.out_shape == (2, 6, 11)
    assert meta.params == 4 * 6 * 3 + 6
    assert meta.macs == 2 * 4 * 5 * 6 * 3  # every input element meets every kernel tap


class Functional(nn.Module):
    """Functional layers: parameters are counted through get_attr (and ``.t()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.w1, self.b1)  # (B, 6)
        h = h @ self.w2.t()  # (B, 5)
        return torch.einsum("bi,ci->bc", h, h)  # h @ h.T: two activations, no params


def test_functional_layers_count_their_parameters() -> None:
    metas = measure(Functional(), torch.randn(3, 4))
    assert list(metas) == ["linear", "matmul", "einsum"]
    assert [m.params for m in metas.values()] == [6 * 4 + 6, 5 * 6, 0]
    assert [m.macs for m in metas.values()] == [3 * 4 * 6, 3 * 6 * 5, 3 * 3 * 5]
    assert [m.module_type for m in metas.values()] == [None, None, None]
    assert [m.depth for m in metas.values()] == [1, 2, 3]


@examples(30)
@given(spec=mlp_specs(kinds=("linear", "f_linear", "at", "matmul", "einsum")))
@example(spec=MLPSpec(1, (Dense("einsum", 1, 2, "relu", False, False),)))  # no summed index
def test_dense_layers_of_every_kind_count_d_in_times_d_out(spec: MLPSpec) -> None:
    batch = 3
    gm = capacity(trace(SpecMLP(spec)), torch.randn(batch, spec.d_in))
    metas = dpc_fx.layers(gm)
    assert len(metas) == len(spec.layers)
    for meta, layer in zip(metas, spec.layers, strict=True):
        assert meta.params == layer.d_in * layer.d_out + (layer.d_out if layer.bias else 0)
        if not (layer.kind == "einsum" and layer.d_in == 1):
            # torch lowers an einsum without a summed index to a multiply, which
            # FlopCounterMode does not count; every other kind is a real mm.
            assert meta.macs == batch * layer.d_in * layer.d_out
        assert meta.out_shape[-1] == layer.d_out  # type: ignore[index]
    depths = [m.depth for m in metas]
    assert depths == list(range(1, len(spec.layers) + 1))


def test_bmm_against_an_expanded_parameter_counts_the_parameter() -> None:
    """``w.unsqueeze(0).expand(x.shape[0], -1, -1)`` still reads the parameter ``w``."""
    spec = MLPSpec(4, (Dense("bmm", 4, 3, None, False, False),))
    (meta,) = dpc_fx.layers(capacity(trace(SpecMLP(spec)), torch.randn(2, 4)))
    assert meta.macs == 2 * 4 * 3
    assert meta.params == 4 * 3


def test_without_inputs_macs_flops_and_shapes_are_none() -> None:
    gm = check_pass(capacity, trace(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2))))
    metas = dpc_fx.layers(gm)
    assert [m.params for m in metas] == [42, 16]
    assert all(m.macs is None and m.flops is None and m.out_shape is None for m in metas)
    assert all(m.bits is None and m.capacity is None for m in metas)
    with pytest.raises(
        dpc_fx.PassOrderError,
        match=r"no MACs because the model was compiled without example inputs",
    ):
        dpc_fx.cost(
            dpc_fx.compile(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 2)))
        )


@examples(30)
@given(models())
def test_every_layer_is_measured_and_nothing_else_changes(
    model_x: tuple[nn.Module, Tensor],
) -> None:
    model, x = model_x
    traced = trace(model)
    gm = check_pass(capacity, traced, x, inputs=(x,))
    assert [(n.op, n.target, n.name) for n in gm.graph.nodes] == [
        (n.op, n.target, n.name) for n in traced.graph.nodes
    ]
    nodes = layer_node_list(gm)
    assert nodes, "every generated model has at least one layer"
    for node in nodes:
        meta = node.meta["dpc"]
        assert meta.macs is not None and meta.macs >= 0 and meta.flops == 2 * meta.macs
        assert meta.out_shape is not None and meta.out_shape[0] == x.shape[0]
        assert meta.depth >= 1 and meta.bits is None
    # Shape propagation on fake tensors agrees with the real forward (the last layer of
    # every generated model feeds the output, up to squeeze/activation/residual).
    assert torch.Size(nodes[-1].meta["dpc"].out_shape).numel() == model(x).numel()


# --------------------------------------------------------------------------------- depth


class Block(nn.Module):
    """conv_a -> conv_b, plus a 1x1 downsample conv on the skip path."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv_b = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.down = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv_b(torch.relu(self.conv_a(x))) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = Block(4, 4)
        self.block2 = Block(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_depth_is_the_longest_chain_of_layers_from_the_input() -> None:
    metas = measure(TinyResNet(), torch.randn(2, 3, 6, 6))
    assert {k: m.depth for k, m in metas.items()} == {
        "stem": 1,
        "block1.conv_a": 2,
        "block1.conv_b": 3,
        "block1.down": 2,
        "block2.conv_a": 4,
        "block2.conv_b": 5,
        "block2.down": 4,
        "fc": 6,
    }


def test_depth_needs_no_inputs() -> None:
    gm = capacity(trace(TinyResNet()))
    assert max(m.depth for m in dpc_fx.layers(gm)) == 6


def test_resnet18_fc_is_at_depth_18(resnet18_compiled) -> None:
    _, gm, _ = resnet18_compiled
    metas = {m.layer: m for m in dpc_fx.layers(gm)}
    assert metas["conv1"].depth == 1
    assert metas["layer1.0.conv1"].depth == 2
    assert metas["layer2.0.downsample.0"].depth == metas["layer2.0.conv1"].depth == 6
    assert metas["fc"].depth == 18
    assert max(m.depth for m in metas.values()) == 18
    assert metas["conv1"].params == 64 * 3 * 7 * 7
    assert metas["conv1"].macs == 2 * 64 * 16 * 16 * 3 * 7 * 7
    assert metas["fc"].params == 512 * 10 + 10 and metas["fc"].macs == 2 * 512 * 10


# -------------------------------------------------------------------------------- errors


class Head(nn.Module):
    """Fits 8x8 inputs only: the first layer runs on any size, the head does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.conv(x), 1))


def test_wrong_input_shape_names_the_failing_node_and_its_input_shapes() -> None:
    with pytest.raises(
        ShapeError,
        match=r"example inputs do not fit the model: node 'head' \(module 'head'\) failed on "
        r"inputs \[flatten: \(2, 400\) float32\] with RuntimeError: .*Check the shape and dtype",
    ):
        capacity(trace(Head()), torch.randn(2, 3, 10, 10))
    measure(Head(), torch.randn(2, 3, 8, 8))  # the right shape passes


def test_functional_node_failure_names_the_node() -> None:
    class MatW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 3))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.w

    with pytest.raises(
        ShapeError,
        match=r"node 'matmul' \(.*matmul\) failed on inputs \[x: \(2, 4\) float32, w: \(5, 3\) float32\]",
    ):
        capacity(trace(MatW()), torch.randn(2, 4))


def test_wrong_number_of_inputs_is_a_shape_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(
        ShapeError,
        match=r"Sequential\.forward takes 1\.\.1 positional inputs \(input_1\), got 2; pass a tuple",
    ):
        capacity(trace(model), (torch.randn(2, 4), torch.randn(2, 4)))


@pytest.mark.parametrize("pass_name", ["capacity", "assign", "rewrite"])
def test_pass_on_an_untraced_module_names_the_pass_to_run_first(pass_name: str) -> None:
    import dpc_fx.passes

    pass_fn = getattr(dpc_fx.passes, pass_name)
    # assign also takes the policy's decision; the graph is checked first.
    extra = (Assignment((), DPCConfig()),) if pass_name == "assign" else ()
    with pytest.raises(
        dpc_fx.PassOrderError,
        match=rf"{pass_name}: expected a torch\.fx\.GraphModule, got Sequential; "
        r"run dpc_fx\.passes\.trace on the model first\.",
    ):
        pass_fn(nn.Sequential(nn.Linear(2, 2)), *extra)


# ---------------------------------------------------- sizing layers without a dispatch


def _measured(gm: torch.fx.GraphModule) -> tuple[dict[str, tuple], int]:
    layers = {n.name: (n.meta["dpc"].flops, n.meta["dpc"].out_shape) for n in layer_node_list(gm)}
    return layers, graph_info(gm).macs


def _dispatched(monkeypatch: pytest.MonkeyPatch, model: nn.Module, *inputs: Tensor) -> tuple:
    """Capacity with every layer sized by the fake dispatch and FlopCounterMode."""
    capacity_module = sys.modules["dpc_fx.passes.capacity"]
    with monkeypatch.context() as patch:
        patch.setattr(capacity_module, "_size_module", lambda m, x: None)
        patch.setattr(capacity_module, "_size_linear", lambda *args: None)
        return _measured(capacity(trace(model), inputs))


class Convs(nn.Module):
    """Convolutions of every kind the arithmetic covers, and linears on 2-D to 4-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2))
        self.grouped = nn.Conv2d(8, 8, 3, padding="same", groups=4, bias=False)
        self.valid = nn.Conv2d(8, 4, 2, padding="valid", padding_mode="zeros")
        self.circular = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2))
        self.fc = nn.Linear(4, 5)
        self.mha = nn.MultiheadAttention(5, 1, batch_first=True)

    def forward(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        a = self.c1(a).mean()
        b = self.circular(self.valid(self.grouped(self.c2(b))))  # (n, 4, h, w)
        b = self.fc(b.permute(0, 2, 3, 1))  # a linear on 4-D input
        b = self.mha(b.flatten(1, 2), b.flatten(1, 2), b.flatten(1, 2))[0].sum()
        return (
            a + b + self.c3(c).mean() + F.linear(c.flatten(1), torch.ones(3, 2 * 3 * 9 * 9)).sum()
        )


@pytest.mark.parametrize(
    "build, inputs",
    [
        (Convs, (torch.randn(2, 3, 17), torch.randn(2, 3, 15, 12), torch.randn(2, 2, 3, 9, 9))),
        (lambda: torchvision.models.resnet18(), (torch.randn(2, 3, 40, 40),)),
        (lambda: torchvision.models.mobilenet_v3_small(), (torch.randn(1, 3, 64, 64),)),
        (lambda: tiny_vit(), (torch.randn(2, 3, 32, 32),)),
        (lambda: tiny_swin(v2=True), (torch.randn(1, 3, 44, 36),)),
    ],
    ids=["convs", "resnet18", "mobilenet_v3", "vit", "swin_v2"],
)
def test_sizing_by_arithmetic_matches_the_flop_counter(
    monkeypatch: pytest.MonkeyPatch, build: Callable[[], nn.Module], inputs: tuple[Tensor, ...]
) -> None:
    torch.manual_seed(0)
    model = build()
    assert _measured(capacity(trace(model), inputs)) == _dispatched(monkeypatch, model, *inputs)


@examples(15)
@given(models())
def test_sizing_by_arithmetic_matches_on_generated_models(
    model_x: tuple[nn.Module, Tensor],
) -> None:
    model, x = model_x
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _measured(capacity(trace(model), (x,))) == _dispatched(monkeypatch, model, x)


def test_a_layer_norm_of_the_wrong_size_is_still_caught() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(6))
    with pytest.raises(
        ShapeError, match=r"node '_1' \(module '1'\) failed on inputs \[_0: \(3, 8\)"
    ):
        capacity(trace(model), torch.randn(3, 4))
