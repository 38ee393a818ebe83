"""Compiled modules with quantisers on match an independent reference, bit for bit.

The reference does not use the rewrite pass or the compiled module's quantisers. It traces
the original model itself (``torch.fx.symbolic_trace``) and runs it through a small
interpreter that, at each layer the plan quantises, fake-quantises the layer's input
activation (per tensor: the batch's range in training, its own running average of that
range in eval) and weight (per output channel) with :func:`dpc_fx.quant.fake_quantize`,
calls the layer's own math on them, and puts a hook on the layer's output that quantises
the gradient (per tensor, stochastic). Hooks fire in autograd's order, so the stochastic
rounding seeds are drawn in the same order as the compiled module draws them.

Outputs, input gradients and every parameter gradient must be ``torch.equal`` to the
compiled module's, over a few training steps and then in eval.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_quiet
from hypothesis import example, given, settings
from strategies import CNNSpec, Conv, Dense, MLPSpec, Pool, SpecCNN, SpecMLP, planned_models
from torch import Tensor, fx, nn
from torch.func import functional_call

import dpc_fx
from dpc_fx import Bits, Plan
from dpc_fx.quant import fake_quantize, tensor_range

MOMENTUM = 0.9  # DESIGN.md: running average of the activation range, momentum 0.9

# Output-channel dimension of a module's weight: rows for conv and linear, the second
# dimension for transposed convs, whose weight is (in, out / groups, *kernel).
_MODULE_WEIGHT_DIM: dict[type[nn.Module], int] = {
    nn.Linear: 0,
    nn.Conv1d: 0,
    nn.Conv2d: 0,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 1,
}

# Functional layers of the generated models: (op, target) -> (activation argument, weight
# argument, the weight's output-channel dimension). For x @ w the output channels are w's
# columns; for einsum "bij,jk->bik" they are k, the weight's index the output keeps.
_FUNCTION_SITES: dict[tuple[str, Any], tuple[int, int, int]] = {
    ("call_function", F.linear): (0, 1, 0),
    ("call_function", operator.matmul): (0, 1, -1),
    ("call_function", torch.matmul): (0, 1, -1),
    ("call_function", torch.bmm): (0, 1, -1),
    ("call_method", "mm"): (0, 1, -1),
    ("call_method", "addmm"): (1, 2, -1),  # bias.addmm(x, w)
    ("call_function", torch.einsum): (1, 2, 1),  # einsum("bij,jk->bik", x, w)
}


class _StraightThrough(torch.autograd.Function):
    """``quantise(x)`` in forward, the gradient unchanged in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, quantise: Callable[[Tensor], Tensor]) -> Tensor:
        return quantise(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class Reference(fx.Interpreter):
    """The original model run with explicit fake-quantise calls at the planned layers.

    ``plan`` maps a layer's key (module path, or node name for functional calls) to its
    bits. Layers not in the plan, or planned in full precision, run as they are.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(fx.symbolic_trace(model))
        self.plan: dict[str, Bits] = {}
        self.running: dict[str, tuple[Tensor, Tensor]] = {}
        self.quantised: list[str] = []  # layers quantised in the last forward, in order

    def key(self, node: fx.Node) -> str | None:
        """The layer key of ``node`` if it is a matmul-like layer of this reference."""
        if node.op == "call_module":
            module = self.module.get_submodule(str(node.target))
            return str(node.target) if type(module) in _MODULE_WEIGHT_DIM else None
        if node.op == "call_function" and node.target is torch.einsum:
            if node.args[0] != "bij,jk->bik":
                raise NotImplementedError(f"reference: einsum {node.args[0]!r}")
        return node.name if (node.op, node.target) in _FUNCTION_SITES else None

    def layer_keys(self) -> list[str]:
        return [k for k in map(self.key, self.module.graph.nodes) if k is not None]

    def __call__(self, x: Tensor) -> Tensor:
        self.quantised = []
        return self.run(x)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def run_node(self, node: fx.Node) -> Any:
        key = self.key(node)
        bits = self.plan.get(key) if key is not None else None
        if bits is None or bits.full_precision:
            return super().run_node(node)
        assert key is not None
        self.quantised.append(key)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        if node.op == "call_module":
            module = self.module.get_submodule(str(node.target))
            assert not kwargs and len(args) == 1, node.format_node()
            x = self.activation(key, args[0], bits.a)
            w = self.weight(module.weight, bits.w, _MODULE_WEIGHT_DIM[type(module)])
            y = functional_call(module, {"weight": w}, (x,))
        else:
            a, b, dim = _FUNCTION_SITES[node.op, node.target]
            values = list(args)
            values[a] = self.activation(key, values[a], bits.a)
            values[b] = self.weight(values[b], bits.w, dim)
            if node.op == "call_method":
                y = getattr(values[0], str(node.target))(*values[1:], **kwargs)
            else:
                y = node.target(*values, **kwargs)  # type: ignore[operator]
        if bits.g is not None and y.requires_grad:
            g_bits = bits.g
            y.register_hook(lambda grad: fake_quantize(grad, g_bits, stochastic=True))
        return y

    def activation(self, key: str, x: Tensor, bits: int | None) -> Tensor:
        if bits is None:
            return x
        if self.module.training:
            lo, hi = tensor_range(x)
            if key in self.running:
                old_lo, old_hi = self.running[key]
                lo, hi = torch.lerp(old_lo, lo, 1 - MOMENTUM), torch.lerp(old_hi, hi, 1 - MOMENTUM)
            self.running[key] = (lo, hi)
            return _StraightThrough.apply(x, lambda t: fake_quantize(t, bits))
        lo, hi = self.running[key] if key in self.running else tensor_range(x)
        return _StraightThrough.apply(x, lambda t: fake_quantize(t, bits, lo, hi))

    @staticmethod
    def weight(w: Tensor, bits: int | None, dim: int) -> Tensor:
        if bits is None:
            return w
        channel_dim = dim if w.dim() > 1 else None  # a vector weight is one channel
        return _StraightThrough.apply(w, lambda t: fake_quantize(t, bits, channel_dim=channel_dim))


def step(
    model: Callable[[Tensor], Tensor], params: dict[str, nn.Parameter], x: Tensor, seed: int
) -> tuple[Tensor, Tensor, dict[str, Tensor | None]]:
    """Output, input gradient and parameter gradients of one forward and backward, with the
    default generator seeded to ``seed`` (stochastic rounding draws its seeds from it)."""
    for p in params.values():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * weight).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, {k: None if p.grad is None else p.grad for k, p in params.items()}


def assert_bitwise_equal(got: tuple, want: tuple, where: str) -> None:
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = got, want
    assert torch.equal(y, y_ref), f"{where}: outputs differ"
    assert torch.equal(dx, dx_ref), f"{where}: input gradients differ"
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        g_ref = grads_ref[name]
        assert (g is None) == (g_ref is None), f"{where}: gradient of {name}"
        assert g is None or torch.equal(g, g_ref), f"{where}: gradients of {name} differ"


TRAIN_STEPS = 3


def check_against_reference(
    model: nn.Module,
    x: Tensor,
    bits: tuple[Bits, ...],
    *,
    tamper: Callable[[fx.GraphModule], None] | None = None,
) -> None:
    """Run the compiled module and the reference in eval (no range observed yet), train
    them side by side for a few SGD steps on batches of growing scale, then run both in
    eval on a batch outside the running range;
    every output and gradient must be bitwise equal. ``tamper`` may break the compiled
    module first (to show that the comparison can fail)."""
    reference = Reference(copy.deepcopy(model))  # the compiled module shares model's tensors
    keys = reference.layer_keys()
    assert len(keys) == len(bits), (keys, bits)
    gm = compile_quiet(model, x, plan=Plan(dict(zip(keys, bits, strict=True))))
    reference.plan = dict(dpc_fx.plan_of(gm).layers)
    assert reference.plan == dict(zip(keys, bits, strict=True))
    if tamper is not None:
        tamper(gm)

    ours = dict(gm.named_parameters())
    theirs = dict(reference.module.named_parameters())
    assert ours.keys() == theirs.keys()
    opt_ours = torch.optim.SGD(ours.values(), lr=0.05)
    opt_theirs = torch.optim.SGD(theirs.values(), lr=0.05)
    planned = [k for k in keys if not reference.plan[k].full_precision]
    # Eval before any training batch: activations are quantised over their own range.
    gm.eval()
    reference.train(False)
    assert_bitwise_equal(
        step(gm, ours, x, seed=7), step(reference, theirs, x, seed=7), "eval before training"
    )
    gm.train()
    reference.train(True)
    for i in range(TRAIN_STEPS):
        batch = x * (1.0 + i)  # the range moves, so the running average differs from it
        got = step(gm, ours, batch, seed=i)
        want = step(reference, theirs, batch, seed=i)
        assert reference.quantised == planned
        assert_bitwise_equal(got, want, f"training step {i}")
        opt_ours.step()
        opt_theirs.step()
    gm.eval()
    reference.train(False)
    assert_bitwise_equal(
        step(gm, ours, 3.0 * x, seed=99), step(reference, theirs, 3.0 * x, seed=99), "eval"
    )
    state, state_ref = gm.state_dict(), reference.module.state_dict()
    assert all(torch.equal(state[k], state_ref[k]) for k in state_ref), "parameters drifted"


def conv(c_in: int, c_out: int, **changes: object) -> Conv:
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


_MLP = MLPSpec(
    3,
    (
        Dense("linear", 3, 4, "relu", False, True),
        Dense("at", 4, 4, "gelu", True, False),
        Dense("addmm", 4, 4, None, True, False),
        Dense("einsum", 4, 2, None, False, False),
    ),
)
_CNN = CNNSpec(
    2,
    2,
    5,
    (
        conv(2, 4, padding_mode="reflect", batch_norm=True, act="relu", branch=True),
        conv(4, 4, transposed=True, stride=2, padding=1, output_padding=1, groups=2),
    ),
    4,
    10,
    3,
)


# Max-pooling leaves a 1x1 map with channels-last strides; the next layer's quantiser must
# keep them, or its convolution sums in another order than the reference's (seed 17 did).
_POOLED_TO_ONE = CNNSpec(
    2,
    3,
    3,
    (
        conv(3, 2, kernel=1, padding=0, transposed=True, act="relu"),
        Pool("max"),
        conv(2, 2, padding_mode="replicate", act="relu"),
    ),
    2,
    1,
    3,
)


@settings(max_examples=40, deadline=None)
@given(planned_models())
@example((SpecMLP(_MLP, seed=1), torch.randn(3, 3), (Bits(2, 3, 4),) * 4))
@example(
    (
        SpecCNN(_CNN, seed=2),
        torch.randn(2, 2, 5, 5),
        (Bits(3, 4, 5), Bits(2, None, 6), Bits(4, 4, None), Bits(None, 5, 8)),
    )
)
@example(
    (
        SpecCNN(_POOLED_TO_ONE, seed=17),
        torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(17)),
        (Bits(1, None, None), Bits(None, 1, None), Bits(None, None, None)),
    )
)
def test_compiled_module_matches_an_independent_reference(
    case: tuple[nn.Module, Tensor, tuple[Bits, ...]],
) -> None:
    check_against_reference(*case)


def _set(role: str, field: str, value: object) -> Callable[[fx.GraphModule], None]:
    def tamper(gm: fx.GraphModule) -> None:
        for held in gm.dpc.children():
            setattr(getattr(held, role), field, value)

    return tamper


@pytest.mark.parametrize(
    ("tamper", "failure"),
    [
        (_set("weight_q", "channel_dim", None), "eval before training: outputs differ"),
        (_set("act_q", "momentum", 0.5), "eval: outputs differ"),
        (_set("grad_q", "bits", 5), "eval before training: input gradients differ"),
    ],
    ids=["weights per tensor", "momentum 0.5", "gradients at 5 bits"],
)
def test_the_comparison_fails_on_a_broken_quantiser(
    tamper: Callable[[fx.GraphModule], None], failure: str
) -> None:
    model, x = SpecMLP(_MLP, seed=1), torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    check_against_reference(copy.deepcopy(model), x, (Bits(2, 3, 4),) * 4)  # untouched: equal
    with pytest.raises(AssertionError, match=failure):
        check_against_reference(model, x, (Bits(2, 3, 4),) * 4, tamper=tamper)
