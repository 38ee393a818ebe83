"""Attention as a layer, the ATen forms of matmul-like ops (graphs captured by
``torch.export``), and coverage that counts every matmul-like layer.

Captured graphs are made here with ``torch.export.export(..., strict=False).module()`` and
run through the passes by hand, as ``dpc_fx.compile`` will once capture is one more way the
part tree gets its parts.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from helpers import check_pass, quantizers_off
from rich.console import Console
from torch import Tensor, fx, nn
from torch.utils.flop_counter import FlopCounterMode

import dpc_fx
from dpc_fx import DPCConfig
from dpc_fx.int8 import Int8Linear
from dpc_fx.meta import Bits, compiled, records
from dpc_fx.passes import assign, capacity, lower, rewrite
from dpc_fx.passes._matmul import matmul_spec
from dpc_fx.passes.capacity import attention_macs
from dpc_fx.policy import decide
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer


class Attend(nn.Module):
    """Attention without parameters, and a product of two activations."""

    def forward(self, h: Tensor) -> Tensor:
        q = h.view(2, 4, 2, 4).transpose(1, 2)  # B=2, H=2, L=4, E=4
        out = F.scaled_dot_product_attention(q, q, q)
        out = out.transpose(1, 2).reshape(2, 4, 8)
        return torch.bmm(out, h.transpose(1, 2))  # (2, 4, 4)


class AtenZoo(nn.Module):
    """One of each matmul-like op, as ``torch.export`` captures them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = Attend()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.m = nn.Parameter(torch.randn(6, 8))
        self.a = nn.Parameter(torch.randn(8, 5))
        self.b = nn.Parameter(torch.randn(5))
        self.e = nn.Parameter(torch.randn(8, 5))
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x: Tensor, img: Tensor) -> Tensor:
        h = self.fc(x)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        s = self.attn(h)
        y = h @ self.w  # (2, 4, 6)
        y2 = torch.mm(y.reshape(8, 6), self.m)  # (8, 8)
        y4 = torch.addmm(self.b, y2, self.a)
        y5 = torch.einsum("ij,jk->ik", y2, self.e)
        g = self.deconv(self.conv2(img))
        return s.sum() + y4.sum() + y5.sum() + g.sum()


def zoo_inputs() -> tuple[Tensor, Tensor]:
    return torch.randn(2, 4, 8), torch.randn(2, 2, 6, 6)


def captured(model: nn.Module, inputs: tuple[Tensor, ...]) -> fx.GraphModule:
    return torch.export.export(model, inputs, strict=False).module()


def measured(model: nn.Module, inputs: tuple[Tensor, ...], **config: object) -> fx.GraphModule:
    gm = check_pass(capacity, captured(model, inputs), inputs)
    return check_pass(assign, gm, decide(records(gm), DPCConfig(**config)))  # type: ignore[arg-type]


def test_captured_aten_ops_are_layers_named_after_their_modules() -> None:
    torch.manual_seed(0)
    model, inputs = AtenZoo(), zoo_inputs()
    gm = captured(model, inputs)
    targets = {str(n.target) for n in gm.graph.nodes if matmul_spec(n, gm) is not None}
    assert targets == {
        "aten.linear.default",
        "aten.conv1d.default",
        "aten.scaled_dot_product_attention.default",
        "aten.bmm.default",
        "aten.matmul.default",
        "aten.mm.default",
        "aten.addmm.default",
        "aten.einsum.default",
        "aten.conv2d.default",
        "aten.conv_transpose2d.input",
    }
    metas = {m.layer: m for m in records(check_pass(capacity, gm, inputs))}
    # Modules by their weights' paths; weightless layers by the module that ran them (the
    # module stack); functional layers on the model's own parameters by node name.
    assert list(metas) == [
        "fc",
        "conv1",
        "attn.attention",
        "attn.bmm",
        "matmul",
        "mm",
        "addmm",
        "einsum",
        "conv2",
        "deconv",
    ]
    assert (metas["fc"].module_type, metas["conv1"].module_type) == ("Linear", "Conv1d")
    assert metas["attn.attention"].op == "attention" and metas["attn.attention"].params == 0
    assert metas["addmm"].params == 8 * 5 + 5 and metas["deconv"].params == 4 * 2 * 4 + 2
    assert metas["attn.attention"].depth == 3  # fc, conv1, then attention


def test_captured_layer_macs_match_the_flop_counter_plus_attention_from_shapes() -> None:
    torch.manual_seed(0)
    model, inputs = AtenZoo(), zoo_inputs()
    metas = {m.layer: m for m in records(capacity(captured(model, inputs), inputs))}
    with attention_by_shapes() as attention, FlopCounterMode(display=False) as counter:
        model(*inputs)
    # B*H*L*S*E + B*H*L*S*Ev, by hand: B=2, H=2, L=S=4, E=Ev=4.
    assert metas["attn.attention"].macs == attention[0] == 2 * 2 * 4 * 4 * (4 + 4)
    others = sum(m.macs or 0 for k, m in metas.items() if k != "attn.attention")
    assert others == counter.get_total_flops() // 2
    counts = counter.get_flop_counts()["AtenZoo"]
    assert metas["addmm"].macs == counts[torch.ops.aten.addmm] // 2 - metas["fc"].macs


def test_captured_layers_are_quantised_and_train() -> None:
    torch.manual_seed(0)
    model, inputs = AtenZoo(), zoo_inputs()
    gm = check_pass(rewrite, measured(model, inputs, pin_first_last=False), inputs=inputs)
    held = dict(gm.dpc.named_children())
    assert set(held) == {
        "linear",
        "conv1d",
        "scaled_dot_product_attention",
        "bmm",
        "matmul",
        "mm",
        "addmm",
        "einsum",
        "conv2d",
        "conv_transpose2d",
    }
    dims = {n: h.weight_q.channel_dim for n, h in held.items() if hasattr(h, "weight_q")}
    # Parameters per output channel (a transposed conv keeps them in dimension 1), the
    # second operand of a product of activations per tensor.
    assert dims == {
        "linear": 0,
        "conv1d": 0,
        "conv2d": 0,
        "conv_transpose2d": 1,
        "matmul": -1,
        "mm": -1,
        "addmm": -1,
        "einsum": 1,
        "bmm": None,
    }
    attention = held["scaled_dot_product_attention"]
    assert {n: type(q) for n, q in attention.named_children()} == {
        "query_q": ActQuantizer,
        "key_q": ActQuantizer,
        "value_q": ActQuantizer,
        "grad_q": GradQuantizer,
    }
    gm.train()
    out = gm(*inputs)
    assert isinstance(out, Tensor) and out.shape == ()  # the capture's own output, not a tuple
    out.backward()
    assert all(p.grad is not None for p in gm.parameters())
    assert attention.query_q.observed and attention.value_q.observed
    assert not torch.equal(out.detach(), model(*inputs).detach())  # something was quantised
    with torch.no_grad():
        assert torch.equal(quantizers_off(gm)(*inputs), model(*inputs))


def test_a_decomposed_convolution_keeps_its_channels() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 3, 2, stride=2))
    x = (torch.randn(1, 2, 8, 8),)
    gm = torch.export.export(model, x, strict=False).run_decompositions().module()
    gm = rewrite(
        assign(capacity(gm, x), decide(records(capacity(gm, x)), DPCConfig(pin_first_last=False)))
    )
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert len(convs) == 2
    dims = [gm.get_submodule(f"dpc.{n.name}").weight_q.channel_dim for n in convs]
    assert dims == [0, 1]
    assert [m.layer for m in records(gm)] == ["0", "1"]
    assert [m.op for m in records(gm)] == ["convolution", "convolution"]


# ------------------------------------------------------------------ attention, traced


class SelfAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def tiny_transformer() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16), SelfAttention(), SelfAttention(), nn.GELU(), nn.Linear(16, 4)
    )


def compile_attention(**config: object) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpc_fx.compile(tiny_transformer(), torch.randn(2, 6, 8), config=DPCConfig(**config))


def test_attention_is_a_layer_with_two_products_and_no_parameters() -> None:
    gm = compile_attention()
    metas = {m.layer: m for m in dpc_fx.layers(gm)}
    att = metas["1.attention"]
    assert (att.op, att.params, att.module_type) == ("attention", 0, None)
    assert (
        att.macs == attention_macs((2, 2, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8)) == 2 * 2 * 6 * 6 * 16
    )
    assert att.depth == 3 and metas["2.attention"].depth == 6  # 0, qkv, attention
    # No parameters: capacity 0 under capacity="params", so b_max, and never pinned.
    assert att.capacity == 0 and att.bits == Bits(8, 8, 8) and not att.pinned
    held = gm.get_submodule(compiled(gm).quantizers[list(metas).index("1.attention")])  # type: ignore[union-attr]
    assert sorted(n for n, _ in held.named_children()) == ["grad_q", "key_q", "query_q", "value_q"]
    assert not any(isinstance(q, WeightQuantizer) for q in held.children())
    assert [r.layer for r in dpc_fx.cost(gm).layers].count("1.attention") == 1
    console = Console(file=io.StringIO(), width=200)
    dpc_fx.show(gm, console=console)
    assert "1.attention" in console.file.getvalue()  # type: ignore[attr-defined]


def test_attention_by_macs_is_ranked_like_any_layer() -> None:
    metas = {m.layer: m for m in dpc_fx.layers(compile_attention(capacity="macs"))}
    assert metas["1.attention"].capacity == metas["1.attention"].macs


def test_attention_off_keeps_it_in_full_precision_and_coverage_says_so() -> None:
    on, off = compile_attention(), compile_attention(attention=False)
    atts = [m for m in dpc_fx.layers(off) if m.op == "attention"]
    assert len(atts) == 2 and all(m.bits is not None and m.bits.full_precision for m in atts)
    assert all(m.quantised for m in dpc_fx.layers(on) if m.op == "attention")
    cov_on, cov_off = dpc_fx.coverage(on), dpc_fx.coverage(off)
    assert "attention: 2/2 quantised" in str(cov_on)
    assert "attention (2) in full precision (attention=False)" in str(cov_off)
    assert cov_off.quantised == cov_on.quantised - 2
    spent = sum(m.macs or 0 for m in atts)
    assert cov_on.quantised_macs - cov_off.quantised_macs == spent  # type: ignore[operator]
    x = torch.randn(2, 6, 8)
    off.eval()
    with torch.no_grad():
        got = off(x)
    assert got.shape == (2, 6, 4)
    with pytest.raises(dpc_fx.ConfigError, match="attention='no' must be True or False"):
        DPCConfig(attention="no")  # type: ignore[arg-type]


# -------------------------------------------------------------------------- coverage


class Conv1D(nn.Module):
    """GPT-2's layer: ``x @ W + b`` by ``addmm``, a weight of shape (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        size = x.size()[:-1] + (self.weight.shape[1],)  # noqa: RUF005  (a Proxy cannot be unpacked)
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(size)


def test_coverage_counts_every_matmul_like_layer() -> None:
    model = nn.Sequential(Conv1D(8, 16), Conv1D(16, 16), Conv1D(16, 16), Conv1D(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = dpc_fx.compile(model, torch.randn(2, 3, 8))
    cov = dpc_fx.coverage(gm)
    assert (cov.layers, cov.compiled, cov.quantised) == (4, 4, 2)
    assert str(cov).startswith("coverage: traced whole; 2/4 matmul-like layers quantised")


@contextlib.contextmanager
def attention_by_shapes() -> Iterator[list[int]]:
    """Count ``F.scaled_dot_product_attention`` from its shapes, B*H*L*S*E + B*H*L*S*Ev per
    call, and keep it from PyTorch's flop counter (which counts the math kernel CPUs run
    for small inputs, and none of the fused ones): its output is zeros of the right shape."""
    macs: list[int] = []

    def counted(q: Tensor, k: Tensor, v: Tensor, *args: object, **kwargs: object) -> Tensor:
        macs.append(math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", counted)
        yield macs


def independent_share(model: nn.Module, x: Tensor, pinned: set[str]) -> float:
    """Quantised share of MACs counted without dpc_fx: PyTorch's flop counter over the plain
    model (per module), plus attention from its shapes, less the pinned modules' MACs."""
    with attention_by_shapes() as attention, torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.eval()(x)
    assert attention, "the model ran no F.scaled_dot_product_attention"
    root = type(model).__name__
    flops = counter.get_flop_counts()
    total = counter.get_total_flops() // 2 + sum(attention)
    fp = sum(sum(flops[f"{root}.{p}"].values()) // 2 for p in pinned)
    return (total - fp) / total


def test_coverage_share_matches_an_independent_count_on_a_timm_vit() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2
    )
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = dpc_fx.compile(model, x)
    metas = dpc_fx.layers(gm)
    assert [m.op for m in metas].count("attention") == 2
    pinned = {m.layer for m in metas if m.pinned}
    assert pinned == {"patch_embed.proj", "head"}
    share = dpc_fx.coverage(gm).macs_share
    assert share == pytest.approx(independent_share(model, x, pinned), abs=1e-9)
    off = dpc_fx.compile(model, x, config=DPCConfig(attention=False))
    attention = sum(m.macs or 0 for m in metas if m.op == "attention")
    cov_off = dpc_fx.coverage(off)
    assert cov_off.macs_share == pytest.approx(share - attention / cov_off.macs, abs=1e-9)  # type: ignore[operator]


def test_a_captured_linear_is_lowered_to_integer_kernels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4))
    x = (torch.randn(8, 16),)
    config = DPCConfig(lower=True, b_min=8, b_max=8)
    gm = capacity(captured(model, x), x)
    gm = lower(rewrite(assign(gm, decide(records(gm), config))))
    assert [m.lowered for m in records(gm)] == [False, True, False]
    assert isinstance(gm.get_submodule("dpc.linear_1"), Int8Linear)
    gm(*x).sum().backward()
