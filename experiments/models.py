"""The experiments' models, small enough to train on a laptop CPU.

:class:`MNIST1DCNN` is the CNN of the MNIST-1D paper (about 94% test accuracy in fp32); the
MLP and the 1-D ResNet give DPC more layers of different sizes to work on. :class:`DigitsCNN`
is a small 2-D CNN for scikit-learn's 8x8 digits. :class:`CharTransformer` is a tiny
character-level language model (:func:`experiments.data.char_corpus` has text for it). The
CIFAR models (:func:`cifar_resnet`, :func:`cifar_mobilenet_v2`) are those of the DPC paper's
setting.

>>> model = MNIST1DResNet()
>>> model(torch.randn(2, 1, 40)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "MNIST1DCNN",
    "MNIST1DMLP",
    "CharTransformer",
    "DigitsCNN",
    "MNIST1DResNet",
    "cifar_mobilenet_v2",
    "cifar_resnet",
]


class DigitsCNN(nn.Module):
    """A small 2-D CNN for the 8x8 digits: three 3x3 convolutions (16, 32, 64 channels)
    with batch norm, global average pooling and a linear classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for n_in, n_out, stride in ((1, 16, 1), (16, 32, 2), (32, 64, 2)):
            layers += [nn.Conv2d(n_in, n_out, 3, stride, 1), nn.BatchNorm2d(n_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class MNIST1DCNN(nn.Module):
    """The MNIST-1D paper's CNN: three strided Conv1d layers and a linear head."""

    def __init__(self, channels: int = 25, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x).relu()
        return self.linear(x.flatten(1))


class MNIST1DMLP(nn.Module):
    """An MLP on the flattened sequence: by default the MNIST-1D paper's three layers
    (about 68%); ``widths`` sets the hidden layers instead, e.g. ``(256, 256, 128, 64)``.
    """

    def __init__(
        self, hidden: int = 100, classes: int = 10, *, widths: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        sizes = [40, *(widths if widths is not None else (hidden, hidden))]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    """He et al.'s basic residual block, 1-D or 2-D: two 3-wide convs with batch norm, and a
    1x1 conv on the shortcut where the shape changes."""

    def __init__(self, n_in: int, n_out: int, stride: int, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.conv1 = conv(n_in, n_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(n_out)
        self.conv2 = conv(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = norm(n_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or n_in != n_out:
            self.shortcut = nn.Sequential(
                conv(n_in, n_out, 1, stride=stride, bias=False), norm(n_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(x)).relu()
        y = self.bn2(self.conv2(y))
        return (y + self.shortcut(x)).relu()


class MNIST1DResNet(nn.Module):
    """A small 1-D ResNet: a stem conv, one residual block per stage (``channels``, the
    later stages halving the length), global average pooling and a linear head."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(1, channels[0], 5, padding=2, bias=False),
            nn.BatchNorm1d(channels[0]),
            nn.ReLU(),
        )
        blocks = []
        for i, n_out in enumerate(channels):
            n_in = channels[max(i - 1, 0)]
            blocks.append(_BasicBlock(n_in, n_out, stride=1 if i == 0 else 2, dims=1))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(2))


class _Attention(nn.Module):
    """Causal multi-head self-attention, written out so its two matmuls are graph nodes."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # a plain unpack: torch.fx can trace it
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        # The mask is built from ``att`` (not sliced from a buffer) so that tracing works.
        causal = torch.ones_like(att, dtype=torch.bool).tril()
        att = att.masked_fill(causal.logical_not(), float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, c))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A small GPT-style character language model: token and position embeddings,
    ``layers`` pre-norm Transformer blocks, a linear head over the vocabulary.

    Input: token ids ``(batch, time)`` with ``time <= context``; output: logits
    ``(batch, time, vocab)``.
    """

    def __init__(
        self, vocab: int, *, context: int = 64, dim: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CharTransformer: dim={dim} is not a multiple of heads={heads}.")
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(_TransformerBlock(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.head(self.norm(self.blocks(x)))


class _CIFARResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        n_in = 16
        for i, n_out in enumerate((16, 32, 64)):
            for j in range(blocks_per_stage):
                stages.append(_BasicBlock(n_in, n_out, 2 if i > 0 and j == 0 else 1))
                n_in = n_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.bn1(self.conv1(x)).relu())
        return self.fc(x.mean((2, 3)))


def cifar_resnet(depth: int = 20, classes: int = 10) -> nn.Module:
    """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers (20, 38, 74, ...): three
    stages of ``n`` basic blocks at 16, 32 and 64 channels, 1x1-conv shortcuts where the
    shape changes.

    >>> sum(p.numel() for p in cifar_resnet(20).parameters())
    272474
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"cifar_resnet: depth={depth} is not 6n + 2 (e.g. 20, 38, 74).")
    return _CIFARResNet((depth - 2) // 6, classes)


def cifar_mobilenet_v2(classes: int = 10) -> nn.Module:
    """torchvision's MobileNetV2 adapted to 32x32 inputs, as CIFAR papers do: the stem and
    the first stride-2 block run at stride 1, so the last feature map is 4x4, not 1x1."""
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=classes)
    for conv in (model.features[0][0], model.features[2].conv[1][0]):
        conv.stride = (1, 1)
    return model
