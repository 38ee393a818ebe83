"""Pass 4, rewrite: quantiser nodes, counted by kind and checked for order, then numerics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ROLES, check_pass, examples, layer_node_list, quantizer_modules, quantizer_nodes
from helpers import assigned as assign
from hypothesis import given
from strategies import CNNSpec, Conv, SpecCNN, models
from torch import Tensor, fx, nn

import dpc_fx
from dpc_fx import Bits, DPCConfig, DPCError, PassOrderError
from dpc_fx.passes import capacity, rewrite, trace
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer, fake_quantize


def assigned(
    model: nn.Module, x: Tensor | None = None, config: DPCConfig | None = None
) -> fx.GraphModule:
    return assign(capacity(trace(model), x), config)


def check_layout(gm: fx.GraphModule) -> None:
    """Each quantised layer has one act_q and one weight_q feeding it and one grad_q right
    after it; full-precision layers have none."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in layer_node_list(gm):
        bits = node.meta["dpc"].bits
        mine = {
            role: [q for q in quantizer_nodes(gm, role) if q.name == f"{node.name}_{role}"]
            for role in ROLES
        }
        if bits.full_precision:
            assert not any(mine.values()), node.name
            assert not hasattr(gm, "dpc") or node.name not in gm.dpc._modules
            continue
        (act_q,), (weight_q,), (grad_q,) = mine["act_q"], mine["weight_q"], mine["grad_q"]
        assert order[act_q] < order[node] and order[weight_q] < order[node]
        assert order[grad_q] == order[node] + 1, "grad_q comes right after its layer"
        assert grad_q.args == (node,)
        assert act_q in node.all_input_nodes and weight_q in node.all_input_nodes
        assert list(node.users) == [grad_q], "every user reads the gradient-quantised output"
        held = gm.get_submodule(f"dpc.{node.name}")
        assert (held.act_q.bits, held.weight_q.bits, held.grad_q.bits) == (bits.a, bits.w, bits.g)


@examples(50)
@given(models())
def test_one_quantiser_of_each_kind_per_free_layer(model_x: tuple[nn.Module, Tensor]) -> None:
    model, x = model_x
    gm = assigned(model, x, DPCConfig(b_min=2, b_max=8))
    out = check_pass(rewrite, gm, inputs=(x,))
    metas = [n.meta["dpc"] for n in layer_node_list(out)]
    assert metas == [n.meta["dpc"] for n in layer_node_list(gm)], "records travel unchanged"
    free = sum(not m.bits.full_precision for m in metas)
    assert free == sum(not m.pinned for m in metas)
    for role, cls in ROLES.items():
        assert len(quantizer_nodes(out, role)) == free
        assert len(quantizer_modules(out, cls)) == free
    check_layout(out)


def test_resnet18_has_19_quantisers_of_each_kind(resnet18_compiled) -> None:
    model, gm, _ = resnet18_compiled
    layer_nodes = layer_node_list(gm)
    assert len(layer_nodes) == 21
    assert sum(m.pinned for m in dpc_fx.layers(gm)) == 2
    for role, cls in ROLES.items():
        assert len(quantizer_nodes(gm, role)) == 19
        assert len(quantizer_modules(gm, cls)) == 19
    check_layout(gm)
    # Pinned layers stay module calls; quantised ones became functional convs.
    kinds = {n.name: (n.op, n.target) for n in layer_nodes}
    assert kinds["conv1"] == ("call_module", "conv1") and kinds["fc"] == ("call_module", "fc")
    assert kinds["layer1_0_conv1"] == ("call_function", F.conv2d)
    assert gm.get_submodule("layer1.0.conv1") is model.layer1[0].conv1


def test_rewrite_sketch_of_the_docstring() -> None:
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Conv1d(1, 2, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.conv, self.out = model[0], model[2], model[4]

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.inp(x)).unsqueeze(1)
            return self.out(torch.flatten(self.conv(h), 1))

    gm = check_pass(rewrite, assigned(Net(), torch.randn(2, 4)))
    names = [n.name for n in gm.graph.nodes]
    start, at = names.index("conv_weight"), names.index("conv")
    assert sorted(names[start:at]) == ["conv_act_q", "conv_bias", "conv_weight", "conv_weight_q"]
    assert names[at + 1] == "conv_grad_q"
    conv = next(n for n in gm.graph.nodes if n.name == "conv")
    assert conv.op == "call_function" and conv.target is F.conv1d
    assert conv.args[3:] == ((2,), (1,), (1,), 1)  # stride, padding, dilation, groups
    assert gm.dpc.conv.weight_q.channel_dim == 0


@pytest.mark.parametrize(
    ("config", "roles"),
    [
        (DPCConfig(grad_bits=None), {"act_q", "weight_q"}),
        (DPCConfig(b_min=32, b_max=32), {"grad_q"}),
        (DPCConfig(b_min=32, b_max=32, grad_bits=32), set()),
    ],
)
def test_only_active_roles_get_a_quantiser(config: DPCConfig, roles: set[str]) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = check_pass(rewrite, assigned(model, config=config), inputs=(torch.randn(3, 4),))
    present = {role for role in ROLES if quantizer_nodes(gm, role)}
    assert present == roles
    for role in roles:
        assert len(quantizer_nodes(gm, role)) == 1


@pytest.mark.parametrize(
    ("module", "x", "dim"),
    [
        (nn.Linear(3, 4), torch.randn(2, 3), 0),
        (nn.Conv2d(2, 4, 3), torch.randn(2, 2, 5, 5), 0),
        (nn.ConvTranspose2d(2, 4, 3, groups=2), torch.randn(2, 2, 5, 5), 1),
    ],
)
def test_weight_quantiser_channel_dim_is_the_output_channel(
    module: nn.Module, x: Tensor, dim: int
) -> None:
    gm = check_pass(rewrite, assigned(nn.Sequential(module), x, DPCConfig(pin_first_last=False)))
    assert gm.dpc._0.weight_q.channel_dim == dim


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_at = nn.Parameter(torch.randn(4, 5))
        self.w_lin = nn.Parameter(torch.randn(6, 5))
        self.w_ein = nn.Parameter(torch.randn(6, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x @ self.w_at, self.w_lin)
        h = torch.einsum("bij,jk->bik", h.unsqueeze(1), self.w_ein).squeeze(1)
        return torch.matmul(h, h.t())


def test_functional_layers_quantise_their_operands() -> None:
    gm = check_pass(
        rewrite,
        assigned(Functional(), torch.randn(2, 4), DPCConfig(pin_first_last=False)),
        inputs=(torch.randn(2, 4),),
    )
    check_layout(gm)
    dims = {name: held.weight_q.channel_dim for name, held in gm.dpc.named_children()}
    # x @ w: output channels are w's columns; F.linear: rows; einsum "bij,jk->bik": k, the
    # weight's index the output keeps; activation @ activation: per tensor.
    assert dims == {"matmul": -1, "linear": 0, "einsum": 1, "matmul_1": None}
    w = gm.get_parameter("w_ein")
    bits = gm.dpc.einsum.weight_q.bits
    assert torch.equal(gm.dpc.einsum.weight_q(w), fake_quantize(w, bits, channel_dim=1))
    assert gm.dpc.matmul.weight_q.channel_dim == -1
    matmul_1 = next(n for n in gm.graph.nodes if n.name == "matmul_1")
    assert [a.name for a in matmul_1.args] == ["matmul_1_act_q", "matmul_1_weight_q"]


def conv_block(c_in: int, c_out: int, **changes: object) -> Conv:
    """A 3x3, stride-1, padding-1 conv block spec with ``changes``."""
    fields: dict[str, object] = {
        "c_in": c_in,
        "c_out": c_out,
        "kernel": 3,
        "stride": 1,
        "padding": 1,
        "dilation": 1,
        "groups": 1,
        "padding_mode": "zeros",
        "transposed": False,
        "output_padding": 0,
        "batch_norm": False,
        "act": None,
        "branch": False,
        "residual": False,
    }
    return Conv(**(fields | changes))  # type: ignore[arg-type]


class MatVec(nn.Module):
    """A matrix-vector product: the weight is one output channel of ``d`` elements."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.v, self.c = nn.Linear(4, 8), nn.Parameter(torch.randn(8)), nn.Linear(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c((torch.relu(self.a(x)) @ self.v).unsqueeze(1))


def test_a_vector_weight_is_quantised_as_one_channel() -> None:
    model = MatVec()
    gm = rewrite(assigned(model, torch.randn(3, 4), DPCConfig(b_min=2, b_max=2)))
    assert gm.dpc.matmul.weight_q.bits == 2
    assert gm.dpc.matmul.weight_q(model.v).unique().numel() <= 4


def test_reflect_padding_becomes_an_explicit_pad() -> None:
    spec = CNNSpec(
        dims=2,
        c_in=2,
        size=5,
        blocks=(
            conv_block(2, 4),
            conv_block(
                4, 4, groups=2, padding_mode="reflect", batch_norm=True, act="relu", residual=True
            ),
        ),
        c_last=4,
        size_last=5,
        n_out=2,
    )
    x = torch.randn(2, 2, 5, 5)
    gm = check_pass(rewrite, assigned(SpecCNN(spec), x), inputs=(x,))
    pads = [n for n in gm.graph.nodes if n.target is F.pad]
    assert len(pads) == 1 and pads[0].kwargs == {"mode": "reflect"}
    conv = next(n for n in gm.graph.nodes if n.name == "features_1_conv")
    assert conv.args[4] == 0 and pads[0] in conv.all_input_nodes[0].all_input_nodes


def test_quantiser_nodes_keep_the_layers_provenance() -> None:
    spec = CNNSpec(
        dims=2, c_in=2, size=4, blocks=(conv_block(2, 4),), c_last=4, size_last=4, n_out=2
    )
    model = SpecCNN(spec)
    gm = rewrite(
        assigned(nn.Sequential(nn.Linear(2, 2), model), None, DPCConfig(pin_first_last=False))
    )
    layer = next(n for n in gm.graph.nodes if n.name == "_1_features_0_conv")
    assert "nn_module_stack" in layer.meta
    for role in ROLES:
        q = next(n for n in gm.graph.nodes if n.name == f"{layer.name}_{role}")
        assert q.meta["nn_module_stack"] == layer.meta["nn_module_stack"]


def test_rewrite_without_assign_raises_pass_order_error() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(
        PassOrderError,
        match=r"rewrite: node '_0' has no bit-widths yet; run dpc_fx\.passes\.assign on the graph first\.",
    ):
        rewrite(capacity(trace(model)))


def test_rewrite_of_an_unmeasured_graph_raises_pass_order_error() -> None:
    with pytest.raises(
        PassOrderError,
        match=r"rewrite: node '_0' .*no meta\['dpc'\]; run dpc_fx\.passes\.capacity on the graph first\.",
    ):
        rewrite(trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))))


def test_module_called_with_extra_arguments_is_refused_with_the_fix() -> None:
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.up, self.b = (
                nn.Conv1d(2, 2, 1),
                nn.ConvTranspose1d(2, 2, 3, stride=2),
                nn.Conv1d(2, 2, 1),
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.up(self.a(x), output_size=[10]))

    with pytest.raises(
        DPCError,
        match=r"rewrite: module 'up' \(ConvTranspose1d\) is called with extra arguments \['output_size'\]; "
        r".*set output_padding on the module instead",
    ):
        dpc_fx.compile(Up(), torch.randn(2, 2, 4))


def test_quantisers_are_fresh_per_rewrite() -> None:
    gm = assigned(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    )
    a, b = rewrite(gm), rewrite(gm)
    assert a.dpc is not b.dpc and a.dpc._2.act_q is not b.dpc._2.act_q
    assert isinstance(a.dpc._2.act_q, ActQuantizer)
    assert isinstance(a.dpc._2.weight_q, WeightQuantizer)
    assert isinstance(a.dpc._2.grad_q, GradQuantizer)
    assert a.get_submodule("2") is b.get_submodule("2")
    assert dpc_fx.layers(a)[1].bits == Bits(6, 6, 8)
