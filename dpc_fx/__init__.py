"""dpc_fx: DPC (Decreasing Precision with layer Capacity) low-precision training as a
torch.fx compiler pass.

>>> import torch, torchvision, dpc_fx
>>> model = torchvision.models.resnet18(num_classes=10)
>>> gm = dpc_fx.compile(model, torch.randn(2, 3, 32, 32))
>>> len(dpc_fx.layers(gm))
21
"""

from dpc_fx.compiler import compile, coverage, layers
from dpc_fx.config import DPCConfig
from dpc_fx.cost import Cost, cost
from dpc_fx.distributed import sync_ranges
from dpc_fx.errors import (
    ConfigError,
    DPCError,
    NonFiniteError,
    PassOrderError,
    PlanError,
    ShapeError,
    TraceError,
)
from dpc_fx.export import export, export_onnx
from dpc_fx.meta import Bits, Coverage, LayerMeta, Leaf
from dpc_fx.plan import Plan, plan_of
from dpc_fx.quant import model_state_dict
from dpc_fx.report import show
from dpc_fx.schedule import CyclicSchedule

__all__ = [
    "Bits",
    "ConfigError",
    "Cost",
    "Coverage",
    "CyclicSchedule",
    "DPCConfig",
    "DPCError",
    "LayerMeta",
    "Leaf",
    "NonFiniteError",
    "PassOrderError",
    "Plan",
    "PlanError",
    "ShapeError",
    "TraceError",
    "compile",
    "cost",
    "coverage",
    "export",
    "export_onnx",
    "layers",
    "model_state_dict",
    "plan_of",
    "show",
    "sync_ranges",
]
