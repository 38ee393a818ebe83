"""The example run: the model, run once on its example inputs, gives each part of its part
tree (:mod:`dpc_fx.parts`) its own first inputs and counts MACs per module.

The run is in eval mode, without gradients. Parts that only training mode calls (auxiliary
classifiers) get their inputs from a second run in training mode, which leaves no trace:
buffers (batch-norm statistics) and the random state are put back after it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from dpc_fx.errors import ShapeError
from dpc_fx.inputs import describe
from dpc_fx.passes.capacity import flop_counter

if TYPE_CHECKING:
    from dpc_fx.parts import Part

__all__ = ["run"]


def run(
    model: nn.Module,
    inputs: tuple[Any, ...],
    root: Part,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Run ``model(*inputs, **kwargs)`` once in eval mode; store each part's first inputs (as
    positional arguments, and the call as it was made); return MACs per module
    path. Parts that only training mode calls (auxiliary classifiers) get theirs from a second
    run in training mode, which leaves no trace: buffers (batch-norm statistics) and the
    random state are restored after it."""
    kwargs = kwargs or {}
    stack: list[str] = []
    with _recording(model, root, stack), _mode(model, training=False), _attributes(model):
        try:
            with torch.no_grad(), flop_counter() as counter:
                model(*inputs, **kwargs)
        except Exception as e:
            where = stack[-1] if stack else ""
            module = model.get_submodule(where) if where not in ("", "?") else model
            shapes = ", ".join(
                [describe(x) for x in inputs] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
            )
            raise ShapeError(
                f"example inputs do not fit the model: module '{where or '(the model itself)'}' "
                f"({type(module).__name__}) failed on example inputs [{shapes}] with "
                f"{type(e).__name__}: {_first_line(e)}. Check the shape and dtype of the example "
                "inputs (batch first, as the model expects; a tuple holds one entry per argument).",
                module=where,
            ) from e
    if any(part.gm is not None and not part.called for part in root.walk()):
        with _recording(model, root, []), _mode(model, training=True), _untouched(model):
            try:
                model(*inputs, **kwargs)
            except Exception:  # training may need more (a detector's targets): left alone
                pass
    root_name = type(model).__name__
    macs = {}
    for key, ops in counter.get_flop_counts().items():
        if key == root_name or key.startswith(root_name + "."):
            macs[key[len(root_name) + 1 :]] = sum(ops.values()) // 2
    return macs


@contextlib.contextmanager
def _recording(model: nn.Module, root: Part, stack: list[str]) -> Iterator[None]:
    """Hooks that give each part not called yet its first inputs, and keep ``stack`` of the
    module paths running."""
    by_module: dict[int, list[Part]] = {}
    for part in root.walk():
        by_module.setdefault(id(part.module), []).append(part)
    paths = {id(m): p for p, m in model.named_modules()}

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stack.append(paths.get(id(module), "?"))
        for part in by_module.get(id(module), ()):
            if not part.called:
                part.called, part.inputs = True, _positional(module, args, kwargs)
                part.call = (args, kwargs)
            elif part.call is not None and not _same_form(part.call, (args, kwargs)):
                part.varied = True  # a capture on the first call would not fit the others

    def after(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _attributes(model: nn.Module) -> Iterator[None]:
    """Put back the modules' attributes after the run: some cache values on their first call
    (torchvision's ``MultiScaleRoIAlign.scales``), which later traces would then meet."""
    saved = {m: dict(vars(m)) for m in model.modules()}
    try:
        yield
    finally:
        for module, attrs in saved.items():
            now = vars(module)
            for key in [k for k in now if k not in attrs]:
                del now[key]
            now.update(attrs)


@contextlib.contextmanager
def _mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, was in modes.items():
            m.training = was


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run without gradients, then put back every buffer (same tensor, same values) and the
    random state (the CPU's, and that of the GPUs the model lives on)."""
    saved = [
        (m, name, b, b.clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    try:
        gpus = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=gpus):
            yield
    finally:
        with torch.no_grad():
            for module, name, buffer, values in saved:
                module._buffers[name] = buffer
                buffer.copy_(values)


def _form(call: Any) -> Any:
    """What a capture specialises on in a call: its structure, the tensors' ranks and dtypes,
    the other values (sizes stay free)."""
    leaves, spec = pytree.tree_flatten(call)
    return spec, [(x.dim(), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves]


def _same_form(a: Any, b: Any) -> bool:
    try:
        return bool(_form(a) == _form(b))
    except Exception:  # values that do not compare: take them as different
        return False


def _positional(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    if not kwargs:
        return args
    try:
        return inspect.signature(module.forward).bind(*args, **kwargs).args
    except TypeError:
        return args


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "(no message)"
