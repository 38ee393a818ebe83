"""ONNX export of a compiled module for inference, quantisers as QuantizeLinear/DequantizeLinear.

The eval-mode module is exported: each activation quantiser becomes a per-tensor Q/DQ pair
over its running range, each weight quantiser a per-channel (or per-tensor) Q/DQ pair over
the weight's range, and gradient quantisers vanish. ONNX's exporter accepts fake-quantise
ops only with 8-bit integer ranges, so a layer of ``b < 8`` bits uses an 8-bit container
whose scale spans its range in ``2**b - 1`` steps, with the input clamped to that range
first: its codes never leave ``0 .. 2**b - 1``. Full-precision layers export as they are.

dpc_fx's grid starts exactly at the range's minimum ``lo``, which an integer zero point
cannot express; the export subtracts ``lo`` before QuantizeLinear (zero point 0) and adds
it back after DequantizeLinear, so ONNX computes the same grid.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpc_fx.errors import ConfigError
from dpc_fx.inputs import example_tuple
from dpc_fx.quant import ActQuantizer, GradQuantizer, WeightQuantizer, tensor_range

__all__ = ["export", "export_onnx"]


def _scale(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    return ((hi - lo) / (2**bits - 1)).clamp_min(1e-12).float()


class _ExportAct(nn.Module):
    def __init__(self, q: ActQuantizer) -> None:
        super().__init__()
        if q.bits is None or not q.observed:
            raise ConfigError(
                f"export: the activation quantiser of layer '{q.layer}' has no running range "
                "yet; run the module in train mode for at least one training step before exporting."
            )
        self.lo, self.span = float(q.running_min), float(q.running_max - q.running_min)
        self.scale = float(_scale(q.running_min, q.running_max, q.bits))

    def forward(self, x: Tensor) -> Tensor:
        shifted = (x - self.lo).clamp(0.0, self.span)
        return torch.fake_quantize_per_tensor_affine(shifted, self.scale, 0, 0, 255) + self.lo


class _ExportWeight(nn.Module):
    def __init__(self, q: WeightQuantizer, weight: Tensor) -> None:
        super().__init__()
        assert q.bits is not None
        self.axis = (
            (q.channel_dim % weight.dim())
            if q.channel_dim is not None and weight.dim() > 1
            else None
        )
        lo, hi = tensor_range(weight, self.axis)
        self.lo: Tensor
        self.scale: Tensor
        self.zero_point: Tensor
        self.register_buffer("lo", lo)
        self.register_buffer("scale", _scale(lo, hi, q.bits).reshape(-1))
        self.register_buffer("zero_point", torch.zeros(self.scale.numel(), dtype=torch.int32))
        self.tensor_scale = float(self.scale[0])  # the per-tensor op takes a Python float

    def forward(self, w: Tensor) -> Tensor:
        shifted = w - self.lo
        if self.axis is None:
            return (
                torch.fake_quantize_per_tensor_affine(shifted, self.tensor_scale, 0, 0, 255)
                + self.lo
            )
        q = torch.fake_quantize_per_channel_affine(
            shifted, self.scale, self.zero_point, self.axis, 0, 255
        )
        return q + self.lo


def export_onnx(
    gm: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Write the eval-mode ``gm`` (from :func:`dpc_fx.compile`) as an ONNX model at ``path``.

    Activation quantisers need a running range: train (or run in train mode) at least one
    step first. With ``dynamic_batch`` (and tensors in and out), the first dimension of
    every input and output is left free, so the model takes any batch size. Returns the
    path written.
    """
    model = copy.deepcopy(gm).eval()
    weights = {n: m for n, m in model.named_modules() if isinstance(m, WeightQuantizer)}
    for name, module in list(model.named_modules()):
        if isinstance(module, ActQuantizer) and module.active:
            model.set_submodule(name, _ExportAct(module))
        elif isinstance(module, GradQuantizer):
            model.set_submodule(name, nn.Identity())
    for name, module in weights.items():
        if module.active:
            model.set_submodule(name, _ExportWeight(module, _weight_of(model, name)))
    args = example_tuple(example_inputs)
    # The TorchScript exporter translates fake-quantise ops to QuantizeLinear/DequantizeLinear
    # by itself; the newer torch.export-based one would need a custom translation table.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        axes = _batch_axes(model, args) if dynamic_batch else {}
        torch.onnx.export(model, args, str(path), opset_version=opset, dynamo=False, **axes)
    return Path(path)


def _batch_axes(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    """Names and a free first dimension for every input and output, where all are tensors."""
    with torch.no_grad():
        out = model(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(t, Tensor) and t.dim() for t in (*args, *outs)):
        return {}
    inputs = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    outputs = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    return {
        "input_names": inputs,
        "output_names": outputs,
        "dynamic_axes": {name: {0: "batch"} for name in inputs + outputs},
    }


def _weight_of(model: nn.Module, quantizer_path: str) -> Tensor:
    """The weight tensor a weight quantiser reads, found through the graph that calls it:
    the model's own, or a compiled part's inside a model compiled part by part."""
    parts = quantizer_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        if not isinstance(owner, torch.fx.GraphModule):
            continue
        target = ".".join(parts[cut:])
        fused = target.removesuffix(".weight_q")  # a fused layer: (x, weight, bias)
        for node in owner.graph.nodes:
            if node.op == "call_module" and node.target in (target, fused):
                weight: Any = owner
                read = node.args[0] if node.target == target else node.args[1]
                for name in str(read.target).split("."):
                    weight = getattr(weight, name)
                return weight.detach()
    raise ValueError(f"export: no graph node calls '{quantizer_path}'")


def export(gm: nn.Module, example_inputs: Any, path: str | Path, **options: Any) -> Path:
    """Deprecated name of :func:`export_onnx` (it writes ONNX, which ``torch.export`` does
    not); kept for one release."""
    warnings.warn(
        "dpc_fx.export is deprecated: it writes ONNX; call dpc_fx.export_onnx instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    return export_onnx(gm, example_inputs, path, **options)
