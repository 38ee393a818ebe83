"""Write docs/PLANS.md: DPC plans and their cost savings for CIFAR-size torchvision models.

    python tools/plans.py                 # ResNet-18, VGG-16, MobileNetV2 at 1x3x32x32
    python tools/plans.py --models resnet50 --out /tmp/plans.md

For each model and a few configs it compiles the model (random weights, 10 classes), reads
``dpc_fx.cost`` and records the per-layer bits and the savings versus fp32 and static 8-bit.
Nothing is trained: the numbers are the cost model's, exact for the given input size.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.progress import Progress

import dpc_fx
from dpc_fx import DPCConfig

CONFIGS = {
    "DPC (defaults: 4-8 bits, params)": DPCConfig(),
    "DPC, capacity by MACs": DPCConfig(capacity="macs"),
    "DPC, budget 30% vs 8-bit": DPCConfig(budget=0.30),
    "uniform 8/8/8": DPCConfig(policy="uniform", b_min=8, b_max=8),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16", "mobilenet_v2"])
    parser.add_argument("--input", default="1,3,32,32")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "PLANS.md")
    )
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.input.split(","))
    x = torch.randn(shape)
    console = Console(stderr=True)
    summary, details = [], []
    with Progress(console=console) as progress:
        task = progress.add_task("compiling", total=len(args.models) * len(CONFIGS))
        for name in args.models:
            model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
            for label, config in CONFIGS.items():
                progress.update(task, description=f"{name}: {label}")
                start = time.perf_counter()
                try:
                    gm = dpc_fx.compile(model, x, config=config)
                except dpc_fx.DPCError as e:
                    summary.append(f"| {name} | {label} | - | - | - | - | {e} |")
                    progress.advance(task)
                    continue
                seconds = time.perf_counter() - start
                c = dpc_fx.cost(gm)
                rows = dpc_fx.layers(gm)
                quantised = [m for m in rows if m.bits and not m.bits.full_precision]
                widths = sorted({m.bits.w for m in quantised if m.bits and m.bits.w})
                span = f"{widths[0]}-{widths[-1]}" if widths else "-"
                resolved = dpc_fx.plan_of(gm).config
                note = (
                    f"solved: b_min={resolved.b_min}, b_max={resolved.b_max}, delta={resolved.delta}"
                    if config.budget
                    else ""
                )
                summary.append(
                    f"| {name} | {label} | {len(quantised)}/{len(rows)} | {span} | "
                    f"{c.saving_vs_fp32:.1%} | {c.saving_vs_8bit:.1%} | {seconds:.2f} s {note} |"
                )
                if label.startswith("DPC (defaults"):
                    details.append(_layer_table(name, gm))
                progress.advance(task)

    text = "\n".join(
        [
            "# DPC plans for CIFAR-size models",
            "",
            f"Made by `python tools/plans.py` on {datetime.date.today()} ({platform.machine()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}), input "
            f"{'x'.join(map(str, shape))}, 10 classes, random weights. Savings are in training "
            "bit-operations per step from `dpc_fx.cost` (forward + input gradient + weight "
            "gradient; full-precision layers count at 32 bits and stay at 32 in the 8-bit "
            "baseline too, so the comparison is about bit-widths alone).",
            "",
            "| model | config | quantised layers | w/a bits | saving vs fp32 | saving vs 8-bit | compile time |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *summary,
            "",
            "First conv and last linear are pinned to full precision (CPT's choice) in every row.",
            "",
            *details,
        ]
    )
    Path(args.out).write_text(text + "\n")
    console.print(f"wrote {args.out}")
    return 0


def _layer_table(name: str, gm: torch.fx.GraphModule) -> str:
    lines = [
        f"## {name}, default DPC plan",
        "",
        "| layer | op | params | MACs | depth | w/a/g |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for m in dpc_fx.layers(gm):
        lines.append(
            f"| {m.layer} | {m.module_type or m.op} | {m.params:,} | {m.macs:,} | {m.depth} | {m.bits} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
