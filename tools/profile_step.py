"""Where a fused DPC training step's extra time goes: write docs/PROFILE.md.

    python tools/profile_step.py    # ResNet-18, MobileNetV2, EfficientNet-B0 at batch 2, a
                                    # Transformer block, the demo CNN (3-4 min)

For each model, fp32 and dpc_fx (default config) steps run interleaved in one process; the
table gives both medians and, per DPC step, the wall time spent in each part of the fused
layers' work, timed by wrapping the functions that do it (so the parts are exact sums, and
what is left is the layers' own Python, autograd's and everything else). Read the parts
against docs/BENCHMARKS.md's kernel table, which puts each quantiser against a range pass
and a copy of its tensor: the floor of a quantiser whose range depends on the whole tensor.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench's helpers
from bench import BLOCK_CONFIG, EncoderBlock, _demo_cnn, step_of

import dpc_fx
from dpc_fx import DPCConfig, fused, native

console = Console(stderr=True)
warnings.filterwarnings("ignore")

# (label, module, function) of each part timed
PARTS = [
    ("activation quantised (range, codes, packing)", fused, "_activation"),
    ("weight quantised (forward, and again in backward)", fused, "_parameter"),
    ("gradient quantised (stochastic)", fused, "_quantize_grad"),
    ("codes unpacked and dequantised", fused._Codes, "floats"),
]


def _timed(spent: dict[str, float]) -> Callable[[], None]:
    """Wrap every part to add its wall time to ``spent``; returns the undo."""
    originals = []
    for label, module, name in PARTS:
        fn = getattr(module, name)
        originals.append((module, name, fn))

        def wrapper(*args: Any, _fn: Callable[..., Any] = fn, _label: str = label) -> Any:
            start = time.perf_counter()
            try:
                return _fn(*args)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapper)

    def undo() -> None:
        for module, name, fn in originals:
            setattr(module, name, fn)

    return undo


def profile(
    model: nn.Module, x: Tensor, reps: int, config: DPCConfig | None = None
) -> tuple[float, float, dict[str, float], int]:
    """(fp32 step median, DPC step median, seconds per DPC step in each part, fused layers)."""
    dpc = dpc_fx.compile(copy.deepcopy(model), x, config=config)
    layers = sum(isinstance(m, fused.FusedLayer) for m in dpc.modules())
    a, b = step_of(model, x), step_of(dpc, x)
    for _ in range(3):
        a()
        b()
    spent: dict[str, float] = {}
    undo = _timed(spent)
    ta: list[float] = []
    tb: list[float] = []
    try:
        for i in range(reps):
            pairs = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
            for step, times in pairs:
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
    finally:
        undo()
    per_step = {label: spent.get(label, 0.0) / reps for label, _, _ in PARTS}
    return statistics.median(ta), statistics.median(tb), per_step, layers


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "PROFILE.md")
    )
    args = parser.parse_args()
    cases: list[tuple[str, Callable[[], nn.Module], Tensor, int, DPCConfig | None]] = [
        ("ResNet-18, 64x3x32x32", lambda: torchvision.models.resnet18(num_classes=10), torch.randn(64, 3, 32, 32), 11, None),
        ("MobileNetV2, 64x3x32x32", lambda: torchvision.models.mobilenet_v2(num_classes=10), torch.randn(64, 3, 32, 32), 11, None),
        ("EfficientNet-B0, 2x3x96x96", lambda: torchvision.models.efficientnet_b0(num_classes=10), torch.randn(2, 3, 96, 96), 21, None),
        ("Transformer block, 64x64x256", EncoderBlock, torch.randn(64, 64, 256), 11, BLOCK_CONFIG),
        ("demo CNN (MNIST-1D), 100x1x40", _demo_cnn, torch.randn(100, 1, 40), 201, None),
    ]  # fmt: skip
    header = [
        "model",
        "fp32 step",
        "DPC step",
        *(label for label, _, _ in PARTS),
        "rest of the difference",
        "fused layers",
        "rest per layer",
    ]
    rows = []
    for label, build, x, reps, config in cases:
        console.print(f"profile: {label}")
        torch.manual_seed(0)
        fp32, dpc, parts, layers = profile(build().train(), x, reps, config)
        rest = dpc - fp32 - sum(parts.values())
        rows.append(
            [
                label,
                _ms(fp32),
                f"{_ms(dpc)} ({dpc / fp32:.2f}x)",
                *map(_ms, parts.values()),
                _ms(rest),
                str(layers),
                f"{rest / layers * 1e6:.0f} us",
            ]
        )
    table = Table(title="Where a DPC step's extra time goes (per step)")
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    lines = [
        "# Where a DPC step's time goes",
        "",
        f"Made by `python tools/profile_step.py` on {datetime.date.today()}: {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"kernels `{os.environ.get('DPC_FX_KERNELS', 'native')}`"
        f"{'' if native.library() is not None else ' (native loops unavailable)'}. "
        "fp32 and DPC steps interleaved in one process, medians; each part is the wall time "
        "spent in it per DPC step, summed over the fused layers. The convolutions' own forward "
        "and backward are the same ATen calls as fp32's. *Rest of the difference*: the DPC step "
        "less fp32's less the parts: the fused layers' Python and autograd, the kernel calls' "
        "fixed costs outside the parts, and noise; *rest per layer* divides it by the fused "
        "layers.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
