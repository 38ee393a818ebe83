"""The demo: ResNet-18's DPC plan, then fp32 vs DPC trained on MNIST-1D.

make demo                                       # sets up .venv first
python -m experiments.demo --steps 500 --seed 1  # from the repository root
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

import dpc_fx
from experiments.data import mnist1d
from experiments.models import MNIST1DCNN
from experiments.train import evaluate, train

__all__ = ["main"]


def run(*, steps: int, seed: int) -> None:
    """Print ResNet-18's plan at CIFAR size, then train the MNIST-1D CNN for ``steps`` steps
    in fp32 and under DPC from the same weights and batches, with a table of the results."""
    import torchvision
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
    from rich.table import Table

    console = Console(width=max(Console().width, 130) if not sys.stdout.isatty() else None)
    torch.manual_seed(0)
    console.rule("[bold]1. ResNet-18 at CIFAR size, compiled")
    resnet = torchvision.models.resnet18(num_classes=10)
    gm = dpc_fx.compile(resnet, torch.randn(1, 3, 32, 32))
    dpc_fx.show(gm, console=console, title="ResNet-18 (1, 3, 32, 32): DPC plan")

    console.rule("[bold]2. MNIST-1D CNN: fp32 vs DPC")
    train_set, test_set = mnist1d()
    results = []
    with Progress(
        TextColumn("{task.description:<6}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        for method in ("fp32", "DPC"):
            torch.manual_seed(seed)
            model: nn.Module = MNIST1DCNN()
            saving = "-"
            if method == "DPC":
                compiled = dpc_fx.compile(model, train_set.x[:100])
                saving = f"{dpc_fx.cost(compiled).saving_vs_fp32:.1%}"
                model = compiled
            task = progress.add_task(method, total=steps, loss=float("nan"))

            def advance(step: int, loss: float, task: TaskID = task) -> None:
                progress.update(task, completed=step, loss=loss)

            start = time.perf_counter()
            train(model, train_set, steps=steps, seed=seed, on_step=advance)
            seconds = time.perf_counter() - start
            results.append((method, evaluate(model, test_set), saving, seconds))

    table = Table(title=f"MNIST-1D test accuracy after {steps} steps (seed {seed})")
    for col in ("method", "test accuracy", "bit-ops saved vs fp32", "train time"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, acc, saving, seconds in results:
        table.add_row(method, f"{acc:.1%}", saving, f"{seconds:.1f} s")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=2000, help="training steps per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: train for at least one step.")
    run(steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
