"""ONNX export: Q/DQ per quantised tensor, onnxruntime agrees with the eval-mode module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import dpc_fx
from dpc_fx import DPCConfig

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
    path = dpc_fx.export(gm, x, tmp_path / "resnet18.onnx")

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    quantised = sum(1 for m in dpc_fx.layers(gm) if m.bits and not m.bits.full_precision)
    assert quantised == 19
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 2 * quantised
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    ref = gm(x).detach().numpy()
    # Same grid, same codes, but onnxruntime and torch may round a value that lies on a
    # half-step boundary differently; one such flip early in an untrained ResNet-18 moves
    # that sample's logits by a few percent. So: every sample within 10% of the output
    # range, and all but one within 1%.
    span = ref.max() - ref.min()
    per_sample = np.abs(out - ref).max(axis=1)
    assert (per_sample <= 0.10 * span).all()
    assert (per_sample <= 0.01 * span).sum() >= len(per_sample) - 1


def test_export_needs_a_running_range(tmp_path: Path) -> None:
    gm = dpc_fx.compile(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    with pytest.raises(dpc_fx.ConfigError, match="no running range yet.*one training step"):
        dpc_fx.export(gm.eval(), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")


def test_torch_export_of_a_compiled_module() -> None:
    x = torch.randn(2, 3, 32, 32)
    gm = dpc_fx.compile(torchvision.models.resnet18(num_classes=10), x)
    gm(x)
    gm.eval()
    exported = torch.export.export(gm, (x,))
    assert torch.allclose(exported.module()(x), gm(x), atol=1e-5)
