"""Training loops for the experiments: :func:`train` (Adam, cosine decay), :func:`evaluate`
(top-1 accuracy) and :func:`compare`, which trains one model under several configurations
from the same start and yields a :class:`Result` per method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

import dpc_fx
from experiments.data import Split

__all__ = ["Result", "compare", "evaluate", "train"]


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
