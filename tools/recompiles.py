"""Compile and step twelve torchvision models in one process and count torch._dynamo's
recompile-limit warnings and the variants each quantisation kernel compiled (it must compile
once per kind of input, not once per model's activation layout).

    python tools/recompiles.py          # prints the models, steps and warnings; exit 1 if any

It runs the compiled torch kernels (``DPC_FX_KERNELS=fused`` unless the variable is set):
on the default native loops nothing would compile, and the count would say nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch
import torchvision

import dpc_fx

MODELS = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
    "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121", "convnext_tiny", "mnasnet0_5",
    "vgg11", "googlenet",
]  # fmt: skip


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.hits.append(message.splitlines()[0])


def main() -> int:
    os.environ.setdefault("DPC_FX_KERNELS", "fused")
    count = _Count()
    logging.getLogger("torch._dynamo").addHandler(count)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in MODELS:
            model = torchvision.models.get_model(name, num_classes=10)
            if name == "googlenet":
                model = torchvision.models.googlenet(num_classes=10, init_weights=False)
            x = torch.randn(2, 3, 64, 64)
            gm = dpc_fx.compile(model, x)
            out = gm(x)
            logits = out[0] if isinstance(out, tuple) else out
            logits.float().square().mean().backward()
            print(f"{name}: {len(dpc_fx.layers(gm))} layers, stepped", flush=True)
    limit = [str(w.message) for w in caught if "recompile" in str(w.message)]
    hits = count.hits + limit
    print(f"{len(MODELS)} models compiled and stepped; recompile-limit warnings: {len(hits)}")
    for hit in hits:
        print("  ", hit)
    variants = _variants()
    print("compiled variants per kernel:", ", ".join(f"{k} {v}" for k, v in variants.items()))
    return 1 if hits or max(variants.values(), default=0) > 2 else 0


def _variants() -> dict[str, int]:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from dpc_fx import kernels

    out = {}
    for name in kernels.__all__:
        fn = getattr(getattr(kernels, name), "__wrapped__", None)
        if fn is not None:
            out[name] = len(_debug_get_cache_entry_list(fn.__code__))
    return out


if __name__ == "__main__":
    sys.exit(main())
