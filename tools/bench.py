"""Benchmarks, the contenders side by side in one process: write docs/BENCHMARKS.md.

    python tools/bench.py            # everything (about 15 minutes on 2 cores)
    python tools/bench.py --quick    # fewer repetitions, no very large model

Every number is a median of per-pair ratios: the two contenders run alternately, the order
flipping each repetition, so a noisy neighbour slows both sides of a pair alike.
Each section runs in a fresh process of its own (in_child): what one leaves in the C
allocator changed another's ratios.

Sections:
  compile   dpc_fx.compile vs torch.ao's prepare_qat_fx (224x224 models, random weights)
  step      training step time and saved-for-backward memory: fp32 vs dpc_fx (w/a/g
            quantised) vs torch.ao QAT (w/a only), CIFAR-size ResNet-18 and MobileNetV2
            (batch 64) and a Transformer encoder block
  memory    saved-for-backward memory only (part of step; deterministic, no timing): fp32
            vs dpc_fx with fused layers (DPCConfig(fuse=True), the default) vs unfused
  targets   step time of EfficientNet-B0 and MobileNetV3-Large at 96x96 (batch 32 and 2),
            the demo CNN, a 2-layer Llama-style decoder, and the demo CNN and ResNet-18 with
            both sides under torch.compile; beside each, the copy floor (copy_floor)
  kernel    one activation quantiser against two memory passes over its tensor
  lower     8-bit integer kernels (DPCConfig(lower=True)) vs fp32: an MLP block, a small GPT;
            where torch._int_mm is slower than an fp32 matmul, both are cut to a time budget
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import dpc_fx
from dpc_fx import DPCConfig, fused, native

console = Console(stderr=True)
warnings.filterwarnings("ignore")


def timed(fn: Callable[[], object], times: int = 1) -> float:
    """Mean seconds of ``times`` calls of ``fn`` in a row."""
    start = time.perf_counter()
    for _ in range(times):
        fn()
    return (time.perf_counter() - start) / times


def paired(
    a: Callable[[], object],
    b: Callable[[], object],
    reps: int,
    warmup: int = 2,
    sample_s: float = 0.0,
) -> tuple[float, float, float]:
    """(median seconds of a, median seconds of b, median of the per-pair ratios b/a).

    With ``sample_s``, each sample runs a function as many times in a row as take about
    that long (the same count for both), and counts the mean: a step of a few milliseconds
    timed alone measures mostly the scheduler's jitter.
    """
    for _ in range(warmup):
        a()
        b()
    times = max(1, round(sample_s / max(timed(a), 1e-6))) if sample_s else 1
    ta, tb, ratios = [], [], []
    for i in range(reps):
        if i % 2:
            y, x = timed(b, times), timed(a, times)
        else:
            x, y = timed(a, times), timed(b, times)
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


# The step and target sections time samples of at least this long (see paired).
STEP_SAMPLE_S = 0.1
# Pairs the step and target sections time (outside --quick). The targets' models swing
# most from pair to pair, so they take more pairs, for a median that moves less.
STEP_REPS = 11
TARGET_REPS = 21


def step_of(m: nn.Module, *inputs: Tensor) -> Callable[[], None]:
    """One training step of ``m`` on ``inputs``: a loss on its (first) output, backward."""

    def step() -> None:
        m.zero_grad(set_to_none=True)
        out = m(*inputs)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()

    return step


def loss_step(m: nn.Module, kwargs: dict[str, Any]) -> Callable[[], None]:
    """One training step of a model that computes its own loss from keyword inputs (a
    Hugging Face model's), backward."""

    def step() -> None:
        m.zero_grad(set_to_none=True)
        m(**kwargs).loss.backward()

    return step


def saved_bytes(model: nn.Module, *inputs: Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward during one step of
    :func:`step_of`, the model's parameters and views of them (``weight.t()``) left out:
    the activation memory of training."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_of(model, *inputs)()
    return sum(storages.values())


# ---------------------------------------------------------------------- the copy floor


def fused_paths(model: nn.Module, compiled: nn.Module) -> dict[str, int | None]:
    """The paths of ``model``'s modules whose layers ``compiled`` (``dpc_fx.compile`` of a
    copy of it) runs as fused layers, found by the weight each fused call reads, with the
    bits of their input. (A product of two activations has no weight and no module: it is
    left out; so is attention, which :func:`copy_floor` finds by its call.)"""
    named = dict(model.named_modules())
    found = {}
    for node in compiled.graph.nodes:  # type: ignore[union-attr]
        if node.op != "call_module" or not str(node.target).startswith("dpc."):
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            path = str(weight.target).removesuffix(".weight")
            if path in named and path != str(weight.target):
                held = compiled.get_submodule(str(node.target))
                found[path] = getattr(getattr(held, "act_q", None), "bits", None)
    return found


def copy_floor(model: nn.Module, compiled: nn.Module, empty: bool = False) -> nn.Module | None:
    """A copy of ``model`` that runs, at each layer ``compiled`` fuses, the passes a fused
    layer's quantisers make, as plain ATen reductions and copies of the same tensors, from
    hooks: forward, the input's range and a copy of it (its codes and quantised floats; once
    for an input that several layers read at the same bits, whose codes they share), the
    weight's range and a copy; backward, the output gradient's range and a copy (its
    rounding), a copy of the input (the codes made floats again), the weight's range and
    copy again. Where ``compiled`` fuses attention, the same for each call of
    ``F.scaled_dot_product_attention``: query, key and value as inputs, no weight; where it
    fuses products of two activations, for each ``torch.matmul`` (or ``@``) of two tensors
    that are not parameters: both operands as inputs (each quantised and, in backward, its
    codes made floats again), no weight.
    ``empty``: the same hooks doing nothing, whose own cost (tens of microseconds a layer of
    Python) :func:`floor_ratio` takes off. ``None`` where no fused layer has a module to
    hook."""
    paths = fused_paths(model, compiled)
    if not paths:
        return None

    def passes(t: Tensor) -> None:
        if not empty:
            t.aminmax()
            t.clone()

    last: list[tuple[Tensor, int | None]] = []  # the input the last hooked layer quantised

    def before(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        key = (args[0], paths[names[module]])
        if not (last and last[0][0] is key[0] and last[0][1] == key[1]):
            passes(args[0].detach())
        last[:] = [key]
        passes(module.get_parameter("weight").detach())

    def after(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        x, weight = args[0].detach(), module.get_parameter("weight").detach()
        if out.requires_grad:

            def backward(grad: Tensor) -> None:
                passes(grad)
                if not empty:
                    x.clone()
                passes(weight)

            out.register_hook(backward)

    floor = copy.deepcopy(model)
    names = {floor.get_submodule(path): path for path in paths}
    for module in names:
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    calls: set[Any] = set()
    for m in compiled.modules():
        if isinstance(m, fused.FusedAttention):
            calls.add(F.scaled_dot_product_attention)
        elif isinstance(m, fused.FusedLayer) and m.op == "matmul":
            calls.update((torch.matmul, Tensor.__matmul__))
    if calls:
        mode = _CallPasses(passes, empty, calls)

        def enter(*_: Any) -> None:
            mode.__enter__()

        def leave(*_: Any) -> None:
            mode.__exit__(None, None, None)

        floor.register_forward_pre_hook(enter)
        floor.register_forward_hook(leave)
    return floor


class _CallPasses(TorchFunctionMode):
    """Runs, around each call of ``calls`` (attention, or a product of two activations), the
    passes its fused quantisers make (:func:`copy_floor`): its tensor operands' (attention:
    query, key and value), forward and backward."""

    def __init__(self, passes: Callable[[Tensor], None], empty: bool, calls: set[Any]) -> None:
        super().__init__()
        self.passes, self.empty, self.calls = passes, empty, calls

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func not in self.calls:
            return out
        inputs = [t.detach() for t in args[:3] if isinstance(t, Tensor)]
        if any(isinstance(t, nn.Parameter) for t in args[:2]):
            return out  # a layer's product with its weight: hooked as a module
        for t in inputs:
            self.passes(t)
        if out.requires_grad:

            def backward(grad: Tensor) -> None:
                self.passes(grad)
                if not self.empty:
                    for t in inputs:
                        t.clone()

            out.register_hook(backward)
        return out


def qat(model: nn.Module, x: Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(
        copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,)
    )


# ---------------------------------------------------------------------------- compile


def bench_compile(quick: bool) -> list[list[str]]:
    names = ["resnet50", "mobilenet_v2", "vit_b_16"] + ([] if quick else ["vit_h_14"])
    rows = []
    x = torch.randn(1, 3, 224, 224)
    for name in names:
        console.print(f"compile: {name}")
        model = torchvision.models.get_model(name, weights=None).eval()
        reps = 3 if name == "vit_h_14" else (3 if quick else 5)
        try:
            ta, tb, ratio = paired(
                lambda m=model: qat(m, x), lambda m=model: dpc_fx.compile(m, x), reps, warmup=1
            )
            rows.append(
                [
                    name,
                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M",
                    f"{ta:.2f} s",
                    f"{tb:.2f} s",
                    f"{ratio:.2f}x",
                    _verdict(ratio, 0.2),
                ]
            )
        except Exception as e:  # torch.ao may not handle a model; say so instead of stopping
            tb = statistics.median(timed(lambda m=model: dpc_fx.compile(m, x)) for _ in range(reps))
            rows.append([name, "", f"failed: {type(e).__name__}", f"{tb:.2f} s", "-", "-"])
        del model
    return rows


# ------------------------------------------------------------------------------- step


class EncoderBlock(nn.Module):
    """A pre-norm Transformer encoder block with explicit attention matmuls (all quantisable)."""

    def __init__(self, d: int = 256, heads: int = 4, ff: int = 1024) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(b, t, 3, self.heads, d // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


# A transformer block stands for one of a network's blocks: compiled alone, DPCConfig()'s
# pinning would keep its first and last linear layers (qkv, down) in fp32 as the model's
# first and last layers; in a network those are the embedding and the head.
BLOCK_CONFIG = DPCConfig(pin_first_last=False)


def bench_step(quick: bool) -> list[list[str]]:
    cases: list[tuple[str, nn.Module, Tensor]] = [
        (
            "ResNet-18, 64x3x32x32",
            torchvision.models.resnet18(num_classes=10),
            torch.randn(64, 3, 32, 32),
        ),
        (
            "MobileNetV2, 64x3x32x32",
            torchvision.models.mobilenet_v2(num_classes=10),
            torch.randn(64, 3, 32, 32),
        ),
        ("Transformer block, 64x64x256", EncoderBlock(), torch.randn(64, 64, 256)),
    ]
    rows = []
    reps = 5 if quick else STEP_REPS
    for label, model, x in cases:
        console.print(f"step: {label}")
        torch.manual_seed(0)
        base = copy.deepcopy(model).train()
        config = BLOCK_CONFIG if isinstance(model, EncoderBlock) else DPCConfig()
        dpc = dpc_fx.compile(copy.deepcopy(model).train(), x, config=config)
        contenders = {"fp32": base, "dpc_fx": dpc}
        try:
            contenders["torch.ao QAT"] = qat(model, x)
        except Exception as e:
            console.print(f"  torch.ao QAT failed on {label}: {type(e).__name__}")

        mem = {name: saved_bytes(m, x) for name, m in contenders.items()}
        fp32_step = step_of(base, x)
        for name, m in contenders.items():
            if name == "fp32":
                continue
            ta, tb, ratio = paired(fp32_step, step_of(m, x), reps, sample_s=STEP_SAMPLE_S)
            target = {"ResNet-18": 1.15, "MobileNetV2": 1.2, "Transformer block": 1.15}.get(
                label.split(",")[0]
            )
            floor = ""
            if name == "dpc_fx":
                hooked = copy_floor(base, dpc, empty=True), copy_floor(base, dpc)
                if hooked[0] is not None and hooked[1] is not None:
                    steps = (step_of(hooked[0], x), step_of(hooked[1], x))
                    floor = f"{floor_ratio(fp32_step, *steps, reps):.2f}x"
            rows.append(
                [
                    label,
                    name,
                    f"{ta * 1e3:.0f} ms",
                    f"{tb * 1e3:.0f} ms",
                    f"{ratio:.2f}x",
                    floor,
                    f"{mem[name] / mem['fp32']:.2f}x",
                    _verdict(ratio, target) if target and name == "dpc_fx" else "",
                ]
            )
    return rows


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(model: nn.Module, *inputs: Tensor) -> int | None:
    """The most memory one training step holds above what it started with: the process's
    peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its
    resident set before the step. Read in a process whose allocator returns every block of
    64 KiB or more to the system when freed (``MALLOC_MMAP_THRESHOLD_``, set by
    :func:`in_child`), so resident memory follows the live tensors. The buffers DPC's fused
    layers keep between steps for the next to reuse (:func:`dpc_fx.native.held_bytes`:
    the quantised weights' buffer, the pools' free buffers) are resident before the step
    and count as the step's. ``None`` where Linux's counters are not there to read."""
    native.release()  # what an earlier model's steps left
    step = step_of(model, *inputs)
    step()
    model.zero_grad(set_to_none=True)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        held = native.held_bytes()
        base = _status_bytes("VmRSS:")
        step()
        return _status_bytes("VmHWM:") - base + held
    except (OSError, KeyError):
        return None


class _Logits(nn.Module):
    """A Hugging Face causal LM called on token ids alone, returning its logits: the
    memory table's steps take one tensor in and one out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, use_cache=False).logits  # type: ignore[no-any-return]


def _memory_cases() -> list[tuple[str, nn.Module, Tensor, DPCConfig]]:
    try:  # transformers: a dev extra
        llama, tokens = _llama()
        decoder = [
            (
                "Llama-style decoder, 2 layers, 16x128 tokens (attention quantised)",
                _Logits(llama),
                tokens["input_ids"],
                DPCConfig(),
            )
        ]
    except ImportError:
        decoder = []
    return [
        (
            "ResNet-18, 64x3x32x32",
            torchvision.models.resnet18(num_classes=10),
            torch.randn(64, 3, 32, 32),
            DPCConfig(),
        ),
        (
            "MobileNetV2, 64x3x32x32",
            torchvision.models.mobilenet_v2(num_classes=10),
            torch.randn(64, 3, 32, 32),
            DPCConfig(),
        ),
        ("Transformer block, 64x64x256", EncoderBlock(), torch.randn(64, 64, 256), BLOCK_CONFIG),
        (
            "Transformer block, 64x64x256, DPCConfig() (qkv and down pinned to fp32)",
            EncoderBlock(),
            torch.randn(64, 64, 256),
            DPCConfig(),
        ),
        (
            # 256 tokens, not the lower section's 2048: every tensor kept scales with the
            # tokens (the ratio does not move), and on a CPU without int8 dot-product
            # instructions one _int_mm of 2048 tokens takes seconds.
            "MLP 1024-4096-1024 lowered, 256 tokens",
            nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)),
            torch.randn(256, 1024),
            DPCConfig(b_min=8, b_max=8, grad_bits=8, lower=True, pin_first_last=False),
        ),
        *decoder,
    ]


MEMORY_TARGETS = {
    "ResNet-18, 64x3x32x32": (1.15, 1.2),
    "MobileNetV2, 64x3x32x32": (1.0, None),
    "Transformer block, 64x64x256": (0.7, None),
    "MLP 1024-4096-1024 lowered, 256 tokens": (0.5, None),
}


def bench_memory(quick: bool) -> list[list[str]]:
    """Saved-for-backward and step-peak memory of one step: fp32, dpc_fx with fused layers
    (the default) and unfused.

    Deterministic (bytes, not time): safe to run on a busy machine. Its process
    (:func:`in_child`) has the allocator set to return freed blocks to the system, so the
    peak is read from the resident set (see :func:`peak_bytes`)."""
    rows = []
    for label, model, x, config in _memory_cases():
        console.print(f"memory: {label}")
        torch.manual_seed(0)
        contenders = {
            "fp32": copy.deepcopy(model).train(),
            "dpc_fx fused": dpc_fx.compile(copy.deepcopy(model).train(), x, config=config),
            "dpc_fx unfused": dpc_fx.compile(
                copy.deepcopy(model).train(), x, config=config.replace(fuse=False)
            ),
        }
        saved = {name: saved_bytes(m, x) for name, m in contenders.items()}
        peak = {name: peak_bytes(m, x) for name, m in contenders.items()}
        saved_target, peak_target = MEMORY_TARGETS.get(label, (None, None))
        for name in contenders:
            held, top = saved[name] / saved["fp32"], peak[name]
            fp32_top = peak["fp32"]
            top_ratio = None if top is None or not fp32_top else top / fp32_top
            verdicts = []
            if name == "dpc_fx fused":
                verdicts.append(_verdict(held, saved_target) if saved_target else "")
                if peak_target and top_ratio is not None:
                    verdicts.append(f"peak {_verdict(top_ratio, peak_target)}")
            rows.append(
                [
                    label,
                    name,
                    f"{saved[name] / 2**20:.1f} MiB",
                    f"{held:.2f}x",
                    "n/a" if top is None else f"{top / 2**20:.1f} MiB",
                    "n/a" if top_ratio is None else f"{top_ratio:.2f}x",
                    "; ".join(v for v in verdicts if v),
                ]
            )
    return rows


def in_child(section: str, quick: bool) -> list[list[str]]:
    """The rows of one section, made in a process of its own.

    Sections do not share a process: what one leaves in the C allocator changes another's
    ratios. After the compile section (which builds and frees a 632M-parameter ViT) DPC's
    steps ran slower and fp32's did not, unless glibc's dynamic thresholds were pinned
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): DPC's step, which allocates
    more tensors of more sizes (codes, temporaries), pays more for a fragmented heap. A
    training script starts from a fresh process, as each section does here."""
    env = dict(os.environ)
    if section == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    done = subprocess.run(
        [sys.executable, __file__, "--rows", section, *(["--quick"] if quick else [])],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- kernel


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """``DPC_FX_KERNELS=mode`` for the block (read on every quantiser call)."""
    before = os.environ.get("DPC_FX_KERNELS")
    os.environ["DPC_FX_KERNELS"] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ["DPC_FX_KERNELS"]
        else:
            os.environ["DPC_FX_KERNELS"] = before


def bench_kernel(quick: bool) -> list[list[str]]:
    """Each part of a fused layer's quantisation, on the native loops (the default) and on
    the compiled torch kernels, against a range pass plus a copy of the same tensor."""
    from dpc_fx import native
    from dpc_fx.quant import ActQuantizer, WeightQuantizer, _quantize_grad

    x, g, w = torch.randn(64, 64, 32, 32), torch.randn(64, 64, 32, 32), torch.randn(512, 512, 3, 3)
    tiny = torch.randn(16)
    act, weight = ActQuantizer(6).train(), WeightQuantizer(6, 0)

    def limit(t: Tensor) -> Callable[[], object]:  # read to measure the range, read and write
        return lambda: (torch.aminmax(t), t.clone())

    def floats(mode: str) -> Callable[[], object]:  # the codes the layer keeps, made in mode
        with kernel_mode(mode):
            _, codes = fused._activation(act, x)
        return lambda: codes.floats(*codes.tensors)

    parts: list[tuple[str, Tensor, Callable[[str], Callable[[], object]]]] = [
        ("activation: range, codes, packing (6 bits)", x, lambda m: lambda: fused._activation(act, x)),
        ("gradient: range, stochastic rounding (8 bits)", g, lambda m: lambda: _quantize_grad(g, 8)),
        ("codes unpacked and dequantised", x, floats),
        ("weight 512x512x3x3 per channel (6 bits)", w, lambda m: lambda: fused._parameter(weight, w)),
        ("one activation call on 16 elements", tiny, lambda m: lambda: fused._activation(act, tiny)),
    ]  # fmt: skip
    modes = (["native"] if native.library() is not None else []) + ["fused"]
    rows = []
    reps = 9 if quick else 21
    for label, t, make in parts:
        n = reps * 20 if t.numel() < 100 else reps
        row = [label]
        for mode in modes:
            fn = make(mode)
            with kernel_mode(mode):
                ta, tb, ratio = paired(limit(t), fn, n, warmup=5)
            unit, scale = ("us", 1e6) if t.numel() < 100 else ("ms", 1e3)
            if len(row) == 1:
                row.append(f"{ta * scale:.2f} {unit}")
            row += [f"{tb * scale:.2f} {unit}", f"{ratio:.2f}x"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ lower


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 512, layers: int = 4, ctx: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.Sequential(*[EncoderBlock(d, heads=8, ff=4 * d) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.tok(idx) + self.pos[: idx.shape[1]])))


def _text_batches(
    batch: int, ctx: int, vocab: int, steps: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    import collections
    import json
    import re
    import typing

    modules = (argparse, collections, json, os, re, typing)
    text = "".join(m.__doc__ or "" for m in modules) * 2  # text every Python ships
    data = torch.tensor([min(max(ord(c) - 32, 0), vocab - 1) for c in text])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
        xb = torch.stack([data[i : i + ctx] for i in idx])
        yb = torch.stack([data[i + 1 : i + ctx + 1] for i in idx])
        out.append((xb, yb))
    return out


def _int8_slowdown(m: int, k: int, n: int, reps: int, budget_s: float) -> tuple[float, float, int]:
    """Seconds of one ``torch._int_mm`` of (m, k) @ (k, n), the median ratio of int8 to fp32
    ``mm`` time, side by side, and how many pairs that median is of.

    Each product runs as four quarters of its rows, each quarter an int8/fp32 pair, so one
    product gives a median of four: on a CPU without int8 dot-product instructions a single
    int8 product of the MLP's size can take tens of seconds. Products stop once another
    would take the int8 side past ``budget_s``."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    qa = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    qb = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    torch._int_mm(qa[:32], qb)  # first-call setup, off the clock
    a[:32].mm(b)
    quarters = [
        (
            functools.partial(torch.mm, a[i : i + m // 4], b),
            functools.partial(torch._int_mm, qa[i : i + m // 4], qb),
        )
        for i in range(0, m, m // 4)
    ]
    t_int: list[float] = []
    ratios: list[float] = []
    while len(t_int) < reps and (not t_int or sum(t_int) + max(t_int) <= budget_s):
        total = 0.0
        for fp32, int8 in quarters:
            if len(ratios) % 2:
                tb, ta = timed(int8), timed(fp32)
            else:
                ta, tb = timed(fp32), timed(int8)
            total += tb
            ratios.append(tb / ta)
        t_int.append(total)
    return statistics.median(t_int), statistics.median(ratios), len(ratios)


def _u8s8_kernel(m: int, k: int, n: int, reps: int) -> str:
    """What the CPU's u8 x s8 kernel (oneDNN's ``qlinear_pointwise``, the x86 quantised
    backend's linear, as ``dpc_fx.int8`` calls it) does with an (m, k) x (k, n) product on
    this machine: its time against an fp32 ``mm`` (the weight prepacked beforehand), and its
    largest error against the exact integer product on random codes with 8-bit and 7-bit
    weights. Without VNNI it sums pairs of u8 x s8 products in 16 bits, which 8-bit weights
    can overflow; an empty string where the operator is missing."""
    from dpc_fx import int8

    qa = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    a, b = torch.randn(m, k), torch.randn(k, n)
    errors = []
    try:
        for half in (128, 64):  # 8-bit and 7-bit weight codes
            qb = torch.randint(-half, half, (k, n), dtype=torch.int8)
            exact = qa.double() @ qb.double()
            errors.append(float((int8._u8s8_product(qa, qb).double() - exact).abs().max()))
        ua = (qa.view(torch.uint8) ^ 128).contiguous()
        packed = torch.ops.onednn.qlinear_prepack(qb.t().contiguous(), [m, k])
    except (AttributeError, RuntimeError):
        return ""
    call = functools.partial(int8._u8s8_packed, ua, packed, n)
    call()
    _, _, ratio = paired(functools.partial(torch.mm, a, b), call, reps, warmup=1)
    return (
        f"oneDNN's u8 x s8 linear (torch.ops.onednn.qlinear_pointwise, prepacked) takes "
        f"{ratio:.2f}x an fp32 mm's time here but is exact only for weights of 7 bits or fewer: "
        f"largest error {errors[0]:.0f} with 8-bit weights, {errors[1]:.0f} with 7-bit "
        f"({m}x{k} @ {k}x{n}, random codes)"
    )


def _linear_macs(model: nn.Module) -> int:
    """Multiply-adds per token of ``model``'s linear layers (the ones lowered)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def bench_lower(quick: bool) -> list[list[str]]:
    """The lowered (int8) MLP block and small GPT against fp32. Where ``torch._int_mm`` is
    slower than an fp32 matmul (as on an AVX2-only x86 CPU, without VNNI), the
    workloads are cut to fit a time budget, each cut said in its row's notes."""
    from dpc_fx import int8

    rows = []
    lowered = DPCConfig(b_min=8, b_max=8, grad_bits=8, lower=True, pin_first_last=False)

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
    tokens = 2048
    t_int, slowdown, pairs = _int8_slowdown(tokens, 1024, 4096, 3 if quick else 5, 40.0)
    speed_note = f"one torch._int_mm {slowdown:.1f}x an fp32 mm ({tokens}x1024 @ 1024x4096)"
    console.print(f"lower: {speed_note}, median of {pairs} quarter-products")
    u8s8_note = _u8s8_kernel(tokens, 1024, 4096, 3 if quick else 5) if slowdown > 1 else ""
    if u8s8_note:
        console.print(f"lower: {u8s8_note}")
    int8_seconds_per_mac = t_int / (tokens * 1024 * 4096)

    def step_s(model: nn.Module, n: int) -> float:
        """A lower bound on a lowered step of ``model`` on ``n`` tokens: its int8 products
        alone, three per linear (forward, dx, dw)."""
        return 3 * _linear_macs(model) * n * int8_seconds_per_mac

    slow = slowdown > 1
    mlp_note = ""
    if slow:
        # Whole multiples of 64 tokens, about 10 s a lowered step at most.
        fit = int(10 / step_s(mlp, 1)) // 64 * 64
        if fit < tokens:
            mlp_note = (
                f"int8 matmul {slowdown:.0f}x slower than fp32 mm on this CPU; "
                f"cut from {tokens} to {max(fit, 64)} tokens"
            )
            tokens = max(fit, 64)

    # 8 bits everywhere (torch._int_mm where the CPU's u8 x s8 kernel is not exact at 8
    # bits), then 7-bit weights and activations (8-bit gradients), which that kernel takes.
    full = 2048
    narrow = lowered.replace(b_min=7, b_max=7)
    cases = [
        (lowered, tokens, f"{speed_note}, median of {pairs} quarter-products; {mlp_note}"),
        (narrow, full, u8s8_note),
    ]
    for config, n, note in cases:
        bits = config.b_max
        console.print(f"lower: MLP block, {n} tokens, {bits}-bit")
        x = torch.randn(n, 1024)
        low, sim = (
            dpc_fx.compile(copy.deepcopy(mlp), x, config=config),
            dpc_fx.compile(copy.deepcopy(mlp), x, config=config.replace(lower=False)),
        )
        reps, warmup = (3, 1) if n < full else (5 if quick else 9, 2)
        for name, m in ((f"dpc_fx lowered ({bits}-bit)", low), (f"dpc_fx simulated ({bits}-bit)", sim)):  # fmt: skip
            ta, tb, ratio = paired(step_of(mlp, x), step_of(m, x), reps, warmup)
            rows.append(
                [
                    f"MLP 1024-4096-1024, {n} tokens",
                    name,
                    f"{ta * 1e3:.0f} ms",
                    f"{tb * 1e3:.0f} ms",
                    f"{1 / ratio:.2f}x",
                    _verdict(1 / ratio, 1.5, higher=True) if "lowered" in name else "",
                    note.strip("; ") if "lowered" in name else "",
                ]
            )

    torch.manual_seed(0)
    gpt = TinyGPT()
    full_steps = 30 if quick else 120
    steps, batch = full_steps, 16
    cuts = []
    gpt_bits = 7 if slow and not int8._u8s8_exact(8) and int8._u8s8_exact(7) else 8
    if slow and gpt_bits == 8:
        budget = 60.0 if quick else 150.0
        per_step = step_s(gpt, batch * 128)
        steps = min(full_steps, max(3, int(budget / per_step)))
        if steps < full_steps:
            cuts.append(f"loss run cut to {steps} steps (of {full_steps})")
        # Fewer sequences where even three full steps would not fit.
        fit = max(1, int(batch * budget / (steps * per_step)))
        if fit < batch:
            cuts.append(f"batch cut from {batch} to {fit} sequence{'s' * (fit > 1)}")
            batch = fit
    console.print(f"lower: small GPT, {steps} steps of {batch}x128 tokens")
    batches = _text_batches(batch, 128, 96, steps, seed=0)
    losses: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {"fp32": [], "lowered": []}
    # Attention's activation-by-activation matmuls stay in fp32 here: only linears are
    # lowered, at 7 bits where the CPU's u8 x s8 kernel is exact there and not at 8.
    gpt_config = lowered.replace(b_min=gpt_bits, b_max=gpt_bits, overrides={"matmul": None})
    models = {
        "fp32": copy.deepcopy(gpt),
        "lowered": dpc_fx.compile(copy.deepcopy(gpt), batches[0][0], config=gpt_config),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=3e-4) for k, m in models.items()}
    for name in models:
        losses[name] = []
    for i, (xb, yb) in enumerate(batches):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for name in order:
            m, opt = models[name], opts[name]
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(m(xb).flatten(0, 1), yb.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
    # The first two steps compile kernels; a run cut to fewer steps times what it has.
    skip = 2 if steps > 4 else 1
    ratios = [a / b for a, b in zip(times["fp32"][skip:], times["lowered"][skip:], strict=True)]
    speed = statistics.median(ratios)
    tail = min(steps, max(5, steps // 10))
    final = {k: statistics.fmean(v[-tail:]) for k, v in losses.items()}
    loss_note = (
        f"loss (mean of the last {tail} of {steps} steps): "
        f"fp32 {final['fp32']:.3f}, lowered {final['lowered']:.3f}"
    )
    if cuts:
        loss_note = f"int8 matmul {slowdown:.0f}x slower than fp32 mm on this CPU; " + (
            "; ".join(cuts) + f"; {loss_note}"
        )
    rows.append(
        [
            f"GPT 4x512, {batch}x128 tokens",
            f"dpc_fx lowered ({gpt_bits}-bit)",
            f"{statistics.median(times['fp32'][skip:]) * 1e3:.0f} ms",
            f"{statistics.median(times['lowered'][skip:]) * 1e3:.0f} ms",
            f"{speed:.2f}x",
            _verdict(speed, 1.2, higher=True),
            loss_note,
        ]
    )
    return rows


# ---------------------------------------------------------------------------- targets


def _llama() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=100,
    )
    ids = torch.randint(0, 100, (16, 128))
    return LlamaForCausalLM(config), {"input_ids": ids, "labels": ids, "use_cache": False}


def _demo_cnn() -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the experiments package
    from experiments.models import MNIST1DCNN

    return MNIST1DCNN()


def bench_targets(quick: bool) -> list[list[str]]:
    """The step-time targets of the small and depthwise models, a Llama-style decoder and the
    demo CNN (fp32 vs dpc_fx, default config, side by side), and both under torch.compile."""
    images = lambda b, s: (torch.randn(b, 3, s, s),)  # noqa: E731
    cases: list[tuple[str, Callable[[], nn.Module], tuple[Tensor, ...], float, bool]] = [
        ("EfficientNet-B0, 32x3x96x96", lambda: torchvision.models.efficientnet_b0(num_classes=10), images(32, 96), 1.15, False),
        ("EfficientNet-B0, 2x3x96x96", lambda: torchvision.models.efficientnet_b0(num_classes=10), images(2, 96), 1.4, False),
        ("MobileNetV3-Large, 32x3x96x96", lambda: torchvision.models.mobilenet_v3_large(num_classes=10), images(32, 96), 1.15, False),
        ("MobileNetV3-Large, 2x3x96x96", lambda: torchvision.models.mobilenet_v3_large(num_classes=10), images(2, 96), 1.4, False),
        ("demo CNN (MNIST-1D), 100x1x40", _demo_cnn, (torch.randn(100, 1, 40),), 1.5, False),
        ("demo CNN under torch.compile", _demo_cnn, (torch.randn(100, 1, 40),), 1.1, True),
        ("ResNet-18 under torch.compile, 64x3x32x32", lambda: torchvision.models.resnet18(num_classes=10), images(64, 32), 1.1, True),
    ]  # fmt: skip
    reps = 5 if quick else TARGET_REPS
    rows = []
    for label, build, x, target, compiled in cases:
        console.print(f"targets: {label}")
        torch.manual_seed(0)
        model = build().train()
        dpc = dpc_fx.compile(copy.deepcopy(model), x)
        hooked = copy_floor(model, dpc, empty=True), copy_floor(model, dpc)
        base: nn.Module = model
        if compiled:
            base, dpc = torch.compile(base), torch.compile(dpc)

        ta, tb, ratio = paired(
            step_of(base, *x),
            step_of(dpc, *x),
            reps,
            warmup=3 if compiled else 2,
            sample_s=STEP_SAMPLE_S,
        )
        floor = "-"
        if hooked[0] is not None and hooked[1] is not None:
            steps = (step_of(hooked[0], *x), step_of(hooked[1], *x))
            floor = f"{floor_ratio(step_of(base, *x), *steps, reps):.2f}x"
        rows.append(
            [
                label,
                f"{ta * 1e3:.0f} ms",
                f"{tb * 1e3:.0f} ms",
                f"{ratio:.2f}x",
                floor,
                _verdict(ratio, target),
            ]
        )
    try:
        model, kwargs = _llama()
    except ImportError:
        return rows
    console.print("targets: Llama-style decoder, 2 layers, 16x128 tokens")
    model.train()
    dpc = dpc_fx.compile(copy.deepcopy(model), example_kwargs=kwargs)

    llama_step = functools.partial(loss_step, kwargs=kwargs)
    ta, tb, ratio = paired(llama_step(model), llama_step(dpc), reps, sample_s=STEP_SAMPLE_S)
    floor = "-"
    empty, copies = copy_floor(model, dpc, empty=True), copy_floor(model, dpc)
    if empty is not None and copies is not None:
        steps = (llama_step(empty), llama_step(copies))
        floor = f"{floor_ratio(llama_step(model), *steps, reps):.2f}x"
    rows.append(["Llama-style decoder, 2 layers, 16x128 tokens", f"{ta * 1e3:.0f} ms", f"{tb * 1e3:.0f} ms", f"{ratio:.2f}x", floor, _verdict(ratio, 1.2)])  # fmt: skip
    # Hugging Face models are captured by torch.export: the same model with no layer
    # quantised shows what running the captured ATen graph costs by itself.
    console.print("targets: the same decoder captured, no layer quantised")
    bare = dpc_fx.compile(
        copy.deepcopy(model), example_kwargs=kwargs, config=DPCConfig(overrides={"*": None})
    )
    ta, tb, ratio = paired(llama_step(model), llama_step(bare), reps, sample_s=STEP_SAMPLE_S)
    rows.append(["the same decoder captured, no layer quantised (reference)", f"{ta * 1e3:.0f} ms", f"{tb * 1e3:.0f} ms", f"{ratio:.2f}x", "", ""])  # fmt: skip
    return rows


def floor_ratio(
    reference: Callable[[], None],
    empty: Callable[[], None],
    copies: Callable[[], None],
    reps: int,
) -> float:
    """The copy floor: one plus the quantiser passes' time as plain copies (a step of the
    model hooked with copies, less the same model with the hooks empty) over the
    ``reference`` step (fp32's, eager or compiled), the median over rounds in which the
    three are timed in turn (the order flipping), so the machine's drift cancels. What a
    DPC step would cost if its loops ran at the memory's speed, the products and the rest as
    fp32's. (Under ``torch.compile`` the hooked models run eager: inductor would drop copies
    that nothing reads.)"""
    steps = (reference, empty, copies)
    for step in steps:
        step()
        step()
    times = max(1, round(STEP_SAMPLE_S / max(timed(reference), 1e-6)))
    values = []
    for i in range(reps):
        t = [0.0, 0.0, 0.0]
        for k in (0, 1, 2) if i % 2 == 0 else (2, 1, 0):
            t[k] = timed(steps[k], times)
        values.append(1 + (t[2] - t[1]) / t[0])
    return statistics.median(values)


def _cpu() -> str:
    """The CPU's model name, the widest vector instructions ATen uses on it, and whether it
    has int8 dot products (VNNI), which decide the integer kernels' speed."""
    name, vnni = platform.processor() or platform.machine(), False
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                vnni = "avx512_vnni" in value or "avx_vnni" in value
                break
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}{' and VNNI' if vnni else ''}"


def _verdict(value: float, target: float | None, higher: bool = False) -> str:
    if target is None:
        return ""
    met = value >= target if higher else value <= target
    return f"{'met' if met else 'missed'} ({'>=' if higher else '<='} {target}x)"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    out = Table(title=title)
    for h in header:
        out.add_column(h)
    for r in rows:
        out.add_row(*r)
    console.print(out)
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# Each section's rows, by the name --only takes; main runs each in a process of its own.
SECTIONS: dict[str, Callable[[bool], list[list[str]]]] = {
    "compile": bench_compile,
    "step": bench_step,
    "memory": bench_memory,
    "targets": bench_targets,
    "kernel": bench_kernel,
    "lower": bench_lower,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS))
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md")
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.rows:  # a child process of in_child
        print(json.dumps(SECTIONS[args.rows](args.quick)))
        return 0
    chosen = args.only or ["compile", "step", "targets", "kernel", "lower"]
    parts = []
    if "compile" in chosen:
        parts.append(
            table(
                "Compile time: dpc_fx.compile vs torch.ao prepare_qat_fx (1x3x224x224)",
                ["model", "params", "prepare_qat_fx", "dpc_fx.compile", "ratio", "target 0.2x"],
                in_child("compile", args.quick),
            )
        )
    if "step" in chosen:
        parts.append(
            table(
                "Training step vs fp32 (forward + backward)",
                [
                    "model",
                    "method",
                    "fp32",
                    "method time",
                    "time ratio",
                    "copy floor",
                    "saved-for-backward memory ratio",
                    "target",
                ],
                in_child("step", args.quick),
            )
        )
    if "step" in chosen or "memory" in chosen:
        parts.append(
            table(
                "Memory of one training step: saved for backward, and the step's peak",
                [
                    "model",
                    "method",
                    "saved for backward",
                    "vs fp32",
                    "step peak",
                    "vs fp32",
                    "target",
                ],
                in_child("memory", args.quick),
            )
        )
    if "targets" in chosen:
        parts.append(
            table(
                "Training step vs fp32: small and depthwise models, a Llama-style decoder, "
                "the demo CNN, and torch.compile of both sides",
                ["workload", "fp32", "dpc_fx", "ratio", "copy floor", "target"],
                in_child("targets", args.quick),
            )
        )
    if "kernel" in chosen:
        parts.append(
            table(
                "A fused layer's quantisation, part by part, vs the memory limit (aminmax + clone of the same tensor)",
                [
                    "part (on 64x64x32x32)",
                    "memory limit",
                    "native loops",
                    "ratio",
                    "compiled torch kernels",
                    "ratio",
                ],
                in_child("kernel", args.quick),
            )
        )
    if "lower" in chosen:
        parts.append(
            table(
                "Integer kernels (DPCConfig(lower=True, grad_bits=8), weights and activations at the bits each row says) vs fp32",
                ["workload", "method", "fp32 step", "method step", "speed-up", "target", "notes"],
                in_child("lower", args.quick),
            )
        )
    header = [
        "# Benchmarks",
        "",
        f"Made by `python tools/bench.py{' --quick' if args.quick else ''}` on {datetime.date.today()}: "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, kernels `{os.environ.get('DPC_FX_KERNELS', 'native')}`. "
        f"CPU: {_cpu()}. "
        "Each figure is the median of per-pair ratios from interleaved repetitions in one process, "
        "a fresh one for each table "
        f"({5 if args.quick else STEP_REPS} pairs in the step table, "
        f"{5 if args.quick else TARGET_REPS} in the targets table); "
        f"in the step and target tables a repetition that would take under {STEP_SAMPLE_S} s runs "
        "the step as many times in a row as take that long, on both sides alike.",
        "",
    ]
    notes = [
        "",
        "### Where the time and memory go",
        "",
        "- *A fused layer's step* (`DPCConfig(fuse=True)`, the default), on the native loops "
        "(`DPC_FX_KERNELS=native`, the default; `dpc_fx/csrc/quant.cpp`), and for a conv or "
        "linear layer in training as one operator with a C++ autograd node "
        "(`torch.ops.dpc_fx.layer`, `dpc_fx/csrc/layer.cpp`): forward measures the "
        "input's range and writes its codes, packed, and its quantised floats in two passes, "
        "and quantises the weight per output channel in one; backward quantises the output "
        "gradient stochastically (a range pass and a pass that draws an integer hash per "
        "element), unpacks and dequantises the saved codes in one pass, quantises the weight "
        "again and runs the same ATen backward as fp32. The temporaries (quantised input, "
        "quantised gradient, dequantised input) come from a pool of buffers that the next layer "
        "of the same size reuses within a pass; the quantised weight, forward and backward, is "
        "written into one buffer that every layer reuses and that is kept between steps. The "
        "kernel table puts each part against its "
        "floor, a range pass and a copy of the same tensor, on the native loops and on the "
        "compiled torch kernels (`DPC_FX_KERNELS=fused`); the gradient's draws its hash "
        "sixteen elements at a time where the CPU has AVX-512.",
        "- *Per layer, whatever its size*: a native call costs a few microseconds, a compiled "
        "torch kernel's tens (dynamo's guards, the wrappers; the last kernel row, which times "
        "the unfused quantiser's Python path). The layer operator makes a layer's step one call "
        "forward and one C++ node backward, and so do the attention operator "
        "(`torch.ops.dpc_fx.attention`) for fused attention and the product operator "
        "(`torch.ops.dpc_fx.product`) for a product of two activations; what is left per "
        "layer is the call, the few small "
        "ATen ops inside it (the running range's update, the random seed) and the products "
        "themselves, which can run a few milliseconds slower or faster beside the quantiser "
        "passes than alone (docs/PROFILE.md, the ATen columns). Models of many small layers (MobileNet, "
        "EfficientNet, batch 2, the demo CNN) pay the fixed part most; large convolutions hide "
        "it. Layers that read the same tensor at the same bits (a transformer's q, k and v "
        "projections, its gate and up) quantise it once and keep one set of codes.",
        "- *Under `torch.compile`* the operator's layers run its two halves "
        "(`torch.ops.dpc_fx.layer_forward`, `layer_backward`) as opaque calls between "
        "inductor's kernels, keeping codes. A ReLU before them keeps a bit an element in an "
        "opaque call too (left to inductor, it would keep a one-byte mask, which inductor's "
        "code writes slowly on this CPU: docs/PROFILE.md). What the compiled demo pays beyond "
        "fp32 is then the quantiser loops inside the two layers' calls (the layer operators "
        "column of docs/PROFILE.md), the bit ReLUs, and a fixed cost per call: dynamo's "
        "guards on each fused layer's quantiser settings, the opaque calls' wrappers.",
        "- *The copy floor* (the step and targets tables): fp32's step plus the time the passes a fused "
        "layer's quantisers make would take as plain ATen reductions (`aminmax`) and copies "
        "(`clone`) of the same tensors: what a DPC step would cost if its quantiser loops ran "
        "at the memory's speed, the products and the rest as fp32's. The passes run from "
        "Python hooks on the fp32 model, and their time is that model's step less the same "
        "model's with the hooks doing nothing (whose Python costs tens of microseconds a "
        "layer), timed in the same rounds as the fp32 step. Under `torch.compile` the hooked "
        "models run eager (inductor would drop copies that nothing reads) and the passes' "
        "time goes on fp32's compiled step. An input several layers read at the same bits "
        "(a decoder's k and v projections) is quantised once, as the fused layers share its "
        "codes; fused attention's passes run around each `F.scaled_dot_product_attention` "
        "call, on its query, key and value, and a fused product of two activations' around "
        "each `torch.matmul` of two tensors that are not parameters, on both.",
        "- *Captured models*: a Hugging Face model is captured by `torch.export` and runs as an "
        "ATen graph, op by op; the reference row under the Llama decoder times that graph with "
        "no layer quantised, the part of the decoder's ratio that is not quantisation. The "
        "capture reads grouped-query attention's keys and values unrepeated "
        "(`enable_gqa=True`), as the eager model does, and builds the positions and causal "
        "mask once per sequence length (`dpc_fx.sizes`), where the eager model builds none.",
        "- *Saved for backward*: a fused layer keeps its input's integer codes packed to the "
        "bits (two a byte at 4 bits or fewer, four in three bytes at 5 or 6, one a byte at 7 or "
        "8) and its range; a weight that is a parameter is quantised again in backward, any "
        "other operand (attention's second matrix) is kept as codes too. A ReLU or ReLU6 "
        "whose output only such layers read (through views and residual additions) keeps a "
        "bit an element for its backward, not its float output (ReLU) or input (ReLU6). What "
        "stays in float is what fp32 keeps for other ops (batch norm's, GELU's and SiLU's "
        "inputs, the loss's). Unfused, a quantised layer keeps its quantised input in float "
        "beside the original.",
        "- *The lowered MLP's floor*: GELU keeps its 4096-wide input and the loss its output, "
        "in float, as fp32 does: 0.50x of fp32's saved memory before any code is kept; the two "
        "layers' 8-bit input codes add 0.125x, so 0.63x is that floor.",
        "- *Step peak* is the resident-set high-water mark of one step over the resident set "
        "before it, in a process whose allocator returns freed blocks of 64 KiB or more to the "
        "system; parameters' gradients are part of it on both sides. DPC's counts the buffers "
        "its fused layers keep between steps for the next to reuse (`dpc_fx.native."
        "held_bytes()`: one for the quantised weights, the size of the largest; the pool's "
        "buffers are let go when backward ends), which are resident before the step.",
        "- *Integer kernels*: `torch._int_mm` is fast only where the CPU has int8 dot-product "
        "instructions (AVX-512 VNNI, AMX) or on a GPU; the row's notes give its speed against "
        "an fp32 matmul on the machine that made this file. A lowered layer's products run on "
        "the CPU's u8 x s8 kernel (oneDNN's) where a probe finds it exact at the operand's "
        "bits: without VNNI it sums pairs of products in 16 bits, exact for 7-bit codes and "
        "fewer (the 7-bit rows). Around its products a lowered step makes its int8 codes "
        "in native loops, transposes them into the dense layouts the kernel needs (a tiled "
        "native pass), prepacks each weight operand, and makes the float product out of the "
        "integer one in a native pass over it (the corrections for the codes' offsets), "
        "every step.",
        "- *Compile*: linear layers and convolutions are sized by arithmetic; the rest of the "
        "shape propagation runs on fake tensors (attention, reshapes), and FX generates code "
        "once per pass.",
        "",
    ]
    Path(args.out).write_text("\n".join(header) + "\n".join(parts) + "\n".join(notes))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
