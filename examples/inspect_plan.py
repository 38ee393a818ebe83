"""Inspect a DPC plan, steer it, and keep the one you want.

    python examples/inspect_plan.py

Shows the per-layer bits DPC picks for a CIFAR ResNet-20, then four ways to change them:
the config's bounds and spread, overrides by path or module type, a cost budget, and a
saved plan file that reproduces the bits exactly.
"""

import sys
import tempfile
from pathlib import Path

import torch

# experiments/ is the repository's package, not installed with dpc_fx; running this file
# puts only examples/ on the path, so add the repository root that holds it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpc_fx
from dpc_fx import DPCConfig
from experiments.models import cifar_resnet

model = cifar_resnet(20)
x = torch.randn(2, 3, 32, 32)

# 1. The default plan: fewer bits for layers with more parameters, first/last in fp32.
gm = dpc_fx.compile(model, x)
dpc_fx.show(gm, title="ResNet-20, default DPC plan")
for m in dpc_fx.layers(gm)[:4]:
    print(f"{m.layer:<22} params={m.params:<6} macs={m.macs:<9} depth={m.depth} bits={m.bits}")


def summary(label: str, gm: torch.fx.GraphModule) -> None:
    c = dpc_fx.cost(gm)
    widths = sorted({str(m.bits) for m in dpc_fx.layers(gm)})
    print(f"{label:<34} {c.saving_vs_8bit:6.1%} vs 8-bit  bits used: {', '.join(widths)}")


summary("default (4-8 bits, by params)", gm)

# 2. Steer the rule: other bounds, a narrower spread, capacity by MACs instead of params.
summary("b_min=3, b_max=8", dpc_fx.compile(model, x, config=DPCConfig(b_min=3, b_max=8)))
summary("delta=0.5 (half the spread)", dpc_fx.compile(model, x, config=DPCConfig(delta=0.5)))
summary("capacity by MACs", dpc_fx.compile(model, x, config=DPCConfig(capacity="macs")))

# 3. Override chosen layers: by glob over module paths, or by module type.
config = DPCConfig(overrides=(("layers.*.shortcut.*", 8), ("Linear", 6)))
summary("shortcuts at 8, every Linear at 6", dpc_fx.compile(model, x, config=config))

# 4. Ask for a saving instead: the spread (and if need be the bounds) are solved for it.
budget = dpc_fx.compile(model, x, config=DPCConfig(budget=0.25))
summary("budget: 25% fewer than 8-bit", budget)
print("   solved:", dpc_fx.plan_of(budget).config)

# 5. Keep the plan that worked and re-apply it exactly (JSON, readable and diffable).
plan = dpc_fx.plan_of(budget)
path = Path(tempfile.mkdtemp()) / "resnet20.plan.json"
plan.save(path)
again = dpc_fx.compile(model, x, plan=dpc_fx.Plan.load(path))
assert dpc_fx.plan_of(again) == plan
print(
    f"plan saved to {path} and re-applied; differs from the default in",
    f"{len(plan.diff(dpc_fx.plan_of(gm)))} layers",
)
