"""Small experiments that run on a laptop CPU: data in memory, models, training loops.

MNIST-1D is generated locally by the ``mnist1d`` package (4000 train / 1000 test sequences
of length 40, 10 classes). The CNN is the one of the MNIST-1D paper (about 94% test accuracy
in fp32); the MLP and the 1-D ResNet give DPC more layers of different sizes to work on.
scikit-learn's bundled 8x8 digits (:func:`digits`) with :class:`DigitsCNN` are a small 2-D
image task.
:class:`CharTransformer` is a tiny character-level language model (see
:func:`dpc_fx.data.stdlib_text` for text that ships with Python). The CIFAR models
(:func:`cifar_resnet`, :func:`cifar_mobilenet_v2`) are those of the DPC paper's setting.

>>> model = MNIST1DResNet()
>>> model(torch.randn(2, 1, 40)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "MNIST1DCNN",
    "MNIST1DMLP",
    "CharTransformer",
    "DigitsCNN",
    "MNIST1DResNet",
    "Result",
    "Split",
    "cifar_mobilenet_v2",
    "cifar_resnet",
    "compare",
    "digits",
    "evaluate",
    "mnist1d",
    "train",
]


@dataclass(frozen=True)
class Split:
    """A data set in memory: inputs ``x`` and integer labels ``y``."""

    x: Tensor
    y: Tensor

    def batches(
        self, size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        order = (
            torch.randperm(len(self.y), generator=generator)
            if generator
            else torch.arange(len(self.y))
        )
        for i in range(0, len(order), size):
            idx = order[i : i + size]
            yield self.x[idx], self.y[idx]


def mnist1d(seed: int = 42) -> tuple[Split, Split]:
    """The MNIST-1D train and test splits, generated locally (no download).

    Inputs have shape ``(N, 1, 40)`` (one channel, for Conv1d models).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the MNIST-1D demo needs `pip install mnist1d` (or dpc-fx[demo])") from e
    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)

    def split(x: object, y: object) -> Split:
        return Split(
            torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y, dtype=torch.long)
        )

    return split(data["x"], data["y"]), split(data["x_test"], data["y_test"])


def digits(*, size: int = 8, channels: int = 1, test: int = 397) -> tuple[Split, Split]:
    """scikit-learn's 1,797 handwritten digits (8x8, bundled with it: no download) as train
    and test splits of ``(N, channels, size, size)`` images, 10 classes.

    Pixels are scaled to zero mean and unit variance over all images, resized bilinearly
    when ``size`` is not 8 and repeated over ``channels``; the split (``test`` images held
    out) is a fixed shuffle.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data needs `pip install scikit-learn` (or dpc-fx[demo])"
        ) from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    if size != 8:
        x = nn.functional.interpolate(x, size=size, mode="bilinear")
    x = x.expand(-1, channels, -1, -1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = order[: len(x) - test], order[len(x) - test :]
    return Split(x[train], y[train]), Split(x[held], y[held])


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


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode; the mode is restored after)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.batches(batch_size))
    model.train(was_training)
    return correct / len(data.y)


def train(
    model: nn.Module,
    data: Split,
    *,
    steps: int,
    batch_size: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` with Adam and a cosine learning-rate decay; returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses: list[float] = []
    model.train()
    while len(losses) < steps:
        for x, y in data.batches(batch_size, generator):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(len(losses), losses[-1])
            if len(losses) == steps:
                break
    return losses


@dataclass(frozen=True)
class Result:
    """One method's run in :func:`compare`; :meth:`line` formats it under :attr:`HEADER`."""

    HEADER: ClassVar[str] = (
        f"{'method':<14}{'test acc':>9}{'vs fp32':>10}{'vs 8-bit':>10}{'time':>8}"
    )

    method: str
    accuracy: float
    saving_vs_fp32: float | None  # training bit-operations saved; None for fp32 itself
    saving_vs_8bit: float | None
    seconds: float

    def line(self) -> str:
        fp32, eight = (
            ("-", "-")
            if self.saving_vs_fp32 is None or self.saving_vs_8bit is None
            else (f"{self.saving_vs_fp32:.1%}", f"{self.saving_vs_8bit:.1%}")
        )
        return f"{self.method:<14}{self.accuracy:>9.1%}{fp32:>10}{eight:>10}{self.seconds:>7.0f}s"


def compare(
    methods: dict[str, Any],
    make_model: Callable[[], nn.Module],
    data: tuple[Split, Split],
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 100,
) -> Iterator[Result]:
    """Train a fresh ``make_model()`` under each method in turn; a :class:`Result` each.

    ``methods`` maps a name to a :class:`~dpc_fx.DPCConfig`, or ``None`` for fp32. Every
    method starts from the same weights (``torch.manual_seed(seed)`` before ``make_model``)
    and sees the same batches (:func:`train`: Adam, cosine decay).
    """
    import dpc_fx  # the package imports this module

    train_set, test_set = data
    for name, config in methods.items():
        torch.manual_seed(seed)
        model = make_model()
        saving: tuple[float | None, float | None] = (None, None)
        if config is not None:
            model = dpc_fx.compile(model, train_set.x[:100], config=config)
            c = dpc_fx.cost(model)
            saving = (c.saving_vs_fp32, c.saving_vs_8bit)
        start = time.perf_counter()
        train(model, train_set, steps=steps, batch_size=batch_size, seed=seed)
        seconds = time.perf_counter() - start
        yield Result(name, evaluate(model, test_set), *saving, seconds)
