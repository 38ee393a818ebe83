"""timm models through dpc_fx.compile: traced whole, attention quantised as a layer, >= 95% of
the MACs outside the pinned first and last layers quantised, the same function as the model
in both modes (quantisers off), and a training step (tools/zoo.py runs the 15 of docs/ZOO.md).

LeViT caches its attention bias in eval mode, a branch on ``self.training``: traced through
a stand-in, it compiles whole instead of keeping its attention modules in full precision.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from helpers import quantizers_off
from torch import nn

import dpc_fx

timm = pytest.importorskip("timm")

# name: (constructor keywords, input size, attention layers)
MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 3}, 32, 3),
    "levit_128": ({"img_size": 64}, 64, 0),  # attention as matmuls around a learned bias
    "poolformer_s12": ({}, 64, 0),
}


def unpinned_share(gm: nn.Module) -> float:
    cov = dpc_fx.coverage(gm)
    assert cov.macs is not None and cov.quantised_macs is not None
    pinned = sum(m.macs or 0 for m in dpc_fx.layers(gm) if m.pinned)
    return cov.quantised_macs / (cov.macs - pinned)


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_models_compile_whole_and_quantise_their_attention(name: str) -> None:
    kwargs, size, attention = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no leaf, no warning
        gm = dpc_fx.compile(model, x)
    cov = dpc_fx.coverage(gm)
    assert cov.traced and not cov.leaves and cov.compiled == cov.layers
    metas = dpc_fx.layers(gm)
    assert sum(m.op == "attention" and m.quantised for m in metas) == attention
    assert unpinned_share(gm) >= 0.95

    off = quantizers_off(copy.deepcopy(gm))
    for training in (True, False):  # dropout, drop-path and LeViT's cached bias follow the mode
        model.train(training)
        off.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert torch.equal(off(x), expected)

    gm.train()
    gm(x).pow(2).mean().backward()
    missing = [n for n, p in gm.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
