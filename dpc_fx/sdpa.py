"""Attention whose mask is the causal one runs as causal attention.

A decoder called eagerly asks ``F.scaled_dot_product_attention`` for ``is_causal=True`` and
passes no mask; captured by ``torch.export``, the same decoder builds the causal mask as a
tensor (export cannot know that no padding will come) and hands it to the kernel, which then
reads and adds it for every block of scores, where the causal kernel skips the blocks above
the diagonal. The capture pass (:mod:`dpc_fx.passes.capture`) therefore calls
:func:`attention` for every attention op that takes a mask: a mask equal, broadcast over
batch and heads, to ``tril(ones(L, S))`` (as booleans, or as ``0``/``-inf``) runs as
``is_causal=True`` with no mask; any other mask (padding, a sliding window, a float bias,
a mask that needs a gradient) runs as given.

The two calls are the same function. On the CPU kernels of this torch they agree bit for bit,
values and gradients (``tests/test_capture.py``), because a masked score adds ``0`` and a
skipped one contributes ``exp(-inf) = 0`` to the softmax's sums either way.

A check reads the mask once per tensor: attention layers that share one mask tensor (every
layer of a decoder) check it once a step. While a trace runs (``torch.compile``,
``torch.export``, ``torch.jit``) the mask is passed as it is: its values are unknown there.

>>> import torch
>>> q = k = v = torch.randn(1, 2, 4, 8)
>>> mask = torch.ones(4, 4, dtype=torch.bool).tril()
>>> torch.equal(attention(q, k, v, mask), attention(q, k, v, None, is_causal=True))
True
>>> causal_mask(mask, q, k), causal_mask(mask.T, q, k)
(True, False)
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor

__all__ = ["as_causal", "attention", "causal_mask"]

_sdpa = torch.ops.aten.scaled_dot_product_attention.default


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``aten.scaled_dot_product_attention`` with the same arguments, run as
    ``is_causal=True`` without the mask where ``attn_mask`` is the causal mask
    (:func:`causal_mask`)."""
    attn_mask, is_causal = as_causal(query, key, attn_mask, is_causal)
    return _sdpa(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


def as_causal(
    query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> tuple[Tensor | None, bool]:
    """``(None, True)`` where ``attn_mask`` is the causal mask (:func:`causal_mask`), else
    ``(attn_mask, is_causal)`` as given: the arguments attention runs with."""
    if attn_mask is not None and not is_causal and causal_mask(attn_mask, query, key):
        return None, True
    return attn_mask, is_causal


# The last mask checked, held weakly (a freed mask's address may come back as another
# tensor's), with its version counter (in-place writes bump it) and the verdict.
_last: tuple[weakref.ref[Tensor], int, bool] | None = None


def causal_mask(mask: Tensor, query: Tensor, key: Tensor) -> bool:
    """Whether attention of ``query`` over ``key`` with ``mask`` is causal attention: the
    mask's last two dimensions are ``(L, S)`` (the query's and the key's lengths) and every
    ``(L, S)`` slice is ``tril(ones(L, S))`` (``torch``'s causal mask, aligned top left),
    as booleans or as a float mask of ``0`` and ``-inf``. False for a mask that needs a
    gradient, and while a trace runs."""
    global _last
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or type(mask) is not Tensor  # fake, functional or another subclass: values unknown
        or mask.requires_grad
        or mask.dim() < 2
        or not (mask.dtype == torch.bool or mask.dtype.is_floating_point)
    ):
        return False
    shape = (query.shape[-2], key.shape[-2])
    if tuple(mask.shape[-2:]) != shape:
        return False
    if _last is not None and _last[0]() is mask and _last[1] == mask._version:
        return _last[2]
    verdict = _is_tril(mask, _pattern(*shape, mask.dtype, mask.device))
    _last = (weakref.ref(mask), mask._version, verdict)
    return verdict


def _is_tril(mask: Tensor, pattern: Tensor) -> bool:
    # A broadcast dimension (stride 0) holds one slice many times: read it once.
    for dim in range(mask.dim() - 2):
        if mask.stride(dim) == 0 and mask.shape[dim] > 1:
            mask = mask.narrow(dim, 0, 1)
    return bool(torch.eq(mask, pattern).all())


@functools.lru_cache(maxsize=16)
def _pattern(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The causal mask of ``rows`` queries over ``cols`` keys in ``dtype`` (never handed
    out: only compared with)."""
    keep = torch.ones(rows, cols, dtype=torch.bool, device=device).tril()
    if dtype == torch.bool:
        return keep
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill_(~keep, -torch.inf)
