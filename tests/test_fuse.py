"""The fuse pass: one autograd node per quantised conv/linear layer, integer codes kept.

Tolerance: none. A fused layer runs the unfused quantisers' kernels, its codes dequantise to
exactly the fake-quantised floats, its backward calls the products autograd calls for the
unfused op (``aten.convolution_backward``; for linear the same ``mm`` layouts), and it draws
its gradient's stochastic-rounding seed at the same point of the backward pass. So outputs,
gradients and running ranges are compared with ``torch.equal``.
"""

from __future__ import annotations

import copy
import importlib
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_quiet, layer_node_list, quantizer_nodes
from rich.console import Console
from torch import Tensor, nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from toys import mlp, small_cnn

import dpc_fx
from dpc_fx import DPCConfig, kernels
from dpc_fx.fused import FusedAttention, FusedLayer, pack, packed_bytes, unpack
from dpc_fx.passes import fuse
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer
from dpc_fx.report import layer_table

CONFIG = DPCConfig(b_min=3, b_max=7, pin_first_last=False)


class Mixed(nn.Module):
    """Every kind of layer the fused path takes, and one it leaves alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.point = nn.Conv2d(8, 16, 1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)  # not fused
        self.seq = nn.Conv1d(8, 12, 3, dilation=2)
        self.proj = nn.Linear(12, 12, bias=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.point(torch.relu(self.depthwise(torch.relu(self.stem(x))))))
        h = torch.relu(self.up(h)).flatten(2)  # (batch, 8, 64)
        h = self.seq(h).transpose(1, 2).contiguous()  # (batch, 60, 12)
        h = self.proj(h)
        h = h @ h.transpose(1, 2) @ h  # products of two activations
        return self.head(torch.tanh(h))


def _model() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Mixed(), torch.randn(2, 3, 8, 8)


def _step(gm: nn.Module, x: Tensor, seed: int) -> list[Tensor]:
    """Output, input gradient and parameter gradients of one backward pass."""
    for p in gm.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the gradient quantisers' noise
    y = gm(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None
    return [y.detach(), x.grad, *(p.grad for p in gm.parameters())]  # type: ignore[misc]


def _ranges(gm: nn.Module) -> list[Tensor]:
    return [
        t
        for m in gm.modules()
        if isinstance(m, ActQuantizer)
        for t in (m.running_min, m.running_max)
    ]


def test_fused_layers_match_the_unfused_quantisers_bit_for_bit() -> None:
    model, x = _model()
    plain = compile_quiet(model, x, config=CONFIG.replace(fuse=False))
    fused = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    assert sum(isinstance(m, FusedLayer) for m in fused.modules()) == 8
    for mode, seed in (("train", 1), ("train", 2), ("eval", 3)):  # eval: the running range
        a = _step(getattr(plain, mode)(), x, seed)
        b = _step(getattr(fused, mode)(), x, seed)
        assert len(a) == len(b)
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), (mode, i, (u - v).abs().max())
        assert all(torch.equal(u, v) for u, v in zip(_ranges(plain), _ranges(fused), strict=True))


def test_a_fused_layer_above_8_bits_runs_the_unfused_chain() -> None:
    model, x = _model()
    plain = compile_quiet(model, x, config=CONFIG.replace(fuse=False))
    fused = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    for gm in (plain, fused):
        for m in gm.modules():
            if isinstance(m, ActQuantizer):
                m.bits = 12  # codes no longer fit a byte
    for u, v in zip(_step(plain, x, 4), _step(fused, x, 4), strict=True):
        assert torch.equal(u, v)


def test_fuse_leaves_one_node_per_layer_that_names_its_quantisers() -> None:
    model, x = _model()
    plain = compile_quiet(model, x, config=CONFIG.replace(fuse=False))
    gm = fuse(plain)
    assert len(quantizer_nodes(plain, "act_q")) == 9
    # ConvTranspose keeps its quantiser nodes.
    assert [len(quantizer_nodes(gm, r)) for r in ("act_q", "weight_q", "grad_q")] == [1, 1, 1]
    fused = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FusedLayer)
    ]
    assert {n.meta["dpc"].layer for n in fused} == {
        "stem",
        "depthwise",
        "point",
        "seq",
        "proj",
        "matmul",
        "matmul_1",
        "head",
    }
    assert all(n.target == f"dpc.{n.meta['dpc'].layer}" for n in fused)
    # The record stays on the layer's node, the quantisers stay the same objects under the
    # same paths, so state_dict keys and schedules are unchanged.
    assert len(layer_node_list(gm)) == len(layer_node_list(plain))
    assert gm.state_dict().keys() == plain.state_dict().keys()
    assert dpc_fx.model_state_dict(gm).keys() == model.state_dict().keys()
    for node in fused:
        layer = gm.get_submodule(node.target)
        assert layer.act_q is plain.get_submodule(f"{node.target}.act_q")
        bits = node.meta["dpc"].bits
        assert f"act_q={bits.a}, weight_q={bits.w}, grad_q={bits.g}" in repr(layer)
    assert plain.graph is not gm.graph and len(quantizer_nodes(plain, "act_q")) == 9  # pure


def test_a_schedule_sets_the_bits_a_fused_layer_runs_at() -> None:
    model, x = _model()
    gm = compile_quiet(model, x, config=CONFIG)
    schedule = dpc_fx.CyclicSchedule(gm, low=3, high=8, period=4)
    stem = gm.get_submodule("dpc.stem")
    assert isinstance(stem, FusedLayer)
    seen = set()
    for _ in range(4):
        seen.add(stem.act_q.bits)
        assert f"act_q={stem.act_q.bits}," in repr(stem)
        schedule.step()
    assert len(seen) > 1


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1000])
def test_packed_codes_round_trip(bits: int, numel: int) -> None:
    torch.manual_seed(bits * 1000 + numel)
    q = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), q)


def _kept(layer: FusedLayer, x: Tensor, weight: Tensor) -> list[Tensor]:
    """The tensors autograd keeps for the layer's backward."""
    kept: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(x, weight, None)
    return kept


def _layer(bits: int, *, fused: bool = True) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    layer = FusedLayer(
        "conv2d", ActQuantizer(bits), WeightQuantizer(bits), GradQuantizer(8), padding=1
    )
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    weight = torch.randn(32, 16, 3, 3, requires_grad=True)
    return layer, x, weight


def test_a_fused_layer_keeps_codes_not_floats_and_less_at_fewer_bits() -> None:
    kept_bytes = []
    for bits in range(8, 1, -1):
        layer, x, weight = _layer(bits)
        kept = _kept(layer, x, weight)
        # A float copy of the input or the weight would be a float tensor as large as a
        # weight channel or more; only the ranges (one per tensor, one per channel) are float.
        big_floats = [t for t in kept if t.is_floating_point() and t.numel() > weight.shape[0]]
        assert not big_floats, [(t.dtype, t.shape) for t in big_floats]
        total = sum(t.numel() * t.element_size() for t in kept)
        assert total == layer.saved_bytes()
        kept_bytes.append(total)
    # A byte per code at 8 and 7 bits, three quarters of one at 6 and 5, half from 4 down.
    assert all(a >= b for a, b in itertools.pairwise(kept_bytes)), kept_bytes
    assert kept_bytes[0] == kept_bytes[1] > kept_bytes[2] == kept_bytes[3], kept_bytes
    assert kept_bytes[3] > kept_bytes[4], kept_bytes  # 4 bits keep less than 5
    codes = 4 * 16 * 12 * 12 + 32 * 16 * 3 * 3
    assert kept_bytes[0] < codes * 1.05  # a byte per element at 8 bits
    assert kept_bytes[-1] < codes / 2 * 1.1  # two codes a byte at 2 bits


def test_the_layer_operator_keeps_codes_not_floats_and_less_at_fewer_bits() -> None:
    """A conv whose weight is a parameter trains through ``torch.ops.dpc_fx.layer`` and its
    C++ autograd node: what that node keeps goes through saved-tensor hooks like any other
    (offloading and checkpointing see it), and is the input's codes, its range and flag,
    and the parameter itself (kept by the model anyway): never a float copy."""
    from dpc_fx import native

    if not native.layers():
        pytest.skip(f"the layer operator is unavailable: {native.unavailable()}")
    kept_bytes = []
    for bits in (8, 6, 4):
        layer, x, weight = _layer(bits)
        weight = nn.Parameter(weight.detach())
        kept = _kept(layer, x, weight)
        assert type(layer(x, weight, None).grad_fn).__name__ == "CppFunction"
        assert any(t is weight for t in kept)
        others = [t for t in kept if t is not weight]
        assert not [t for t in others if t.is_floating_point() and t.numel() > 1], others
        total = sum(t.numel() * t.element_size() for t in others)
        assert total == layer.saved_bytes()
        kept_bytes.append(total)
    assert kept_bytes[0] > kept_bytes[1] > kept_bytes[2], kept_bytes


def test_the_float_copy_check_sees_the_unfused_quantisers() -> None:
    """The check above can fail: the unfused chain keeps the quantised input in float."""
    layer, x, weight = _layer(8)
    kept: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer.grad_q(layer.product(layer.act_q(x), layer.weight_q(weight), None))
    assert any(t.is_floating_point() and t.shape == x.shape for t in kept)


class _Relus(nn.Module):
    """ReLUs the fuse pass makes keep bits (``a``: a fused conv reads it; ``d``: through a
    flatten, a fused linear; ``e``: a fused conv and a residual addition) and ReLUs it
    leaves (``b``: in place, on a tensor something else reads after it; ``c``: max-pooling
    keeps its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu_b = nn.ReLU(inplace=True)
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.conv0(x))
        h = self.conv1(a)
        h2 = h * 2
        b = self.relu_b(h)  # changes h in place: the product below reads the new h
        e = F.relu(b + h2 * h)
        c = F.max_pool2d(torch.relu(self.conv2(e) + e), 2)
        return self.head(F.relu(c).flatten(1))  # d


def _kept_bytes(gm: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors one forward pass keeps for backward (a tensor kept twice counts
    twice)."""
    kept: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        gm(x.clone().requires_grad_())
    return sum(t.numel() * t.element_size() for t in kept)


def test_a_relu_only_fused_layers_read_keeps_a_bit_an_element(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model, x = _Relus(), torch.randn(2, 3, 16, 16)  # (ReLUs of 1024 elements or more)
    plain = compile_quiet(model, x, config=CONFIG.replace(fuse=False))
    fused = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    inputs = {n.args[0].name for n in fused.graph.nodes if n.target is dpc_fx.fused.relu}
    assert inputs == {"dpc_conv0", "add", "max_pool2d"}, fused.code  # a, e, d
    for seed in (1, 2):  # the same numbers as the unfused chain, which runs torch.relu
        for u, v in zip(_step(plain, x, seed), _step(fused, x, seed), strict=True):
            assert torch.equal(u, v)
    # Without the bit ReLUs each of a, e and d keeps its float output (2x8x16x16,
    # 2x8x16x16, 2x512) for its backward; with them, a bit an element and nothing else.
    pass_module = importlib.import_module("dpc_fx.passes.fuse")  # (the package exports
    monkeypatch.setattr(pass_module, "_keep_bits", lambda gm, fused: None)  # a function)
    floats = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    assert not any(n.target is dpc_fx.fused.relu for n in floats.graph.nodes)
    numels = (4096, 4096, 1024)
    assert _kept_bytes(floats, x) - _kept_bytes(fused, x) == sum(4 * n - n // 8 for n in numels)


def test_a_relu6_only_fused_layers_read_keeps_a_bit_an_element(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ReLU6 (MobileNetV2's, in place after batch norm) keeps its float input for backward;
    before fused layers it keeps a bit an element instead, with the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    plain = compile_quiet(model, x, config=CONFIG.replace(fuse=False))
    fused = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    calls = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert calls == [dpc_fx.fused.relu6] * 2, fused.code
    for seed in (1, 2):
        for u, v in zip(_step(plain, x, seed), _step(fused, x, seed), strict=True):
            assert torch.equal(u, v)
    pass_module = importlib.import_module("dpc_fx.passes.fuse")
    monkeypatch.setattr(pass_module, "_keep_bits", lambda gm, fused: None)
    floats = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    n = 2 * 8 * 8 * 8
    assert _kept_bytes(floats, x) - _kept_bytes(fused, x) == 2 * (4 * n - n // 8)


def test_a_relu_module_keeping_bits_still_runs_its_hooks() -> None:
    """A ReLU module the pass makes keep bits stays in the graph: with a hook on it, the
    call goes through the module (the hook runs, and may change the output)."""
    torch.manual_seed(0)
    model, x = mlp(8, 256, 4), torch.randn(5, 8)
    gm = compile_quiet(model, x, config=CONFIG)
    (node,) = [n for n in gm.graph.nodes if n.target is dpc_fx.fused.relu]
    assert node.args[1].op == "get_attr" and node.args[1].target == "1"
    kept = _kept_bytes(gm, x)
    seen: list[Tensor] = []
    handle = gm.get_submodule("1").register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        assert _kept_bytes(gm, x) == kept + 4 * 5 * 256 - 5 * 256 // 8  # a float output
        assert len(seen) == 1 and seen[0].shape == (5, 256)
    finally:
        handle.remove()
    assert _kept_bytes(gm, x) == kept


def test_cost_reports_what_each_layer_keeps_falling_with_its_bits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)
    )
    x = torch.randn(16, 64)
    config = CONFIG.replace(overrides={"0": 8, "2": 5, "4": 3})
    gm = compile_quiet(model, x, config=config)
    assert all(r.saved_bytes is None for r in dpc_fx.cost(gm).layers)  # nothing ran yet
    gm(x).sum().backward()
    saved = [r.saved_bytes for r in dpc_fx.cost(gm).layers]
    assert saved[0] is not None and saved[1] is not None and saved[2] is not None
    assert saved[0] > saved[1] > saved[2]  # 8 bits: a byte a code; 5 bits: 3/4; 3 bits: 1/2
    # The input's codes, its 4-byte lo/hi and a one-byte non-finite flag; the weight is a
    # parameter, kept anyway, and quantised again in backward.
    assert saved[1] == packed_bytes(16 * 64, 5) + 8 + 1
    text = io.StringIO()
    Console(file=text, width=200).print(layer_table(gm))
    shown = f"{saved[2] / 1e3:.1f}kB" if saved[2] >= 1e3 else f"{saved[2]}B"
    assert " kept" in text.getvalue() and shown in text.getvalue()
    unfused = compile_quiet(model, x, config=config.replace(fuse=False))
    unfused(x).sum().backward()
    assert all(r.saved_bytes is None for r in dpc_fx.cost(unfused).layers)


def test_fused_layers_match_under_autocast() -> None:
    """Under autocast the product runs in bfloat16 on cast copies: backward differentiates
    at the same copies and casts the gradients back to each parameter's dtype."""
    model, x = _model()
    plain = compile_quiet(model, x, config=CONFIG.replace(fuse=False))
    fused = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = _step(plain, x, 5), _step(fused, x, 5)
    assert a[0].dtype == torch.bfloat16 and a[-1].dtype == torch.float32
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.dtype == v.dtype and torch.equal(u, v), (i, (u - v).abs().max())


@pytest.mark.usefixtures("fused_kernels")
def test_differently_shaped_models_compile_each_kernel_once() -> None:
    """Five models (conv2d, channels-last, conv1d, 2-D and 3-D linear inputs), fused and
    unfused, stepped in one process: each kernel compiles once per kind of input, not once
    per model's activation layout
    (a view's base layout was a dynamo guard: four variants each, then the recompile limit)."""
    torch.manual_seed(0)
    models = [
        (small_cnn(), torch.randn(4, 3, 12, 12)),
        (mlp(8, 16, 4), torch.randn(5, 8)),
        (
            nn.Sequential(nn.Conv1d(2, 6, 3), nn.ReLU(), nn.Conv1d(6, 4, 5, stride=2)),
            torch.randn(3, 2, 20),
        ),
        (nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6)), torch.randn(2, 7, 6)),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
            torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),
        ),
    ]
    for model, x in models:
        for fused in (True, False):
            gm = compile_quiet(model, x, config=CONFIG.replace(fuse=fused))
            gm(x).sum().backward()
            with torch.no_grad():
                gm.eval()(x)
    variants = {
        name: len(_debug_get_cache_entry_list(getattr(kernels, name).__wrapped__.__code__))
        for name in kernels.__all__
        if hasattr(getattr(kernels, name), "__wrapped__")  # the compiled ones
    }
    # Finite inputs (all of these) take the *_in_range kernels; the masked ones, which
    # measure the finite range themselves, are for tensors holding inf or nan.
    assert variants == {
        "channel_range": 0,
        "fake_quant": 1,
        "fake_quant_channels": 1,
        "fake_quant_in_range": 1,
        "fake_quant_stochastic": 0,
        "fake_quant_stochastic_in_range": 1,
        "fake_quant_tensor": 0,
        "quantize_codes": 0,
        "quantize_codes_channels": 0,  # parameters are quantised again, not kept as codes
        "quantize_codes_in_range": 1,
        "quantize_codes_tensor": 0,
        "tensor_range": 0,
    }


def test_a_fused_linear_output_may_be_modified_in_place() -> None:
    """A 3-D input's product comes back as a view; in-place ops on it (ReLU(inplace=True),
    Swin's masks) work and change nothing: the same numbers as out of place. (Unfused, the
    gradient hook put on such a view before the in-place op never fires, so its layer's
    gradient goes unquantised: the two paths differ there, and the fused one is right.)"""
    results = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 4))
        x = torch.randn(3, 5, 6)
        results.append(_step(compile_quiet(model, x, config=CONFIG), x, 6))
    for u, v in zip(*results, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("where", ["input", "weight"])
def test_a_non_finite_value_reaches_the_fused_layers_gradients(where: str) -> None:
    """Codes cannot hold ``inf``: a flag kept beside them makes the gradients the codes
    give non-finite, as the plain layer's are (AMP's GradScaler must see the overflow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    gm = dpc_fx.compile(model, torch.randn(4, 8), config=DPCConfig(pin_first_last=False))
    assert isinstance(gm.get_submodule("dpc._0"), FusedLayer)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        (x if where == "input" else model[0].weight)[0, 0] = float("inf")
    gm(x).sum().backward()
    # The other operand's gradient is the one the bad value feeds.
    grad = model[0].weight.grad if where == "input" else x.grad
    assert grad is not None and not bool(torch.isfinite(grad).all())


class Heads(nn.Module):
    """Attention written out: per-head products of two activations on views of one
    projection (strided operands), and a broadcast product the fused layer declines."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mix = nn.Parameter(torch.randn(1, d, d))  # broadcast over the batch

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        h = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(torch.bmm(h.transpose(1, 2), h) @ self.mix.tanh())


def test_products_of_two_activations_are_fused_and_match_bit_for_bit() -> None:
    torch.manual_seed(0)
    model, x = Heads(), torch.randn(3, 8, 16)
    plain = compile_quiet(model, x, config=CONFIG.replace(fuse=False))
    fused = compile_quiet(copy.deepcopy(model), x, config=CONFIG)
    products = {
        n.meta["dpc"].layer
        for n in fused.graph.nodes
        if n.op == "call_module"
        and isinstance(m := fused.get_submodule(n.target), FusedLayer)
        and m.op == "matmul"
    }
    # matmul_2 broadcasts its second operand: its fused layer runs the unfused chain.
    assert products == {"matmul", "matmul_1", "bmm", "matmul_2"}
    for mode, seed in (("train", 1), ("train", 2), ("eval", 3)):
        a = _step(getattr(plain, mode)(), x, seed)
        b = _step(getattr(fused, mode)(), x, seed)
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), (mode, i, (u - v).abs().max())


def test_a_product_of_two_activations_keeps_both_as_codes() -> None:
    torch.manual_seed(0)
    layer = FusedLayer("matmul", ActQuantizer(4), WeightQuantizer(4, None), GradQuantizer(8))
    a = torch.randn(2, 3, 16, 8, requires_grad=True)
    b = torch.randn(2, 3, 8, 16, requires_grad=True).transpose(-2, -1).contiguous()
    b = b.transpose(-2, -1)  # a strided operand, as k^T is
    kept = _kept(layer, a, b)
    assert not [t for t in kept if t.is_floating_point() and t.numel() > 1]
    assert sum(t.numel() * t.element_size() for t in kept) == layer.saved_bytes()
    assert layer.saved_bytes() == 2 * (a.numel() // 2 + 8 + 1)  # two codes a byte, each
    # Broadcast batch dimensions are not folded the same way: the unfused chain runs.
    assert not layer._fusable(a, b[:1], None)


def test_captured_graphs_are_fused_too() -> None:
    from test_capture import Unrolled, unrolled_inputs

    torch.manual_seed(0)
    model, kwargs = Unrolled(), unrolled_inputs()
    plain = dpc_fx.compile(
        copy.deepcopy(model), example_kwargs=kwargs, config=CONFIG.replace(fuse=False)
    )
    fused = dpc_fx.compile(copy.deepcopy(model), example_kwargs=kwargs, config=CONFIG)
    layers = [m for m in fused.modules() if isinstance(m, FusedLayer)]
    assert [m.op for m in layers] == ["conv2d", "linear", "linear", "linear", "linear", "linear"]
    _same_steps(plain, fused, kwargs)


def _same_steps(plain: nn.Module, fused: nn.Module, kwargs: dict[str, object]) -> None:
    """Two captured modules' losses and parameter gradients equal, bit for bit, over steps
    with the same seeds."""
    for seed in (1, 2):
        outs = []
        for gm in (plain, fused):
            gm.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = gm(**kwargs)
            out["loss"].backward()
            outs.append([out["loss"].detach(), *(p.grad for p in gm.parameters())])
        for u, v in zip(*outs, strict=True):
            assert torch.equal(u, v)


class Attention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention: strided heads (views of one
    projection), and a mask given or not."""

    def __init__(self, d: int = 32, heads: int = 4, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, mask, is_causal=self.causal)
        return self.out(torch.relu(h.transpose(1, 2).reshape(b, t, d)))


def _attention_step(gm: nn.Module, x: Tensor, mask: Tensor, seed: int) -> list[Tensor]:
    for p in gm.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = gm(x, mask)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None
    return [y.detach(), x.grad, *(p.grad for p in gm.parameters())]  # type: ignore[misc]


_MASKS = {
    "none": lambda t: None,
    "padding": lambda t: torch.ones(t, t, dtype=torch.bool).index_fill_(1, torch.tensor([t - 1]), False),
    "causal": lambda t: torch.ones(t, t, dtype=torch.bool).tril(),
    "float bias": lambda t: torch.randn(t, t, generator=torch.Generator().manual_seed(0)),
}  # fmt: skip


@pytest.mark.parametrize("mask_kind", list(_MASKS))
@pytest.mark.parametrize("bits", [8, 6, 3])
def test_fused_attention_matches_the_unfused_quantisers_bit_for_bit(
    mask_kind: str, bits: int
) -> None:
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(3, 10, 32)
    mask = _MASKS[mask_kind](10)
    config = DPCConfig(overrides={"*": (bits, bits, 8)}, pin_first_last=False)
    plain = compile_quiet(model, (x, mask), config=config.replace(fuse=False))
    fused = compile_quiet(copy.deepcopy(model), (x, mask), config=config)
    (attention,) = [m for m in fused.modules() if isinstance(m, FusedAttention)]
    assert (
        attention.extra_repr()
        == f"attention, query_q={bits}, key_q={bits}, value_q={bits}, grad_q=8"
    )
    for mode, seed in (("train", 1), ("train", 2), ("eval", 3)):
        a = _attention_step(getattr(plain, mode)(), x, mask, seed)
        b = _attention_step(getattr(fused, mode)(), x, mask, seed)
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), (mode, i, (u - v).abs().max())
        assert all(torch.equal(u, v) for u, v in zip(_ranges(plain), _ranges(fused), strict=True))
    assert attention.last_shapes == (x.numel(),) * 3  # the fused path ran
    (meta,) = [m for m in dpc_fx.layers(fused) if m.op == "attention"]
    kept = {row.layer: row.saved_bytes for row in dpc_fx.cost(fused).layers}
    assert kept[meta.layer] == attention.saved_bytes() == 3 * (packed_bytes(x.numel(), bits) + 9)


def _attention_kept(
    layer: FusedAttention, *inputs: Tensor, mask: Tensor | None = None
) -> list[Tensor]:
    kept: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer(*inputs, mask)
    return kept


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_attention_keeps_codes_not_float_copies_of_its_inputs(bits: int) -> None:
    torch.manual_seed(0)
    quantizers = [ActQuantizer(bits) for _ in range(3)]
    layer = FusedAttention(*quantizers, GradQuantizer(8))
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    kept = _attention_kept(layer, q, k, v)
    floats = [t for t in kept if t.is_floating_point() and t.numel() > 1]
    # The kernel's output and log-sum-exp, as fp32 attention keeps them; no copy of an input.
    assert sorted(t.shape for t in floats) == [torch.Size([2, 4, 64]), torch.Size([2, 4, 64, 16])]
    codes = [t for t in kept if t.dtype == torch.uint8]
    assert sum(t.numel() for t in codes) == 3 * packed_bytes(q.numel(), bits)
    assert layer.saved_bytes() == 3 * (packed_bytes(q.numel(), bits) + 2 * 4 + 1)
    assert layer.saved_bytes(4) < layer.saved_bytes(8)  # type: ignore[operator]


def test_fused_attention_runs_the_unfused_chain_where_the_flash_kernel_would_not_run() -> None:
    torch.manual_seed(0)
    layer = FusedAttention(*(ActQuantizer(8) for _ in range(3)), GradQuantizer(8))
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    kv = torch.randn(2, 2, 8, 16, requires_grad=True)
    assert layer._fusable(q, q, q, None, 0.0, False, None, False)
    assert not layer._fusable(q, q, q, None, 0.1, False, None, False)  # dropout
    assert layer._fusable(q, kv, kv, None, 0.0, False, None, True)  # grouped-query attention
    assert not layer._fusable(q, kv, kv, None, 0.0, False, None, False)  # heads that differ
    assert not layer._fusable(q.detach(), q.detach(), q.detach(), None, 0.0, False, None, False)
    with torch.no_grad():
        assert not layer._fusable(q, q, q, None, 0.0, False, None, False)
    layer.key_q.bits = 16  # no byte codes
    assert not layer._fusable(q, q, q, None, 0.0, False, None, False)


@pytest.mark.hf
def test_a_captured_decoders_attention_is_fused_and_matches_bit_for_bit() -> None:
    from test_capture import _hf

    model, kwargs = _hf("llama")
    model.train()
    plain = dpc_fx.compile(
        copy.deepcopy(model), example_kwargs=kwargs, config=CONFIG.replace(fuse=False)
    )
    fused = dpc_fx.compile(copy.deepcopy(model), example_kwargs=kwargs, config=CONFIG)
    (attention,) = [m for m in fused.modules() if isinstance(m, FusedAttention)]
    _same_steps(plain, fused, kwargs)
    assert attention.last_shapes  # the fused path ran
    query, key, value = attention.last_shapes
    assert key == value == query // 2  # 4 query heads over 2 key/value heads, unrepeated
