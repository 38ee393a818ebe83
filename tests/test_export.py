"""ONNX export: Q/DQ per quantised tensor, onnxruntime agrees with the eval-mode module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import toys
from torch import Tensor, nn

import dpc_fx
from dpc_fx import DPCConfig
from dpc_fx.export import _ExportAct, _ExportWeight
from dpc_fx.quant import ActQuantizer, WeightQuantizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    "config", [DPCConfig(), DPCConfig(b_min=3, b_max=6)], ids=["default", "3-6 bits"]
)
def test_resnet18_exports_with_a_qdq_pair_per_quantised_tensor(
    config: DPCConfig, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    gm = dpc_fx.compile(torchvision.models.resnet18(num_classes=10), x, config=config)
    gm(x)  # one training-mode forward: the activation quantisers get their running range
    gm.eval()
    path = dpc_fx.export_onnx(gm, x, tmp_path / "resnet18.onnx")

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    quantised = sum(1 for m in dpc_fx.layers(gm) if m.bits and not m.bits.full_precision)
    assert quantised == 19
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 2 * quantised
    # The batch dimension is free: run more images than the export saw.
    images = torch.randn(32, 3, 32, 32)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    ref = gm(images).detach().numpy()
    # Same grid, same codes (see the quantiser tests below), but a convolution output that
    # torch and onnxruntime compute a float rounding apart can sit on a level boundary and
    # be rounded to neighbouring levels; in an untrained ResNet-18 that moves the image's
    # logits by a level's worth, several percent at 3-4 bits (docs/EXPORT.md: about 5% of
    # images; torch against itself with oneDNN off, about 20%). So: most images agree to
    # float rounding, hence well within 1% of the range.
    span = ref.max() - ref.min()
    per_sample = np.abs(out - ref).max(axis=1) / span
    assert (per_sample <= 1e-5).mean() >= 0.8
    assert (per_sample <= 0.01).mean() >= 0.8


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's
@pytest.mark.parametrize("bits", [2, 5, 8])
def test_exported_activation_quantiser_matches_torch_exactly(bits: int, tmp_path: Path) -> None:
    torch.manual_seed(bits)
    q = ActQuantizer(bits)
    q(torch.randn(1000) * 3)  # training mode: the running range
    q.eval()
    x = torch.randn(1, 50_000) * 4  # reaches past the range on both sides
    torch.onnx.export(nn.Sequential(_ExportAct(q)), (x,), str(tmp_path / "q.onnx"), dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.array_equal(out, q(x).numpy())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("channel_dim", [0, None], ids=["per channel", "per tensor"])
def test_exported_weight_quantiser_matches_torch_exactly(
    bits: int, channel_dim: int | None, tmp_path: Path
) -> None:
    torch.manual_seed(bits)
    q = WeightQuantizer(bits, channel_dim)
    w = torch.randn(64, 32, 3, 3) * torch.rand(64, 1, 1, 1)  # a spread of channel ranges
    w[3] = 0.25  # a constant channel: zero width
    torch.onnx.export(
        nn.Sequential(_ExportWeight(q, w)), (w,), str(tmp_path / "w.onnx"), dynamo=False
    )
    session = ort.InferenceSession(str(tmp_path / "w.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: w.numpy()})[0]
    assert np.array_equal(out, q(w).numpy())


class AuxHeads(nn.Module):
    """An auxiliary head in training only, as GoogLeNet's: compiled part by part."""

    def __init__(self) -> None:
        super().__init__()
        self.body = toys.small_cnn(classes=8)
        self.head, self.aux = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        h = self.body(x)
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_a_model_compiled_part_by_part_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    with pytest.warns(UserWarning, match="is kept whole"):
        gm = dpc_fx.compile(AuxHeads().train(), x, config=DPCConfig(pin_first_last=False))
    assert not isinstance(gm, torch.fx.GraphModule)
    gm(x)
    gm.eval()
    path = dpc_fx.export_onnx(gm, x, tmp_path / "aux.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    in_eval = [m for m in dpc_fx.layers(gm) if m.layer != "aux"]  # aux runs in training only
    assert all(not m.bits.full_precision for m in in_eval)
    assert ops.count("QuantizeLinear") == 2 * len(in_eval)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    ref = gm(x).detach().numpy()
    per_sample = np.abs(out - ref).max(axis=1) / (ref.max() - ref.min())
    assert (per_sample <= 1e-5).mean() >= 0.8


def test_export_needs_a_running_range(tmp_path: Path) -> None:
    gm = dpc_fx.compile(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    with pytest.raises(dpc_fx.ConfigError, match="no running range yet.*one training step"):
        dpc_fx.export_onnx(gm.eval(), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")


def test_torch_export_of_a_compiled_module() -> None:
    x = torch.randn(2, 3, 32, 32)
    gm = dpc_fx.compile(torchvision.models.resnet18(num_classes=10), x)
    gm(x)
    gm.eval()
    exported = torch.export.export(gm, (x,))
    assert torch.allclose(exported.module()(x), gm(x), atol=1e-5)
