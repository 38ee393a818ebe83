"""MNIST-1D experiments that run on a laptop CPU in seconds: data, models, a training loop.

The data set is generated locally by the ``mnist1d`` package (4000 train / 1000 test
sequences of length 40, 10 classes). The CNN is the one of the MNIST-1D paper (about 94%
test accuracy in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MNIST1DCNN", "MNIST1DMLP", "Split", "evaluate", "mnist1d", "train"]


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
    """A three-layer MLP on the flattened sequence (about 68% in the MNIST-1D paper)."""

    def __init__(self, hidden: int = 100, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(40, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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
