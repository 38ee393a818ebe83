"""Reproduce the DPC paper's claim on real data: accuracy parity at a lower training cost.

Trains one model under several methods, with the same seeds, data order and schedule, and
prints (and optionally writes) a results table: mean ± std of the test metric over seeds,
the training cost saving from ``dpc_fx.cost`` versus fp32 and versus static 8-bit, and the
wall time per run (training and evaluation).

    python tools/reproduce.py mnist1d-cnn --seeds 3                     # about 5 min
    python tools/reproduce.py mnist1d-cnn mnist1d-mlp mnist1d-resnet charlm --seeds 3 \\
        --out docs/RESULTS.md --plot docs/results.png --json docs/results.json   # ~40 min
    python tools/reproduce.py --data cifar10 --root ~/data --device cuda --seeds 3

Workloads (none downloads anything). Times are for 3 seeds x 7 methods with one torch
thread, from per-step costs measured on a shared two-core machine (fp32 / quantised, in
ms per step); a busier machine is slower:

    mnist1d-cnn     MNIST-1D (4000 train / 1000 test), the MNIST-1D paper's CNN;
                    Adam 1e-2, batch 100, 4000 steps (2 / 3 ms)                     ~5 min
    mnist1d-mlp     MNIST-1D, an MLP 40-256-256-128-64-10; same, 4000 steps (2 / 3)  ~4 min
    mnist1d-resnet  MNIST-1D, a 1-D ResNet (16/32/64 channels); 1500 steps (10 / 17) ~9 min
    charlm          a character-level Transformer LM (2 layers, d=64, context 64) on the
                    docstrings of the Python standard library; validation perplexity;
                    Adam 3e-3, batch 32, 1500 steps (35 / 45)                       ~20 min
    cifar10-resnet20, -resnet38, -resnet74, -mobilenetv2, and the same for cifar100:
                    the paper's setting (SGD 0.1, momentum 0.9, weight decay 1e-4, batch
                    128, 64k steps with the learning rate cut 10x at 50% and 75%, crop and
                    flip); needs --root DIR with the standard CIFAR files and, in practice,
                    --device cuda.

Methods (``--methods``; all by default):

    fp32      the model as it is
    8bit      static 8-bit: DPCConfig(policy="uniform", b_min=8, b_max=8, grad_bits=8)
    cpt       CPT: the 8-bit plan with CyclicSchedule(low=3, high=8), 32 cycles per run
    dpc       DPC with the default config (4-8 bits by parameter count, 8-bit gradients)
    dpc30     DPC with DPCConfig(budget=0.30): 30% fewer bit-operations than static 8-bit
    dpc+cpt   the default DPC plan with the cyclic schedule on top
    dpc-all   DPC with pin_first_last=False (first and last layers quantised too)

Every quantised method but ``dpc-all`` keeps the first and the last layer in full
precision (CPT's choice, dpc_fx's default). Cyclic methods are evaluated at their plan's
bits (8-bit for CPT); their cost is given at the plan and averaged over the schedule.
A budget the solver cannot reach leaves its cells empty, with the solver's reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import Tensor, nn

# experiments/ is the repository's package, not installed with dpc_fx; running this file
# puts only tools/ on the path, so add the repository root that holds it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpc_fx
from dpc_fx import DPCConfig
from dpc_fx.cost import bitops
from dpc_fx.meta import Bits
from dpc_fx.quant import Quantizer
from experiments.data import (
    STDLIB_MODULES,
    DataError,
    Split,
    char_corpus,
    cifar,
    cifar_batches,
    mnist1d,
)
from experiments.models import (
    MNIST1DCNN,
    MNIST1DMLP,
    CharTransformer,
    MNIST1DResNet,
    cifar_mobilenet_v2,
    cifar_resnet,
)

Metric = Literal["accuracy", "perplexity"]

# ---------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    key: str
    label: str  # short, for the table
    description: str
    config: DPCConfig | None  # None: fp32, not compiled
    cyclic: bool = False


UNIFORM8 = DPCConfig(policy="uniform", b_min=8, b_max=8, grad_bits=8)
METHODS = {
    m.key: m
    for m in (
        Method("fp32", "fp32", "the model as it is, in fp32", None),
        Method("8bit", "8-bit", "static 8-bit: w/a/g 8/8/8 on every quantised layer", UNIFORM8),
        Method(
            "cpt",
            "CPT",
            "CPT: the 8-bit plan with forward bits cycling from 3 to 8, 8-bit gradients",
            UNIFORM8,
            cyclic=True,
        ),
        Method("dpc", "DPC", "DPC, default config (4-8 bits by parameter count)", DPCConfig()),
        Method(
            "dpc30",
            "DPC 30%",
            "DPC with budget=0.30: 30% fewer bit-operations than static 8-bit",
            DPCConfig(budget=0.30),
        ),
        Method(
            "dpc+cpt",
            "DPC+CPT",
            "the default DPC plan with CPT's cycle on top",
            DPCConfig(),
            cyclic=True,
        ),
        Method(
            "dpc-all",
            "DPC, all layers",
            "DPC with pin_first_last=False: the first and last layers are quantised too, and "
            "its saving vs 8-bit is against 8/8/8 on every layer",
            DPCConfig(pin_first_last=False),
        ),
    )
}
CPT_LOW, CPT_HIGH, CPT_CYCLES = 3, 8, 32

# ---------------------------------------------------------------------------------------
# Workloads


@dataclass
class Task:
    """A workload's data, made ready on a device: what a training run needs."""

    example: Tensor  # a small batch of inputs, for dpc_fx.compile
    batches: Callable[[torch.Generator], Iterator[tuple[Tensor, Tensor]]]  # endless
    loss: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], float]
    note: str = ""  # data provenance, for the results page


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    metric: Metric
    steps: int
    build: Callable[[], nn.Module]
    task: Callable[[argparse.Namespace, torch.device], Task]
    optimizer: Callable[[list[nn.Parameter], int], tuple[torch.optim.Optimizer, Any]]
    recipe: str  # the optimiser and schedule, in words, for the results page


def _adam(lr: float) -> Callable[[list[nn.Parameter], int], tuple[torch.optim.Optimizer, Any]]:
    def make(params: list[nn.Parameter], steps: int) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.Adam(params, lr=lr)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    return make


def _sgd_paper(params: list[nn.Parameter], steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    cuts = [steps // 2, steps * 3 // 4]
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, cuts, gamma=0.1)


SGD_RECIPE = "SGD, lr 0.1, momentum 0.9, weight decay 1e-4, lr cut 10x at 50% and 75% of steps"


def _accuracy(data: Split, batch: int) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        correct = sum(
            int((model(x).argmax(1) == y).sum()) for x, y in _chunks(data.x, data.y, batch)
        )
        model.train()
        return correct / len(data.y)

    return evaluate


def _chunks(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, len(y), size):
        yield x[i : i + size], y[i : i + size]


_MNIST1D: list[tuple[Split, Split]] = []  # generated once per process (about 2 s)


def _mnist1d_task(args: argparse.Namespace, device: torch.device) -> Task:
    if not _MNIST1D:
        _MNIST1D.append(mnist1d())
    train, test = (Split(s.x.to(device), s.y.to(device)) for s in _MNIST1D[0])

    def batches(generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            order = torch.randperm(len(train.y), generator=generator).to(device)
            for i in range(0, len(order) - 99, 100):
                idx = order[i : i + 100]
                yield train.x[idx], train.y[idx]

    return Task(
        train.x[:2],
        batches,
        nn.functional.cross_entropy,
        _accuracy(test, 500),
        note="MNIST-1D from `mnist1d.data.make_dataset` (default arguments, seed 42): "
        f"{len(train.y)} train / {len(test.y)} test sequences of length 40; batch 100.",
    )


CHARLM = {"context": 64, "dim": 64, "heads": 4, "layers": 2, "batch": 32}


def _charlm_task(args: argparse.Namespace, device: torch.device) -> Task:
    corpus = char_corpus()
    train, val = corpus.train.to(device), corpus.val.to(device)
    ctx, batch = CHARLM["context"], CHARLM["batch"]
    offsets = torch.arange(ctx + 1, device=device)

    def windows(tokens: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        w = tokens[starts.view(-1, 1) + offsets]
        return w[:, :-1], w[:, 1:]

    def batches(generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            starts = torch.randint(0, len(train) - ctx - 1, (batch,), generator=generator)
            yield windows(train, starts.to(device))

    @torch.no_grad()
    def perplexity(model: nn.Module) -> float:
        model.eval()
        starts = torch.arange(0, len(val) - ctx - 1, ctx, device=device)
        total, count = 0.0, 0
        for chunk in starts.split(128):
            x, y = windows(val, chunk)
            total += float(_lm_loss(model(x), y, reduction="sum"))
            count += y.numel()
        model.train()
        return math.exp(total / count)

    return Task(
        windows(train, torch.tensor([0, ctx], device=device))[0],
        batches,
        _lm_loss,
        perplexity,
        note=f"Text: docstrings of {len(STDLIB_MODULES)} standard-library modules of Python "
        f"{platform.python_version()} (`experiments.data.stdlib_text`), {len(corpus.train):,} "
        f"train / {len(corpus.val):,} validation characters (every 10th 2048-character block), "
        f"{len(corpus.vocab)}-character vocabulary, sha256 {corpus.digest}; random windows of "
        f"{ctx}, batch {batch}; perplexity over non-overlapping validation windows.",
    )


def _lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
    )


def _cifar_task(name: str) -> Callable[[argparse.Namespace, torch.device], Task]:
    def make(args: argparse.Namespace, device: torch.device) -> Task:
        if args.root is None:
            raise DataError(
                f"{name} needs --root DIR: the folder holding the standard {name} files "
                "(e.g. DIR/cifar-10-batches-py/data_batch_1 ... test_batch)."
            )
        train, test = cifar(args.root, name)  # type: ignore[arg-type]
        train, test = (Split(s.x.to(device), s.y.to(device)) for s in (train, test))

        size = min(128, len(train.y))

        def batches(generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
            while True:
                for x, y in cifar_batches(train, size, generator=generator):
                    if len(y) == size:  # full batches only, as drop_last does
                        yield x, y

        @torch.no_grad()
        def accuracy(model: nn.Module) -> float:
            model.eval()
            correct = sum(
                int((model(x).argmax(1) == y).sum())
                for x, y in cifar_batches(test, 1000, augment=False)
            )
            model.train()
            return correct / len(test.y)

        example = next(cifar_batches(train, 2, augment=False))[0]
        return Task(
            example,
            batches,
            nn.functional.cross_entropy,
            accuracy,
            note=f"{name} from {args.root}: {len(train.y)} train / {len(test.y)} test images; "
            "batch 128, 4-pixel random crop and horizontal flip.",
        )

    return make


def _workloads() -> dict[str, Workload]:
    out = [
        Workload(
            "mnist1d-cnn",
            "MNIST-1D, CNN (MNIST-1D paper)",
            "accuracy",
            4000,
            MNIST1DCNN,
            _mnist1d_task,
            _adam(1e-2),
            "Adam, lr 1e-2, cosine decay to 0",
        ),
        Workload(
            "mnist1d-mlp",
            "MNIST-1D, MLP 40-256-256-128-64-10",
            "accuracy",
            4000,
            lambda: MNIST1DMLP(widths=(256, 256, 128, 64)),
            _mnist1d_task,
            _adam(1e-2),
            "Adam, lr 1e-2, cosine decay to 0",
        ),
        Workload(
            "mnist1d-resnet",
            "MNIST-1D, 1-D ResNet 16/32/64",
            "accuracy",
            1500,
            MNIST1DResNet,
            _mnist1d_task,
            _adam(1e-2),
            "Adam, lr 1e-2, cosine decay to 0",
        ),
        Workload(
            "charlm",
            "char-level Transformer LM (2 x d64)",
            "perplexity",
            1500,
            lambda: CharTransformer(
                97,
                context=CHARLM["context"],
                dim=CHARLM["dim"],
                heads=CHARLM["heads"],
                layers=CHARLM["layers"],
            ),
            _charlm_task,
            _adam(3e-3),
            "Adam, lr 3e-3, cosine decay to 0",
        ),
    ]
    for data, classes in (("cifar10", 10), ("cifar100", 100)):
        for depth in (20, 38, 74):
            out.append(
                Workload(
                    f"{data}-resnet{depth}",
                    f"{data.upper()}, ResNet-{depth}",
                    "accuracy",
                    64_000,
                    lambda d=depth, c=classes: cifar_resnet(d, c),  # type: ignore[misc]
                    _cifar_task(data),
                    _sgd_paper,
                    SGD_RECIPE,
                )
            )
        out.append(
            Workload(
                f"{data}-mobilenetv2",
                f"{data.upper()}, MobileNetV2",
                "accuracy",
                64_000,
                lambda c=classes: cifar_mobilenet_v2(c),  # type: ignore[misc]
                _cifar_task(data),
                _sgd_paper,
                SGD_RECIPE,
            )
        )
    return {w.name: w for w in out}


WORKLOADS = _workloads()

# ---------------------------------------------------------------------------------------
# One run


@dataclass
class Run:
    """One training run: a workload, a method, a seed."""

    workload: str
    method: str
    seed: int
    steps: int
    kind: Metric = "accuracy"
    metric: float | None = None
    train_loss: float | None = None  # mean over the last 5% of steps
    seconds: float = 0.0
    saving_fp32: float | None = None  # at the plan
    saving_8bit: float | None = None
    avg_saving_fp32: float | None = None  # averaged over a cyclic schedule (else = plan)
    avg_saving_8bit: float | None = None
    quantised_saving_8bit: float | None = None  # on the quantised layers alone
    pinned_share_8bit: float | None = None  # full-precision layers' share of static 8-bit
    plan: dict[str, str] = field(default_factory=dict)  # layer: w/a/g bits
    sizes: dict[str, list[int]] = field(default_factory=dict)  # layer: [params, MACs]
    solved: str = ""  # the config a budget resolved to
    error: str = ""


def run_one(
    workload: Workload,
    task: Task,
    method: Method,
    seed: int,
    steps: int,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> Run:
    """Train ``workload``'s model with ``method`` from ``seed`` for ``steps`` and evaluate it."""
    result = Run(workload.name, method.key, seed, steps, workload.metric)
    torch.manual_seed(seed)
    model: nn.Module = workload.build().to(device)
    schedule = None
    if method.config is not None:
        try:
            gm = dpc_fx.compile(model, task.example, config=method.config)
        except dpc_fx.ConfigError as e:  # e.g. a budget this model cannot reach
            result.error = str(e)
            return result
        _record_cost(result, gm)
        bits_at_plan = {n: q.bits for n, q in gm.named_modules() if isinstance(q, Quantizer)}
        if method.cyclic:
            period = max(1, steps // CPT_CYCLES)
            schedule = dpc_fx.CyclicSchedule(gm, low=CPT_LOW, high=CPT_HIGH, period=period)
            result.avg_saving_fp32, result.avg_saving_8bit = scheduled_saving(gm, schedule, steps)
        model = gm
    params = [p for p in model.parameters() if p.requires_grad]
    opt, lr_schedule = workload.optimizer(params, steps)
    generator = torch.Generator().manual_seed(seed)
    tail = max(1, steps // 20)
    tail_loss = torch.zeros((), device=device)
    report_every = max(1, steps // 200)
    start = time.perf_counter()
    model.train()
    for step, (x, y) in zip(range(1, steps + 1), task.batches(generator), strict=False):
        loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_schedule.step()
        if schedule is not None:
            schedule.step()
        if step > steps - tail:
            tail_loss += loss.detach()
        if on_step is not None and (step % report_every == 0 or step == steps):
            on_step(step, loss.item())
    if schedule is not None:  # evaluate at the plan's bits, as CPT tests at its top precision
        for name, q in model.named_modules():
            if isinstance(q, Quantizer):
                q.bits = bits_at_plan[name]
    result.metric = task.evaluate(model)
    result.seconds = time.perf_counter() - start
    result.train_loss = float(tail_loss) / min(tail, steps)
    return result


def _record_cost(result: Run, gm: torch.fx.GraphModule) -> None:
    c = dpc_fx.cost(gm)
    result.saving_fp32 = result.avg_saving_fp32 = c.saving_vs_fp32
    result.saving_8bit = result.avg_saving_8bit = c.saving_vs_8bit
    quantised = [r for r in c.layers if not r.bits.full_precision]
    pinned = sum(r.total for r in c.layers if r.bits.full_precision)
    eight = sum(sum(bitops(r.macs, Bits(8, 8, 8))) for r in quantised)
    result.quantised_saving_8bit = 1 - sum(r.total for r in quantised) / eight if eight else 0.0
    result.pinned_share_8bit = pinned / c.static8 if c.static8 else 0.0
    result.plan = {r.layer: str(r.bits) for r in c.layers}
    result.sizes = {m.layer: [m.params, m.macs or 0] for m in dpc_fx.layers(gm)}
    config = dpc_fx.plan_of(gm).config
    if isinstance(config, DPCConfig) and config.budget is not None:
        result.solved = f"b_min={config.b_min}, b_max={config.b_max}, delta={config.delta}"


def scheduled_saving(
    gm: torch.fx.GraphModule, schedule: dpc_fx.CyclicSchedule, steps: int
) -> tuple[float, float]:
    """Savings vs fp32 and vs static 8-bit averaged over ``steps`` steps of ``schedule``.

    At each step the scheduled layers run weights and activations at ``schedule.bits(t)``
    and keep their planned gradient bits; the other layers keep their plan.
    """
    c = dpc_fx.cost(gm)
    scheduled = [i for i, r in enumerate(c.layers) if r.bits.w is not None or r.bits.a is not None]
    if len(scheduled) != len(schedule.bits(0)):
        raise RuntimeError(
            f"scheduled_saving: the schedule drives {len(schedule.bits(0))} layers but the "
            f"plan quantises {len(scheduled)}; the cost of a cyclic run cannot be matched up."
        )
    # The bits depend on t only through the cycle's base bit-width: count those.
    bases = Counter(schedule.base(t) for t in range(steps))
    first_t: dict[int, int] = {}
    for t in range(min(steps, schedule.period)):
        first_t.setdefault(schedule.base(t), t)
    total = 0.0
    for base, count in bases.items():
        widths = dict(zip(scheduled, schedule.bits(first_t[base]), strict=True))
        step_cost = 0
        for i, r in enumerate(c.layers):
            bits = Bits(widths[i], widths[i], r.bits.g) if i in widths else r.bits
            step_cost += sum(bitops(r.macs, bits))
        total += count * step_cost
    mean = total / max(1, sum(bases.values()))
    return 1 - mean / c.fp32, 1 - mean / c.static8


# ---------------------------------------------------------------------------------------
# Summaries


@dataclass
class Cell:
    """One workload x method: its runs, summarised."""

    workload: str
    method: str
    runs: list[Run]

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.metric is not None]

    def _stat(self, key: str) -> tuple[float, float] | None:
        values = [getattr(r, key) for r in self.ok if getattr(r, key) is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def metric(self) -> tuple[float, float] | None:
        return self._stat("metric")

    def first(self, key: str) -> Any:
        return next((getattr(r, key) for r in self.runs if getattr(r, key) is not None), None)

    @property
    def seconds(self) -> float | None:
        stat = self._stat("seconds")
        return None if stat is None else stat[0]

    @property
    def train_loss(self) -> float | None:
        stat = self._stat("train_loss")
        return None if stat is None else stat[0]

    @property
    def error(self) -> str:
        return next((r.error for r in self.runs if r.error), "")


def cells(runs: Sequence[Run]) -> list[Cell]:
    order: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        order.setdefault((r.workload, r.method), []).append(r)
    return [Cell(w, m, rs) for (w, m), rs in order.items()]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def format_metric(cell: Cell, metric: Metric) -> str:
    stat = cell.metric
    if stat is None:
        return "n/a" if cell.error else "..."
    mean, std = stat
    if metric == "accuracy":
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


COLUMNS = (
    "workload",
    "method",
    "test metric, mean ± std",
    "Δ vs fp32",
    "saving vs fp32",
    "vs 8-bit",
    "vs 8-bit, time-avg",
    "vs 8-bit, quantised layers",
    "train loss",
    "time / run",
    "seeds",
)


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """The results table as strings, one row per workload x method."""
    all_cells = cells(runs)
    fp32 = {c.workload: c.metric for c in all_cells if c.method == "fp32"}
    rows = []
    for c in all_cells:
        metric = c.runs[0].kind
        delta = "-"
        base, stat = fp32.get(c.workload), c.metric
        if base is not None and stat is not None and c.method != "fp32":
            if metric == "accuracy":
                delta = f"{100 * (stat[0] - base[0]):+.2f} pt"
            else:
                delta = f"{stat[0] / base[0] - 1:+.1%}"
        cyclic = METHODS[c.method].cyclic
        rows.append(
            [
                c.workload,
                METHODS[c.method].label,
                format_metric(c, metric),
                delta,
                _pct(c.first("saving_fp32")),
                _pct(c.first("saving_8bit")),
                _pct(c.first("avg_saving_8bit")) + (" (cycle)" if cyclic else ""),
                _pct(c.first("quantised_saving_8bit")),
                "-" if c.train_loss is None else f"{c.train_loss:.3f}",
                "-" if c.seconds is None else f"{c.seconds:.1f} s",
                str(len(c.ok)),
            ]
        )
    return rows


def rich_table(runs: Sequence[Run], title: str) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("workload", "method") else "right")
    for row in table_rows(runs):
        table.add_row(*row)
    return table


def markdown_table(runs: Sequence[Run]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in COLUMNS[2:]) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    return "\n".join(lines)


HEADLINE_METHODS = {"dpc": "DPC", "dpc-all": "DPC with all layers quantised"}


def headline(runs: Sequence[Run]) -> list[str]:
    """One sentence per workload and DPC variant: its metric against fp32's and the parity
    threshold (0.5 points of accuracy, 3% of perplexity), and its cost saving."""
    out = []
    by = {(c.workload, c.method): c for c in cells(runs)}
    for name in dict.fromkeys(r.workload for r in runs):
        fp32 = by.get((name, "fp32"))
        for key, label in HEADLINE_METHODS.items():
            dpc = by.get((name, key))
            if fp32 is None or dpc is None or fp32.metric is None or dpc.metric is None:
                continue
            mine, theirs = dpc.metric[0], fp32.metric[0]
            if fp32.runs[0].kind == "accuracy":
                gap = 100 * (mine - theirs)
                verdict = (
                    "within 0.5 points of fp32 or better" if gap >= -0.5 - 1e-9 else "below fp32"
                )
                compared = (
                    f"{100 * mine:.2f}% vs fp32 {100 * theirs:.2f}% test accuracy "
                    f"({gap:+.2f} points, {verdict})"
                )
            else:
                ratio = mine / theirs - 1
                verdict = "within 3% of fp32" if ratio <= 0.03 + 1e-9 else "more than 3% above fp32"
                compared = f"validation perplexity {mine:.3f} vs fp32 {theirs:.3f} ({ratio:+.1%}, {verdict})"
            out.append(
                f"- **{name}**: {label} {compared}, {_pct(dpc.first('saving_8bit'))} fewer "
                f"training bit-operations than static 8-bit ({_pct(dpc.first('saving_fp32'))} "
                "fewer than fp32)."
            )
    return out


PLAN_METHODS = ("8bit", "dpc", "dpc30", "dpc-all")  # plans worth a column (cyclic ones repeat)


def plan_notes(runs: Sequence[Run]) -> list[str]:
    """Per workload: the plans, the share of cost the pinned layers hold, degenerate cases."""
    lines: list[str] = []
    by = {(c.workload, c.method): c for c in cells(runs)}
    for name in dict.fromkeys(r.workload for r in runs):
        shown = [m for m in PLAN_METHODS if (name, m) in by and by[name, m].first("plan")]
        if not shown:
            continue
        lines += [f"### {name}", ""]
        first = by[name, shown[0]]
        sizes: dict[str, list[int]] = first.first("sizes") or {}
        pinned = first.first("pinned_share_8bit")
        plan: dict[str, str] = first.first("plan")
        n_pinned = sum(1 for bits in plan.values() if bits == "fp/fp/fp")
        lines.append(
            f"{n_pinned} of {len(plan)} matmul-like layers stay in full precision under "
            f"`{shown[0]}` (the first and last, pinned); they hold {_pct(pinned)} of static "
            "8-bit's bit-operations here, so no plan that pins them can save more than "
            f"{_pct(None if pinned is None else 1 - pinned)} versus static 8-bit."
        )
        dpc = by.get((name, "dpc"))
        dpc_plan: dict[str, str] = dpc.first("plan") if dpc else {}
        widths = {bits for bits in dpc_plan.values() if bits != "fp/fp/fp"}
        if len(widths) == 1:
            lines.append(
                f"Default DPC gives every quantised layer the same bits ({widths.pop()}): "
                "their capacities are equal, so DPC is a uniform plan at the rule's mid-point "
                "on this model, and DPC + CPT trains exactly as CPT does (it is only evaluated "
                "at other bits)."
            )
        lines += ["", "| layer | params | MACs | " + " | ".join(shown) + " |"]
        lines.append("| --- | ---: | ---: |" + " --- |" * len(shown))
        for layer in plan:
            params, macs = sizes.get(layer, ["-", "-"])
            bits = [by[name, m].first("plan").get(layer, "-") for m in shown]
            lines.append(f"| {layer} | {params} | {macs} | " + " | ".join(bits) + " |")
        lines.append("")
        budget = by.get((name, "dpc30"))
        if budget is not None and budget.first("solved"):
            lines.append(f"The 30% budget resolved to {budget.first('solved')}.")
        elif budget is not None and budget.error:
            lines.append(f"DPC with a 30% budget did not run: {budget.error}")
        lines.append("")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


@dataclass
class Session:
    """Everything one invocation measured: the runs and how and where they were made.

    ``--json`` saves it; ``--from-json`` renders the table, page and plot from it again
    (for instance with ``--notes`` written after looking at the results).
    """

    command: str
    machine: str
    device: str
    threads: int
    started: str  # ISO date and time
    seconds: float
    notes: dict[str, str]  # workload: where its data came from
    runs: list[Run]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Session:
        data = json.loads(text)
        data["runs"] = [Run(**r) for r in data["runs"]]
        return cls(**data)


def write_markdown(
    path: Path, session: Session, *, plot: Path | None, extra: str = "", rebuilt: str = ""
) -> None:
    """The results page: headline, table, how it was made, plans, plot, notes."""
    runs = session.runs
    threads = f", {session.threads} torch thread(s)" if session.device == "cpu" else ""
    parts = [
        "# Reproducing DPC: accuracy at lower training cost",
        "",
        "Written by `tools/reproduce.py`; do not edit by hand (rerun the command below; put "
        "commentary in the file passed as `--notes`).",
        "",
        "## Headline",
        "",
        *(headline(runs) or ["- (no fp32 and DPC pair in this run)"]),
        "",
        "## Results",
        "",
        markdown_table(runs),
        "",
        f"- Command: `{session.command}`",
        *([f"- Page rebuilt from its JSON record with `{rebuilt}`."] if rebuilt else []),
        f"- Machine: {session.machine}; device `{session.device}`{threads}.",
        f"- Date: {session.started}; total wall time {session.seconds / 60:.1f} min.",
        "- Test metric: top-1 test accuracy in %, or validation perplexity (lower is better), "
        "mean ± sample standard deviation over seeds; every method uses the same seeds, so the "
        "same initial weights and the same batches.",
        "- Savings are in training bit-operations per step (forward + input gradient + weight "
        "gradient) from `dpc_fx.cost` at the method's plan; full-precision layers count at 32 "
        "bits in every column, and stay at 32 in the static 8-bit baseline. *time-avg*: for "
        "the cyclic methods (CPT, DPC + CPT) the cost averaged over every training step of "
        "the schedule; for the others it equals the plan's. *quantised layers*: the saving "
        "versus 8/8/8 on the layers the method quantises, leaving out the pinned ones.",
        "- Cyclic methods are evaluated at their plan's bits (8/8/8 for CPT).",
        "- Train loss: mean training loss over the last 5% of steps. Time: training and "
        "evaluation of one run.",
        "",
    ]
    if plot is not None:
        rel = os.path.relpath(plot, path.parent)
        parts += [
            f"![test metric against cost saving, error bars over seeds]({rel})",
            "",
            "*Mean test metric (error bars: standard deviation over seeds) against the saving "
            "of training bit-operations versus fp32 (time-averaged for cyclic methods); the "
            "band is fp32's mean ± std.*",
            "",
        ]
    parts += ["## Setup", ""]
    for name in dict.fromkeys(r.workload for r in runs):
        w = WORKLOADS[name]
        steps = next(r.steps for r in runs if r.workload == name)
        note = session.notes.get(name, "")
        parts.append(f"- **{name}** ({w.title}): {steps} steps; {w.recipe}. {note}")
    parts += [
        "- Methods: "
        + "; ".join(f"`{m.key}` ({m.label}): {m.description}" for m in METHODS.values())
        + f". CPT's schedule: `CyclicSchedule(low={CPT_LOW}, high={CPT_HIGH}, "
        f"period=steps // {CPT_CYCLES})`, stepped once per training step.",
        "",
        "## Plans and what bounds the saving",
        "",
        *plan_notes(runs),
    ]
    if extra:
        parts += ["## Notes", "", extra.strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts).rstrip() + "\n")


def plot_results(path: Path, runs: Sequence[Run]) -> None:
    """Test metric against saving vs fp32, one panel per workload, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.workload for r in runs))
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    style = {
        key: (marker, f"C{i}")
        for i, (key, marker) in enumerate(zip(METHODS, "os^Dvp*", strict=True))
    }
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        metric = next(r.kind for r in runs if r.workload == name)
        scale = 100.0 if metric == "accuracy" else 1.0
        for c in cells([r for r in runs if r.workload == name]):
            if c.metric is None:
                continue
            mean, std = (v * scale for v in c.metric)
            if c.method == "fp32":
                ax.axhspan(mean - std, mean + std, color="0.88")
                ax.axhline(mean, color="0.4", linestyle="--", label="fp32 (mean ± std)")
                continue
            marker, color = style[c.method]
            ax.errorbar(
                100 * (c.first("avg_saving_fp32") or 0.0),
                mean,
                yerr=std,
                marker=marker,
                color=color,
                capsize=3,
                ls="none",
                label=METHODS[c.method].label,
            )
        ax.set_title(name)
        ax.set_xlabel("saving of training bit-ops vs fp32 (%)")
        ax.set_ylabel(
            "test accuracy (%)" if metric == "accuracy" else "val perplexity (lower is better)"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Command line


def _warm_up(workload: Workload, task: Task, device: torch.device) -> None:
    """A two-step run, thrown away: the quantisers' kernels are compiled (``torch.compile``,
    once per process and shape family) here rather than inside a timed run."""
    run_one(workload, task, METHODS["8bit"], 0, 2, device)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/reproduce.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--steps", type=int, help="training steps (default: the workload's)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help=f"some of {', '.join(METHODS)} (default: all)",
    )
    parser.add_argument("--data", choices=("cifar10", "cifar100"), help="the paper's CIFAR models")
    parser.add_argument("--root", help="folder with the CIFAR files (for cifar workloads)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on the CPU (default 1: these models are small, and more threads "
        "only contend on a shared machine)",
    )
    parser.add_argument("--out", type=Path, help="write the results page (Markdown) here")
    parser.add_argument("--plot", type=Path, help="write the accuracy-vs-cost plot (PNG) here")
    parser.add_argument(
        "--json", type=Path, help="write every run's record, and how it was made, here (JSON)"
    )
    parser.add_argument("--notes", type=Path, help="Markdown to include in the page as notes")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="JSON",
        help="train nothing: print the table and write --out/--plot from a --json record",
    )
    args = parser.parse_args(argv)
    if args.notes is not None and not args.notes.is_file():
        parser.error(f"--notes {args.notes}: no such file")
    if args.from_json is not None:
        if not args.from_json.is_file():
            parser.error(f"--from-json {args.from_json}: no such file")
        return args
    if args.data:
        args.workloads = args.workloads or [
            f"{args.data}-{m}" for m in ("resnet20", "resnet38", "resnet74", "mobilenetv2")
        ]
    if not args.workloads:
        parser.error("name at least one workload (or --data cifar10/cifar100)")
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds and --steps must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python tools/reproduce.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if args.from_json is not None:
            session = Session.from_json(args.from_json.read_text())
            report(session, args, rebuilt=command)
        else:
            report(train_all(args, command), args)
    except dpc_fx.DPCError as e:  # bad data folder, bad config: say so, no traceback
        Console(stderr=True).print(f"reproduce: error: {e}", markup=False, highlight=False)
        return 2
    return 0


def train_all(args: argparse.Namespace, command: str) -> Session:
    """Every run ``args`` asks for, with progress bars and a live table on stderr."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    started, t0 = datetime.datetime.now(), time.perf_counter()
    console = Console(stderr=True)
    runs: list[Run] = []
    notes: dict[str, str] = {}
    plan = [
        (WORKLOADS[w], METHODS[m], seed)
        for w in args.workloads
        for seed in range(args.seeds)
        for m in args.methods
    ]
    steps_of = {w: args.steps or WORKLOADS[w].steps for w in args.workloads}
    progress = Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    overall = progress.add_task(
        "all runs", total=sum(steps_of[w.name] for w, _, _ in plan), loss=float("nan")
    )

    def view() -> Group:
        return Group(progress, rich_table(runs, "results so far"))

    with Live(view(), console=console, refresh_per_second=4, transient=True) as live:
        tasks: dict[str, Task] = {}
        for workload, method, seed in plan:
            if workload.name not in tasks:
                tasks[workload.name] = workload.task(args, device)
                notes[workload.name] = tasks[workload.name].note
                _warm_up(workload, tasks[workload.name], device)
            steps = steps_of[workload.name]
            bar = progress.add_task(
                f"{workload.name} {method.key} seed {seed}", total=steps, loss=float("nan")
            )
            done = progress.tasks[overall].completed

            def advance(step: int, loss: float, bar: TaskID = bar, done: float = done) -> None:
                progress.update(bar, completed=step, loss=loss)
                progress.update(overall, completed=done + step, loss=loss)

            runs.append(
                run_one(workload, tasks[workload.name], method, seed, steps, device, advance)
            )
            progress.update(overall, completed=done + steps)
            progress.update(bar, visible=False)
            live.update(view())
    return Session(
        command=command,
        machine=machine(),
        device=str(device),
        threads=torch.get_num_threads(),
        started=started.isoformat(timespec="minutes"),
        seconds=time.perf_counter() - t0,
        notes=notes,
        runs=runs,
    )


def report(session: Session, args: argparse.Namespace, rebuilt: str = "") -> None:
    """Print the table and headline; write what ``--json``, ``--plot`` and ``--out`` ask for."""
    runs, console = session.runs, Console(stderr=True)
    seeds = max((r.seed for r in runs), default=0) + 1
    out = Console(width=None if sys.stdout.isatty() else 180)
    title = f"DPC reproduction ({seeds} seed(s), {session.seconds / 60:.1f} min)"
    out.print(rich_table(runs, title))
    for line in headline(runs):
        out.print(line.replace("**", ""), highlight=False, markup=False)
    for c in cells(runs):
        if c.error:
            message = f"{c.workload} {c.method}: did not run: {c.error}"
            out.print(message, style="yellow", highlight=False, markup=False)
    if args.json and not rebuilt:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(session.to_json())
        console.print(f"wrote {args.json}")
    if args.plot:
        plot_results(args.plot, runs)
        console.print(f"wrote {args.plot}")
    if args.out:
        extra = args.notes.read_text() if args.notes else ""
        write_markdown(args.out, session, plot=args.plot, extra=extra, rebuilt=rebuilt)
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
