"""Traceable stand-ins for attention modules whose layers torch.fx cannot see.

Four families of attention hide their matmul-like layers from a symbolic trace:

- ``nn.MultiheadAttention`` is a ``torch.nn`` module, so FX records it as one call; its
  in-projection (a packed ``in_proj_weight``) and ``out_proj`` never reach the graph.
- ``nn.Transformer`` and its encoder and decoder (layers) are ``torch.nn`` modules too,
  and their forwards branch on tensor values to pick a fused inference kernel.
- torchvision's Swin attention (2-D, V2 and 3-D) runs in a function marked
  ``torch.fx.wrap`` that takes the ``qkv`` and ``proj`` weights as arguments, because its
  padding, shifting and masking depend on the feature map's size.
- timm's LeViT and EfficientFormer attention caches its attention bias in eval mode: a
  branch on ``self.training`` that keeps the module whole (both branches give the same
  values; the stand-in takes the training one).

One registry maps each such class to a *stand-in*: a function ``standin(m, mode, *args,
**kwargs)`` that takes the arguments of the class's ``forward`` in the same order and
computes what it computes (the general path, not the fused inference kernel), but lays
the projections out as ``F.linear`` calls on the module's own parameters or as calls of
its own submodules, and keeps what depends on concrete sizes (window partitioning,
masks, the attention core) inside small functions that FX records as single calls. The
tracer (``passes/trace.py``) runs :func:`standin_for`'s function in place of the
module's ``forward``, for a submodule and for the model itself alike. ``mode()`` gives a
graph value for ``m.training`` read at run time (FX would record the flag as a
constant), so dropout inside a stand-in follows ``train()``/``eval()``:

    Swin block attention, before:   x ──► shifted_window_attention(x, qkv.weight, ...) ──►
    after:   x ──► _windows ──► linear(qkv.weight) ──► _window_core ──► linear(proj.weight)
               ──► dropout ──► _unwindows ──►

The module itself is not changed, so ``state_dict`` keys stay the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

__all__ = ["standin_for"]


def standin_for(m: nn.Module) -> Callable[..., Any] | None:
    """The stand-in for ``m``'s ``forward``, called as ``standin(m, mode, *args,
    **kwargs)``; ``None`` when ``m`` has none (trace it as usual).

    The stand-in is looked up by the class that defines ``m``'s ``forward``: a subclass
    with a forward of its own is traced through that forward, which the stand-in does not
    mirror.
    """
    owner = next(c for c in type(m).__mro__ if "forward" in vars(c))
    standin = _STANDINS.get(f"{owner.__module__}.{owner.__qualname__}")
    if isinstance(m, nn.MultiheadAttention) and (
        m.bias_k is not None or m.bias_v is not None or m.add_zero_attn
    ):
        return None  # rare options, left to the module itself (one call)
    return standin


# --- nn.MultiheadAttention -------------------------------------------------------------


def _multihead_attention(
    m: nn.MultiheadAttention,
    mode: Callable[[], Any],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``m(query, key, value, ...)`` with the projections in the graph.

    The projections act on each token alone, so they run in the caller's layout
    (batch-first or not); only the attention core needs to know the layout.
    """
    e = m.embed_dim
    bias = m.in_proj_bias
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        if query is key and key is value:  # self-attention: one packed projection
            qkv = F.linear(query, w, bias)
            q, k, v = qkv[..., :e], qkv[..., e : 2 * e], qkv[..., 2 * e :]
        else:
            q = F.linear(query, w[:e], None if bias is None else bias[:e])
            k = F.linear(key, w[e : 2 * e], None if bias is None else bias[e : 2 * e])
            v = F.linear(value, w[2 * e :], None if bias is None else bias[2 * e :])
    else:
        q = F.linear(query, m.q_proj_weight, None if bias is None else bias[:e])
        k = F.linear(key, m.k_proj_weight, None if bias is None else bias[e : 2 * e])
        v = F.linear(value, m.v_proj_weight, None if bias is None else bias[2 * e :])
    out_weights = _mha_core(
        q,
        k,
        v,
        m.num_heads,
        m.batch_first,
        key_padding_mask,
        attn_mask,
        need_weights,
        average_attn_weights,
        is_causal,
        m.dropout,
        mode() if m.dropout > 0 else False,
    )
    out = m.out_proj(out_weights[0])
    return out, (out_weights[1] if need_weights else None)


@torch.fx.wrap
def _mha_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    batch_first: bool,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    need_weights: bool,
    average_attn_weights: bool,
    is_causal: bool,
    dropout: float,
    training: bool,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention over projected ``q, k, v`` in the module's layout;
    masks follow ``nn.MultiheadAttention`` (boolean ``True`` = may not attend, floats
    added to the scores), dropout on the attention weights in training. Returns the heads
    merged back, and the attention weights."""
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "nn.MultiheadAttention: is_causal=True needs attn_mask (it is only a hint "
            "that attn_mask is causal)."
        )
    unbatched = q.dim() == 2
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    n, length, e = q.shape
    d = e // num_heads

    def heads(t: Tensor) -> Tensor:  # (n, len, e) -> (n, heads, len, d)
        return t.reshape(n, t.shape[1], num_heads, d).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    mask = _additive_mask(attn_mask, key_padding_mask, n, num_heads, q.dtype)
    if need_weights:
        scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=training)
        out = weights @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
        if unbatched:
            weights = weights.squeeze(0)
    else:
        p = dropout if training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        weights = None
    out = out.transpose(1, 2).reshape(n, length, e)
    if unbatched:
        out = out.squeeze(0)
    elif not batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    num_heads: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """One float mask broadcastable to ``(n, heads, len, src_len)``, or ``None``."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        out = additive(attn_mask)
        if out.dim() == 3:  # (n * heads, len, src_len)
            out = out.reshape(n, num_heads, *out.shape[1:])
    if key_padding_mask is not None:
        pad = additive(key_padding_mask)[:, None, None, :]
        out = pad if out is None else out + pad
    return out


# --- nn.Transformer and its parts ------------------------------------------------------
# Their own forwards first check, on tensor values, whether a fused inference kernel
# applies; the stand-ins take the general path, which computes the same function.


def _encoder_layer(
    m: nn.TransformerEncoderLayer,
    mode: Callable[[], Any],
    src: Tensor,
    src_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    x = src
    if m.norm_first:
        x = x + _self_attention(m, m.norm1(x), src_mask, src_key_padding_mask, is_causal)
        return x + _feed_forward(m, m.norm2(x), m.dropout2)
    x = m.norm1(x + _self_attention(m, x, src_mask, src_key_padding_mask, is_causal))
    return m.norm2(x + _feed_forward(m, x, m.dropout2))


def _decoder_layer(
    m: nn.TransformerDecoderLayer,
    mode: Callable[[], Any],
    tgt: Tensor,
    memory: Tensor,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
) -> Tensor:
    x = tgt
    if m.norm_first:
        x = x + _self_attention(m, m.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + _cross_attention(
            m, m.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal
        )
        return x + _feed_forward(m, m.norm3(x), m.dropout3)
    x = m.norm1(x + _self_attention(m, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
    x = m.norm2(
        x + _cross_attention(m, x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
    )
    return m.norm3(x + _feed_forward(m, x, m.dropout3))


# The blocks of both layer classes, from their public submodules.


def _self_attention(
    m: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer,
    x: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
) -> Tensor:
    out = m.self_attn(
        x,
        x,
        x,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        need_weights=False,
        is_causal=is_causal,
    )[0]
    return m.dropout1(out)


def _cross_attention(
    m: nn.TransformerDecoderLayer,
    x: Tensor,
    memory: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
) -> Tensor:
    out = m.multihead_attn(
        x,
        memory,
        memory,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        need_weights=False,
        is_causal=is_causal,
    )[0]
    return m.dropout2(out)


def _feed_forward(
    m: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer, x: Tensor, dropout: nn.Module
) -> Tensor:
    return dropout(m.linear2(m.dropout(m.activation(m.linear1(x)))))


def _encoder(
    m: nn.TransformerEncoder,
    mode: Callable[[], Any],
    src: Tensor,
    mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool | None = None,
) -> Tensor:
    """The layers in turn, then the final norm. A causal hint of ``None`` (detect it from
    the mask) becomes ``False``: the mask itself is applied either way."""
    x = src
    for layer in m.layers:
        x = layer(
            x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal)
        )
    return x if m.norm is None else m.norm(x)


def _decoder(
    m: nn.TransformerDecoder,
    mode: Callable[[], Any],
    tgt: Tensor,
    memory: Tensor,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Tensor:
    x = tgt
    for layer in m.layers:
        x = layer(
            x,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=bool(tgt_is_causal),
            memory_is_causal=memory_is_causal,
        )
    return x if m.norm is None else m.norm(x)


def _transformer(
    m: nn.Transformer,
    mode: Callable[[], Any],
    src: Tensor,
    tgt: Tensor,
    src_mask: Tensor | None = None,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    src_is_causal: bool | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Tensor:
    memory = m.encoder(
        src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal
    )
    return m.decoder(
        tgt,
        memory,
        tgt_mask=tgt_mask,
        memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal,
    )


# --- torchvision's Swin attention ------------------------------------------------------
# The modules' forwards compute the relative position bias (public methods, traceable) and
# pass everything to one wrapped function; the stand-ins do the same with that function's
# traceable equivalent.


def _swin_attention(m: ShiftedWindowAttention, mode: Callable[[], Any], x: Tensor) -> Tensor:
    """``ShiftedWindowAttention`` (2-D Swin) and, with ``logit_scale``, its V2."""
    return _shifted_window_attention(
        x,
        m.qkv.weight,
        m.proj.weight,
        m.get_relative_position_bias(),
        m.window_size,
        m.num_heads,
        m.shift_size,
        m.attention_dropout,
        m.dropout,
        m.qkv.bias,
        m.proj.bias,
        getattr(m, "logit_scale", None),
        clamp_shift=True,
        mode=mode,
    )


def _swin_3d_attention(m: ShiftedWindowAttention3d, mode: Callable[[], Any], x: Tensor) -> Tensor:
    """``ShiftedWindowAttention3d``: the window first shrinks to a map smaller than it."""
    fitted = _fit_window(x, m.window_size, m.shift_size)
    window, shift = fitted[0], fitted[1]
    return _shifted_window_attention(
        x,
        m.qkv.weight,
        m.proj.weight,
        m.get_relative_position_bias(window),
        window,
        m.num_heads,
        shift,
        m.attention_dropout,
        m.dropout,
        m.qkv.bias,
        m.proj.bias,
        None,
        clamp_shift=False,
        mode=mode,
    )


@torch.fx.wrap
def _fit_window(
    x: Tensor, window_size: list[int], shift_size: list[int]
) -> tuple[list[int], list[int]]:
    """3-D Swin's window and shift for a ``(B, T, H, W, C)`` map: along a dimension no
    longer than the window, the window is the map's size and there is no shift."""
    window, shift = list(window_size), list(shift_size)
    for i, size in enumerate(x.shape[1:4]):
        if size <= window[i]:
            window[i], shift[i] = size, 0
    return window, shift


def _shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float,
    dropout: float,
    qkv_bias: Tensor | None,
    proj_bias: Tensor | None,
    logit_scale: Tensor | None,
    *,
    clamp_shift: bool,
    mode: Callable[[], Any],
) -> Tensor:
    """Window attention of a ``(B, *spatial, C)`` map with the two projections in the
    graph. ``clamp_shift``: no shift along a dimension the window covers (2-D Swin; the
    3-D model adapts window and shift before the call). Dropout follows the module's mode
    at run time (``mode()``)."""
    training = mode() if attention_dropout > 0 or dropout > 0 else False
    geometry = (window_size, shift_size, clamp_shift)
    x = _windows(input, *geometry)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = _without_key_bias(qkv_bias)
    qkv = F.linear(x, qkv_weight, qkv_bias)
    x = _window_core(
        qkv,
        input,
        relative_position_bias,
        num_heads,
        logit_scale,
        attention_dropout,
        training,
        *geometry,
    )
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    return _unwindows(x, input, *geometry)


def _geometry(
    input: Tensor, window_size: list[int], shift_size: list[int], clamp_shift: bool
) -> tuple[list[int], list[int], list[int]]:
    """(padded spatial size, window, shift) of a ``(B, *spatial, C)`` map."""
    spatial = list(input.shape[1:-1])
    window = [int(w) for w in window_size[: len(spatial)]]
    padded = [s + (w - s % w) % w for s, w in zip(spatial, window, strict=True)]
    shift = [int(s) for s in shift_size[: len(spatial)]]
    if clamp_shift:
        shift = [0 if w >= p else s for s, w, p in zip(shift, window, padded, strict=True)]
    return padded, window, shift


def _partition(x: Tensor, window: list[int]) -> Tensor:
    """``(B, *padded, C)`` -> ``(B * windows, window volume, C)``, windows in raster order."""
    nd = len(window)
    grid = [p // w for p, w in zip(x.shape[1:-1], window, strict=True)]
    shape = [x.shape[0]]
    for g, w in zip(grid, window, strict=True):
        shape += [g, w]
    x = x.reshape(*shape, x.shape[-1])
    order = [0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1]
    return x.permute(order).reshape(-1, math.prod(window), x.shape[-1])


@torch.fx.wrap
def _windows(
    input: Tensor, window_size: list[int], shift_size: list[int], clamp_shift: bool
) -> Tensor:
    """Pad to whole windows, shift cyclically, cut into windows."""
    padded, window, shift = _geometry(input, window_size, shift_size, clamp_shift)
    pad: list[int] = [0, 0]
    for s, p in reversed(list(zip(input.shape[1:-1], padded, strict=True))):
        pad += [0, p - s]
    x = F.pad(input, pad)
    dims = tuple(range(1, len(window) + 1))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=dims)
    return _partition(x, window)


@torch.fx.wrap
def _unwindows(
    x: Tensor, input: Tensor, window_size: list[int], shift_size: list[int], clamp_shift: bool
) -> Tensor:
    """Inverse of :func:`_windows`: windows back into the map, shifted back, cropped."""
    padded, window, shift = _geometry(input, window_size, shift_size, clamp_shift)
    nd = len(window)
    grid = [p // w for p, w in zip(padded, window, strict=True)]
    b, c = input.shape[0], x.shape[-1]
    x = x.reshape(b, *grid, *window, c)
    order = [0]
    for i in range(nd):
        order += [1 + i, 1 + nd + i]
    x = x.permute(*order, 2 * nd + 1).reshape(b, *padded, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=tuple(shift), dims=tuple(range(1, nd + 1)))
    crop = (slice(None), *(slice(0, s) for s in input.shape[1:-1]), slice(None))
    return x[crop].contiguous()


@torch.fx.wrap
def _without_key_bias(qkv_bias: Tensor) -> Tensor:
    """Swin V2 has no key bias: the middle third of the packed bias is zero."""
    third = qkv_bias.numel() // 3
    keep = torch.ones_like(qkv_bias)
    keep[third : 2 * third] = 0
    return qkv_bias * keep


@torch.fx.wrap
def _window_core(
    qkv: Tensor,
    input: Tensor,
    relative_position_bias: Tensor,
    num_heads: int,
    logit_scale: Tensor | None,
    attention_dropout: float,
    training: bool,
    window_size: list[int],
    shift_size: list[int],
    clamp_shift: bool,
) -> Tensor:
    """Attention inside each window: scaled dot product (cosine with a learned scale for
    V2), plus the relative position bias, with tokens from different regions of a shifted
    window kept apart."""
    padded, window, shift = _geometry(input, window_size, shift_size, clamp_shift)
    n, tokens, c3 = qkv.shape
    c = c3 // 3
    qkv = qkv.reshape(n, tokens, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (c // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(padded, window, shift, qkv)
        windows = mask.shape[0]
        attn = attn.view(n // windows, windows, num_heads, tokens, tokens) + mask[None, :, None]
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(n, tokens, c)


def _shift_mask(padded: list[int], window: list[int], shift: list[int], like: Tensor) -> Tensor:
    """``(windows, tokens, tokens)``: -100 between tokens that a cyclic shift brought
    together from different regions of the map, 0 elsewhere.

    Along each dimension the shifted map has three regions, ``[0, p - w)``,
    ``[p - w, p - s)`` and ``[p - s, p)``; a token's region is the tuple over dimensions.
    """
    region = torch.zeros(padded, dtype=torch.long, device=like.device)
    for i, (p, w, s) in enumerate(zip(padded, window, shift, strict=True)):
        along = torch.zeros(p, dtype=torch.long, device=like.device)
        along[p - w :] = 1
        along[p - s :] = 2 if s else 1
        shape = [1] * len(padded)
        shape[i] = p
        region = region * 3 + along.view(shape)
    ids = _partition(region[None, ..., None], window)[..., 0]  # (windows, tokens)
    differ = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(differ.shape, dtype=like.dtype, device=like.device).masked_fill(
        differ, -100.0
    )


# Stand-ins by the qualified name of the class whose ``forward`` they stand in for (names,
# not classes, so that torchvision is imported only by models that use it).
# --- timm's LeViT and EfficientFormer attention -----------------------------------------
# Their attention bias is gathered from its parameters in training, and cached in eval (the
# same values, kept per device): a branch on ``self.training`` that would keep the module
# whole. The stand-in traces the training branch, right in both modes.


def _cached_bias_attention(m: nn.Module, mode: Callable[[], Any], x: Tensor) -> Tensor:
    """``m.forward(x)`` with the attention bias gathered from its parameters, as training
    mode does; eval mode reads the same values from a cache."""
    was = m.training
    m.training = True  # only get_attention_biases reads it: no dropout in these modules
    try:
        return type(m).forward(m, x)  # type: ignore[no-any-return]
    finally:
        m.training = was


_STANDINS: dict[str, Callable[..., Any]] = {
    "torch.nn.modules.activation.MultiheadAttention": _multihead_attention,
    "torch.nn.modules.transformer.TransformerEncoderLayer": _encoder_layer,
    "torch.nn.modules.transformer.TransformerDecoderLayer": _decoder_layer,
    "torch.nn.modules.transformer.TransformerEncoder": _encoder,
    "torch.nn.modules.transformer.TransformerDecoder": _decoder,
    "torch.nn.modules.transformer.Transformer": _transformer,
    "torchvision.models.swin_transformer.ShiftedWindowAttention": _swin_attention,
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": _swin_attention,
    "torchvision.models.video.swin_transformer.ShiftedWindowAttention3d": _swin_3d_attention,
    "timm.models.levit.Attention": _cached_bias_attention,
    "timm.models.levit.AttentionDownsample": _cached_bias_attention,
    "timm.models.efficientformer.Attention": _cached_bias_attention,
}
