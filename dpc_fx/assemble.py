"""Assembling a compiled model: the compiled parts of a part tree (:mod:`dpc_fx.parts`) put
back where their modules sat.

A part traced from the model itself is the result; a leaf becomes a shallow copy of its
module (same class, same parameters) with its compiled children swapped in. A compiled
part called by a leaf's own code answers for its module what its graph does not hold (an
attribute, a method): see :func:`_delegate`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from dpc_fx.meta import keep_attribute, kept_attribute
from dpc_fx.parts import Part, Tree
from dpc_fx.passes._graph import keep_module_order

__all__ = ["assemble"]


def assemble(tree: Tree, compiled: dict[str, fx.GraphModule]) -> nn.Module:
    """The module to run: the root's compiled graph, or a shallow copy of the model with
    the compiled parts (``compiled``, by path) swapped in, each where its module sat."""
    for path, gm in compiled.items():
        keep_module_order(gm, tree.model.get_submodule(path))
    result = _assemble(tree.root, compiled)
    # Nothing compiled, or the model's own forward is a leaf: a copy of the model's class,
    # so the compiled module's record never lands on the user's model.
    return _shallow_copy(tree.model, {}) if result is tree.model else result


def _assemble(part: Part, compiled: dict[str, fx.GraphModule]) -> nn.Module:
    """The module to run for ``part``: its compiled graph, or a shallow copy of its module
    with compiled children; the module itself if nothing in it was compiled."""
    if part.gm is not None:
        out = compiled.get(part.path)
        if out is None:
            return part.module
        if part.path:  # the leaf above calls it, and may read its attributes
            _delegate(out, part.module)
        swapped = []
        for child in part.children:
            new = _assemble(child, compiled)
            if new is not child.module:
                out.set_submodule(child.name, new, strict=False)
                swapped.append(child.name)
        return out
    children = {child.name: _assemble(child, compiled) for child in part.children}
    changed = {name: m for name, m in children.items() if m is not part.module._modules[name]}
    return _shallow_copy(part.module, changed) if changed else part.module


def _delegate(gm: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """Let ``gm`` answer for ``module`` what its graph does not hold: the leaf code calling a
    compiled part may read its attributes or call its methods (RAFT reads
    ``update_block.hidden_state_size``; RetinaNet calls ``head.compute_loss``). Every
    GraphModule has a class of its own, so the change stays with ``gm``; it survives
    ``copy.deepcopy`` and ``torch.save``."""
    cls = type(gm)
    cls.__getattr__ = _getattr_or_delegate  # type: ignore[method-assign]
    cls.__reduce__ = _reduce_delegating  # type: ignore[method-assign,assignment]
    cls.__deepcopy__ = _deepcopy_delegating  # type: ignore[method-assign]
    keep_attribute(gm, _ORIGINAL, (module,))  # in a tuple: not a submodule, even after torch.load
    return gm


_ORIGINAL = "_dpc_original"


def _getattr_or_delegate(self: nn.Module, name: str) -> Any:
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        original = kept_attribute(self, _ORIGINAL)
        if original is None or name.startswith("__"):
            raise
        return getattr(original[0], name)


def _reduce_delegating(self: fx.GraphModule) -> tuple[Any, ...]:
    rebuild, args = fx.GraphModule.__reduce__(self)[:2]
    return _rebuild_delegating, (rebuild, args)


def _rebuild_delegating(
    rebuild: Callable[..., fx.GraphModule], args: tuple[Any, ...]
) -> fx.GraphModule:
    gm = rebuild(*args)
    return _delegate(gm, kept_attribute(gm, _ORIGINAL)[0])


def _deepcopy_delegating(self: fx.GraphModule, memo: dict[int, Any]) -> fx.GraphModule:
    new = fx.GraphModule.__deepcopy__(self, memo)  # copies ``meta``, and so the original
    return _delegate(new, kept_attribute(new, _ORIGINAL)[0])


def _shallow_copy(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``module`` (same class, same parameters) with ``children`` swapped in."""
    new = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, dict):  # parameters, buffers, modules, hooks: the copy's own
            new.__dict__[key] = copy.copy(value)
    new._modules.update(children)
    return new
