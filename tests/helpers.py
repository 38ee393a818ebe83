"""Helpers the test files share: the pass invariant check and small graph utilities."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import settings
from torch import Tensor, fx, nn

import dpc_fx
from dpc_fx.quant import ActQuantizer, GradQuantizer, Quantizer, WeightQuantizer

ROLES = {"act_q": ActQuantizer, "weight_q": WeightQuantizer, "grad_q": GradQuantizer}


# ------------------------------------------------------------------------ check_pass


def _snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything a pass must leave alone, with object identities where sharing matters."""
    snap: dict[str, Any] = {
        "training": [(name, m.training) for name, m in module.named_modules()],
        "modules": [(name, id(m), type(m)) for name, m in module.named_modules()],
        "tensors": [(name, id(t)) for name, t in module.named_parameters()]
        + [(name, id(t)) for name, t in module.named_buffers()],
        "state": [(k, v.data_ptr(), v.detach().clone()) for k, v in module.state_dict().items()],
    }
    if isinstance(module, fx.GraphModule):
        snap["code"] = module.code
        snap["graph"] = id(module.graph)
        snap["n_nodes"] = len(module.graph.nodes)
        snap["nodes"] = [
            (
                n.name,
                n.op,
                str(n.target),
                id(n.meta),
                tuple((k, id(v)) for k, v in n.meta.items()),
                tuple(a.name for a in n.all_input_nodes),
            )
            for n in module.graph.nodes
        ]
        snap["gm_meta"] = [(k, id(v)) for k, v in getattr(module, "meta", {}).items()]
    return snap


def _assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key == "state":
            assert [s[:2] for s in before[key]] == [s[:2] for s in after[key]], "state_dict changed"
            for (name, *_, old), (*_, new) in zip(before[key], after[key], strict=True):
                assert torch.equal(old, new), f"the pass changed the value of {name}"
        else:
            assert before[key] == after[key], f"the pass mutated its input: {key} changed"


def quantizers_off(gm: nn.Module) -> nn.Module:
    """``gm`` with every quantiser's ``bits`` set to ``None`` (in place); returns ``gm``."""
    for m in gm.modules():
        if isinstance(m, Quantizer):
            m.bits = None
    return gm


def check_pass(
    pass_fn: Callable[..., fx.GraphModule],
    gm: nn.Module,
    *args: Any,
    inputs: tuple[Tensor, ...] | None = None,
    **kwargs: Any,
) -> fx.GraphModule:
    """Run ``pass_fn(gm, *args, **kwargs)`` and check the invariants every pass keeps.

    * the input is unchanged: code, node count, nodes and the identity of their ``meta``
      dicts and values, submodules, state;
    * the output is a new GraphModule whose graph lints and whose code is up to date;
    * the output has the same ``state_dict`` keys, besides its quantisers' state, and shares
      the input's tensors;
    * with ``inputs``: the output (quantisers switched off) computes exactly the input's
      function (on copies, so batch-norm statistics of ``gm`` stay put).

    Returns the output.
    """
    before = _snapshot(gm)
    out = pass_fn(gm, *args, **kwargs)
    _assert_same_snapshot(before, _snapshot(gm))

    assert isinstance(out, fx.GraphModule)
    assert out is not gm
    if isinstance(gm, fx.GraphModule):
        assert out.graph is not gm.graph
    out.graph.lint()
    assert out.code == out.graph.python_code(root_module="self").src, "recompile() missing"

    ours, theirs = dpc_fx.model_state_dict(out), dpc_fx.model_state_dict(gm)
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].data_ptr() == theirs[key].data_ptr(), f"{key} is not shared"

    if inputs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = copy.deepcopy(gm)(*inputs)
            got = quantizers_off(copy.deepcopy(out))(*inputs)
        assert torch.equal(got, expected)
    return out


# --------------------------------------------------------------------- graph utilities


def compile_quiet(model: nn.Module, *args: Any, **kwargs: Any) -> fx.GraphModule:
    """``dpc_fx.compile`` without the "no layer to quantise" warning of tiny models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dpc_fx.compile(model, *args, **kwargs)


def quantizer_nodes(gm: fx.GraphModule, role: str) -> list[fx.Node]:
    """The ``call_module`` nodes of ``gm`` that call a quantiser of ``role``
    (``"act_q"``, ``"weight_q"`` or ``"grad_q"``), checked against the module's class."""
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("dpc."):
            module = gm.get_submodule(str(node.target))
            if str(node.target).endswith("." + role):
                assert type(module) is ROLES[role], (node.target, type(module))
                nodes.append(node)
    return nodes


def quantizer_modules(gm: nn.Module, cls: type[Quantizer]) -> list[Quantizer]:
    return [m for m in gm.modules() if type(m) is cls]


def layer_node_list(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if "dpc" in n.meta]


def grads(model: nn.Module) -> dict[str, Tensor | None]:
    """A copy of every parameter's ``.grad``, by name."""
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }


def backward_grads(model: nn.Module, x: Tensor, weight: Tensor) -> tuple[Tensor, dict, Tensor]:
    """Output, parameter gradients and input gradient of ``(model(x) * weight).sum()``.

    Zeroes the gradients first and afterwards, so models that share parameters can be
    compared one after the other.
    """
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * weight).sum().backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    assert x.grad is not None
    return y.detach(), g, x.grad


def relative_l2(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def examples(n: int) -> settings:
    """``@settings`` for a property worth ``n`` examples under the default profile.

    Scales with the loaded profile's ``max_examples`` (100 by default), so
    ``pytest --hypothesis-profile=thorough`` runs every property ten times longer.
    """
    return settings(max_examples=max(1, round(n * settings.default.max_examples / 100)))


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    opt: torch.optim.Optimizer,
    steps: int,
) -> list[float]:
    """``steps`` full-batch steps of ``opt`` on ``loss_fn(model(x), y)``; the losses."""
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def reloaded(module: nn.Module) -> nn.Module:
    """``module`` through ``torch.save`` and ``torch.load`` (a whole pickled module)."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def assigned(
    gm: fx.GraphModule, config: dpc_fx.DPCConfig | None = None, *, plan: Any = None
) -> fx.GraphModule:
    """The assign pass with the policy's bits for ``gm``'s own layers: what
    ``dpc_fx.compile`` does for a model that traces whole."""
    from dpc_fx.meta import LayerMeta
    from dpc_fx.passes import assign
    from dpc_fx.passes._matmul import layer_weight
    from dpc_fx.policy import decide

    weights = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("dpc")
        if isinstance(meta, LayerMeta) and (found := layer_weight(node, gm)):
            weights[meta.layer] = found
    return assign(gm, decide(dpc_fx.layers(gm), config, plan=plan, weights=weights))
