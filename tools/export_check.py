"""How closely onnxruntime runs what dpc_fx.export writes: write docs/EXPORT.md.

    python tools/export_check.py                 # ResNet-18, 3 seeds x 256 images, ~3 min
    python tools/export_check.py --seeds 1 --batch 64

Two measurements, torch (eval-mode compiled module) against onnxruntime:

  quantiser   one activation quantiser alone, 200,000 values per bit-width: elements whose
              dequantised value differs (the arithmetic is the same, so this should be 0)
  resnet18    a compiled ResNet-18 (the default plan, 8 bits everywhere, and no layer
              quantised), after one training-mode forward for its activation ranges: per
              image, the largest output difference as a share of the output range; the
              share of images within 1e-5 and within 1%
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

import dpc_fx
from dpc_fx.export import _ExportAct
from dpc_fx.quant import ActQuantizer

console = Console(stderr=True)
warnings.filterwarnings("ignore")


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def quantiser_mismatches(bits: int, tmp: Path) -> int:
    torch.manual_seed(bits)
    q = ActQuantizer(bits)
    q(torch.randn(1000) * 3)  # training mode: sets the running range
    q.eval()
    x = torch.randn(1, 200_000) * 3
    path = tmp / f"q{bits}.onnx"
    torch.onnx.export(nn.Sequential(_ExportAct(q)), (x,), str(path), dynamo=False)
    return int((np.abs(run_onnx(path, x) - q(x).numpy()) > 0).sum())


PLANS = {
    "default (4-8 bits)": dpc_fx.DPCConfig(),
    "8 bits": dpc_fx.DPCConfig(b_min=8, b_max=8),
    "all layers fp32": dpc_fx.DPCConfig(overrides={"*": None}),
}


def resnet_agreement(seed: int, batch: int, tmp: Path, plan: str) -> np.ndarray:
    """Per image: max |onnxruntime - torch| over the logits, over the output range."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32)
    config = PLANS[plan]
    gm = dpc_fx.compile(torchvision.models.resnet18(num_classes=10), x[:4], config=config)
    gm(x[:16])
    gm.eval()
    path = dpc_fx.export(gm, x[:4], tmp / f"resnet18-{seed}.onnx")
    with torch.no_grad():
        ref = gm(x).numpy()
    span = float(ref.max() - ref.min())
    return np.abs(run_onnx(path, x) - ref).max(axis=1) / span


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "EXPORT.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        quant = {bits: quantiser_mismatches(bits, tmp) for bits in (2, 4, 6, 8)}
        rows = []
        for plan in PLANS:
            for seed in range(args.seeds):
                share = resnet_agreement(seed, args.batch, tmp, plan)
                rows.append((plan, seed, share))
                console.print(f"{plan}, seed {seed}: {np.mean(share <= 0.01):.1%} within 1%")
    table = Table("plan", "seed", "images", "within 1e-5", "within 1%", "largest")
    lines = [
        "# ONNX export: onnxruntime against torch",
        "",
        f"Command: `python tools/export_check.py --seeds {args.seeds} --batch {args.batch}`  ",
        f"Date: {datetime.date.today().isoformat()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}.",
        "",
        "## One activation quantiser",
        "",
        "200,000 values through the eval-mode quantiser in torch and in onnxruntime "
        "(Sub, QuantizeLinear, DequantizeLinear, Add): elements that differ at all.",
        "",
        "| bits | differing elements |",
        "| ---: | ---: |",
        *(f"| {b} | {n} |" for b, n in quant.items()),
        "",
        "## ResNet-18",
        "",
        f"{args.batch} random 3x32x32 images per seed, after one training-mode forward; per "
        "image, the largest logit difference as a share of the output range.",
        "",
        "| plan | seed | images | within 1e-5 | within 1% | largest |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for plan, seed, share in rows:
        cells = (
            plan,
            str(seed),
            str(len(share)),
            f"{np.mean(share <= 1e-5):.1%}",
            f"{np.mean(share <= 0.01):.1%}",
            f"{share.max():.2g}",
        )
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The quantiser computes the same values in both runtimes, and the unquantised network "
        "differs only by float rounding. Images either agree to float rounding or "
        "differ by up to a few percent: there, a convolution's output that torch and onnxruntime "
        "compute a rounding error apart lies on the boundary between two quantisation levels, "
        "one runtime picks the level above and the other the level below, and one level "
        "(a fifteenth of the range at 4 bits, a 255th at 8) travels on through the network. "
        "More levels mean more boundaries to land on but smaller steps: at 8 bits more images "
        "differ, by less.",
    ]
    console.print(table)
    Path(args.out).write_text("\n".join(lines) + "\n")
    console.print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
