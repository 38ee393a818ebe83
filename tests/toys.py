"""Small hand-written models that several test files share (generated ones live in
strategies.py)."""

from __future__ import annotations

import itertools

from torch import Tensor, nn
from torchvision.models import swin_transformer, vision_transformer


class Gate(nn.Module):
    """Python control flow on a tensor value: symbolic tracing cannot follow it."""

    def forward(self, x: Tensor) -> Tensor:
        return x if x.sum() > 0 else -x


class GatedBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.gate = Gate()

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.lin(x))


class GatedNet(nn.Module):
    """Traceable but for ``body.1.gate``, two levels down; input ``(batch, 4)``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.body = nn.Sequential(
            nn.Linear(width, width), GatedBlock(width), nn.Linear(width, width)
        )
        self.head = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))


def tiny_vit() -> nn.Module:
    return vision_transformer.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )


def tiny_swin(*, v2: bool = False) -> nn.Module:
    """Two stages of window size 4 on 32x32 images: windows shift in the first stage."""
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[4, 4],
        num_classes=10,
        block=swin_transformer.SwinTransformerBlockV2
        if v2
        else swin_transformer.SwinTransformerBlock,
        downsample_layer=swin_transformer.PatchMergingV2 if v2 else swin_transformer.PatchMerging,
    )


def small_cnn(classes: int = 3) -> nn.Sequential:
    """Three 3x3 convolutions (batch norm after the first two) and a linear head, for
    3-channel images of any size."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def mlp(*widths: int) -> nn.Sequential:
    """Linear layers of the given widths with ReLUs between: ``mlp(4, 8, 2)``."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)
