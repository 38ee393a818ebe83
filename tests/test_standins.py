"""Attention stand-ins (passes/_standins.py): traced graphs compute what the modules do.

``nn.MultiheadAttention`` and torchvision's Swin attention are traced through stand-ins
that put their projections in the graph. The references are the modules themselves, run
eagerly: outputs (and attention weights) must match, gradients too, at sizes that make
Swin pad and shift; the projections must then be quantised layers named after their
weights.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_quiet, examples, quantizers_off
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torchvision.models.video import swin_transformer as swin3d
from toys import tiny_swin

import dpc_fx
from dpc_fx.passes import trace


class Attend(nn.Module):
    """Self-attention, cross-attention with masks, and per-head weights, from one module."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = mha

    def forward(self, x: Tensor, mem: Tensor, pad: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        own, own_weights = self.attn(x, x, x)
        cross, _ = self.attn(x, mem, mem, key_padding_mask=pad, attn_mask=mask, need_weights=False)
        scored, heads = self.attn(
            x, mem, 2 * mem, attn_mask=mask.float() * -3.0, average_attn_weights=False
        )
        return own, own_weights, cross, scored, heads


def attend_inputs(batch_first: bool, seed: int, *, kdim: int = 16) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g)
    mem = torch.randn(3, 7, kdim, generator=g)
    if not batch_first:
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[1, :3] = True
    return x, mem, pad, mask


@examples(10)
@given(batch_first=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_multihead_attention_stand_in_matches_the_module(
    batch_first: bool, bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = Attend(nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first)).eval()
    gm = trace(model)
    assert not any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)
    inputs = attend_inputs(batch_first, seed)
    for want, got in zip(model(*inputs), gm(*inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_multihead_attention_with_own_key_and_value_sizes() -> None:
    torch.manual_seed(0)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=12, vdim=10, batch_first=True)

        def forward(self, x: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            return self.attn(x, k, v)

    model = Cross().eval()
    inputs = (torch.randn(3, 5, 16), torch.randn(3, 7, 12), torch.randn(3, 7, 10))
    gm = compile_quiet(model, inputs, config=dpc_fx.DPCConfig(pin_first_last=False))
    names = {m.layer for m in dpc_fx.layers(gm)}
    assert names == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}
    for w, g in zip(model(*inputs), quantizers_off(gm)(*inputs), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_unbatched_multihead_attention() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)

    class SelfAttend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x)[0]

    model = SelfAttend().eval()
    x = torch.randn(6, 8)
    gm = trace(model)
    assert not any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_gradients_through_the_stand_in_match_the_module() -> None:
    torch.manual_seed(0)
    model = Attend(nn.MultiheadAttention(16, 4, batch_first=True)).train()
    gm = trace(model)
    inputs = attend_inputs(True, 1)
    grads = []
    for m in (model, gm):
        m.zero_grad()
        sum(out.square().sum() for out in m(*inputs)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "mha",
    [
        nn.MultiheadAttention(16, 4, add_bias_kv=True),
        nn.MultiheadAttention(16, 4, add_zero_attn=True),
    ],
    ids=["bias_kv", "zero_attn"],
)
def test_unsupported_multihead_attention_stays_one_call(mha: nn.MultiheadAttention) -> None:
    gm = trace(Attend(mha))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"].count("attn") == 3


def test_attention_dropout_follows_train_and_eval() -> None:
    """FX would record ``self.training`` as a constant; the stand-in reads it at run time."""
    torch.manual_seed(0)
    model = Attend(nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True)).train()
    gm = trace(model)
    assert "attn.training" in [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    inputs = attend_inputs(True, 2)
    with torch.no_grad():
        first, second = gm(*inputs)[0], gm(*inputs)[0]
        assert not torch.equal(first, second)  # dropped at random in training
        model.eval()
        gm.eval()
        for want, got in zip(model(*inputs), gm(*inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_multihead_attention_projections_are_quantised_and_named() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)

    class Block(nn.Module):  # the encoder layer's own forward is a torch.nn leaf
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.attn = layer.self_attn
            self.ff = nn.Sequential(layer.linear1, nn.ReLU(), layer.linear2)
            self.head = nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.embed(x)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.head(h + self.ff(h))

    model = Block()
    x = torch.randn(2, 5, 8)
    gm = compile_quiet(model, x)
    bits = {m.layer: m.bits for m in dpc_fx.layers(gm)}
    assert {"attn.in_proj", "attn.out_proj"} <= bits.keys()
    assert bits["attn.in_proj"].w is not None and bits["attn.out_proj"].w is not None
    cov = dpc_fx.coverage(gm)
    assert (cov.quantised, cov.layers) == (4, 6)  # embed and head pinned
    assert set(dpc_fx.model_state_dict(gm)) == set(model.state_dict())
    F.cross_entropy(gm(x).flatten(0, 1), torch.zeros(10, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in gm.parameters())


def test_cross_attention_projections_are_numbered_and_count_their_slice() -> None:
    """Cross-attention splits the packed in_proj_weight in three: three layers, each
    reading (and sized by) its third, named after the packed weight."""
    torch.manual_seed(0)

    class Decode(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x: Tensor, memory: Tensor) -> Tensor:
            return self.head(self.attn(x, memory, memory, need_weights=False)[0])

    gm = compile_quiet(Decode(), (torch.randn(2, 5, 32), torch.randn(2, 7, 32)))
    found = {m.layer: m for m in dpc_fx.layers(gm)}
    projections = [f"attn.in_proj.{i}" for i in range(3)]
    assert list(found) == [*projections, "attn.out_proj", "head"]
    assert all(found[p].module_type == "MultiheadAttention" for p in projections)
    assert [found[p].params for p in projections] == [32 * 32 + 32] * 3  # weight + bias third
    plan = dpc_fx.compile(
        Decode(),
        (torch.randn(2, 5, 32), torch.randn(2, 7, 32)),
        config=dpc_fx.DPCConfig(overrides={"attn.in_proj.*": 5}),
    )
    assert [m.bits.w for m in dpc_fx.layers(plan)][:3] == [5, 5, 5]


SWINS = {
    "v1": tiny_swin,
    "v2": lambda: tiny_swin(v2=True),
    "3d": lambda: swin3d.SwinTransformer3d(
        patch_size=[2, 4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[2, 4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
    ),
}


@pytest.mark.parametrize("version", list(SWINS))
@pytest.mark.parametrize("size", [32, 44, 20], ids=["whole-windows", "padded", "one-window"])
def test_swin_stand_in_is_exact(version: str, size: int) -> None:
    torch.manual_seed(0)
    model = SWINS[version]().eval()
    x = (
        torch.randn(2, 3, 4, size, size + 8)
        if version == "3d"
        else torch.randn(2, 3, size, size + 8)
    )
    gm = trace(model)
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    assert len(linears) == 2 * 4  # qkv and proj in each of four blocks
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("version", list(SWINS))
def test_swin_compiles_with_attention_quantised_and_trains(version: str) -> None:
    torch.manual_seed(0)
    model = SWINS[version]()
    x = torch.randn(2, 3, 4, 32, 32) if version == "3d" else torch.randn(2, 3, 32, 32)
    gm = compile_quiet(model, x)
    bits = {m.layer: m.bits for m in dpc_fx.layers(gm)}
    attention = [name for name in bits if name.endswith(("attn.qkv", "attn.proj"))]
    assert len(attention) == 8 and all(bits[name].w is not None for name in attention)
    gm.train()
    gm(x).square().mean().backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    quantizers_off(gm).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def transformer_inputs(batch_first: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(1)
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    return src, tgt, pad, causal


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_traces_through_and_matches(batch_first: bool, norm_first: bool) -> None:
    """``nn.Transformer`` and its parts are ``torch.nn`` modules whose forwards branch on
    tensor values (for the fused inference path); the stand-ins take the general path."""
    torch.manual_seed(0)

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.Transformer(
                d_model=16,
                nhead=2,
                num_encoder_layers=2,
                num_decoder_layers=2,
                dim_feedforward=32,
                dropout=0.1,
                batch_first=batch_first,
                norm_first=norm_first,
            )

        def forward(
            self,
            src: Tensor,
            tgt: Tensor,
            tgt_mask: Tensor,
            src_key_padding_mask: Tensor,
            memory_key_padding_mask: Tensor,
        ) -> Tensor:
            return self.transformer(
                src,
                tgt,
                tgt_mask=tgt_mask,
                src_key_padding_mask=src_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
            )

    model = Seq2Seq().eval()
    src, tgt, pad, causal = transformer_inputs(batch_first)

    def run(m: nn.Module) -> Tensor:
        return m(src, tgt, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)

    gm = trace(model)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert not {t for t in called if t.endswith("attn") or t.endswith(("encoder", "decoder"))}
    assert len([t for t in called if t.endswith("attn.out_proj")]) == 6
    # Gradients on: torch's own forward takes its general path too (its fused inference
    # path would return zeros at padded source positions).
    torch.testing.assert_close(run(gm), run(model), rtol=1e-5, atol=1e-5)


def test_transformer_encoder_compiles_with_every_linear_quantised() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2)
            self.head = nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.encoder(self.embed(x)).mean(1))

    model = Classifier()
    x = torch.randn(4, 6, 8)
    gm = compile_quiet(model, x)
    cov = dpc_fx.coverage(gm)
    assert (cov.quantised, cov.layers) == (8, 10)  # 2 x (in_proj, out_proj, linear1, linear2)
    names = {m.layer for m in dpc_fx.layers(gm)}
    assert {"encoder.layers.0.self_attn.in_proj", "encoder.layers.1.linear2"} <= names
    F.cross_entropy(gm(x), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None for p in gm.parameters())
    quantizers_off(gm).eval()
    torch.testing.assert_close(gm(x), model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_per_head_attention_masks(kind: str) -> None:
    """A 3-D ``attn_mask`` (one per batch element and head) and a key padding mask."""
    torch.manual_seed(0)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x: Tensor, mask: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
            return self.attn(x, x, x, attn_mask=mask, key_padding_mask=pad)

    model = Masked().eval()
    x = torch.randn(3, 5, 16)
    if kind == "float":
        mask, pad = torch.randn(3 * 4, 5, 5), torch.randn(3, 5)
    else:
        mask, pad = torch.rand(3 * 4, 5, 5) > 0.7, torch.zeros(3, 5, dtype=torch.bool)
        mask[..., 0] = False  # every query may attend somewhere
        pad[1, -2:] = True
    gm = trace(model)
    assert not any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)
    for want, got in zip(model(x, mask, pad), gm(x, mask, pad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize(
    "build, shapes, quantised",
    [
        (lambda: nn.TransformerEncoderLayer(16, 2, 32), [(5, 2, 16)], (2, 4)),
        (
            lambda: nn.TransformerEncoder(
                nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2
            ),
            [(2, 5, 16)],
            (6, 8),
        ),
        (
            lambda: nn.Transformer(16, 2, 1, 1, 32, batch_first=True),
            [(2, 5, 16), (2, 4, 16)],
            (8, 10),
        ),
    ],
    ids=["encoder-layer", "encoder", "transformer"],
)
def test_a_torch_transformer_as_the_model_itself(
    build: Callable[[], nn.Module], shapes: list[tuple[int, ...]], quantised: tuple[int, int]
) -> None:
    """The model's own forward is the stand-in too: no fallback, every projection reached."""
    torch.manual_seed(0)
    model = build().eval()
    inputs = tuple(torch.randn(shape) for shape in shapes)
    torch.testing.assert_close(trace(model)(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    gm = compile_quiet(model, inputs)
    cov = dpc_fx.coverage(gm)
    assert cov.traced and (cov.quantised, cov.layers) == quantised
    assert type(gm).__name__ == type(model).__name__
    assert set(dpc_fx.model_state_dict(gm)) == set(model.state_dict())


def test_every_stand_in_takes_its_forwards_arguments_in_order() -> None:
    """The tracer reads a model's inputs from its own forward and passes them, in order, to
    the stand-in (``standin(m, mode, *args)``): the two signatures must agree."""
    import importlib
    import inspect

    from dpc_fx.passes._standins import _STANDINS

    for name, standin in _STANDINS.items():
        module, cls = name.rsplit(".", 1)
        forward = inspect.signature(getattr(importlib.import_module(module), cls).forward)
        own = [(p.name, p.default) for p in forward.parameters.values()][1:]  # after self
        mirrored = [(p.name, p.default) for p in inspect.signature(standin).parameters.values()]
        assert mirrored[2:] == own, name  # after (m, mode)


def swin_attention(version: str) -> nn.Module:
    from torchvision.models import swin_transformer as swin2d

    if version == "3d":
        return swin3d.ShiftedWindowAttention3d(16, [2, 4, 4], [1, 2, 2], 2)
    cls = swin2d.ShiftedWindowAttentionV2 if version == "v2" else swin2d.ShiftedWindowAttention
    return cls(16, [4, 4], [2, 2], 2)


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: nn.MultiheadAttention(16, 4, batch_first=True), (2, 5, 16)),
        (lambda: swin_attention("v1"), (2, 10, 12, 16)),
        (lambda: swin_attention("v2"), (2, 10, 12, 16)),
        (lambda: swin_attention("3d"), (2, 3, 10, 12, 16)),
    ],
    ids=["multihead", "swin-v1", "swin-v2", "swin-3d"],
)
def test_attention_as_the_model_itself_is_traced_through_its_stand_in(
    build: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    """A bare attention module gets its stand-in as a submodule does: its projections are
    in the graph (FX alone records one opaque call), and it computes the same."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    inputs = (x, x, x) if isinstance(model, nn.MultiheadAttention) else (x,)
    gm = trace(model)
    assert len([n for n in gm.graph.nodes if n.target is F.linear]) >= 1
    assert set(gm.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        want, got = model(*inputs), gm(*inputs)
    if isinstance(model, nn.MultiheadAttention):
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_decoder_layer_is_traced_through_its_stand_in(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first)
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    gm = trace(model.eval())
    # Self-attention projects once (packed), cross-attention query, key and value apart.
    assert len([n for n in gm.graph.nodes if n.target is F.linear]) == 1 + 3
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert {"self_attn.out_proj", "multihead_attn.out_proj", "linear1", "linear2"} <= set(called)
    torch.testing.assert_close(
        gm(tgt, memory, tgt_mask=causal), model(tgt, memory, tgt_mask=causal), rtol=1e-5, atol=1e-5
    )


def test_a_subclass_with_its_own_forward_is_traced_through_that_forward() -> None:
    """A stand-in mirrors one forward; a subclass that overrides it is not replaced."""

    class Skip(nn.TransformerEncoderLayer):
        def forward(self, src: Tensor, *_: object, **__: object) -> Tensor:
            return src + self.linear2(torch.relu(self.linear1(src)))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = Skip(16, 2, 32, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(x)

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(2, 5, 16)
    gm = trace(model)
    assert not any("self_attn" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
