"""Attention whose mask is the causal one runs as causal attention (dpc_fx/sdpa.py), and
captured decoders call it."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import dpc_fx
from dpc_fx import DPCConfig
from dpc_fx.sdpa import attention, causal_mask

_KERNELS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math")


class _Kernels(TorchDispatchMode):
    """Records, for each attention kernel called, whether it was asked for causal attention
    and whether it was handed a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in _KERNELS:
            bound = dict(zip((a.name for a in func._schema.arguments), args, strict=False))
            bound.update(kwargs)
            self.calls.append((bool(bound.get("is_causal")), bound.get("attn_mask") is not None))
        return func(*args, **kwargs)


@contextlib.contextmanager
def kernels() -> Iterator[list[tuple[bool, bool]]]:
    mode = _Kernels()
    with mode:
        yield mode.calls


def tril(rows: int, cols: int) -> Tensor:
    return torch.ones(rows, cols, dtype=torch.bool).tril()


def as_float(mask: Tensor) -> Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)


def step(fn: Any, mask: Tensor, shapes: tuple[int, ...], seed: int) -> list[Tensor]:
    """Output and the three inputs' gradients of attention ``fn`` with ``mask``."""
    b, h, rows, cols, d = shapes
    torch.manual_seed(seed)
    q = torch.randn(b, h, rows, d, requires_grad=True)
    k = torch.randn(b, h, cols, d, requires_grad=True)
    v = torch.randn(b, h, cols, d, requires_grad=True)
    out = fn(q, k, v, mask, scale=0.3)
    out.backward(torch.randn_like(out))
    return [out.detach(), q.grad, k.grad, v.grad]  # type: ignore[list-item]


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    rows=st.integers(1, 70),
    extra=st.integers(0, 40),
    d=st.sampled_from([4, 8, 16]),
    floats=st.booleans(),
    broadcast=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_causal_mask_runs_the_causal_kernel_and_computes_the_same_bit_for_bit(
    b: int, h: int, rows: int, extra: int, d: int, floats: bool, broadcast: bool, seed: int
) -> None:
    cols = rows + extra  # tril aligned top left, as torch's is_causal
    mask = tril(rows, cols)
    mask = as_float(mask) if floats else mask
    mask = mask.expand(b, 1, rows, cols) if broadcast else mask.repeat(b, 1, 1, 1)
    shapes = (b, h, rows, cols, d)
    with kernels() as calls:
        ours = step(attention, mask, shapes, seed)
    assert calls[0] == (True, False)  # the causal kernel, no mask
    with kernels() as calls:  # the kernel as the graph called it before: with the mask
        given = step(torch.ops.aten.scaled_dot_product_attention.default, mask, shapes, seed)
    assert calls[0] == (False, True)
    for got, want in zip(ours, given, strict=True):
        assert torch.equal(got, want)


def _flipped(mask: Tensor) -> Tensor:
    mask = mask.clone()
    mask[0, 0, 1, 2] = True  # one key in the future
    return mask


@pytest.mark.parametrize(
    "name, make",
    [
        ("one element flipped", lambda: _flipped(tril(5, 5).repeat(2, 1, 1, 1))),
        ("aligned bottom right", lambda: torch.ones(3, 5, dtype=torch.bool).tril(2)),
        ("padding", lambda: tril(5, 5) & torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)),
        ("the float minimum, not -inf", lambda: torch.zeros(5, 5).masked_fill(~tril(5, 5), -3.4e38)),
        ("a float bias", lambda: torch.randn(5, 5)),
        ("every key", lambda: torch.ones(5, 5, dtype=torch.bool)),
        ("a nan", lambda: as_float(tril(5, 5)).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(torch.nan))),
        ("too short", lambda: tril(5, 5)[:, :4]),
    ],
)  # fmt: skip
def test_any_other_mask_reaches_the_kernel_as_given(name: str, make: Any) -> None:
    mask = make()
    rows, cols = (3, 5) if name == "aligned bottom right" else (5, 5)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, rows, 8), torch.randn(2, 2, cols, 8), torch.randn(2, 2, cols, 8)
    assert not causal_mask(mask, q, k), name
    if name == "too short":
        return  # the kernel refuses it itself
    with kernels() as calls:
        ours = attention(q, k, v, mask)
    assert calls == [(False, True)]
    plain = torch.ops.aten.scaled_dot_product_attention.default(q, k, v, mask)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0, equal_nan=True)


def test_a_mask_that_needs_a_gradient_reaches_the_kernel() -> None:
    mask = as_float(tril(4, 4)).requires_grad_()
    q = k = v = torch.randn(1, 1, 4, 8)
    assert not causal_mask(mask, q, k)
    attention(q, k, v, mask).sum().backward()
    assert mask.grad is not None


def test_a_mask_written_in_place_after_its_check_is_checked_again() -> None:
    mask = tril(4, 4)
    q = k = v = torch.randn(1, 1, 4, 8)
    assert causal_mask(mask, q, k)
    mask[0, 3] = True  # the version counter moves on
    assert not causal_mask(mask, q, k)
    with kernels() as calls:
        attention(q, k, v, mask)
    assert calls == [(False, True)]


@pytest.mark.parametrize("strict", [False, True])
def test_a_trace_keeps_the_mask_it_cannot_read(strict: bool) -> None:
    mask = tril(4, 4)
    q = k = v = torch.randn(1, 1, 4, 8)
    exported = torch.export.export(_Attend(), (q, k, v, mask), strict=strict)
    (node,) = [n for n in exported.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert isinstance(node.args[3], torch.fx.Node)  # the mask, a graph input, not None
    assert torch.equal(exported.module()(q, k, v, mask), attention(q, k, v, mask))


class _Attend(torch.nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return attention(q, k, v, mask)


# ------------------------------------------------------------------ captured decoders


@pytest.mark.hf
def test_a_captured_decoder_runs_causal_attention_unless_a_batch_is_padded() -> None:
    pytest.importorskip("transformers")
    from test_capture import _hf

    model, kwargs = _hf("llama")  # one layer, an attention mask of ones
    model.train()
    with pytest.warns(UserWarning, match="no layer to quantise"):
        bare = dpc_fx.compile(
            copy.deepcopy(model), example_kwargs=kwargs, config=DPCConfig(overrides={"*": None})
        )
    called = [n.target for n in bare.graph.nodes if n.op == "call_function"]
    assert called.count(attention) == 1  # the attention checks its mask

    with kernels() as calls:
        ours = bare(**kwargs)
    assert calls == [(True, False)]
    theirs = model(**kwargs)  # eager: torch's causal kernel too
    assert torch.equal(ours.logits, theirs.logits)

    mask = kwargs["attention_mask"]
    assert isinstance(mask, Tensor)
    padded = {**kwargs, "attention_mask": mask.clone().index_fill_(1, torch.tensor([7]), 0)}
    with kernels() as calls:
        ours = bare(**padded)
    assert calls == [(False, True)]  # the padding mask, as given
    assert torch.allclose(ours.logits, model(**padded).logits, atol=1e-6)
