"""Where a fused DPC training step's extra time goes: write docs/PROFILE.md.

    python tools/profile_step.py    # ResNet-18, MobileNetV2, EfficientNet-B0 at batch 32
                                    # and 2, MobileNetV3-Large at batch 32, a Transformer
                                    # block, a Llama-style decoder, the demo CNN eager and
                                    # under torch.compile (7-8 min)

For each model, fp32 and dpc_fx (default config) steps run interleaved in one process (the
step columns: medians, no profiler). Then a few steps of each run under
``torch.profiler``, which splits the time by who spends it (self time, per step):

- the ReLUs that keep a bit an element (``torch.ops.dpc_fx.relu`` and its C++ node; their
  halves under ``torch.compile``): ReLU's own pass, a bit written beside each output;
- the layer operators (``torch.ops.dpc_fx.layer``, ``attention`` and ``product`` in
  forward, their C++ autograd nodes in backward), whose own time is the quantiser loops:
  the inputs' ranges and codes, the weight per channel, the gradient's stochastic rounding,
  the codes dequantised;
- the fused layers' Python autograd nodes (``_FusedFn`` and ``_AttentionFn`` and their
  backward, for the layers the operators leave out, a weight quantised per channel that is
  no parameter say, or where the operators could not be built: their Python, and their
  loops, called through
  ctypes where the profiler cannot see them);
- the quantisers that run unfused (their autograd nodes' own time);
- ATen ops (``aten::*``: the products, their backward and the rest of the model), in fp32's
  step and in DPC's: the same ops, on quantised values;
- under ``torch.compile``, the compiled graphs' own time (inductor's kernels, profiled one
  by one), and among it the kernels that write or read a ReLU's one-byte mask (where a
  ReLU does not keep bits), with a measurement of what such a mask costs inductor's code
  on this machine. (Inductor then compiles a profiler record into every kernel, on both
  sides, for the step columns too.)

Where Linux ``perf`` runs, a second table splits each step's CPU time by the code that
spends it (perf's samples by shared object): the quantiser loops, ATen (torch, oneDNN,
MKL), the OpenMP runtime (threads waiting), the kernel (page faults, scheduling), Python,
the C library. Where it cannot, the file says why.

The profiler adds a little to every op it records, on both sides alike. Read the loops
against docs/BENCHMARKS.md's kernel table, which puts each quantiser against a range pass
and a copy of its tensor: the floor of a quantiser whose range depends on the whole tensor.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
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
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench's helpers
from bench import BLOCK_CONFIG, EncoderBlock, _cpu, _demo_cnn, _llama, loss_step, step_of

import dpc_fx
from dpc_fx import DPCConfig, fused, native

console = Console(stderr=True)
warnings.filterwarnings("ignore")

# The C++ autograd nodes of csrc/layer.cpp's operators (profiled as CppNode<...::Name>)
_OPERATOR_NODES = ("Layer", "Attention", "Product")

# (column, who): who is a predicate on a profiler event's name
PARTS: list[tuple[str, Callable[[str], bool]]] = [
    # ReLUs keeping bits (torch.ops.dpc_fx.relu, its C++ node, its halves under compile)
    ("bit ReLUs", lambda n: n.startswith("dpc_fx::relu") or "::Relu" in n),  # ReluInPlace too
    # the operators' forward (layer, attention, product), their C++ autograd nodes' backward
    (
        "layer operators: quantiser loops",
        lambda n: n.startswith("dpc_fx::") or any(f"::{k}>" in n for k in _OPERATOR_NODES),
    ),
    ("fused layers' autograd nodes (Python)", lambda n: n.startswith(("_FusedFn", "_AttentionFn"))),
    (
        "unfused quantisers",
        lambda n: n.startswith(("_MeasuredFakeQuantSTE", "_FakeQuantSTE", "_QuantizeGrad")),
    ),
]
ATEN = "ATen ops"
INDUCTOR = "compiled graphs' kernels"  # under torch.compile: inductor's code, both sides
MASKS = "of which kernels with a ReLU mask"  # inductor kernels named for threshold_backward

# Inductor's kernels as profiler events of their own (graph_N_cpp_fused_...), on both sides.
torch._inductor.config.cpp.enable_kernel_profile = True


def _self_times(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Seconds of self time per step, by part (and ``ATEN``), under ``torch.profiler``."""
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    spent = dict.fromkeys([*(label for label, _ in PARTS), ATEN, INDUCTOR, MASKS], 0.0)
    for event in prof.key_averages():
        who = [label for label, match in PARTS if match(event.key)]
        if who:
            spent[who[0]] += event.self_cpu_time_total
        elif event.key.startswith("aten::"):
            spent[ATEN] += event.self_cpu_time_total
        elif event.key.startswith("## Call CompiledFxGraph") or "cpp_fused" in event.key:
            spent[INDUCTOR] += event.self_cpu_time_total
            if "cpp_fused" in event.key and "threshold_backward" in event.key:
                spent[MASKS] += event.self_cpu_time_total
    return {k: v / 1e6 / steps for k, v in spent.items()}


def _step(m: nn.Module, x: Tensor | dict[str, Any]) -> Callable[[], None]:
    """A training step of ``m`` on an input tensor, or on keyword inputs (its own loss)."""
    return step_of(m, x) if isinstance(x, Tensor) else loss_step(m, x)


def _dpc(model: nn.Module, x: Tensor | dict[str, Any], config: DPCConfig | None) -> nn.Module:
    """``model`` compiled by dpc_fx (a copy) on the input, or on the keyword inputs."""
    if isinstance(x, Tensor):
        return dpc_fx.compile(copy.deepcopy(model), x, config=config)
    return dpc_fx.compile(copy.deepcopy(model), example_kwargs=x, config=config)


def profile(
    model: nn.Module,
    x: Tensor | dict[str, Any],
    reps: int,
    config: DPCConfig | None = None,
    compiled: bool = False,
) -> tuple[float, float, dict[str, float], dict[str, float], int]:
    """(fp32 step median, DPC step median, DPC's and fp32's self time per step by part, fused
    layers); ``x``: the input, or the keyword inputs; ``compiled``: both under
    ``torch.compile``."""
    dpc = _dpc(model, x, config)
    layers = sum(isinstance(m, (fused.FusedLayer, fused.FusedAttention)) for m in dpc.modules())
    if compiled:
        model, dpc = torch.compile(model), torch.compile(dpc)  # type: ignore[assignment]
    a, b = _step(model, x), _step(dpc, x)
    for _ in range(5 if compiled else 3):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(reps):
        pairs = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for step, times in pairs:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    # profiled in alternating rounds, as the steps were timed
    rounds, steps = 3, max(2, reps // 4)
    parts = {
        side: dict.fromkeys([*(label for label, _ in PARTS), ATEN, INDUCTOR, MASKS], 0.0)
        for side in "ab"
    }
    for _ in range(rounds):
        for side, step in (("a", a), ("b", b)):
            for part, seconds in _self_times(step, steps).items():
                parts[side][part] += seconds / rounds
    return statistics.median(ta), statistics.median(tb), parts["b"], parts["a"], layers


# Where the CPU time goes by the code that spends it: Linux perf's samples, by the shared
# object they fell in. (name, test on the object's name); the first that matches counts.
PLACES: list[tuple[str, Callable[[str], bool]]] = [
    ("quantiser loops (dpc_fx's native code)", lambda d: bool(re.match(r"(layer|quant)-\w+\.so", d))),
    ("ATen: torch, oneDNN, MKL", lambda d: d.startswith(("libtorch", "libc10", "[JIT]", "libmkl", "libdnnl"))),
    ("OpenMP runtime (threads waiting)", lambda d: d.startswith(("libgomp", "libiomp"))),
    ("kernel (page faults, scheduling)", lambda d: d.startswith("[kernel")),
    ("Python", lambda d: d.startswith(("libpython", "python"))),
    ("C library (malloc, memcpy)", lambda d: d.startswith(("libc.so", "libc-", "libm.so", "libstdc++"))),
]  # fmt: skip
ELSEWHERE = "elsewhere"
_PERF_HZ = 999


class _Perf:
    """``perf record`` on this process, its sampling switched on and off from here (perf's
    control fifos), so that only the steps are sampled. Raises OSError where perf cannot
    run."""

    def __init__(self, where: Path) -> None:
        self.data, ctl, ack = where / "perf.data", where / "ctl", where / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        self.proc = subprocess.Popen(
            ["perf", "record", "-q", "-F", str(_PERF_HZ), "-D", "-1",
             "--control", f"fifo:{ctl},{ack}", "-p", str(os.getpid()), "-o", str(self.data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        # read-write, so that opening neither end waits for perf's
        self.ctl, self.ack = os.open(ctl, os.O_RDWR), os.open(ack, os.O_RDWR)
        self._say("ping")

    def _say(self, command: str) -> None:
        os.write(self.ctl, f"{command}\n".encode())
        if not select.select([self.ack], [], [], 30)[0]:
            _, err = (
                self.proc.communicate(timeout=5) if self.proc.poll() is not None else (b"", b"")
            )
            raise OSError(f"perf did not answer: {err.decode(errors='replace').strip()[-300:]}")
        os.read(self.ack, 64)

    def on(self) -> None:
        self._say("enable")

    def off(self) -> None:
        self._say("disable")

    def samples(self) -> dict[str, int]:
        """Stop recording; the samples by shared object."""
        self._say("stop")
        self.proc.wait(timeout=60)
        os.close(self.ctl)
        os.close(self.ack)
        report = subprocess.run(
            ["perf", "report", "-i", str(self.data), "--no-children", "--sort", "dso",
             "--stdio", "-F", "sample,dso", "--field-separator=;", "-q", "-g", "none"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        counts: dict[str, int] = {}
        for line in report.splitlines():
            count, _, dso = line.partition(";")
            if count.strip().isdigit():
                counts[dso.strip()] = counts.get(dso.strip(), 0) + int(count)
        return counts


def _places(counts: dict[str, int], steps: int) -> dict[str, float]:
    """CPU seconds per step (all threads) by place, from perf's samples by shared object."""
    spent = dict.fromkeys([*(name for name, _ in PLACES), ELSEWHERE], 0.0)
    for dso, n in counts.items():
        place = next((name for name, match in PLACES if match(dso)), ELSEWHERE)
        spent[place] += n / _PERF_HZ / steps
    return spent


def perf_split(
    model: nn.Module,
    x: Tensor | dict[str, Any],
    config: DPCConfig | None = None,
    compiled: bool = False,
    rounds: int = 3,
) -> tuple[dict[str, float], dict[str, float]]:
    """fp32's and DPC's CPU time per step by place (:data:`PLACES`), from ``perf record``:
    ``rounds`` rounds of about a second of steps on each side, alternating. Raises OSError
    where perf cannot run here."""
    if shutil.which("perf") is None:
        raise OSError("perf is not installed")
    dpc = _dpc(model, x, config)
    if compiled:
        model, dpc = torch.compile(model), torch.compile(dpc)  # type: ignore[assignment]
    sides = {"fp32": _step(model, x), "dpc": _step(dpc, x)}
    for step in sides.values():
        for _ in range(5 if compiled else 3):
            step()
    start = time.perf_counter()
    sides["fp32"]()
    steps = max(3, math.ceil(1.0 / (time.perf_counter() - start)))
    with tempfile.TemporaryDirectory() as where:
        perfs: dict[str, _Perf] = {}
        try:
            for side in sides:
                (Path(where) / side).mkdir()
                perfs[side] = _Perf(Path(where) / side)
            for _ in range(rounds):
                for side, step in sides.items():
                    perfs[side].on()
                    for _ in range(steps):
                        step()
                    perfs[side].off()
            split = {side: _places(perf.samples(), steps * rounds) for side, perf in perfs.items()}
        finally:
            for perf in perfs.values():
                if perf.proc.poll() is None:
                    perf.proc.kill()
    return split["fp32"], split["dpc"]


def _mask_store() -> str:
    """What writing a one-byte mask costs inductor's CPU code here: ReLU and its mask
    compiled, against ReLU alone compiled and the two in eager ATen, on the demo CNN's first
    activation (100x25x19)."""
    x = torch.randn(100, 25, 19)
    fns: dict[str, Callable[[Tensor], object]] = {
        "relu": torch.relu,
        "relu + mask": lambda t: (torch.relu(t), torch.relu(t) <= 0),
    }
    times = {}
    for name, fn in fns.items():
        for how, f in (("compiled", torch.compile(fn)), ("eager", fn)):
            for _ in range(3):
                f(x)
            start = time.perf_counter()
            for _ in range(200):
                f(x)
            times[name, how] = (time.perf_counter() - start) / 200
    us = {k: f"{v * 1e6:.0f} us" for k, v in times.items()}
    return (
        f"ReLU and its mask on 100x25x19 take {us['relu + mask', 'compiled']} compiled and "
        f"{us['relu + mask', 'eager']} in eager ATen; ReLU alone {us['relu', 'compiled']} "
        f"compiled, {us['relu', 'eager']} eager."
    )


def _dispatched_ops() -> str:
    """How many ATen ops one training step of a small conv layer (2x8x8x8, 3x3) dispatches
    in fp32 and as a fused layer: the fixed cost per layer that no loop speed removes (a
    count, the same on every machine with this torch)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    dpc = dpc_fx.compile(copy.deepcopy(conv), x, config=DPCConfig(pin_first_last=False))
    counts = []
    for model in (conv, dpc):
        step = step_of(model.train(), x)
        for _ in range(3):
            step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
        counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
    fp32, dpc_ops = (c // 10 for c in counts)
    on = "the layer operator" if native.layers() else "the Python path"
    return (
        f"A training step of one small conv layer (2x8x8x8, 3x3) dispatches {fp32} ATen ops "
        f"in fp32 and {dpc_ops} as a fused layer on {on}, the step's loss included: "
        f"{dpc_ops - fp32} more, each a microsecond or two of fixed cost whatever the layer's size."
    )


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "PROFILE.md")
    )
    args = parser.parse_args()
    try:  # transformers: a dev extra
        llama, tokens = _llama()
        decoder = [
            ("Llama-style decoder, 2 layers, 16x128 tokens", lambda: llama, tokens, 21, None, False)
        ]
    except ImportError:
        decoder = []
    cases: list[tuple[str, Callable[[], nn.Module], Any, int, DPCConfig | None, bool]] = [
        ("ResNet-18, 64x3x32x32", lambda: torchvision.models.resnet18(num_classes=10), torch.randn(64, 3, 32, 32), 11, None, False),
        ("MobileNetV2, 64x3x32x32", lambda: torchvision.models.mobilenet_v2(num_classes=10), torch.randn(64, 3, 32, 32), 11, None, False),
        ("EfficientNet-B0, 32x3x96x96", lambda: torchvision.models.efficientnet_b0(num_classes=10), torch.randn(32, 3, 96, 96), 11, None, False),
        ("EfficientNet-B0, 2x3x96x96", lambda: torchvision.models.efficientnet_b0(num_classes=10), torch.randn(2, 3, 96, 96), 21, None, False),
        ("MobileNetV3-Large, 32x3x96x96", lambda: torchvision.models.mobilenet_v3_large(num_classes=10), torch.randn(32, 3, 96, 96), 11, None, False),
        ("Transformer block, 64x64x256", EncoderBlock, torch.randn(64, 64, 256), 11, BLOCK_CONFIG, False),
        *decoder,
        ("demo CNN (MNIST-1D), 100x1x40", _demo_cnn, torch.randn(100, 1, 40), 201, None, False),
        ("demo CNN under torch.compile", _demo_cnn, torch.randn(100, 1, 40), 201, None, True),
    ]  # fmt: skip
    header = [
        "model",
        "fp32 step",
        "DPC step",
        *(label for label, _ in PARTS),
        f"{INDUCTOR}, fp32 / DPC",
        f"{MASKS}, fp32 / DPC",
        f"{ATEN}, fp32 / DPC",
        "fused layers (attention's too)",
        "DPC less fp32, per fused layer",
    ]
    rows = []
    for label, build, x, reps, config, compiled in cases:
        console.print(f"profile: {label}")
        torch.manual_seed(0)
        fp32, dpc, parts, base, layers = profile(build().train(), x, reps, config, compiled)
        rows.append(
            [
                label,
                _ms(fp32),
                f"{_ms(dpc)} ({dpc / fp32:.2f}x)",
                *(_ms(parts[p]) for p, _ in PARTS),
                f"{_ms(base[INDUCTOR])} / {_ms(parts[INDUCTOR])}" if compiled else "-",
                f"{_ms(base[MASKS])} / {_ms(parts[MASKS])}" if compiled else "-",
                f"{_ms(base[ATEN])} / {_ms(parts[ATEN])}",
                str(layers),
                f"{(dpc - fp32) / layers * 1e6:.0f} us",
            ]
        )
    perf_rows, perf_note = [], ""
    for label, build, x, _, config, compiled in cases:
        console.print(f"perf: {label}")
        torch.manual_seed(0)
        try:
            fp32_at, dpc_at = perf_split(build().train(), x, config, compiled)
        except (OSError, subprocess.SubprocessError) as e:
            perf_note = f"Not made here: {e}."
            console.print(f"perf: {perf_note}")
            break
        places = [*(name for name, _ in PLACES), ELSEWHERE]
        perf_rows.append(
            [
                label,
                f"{_ms(sum(fp32_at.values()))} / {_ms(sum(dpc_at.values()))}",
                *(f"{_ms(fp32_at[p])} / {_ms(dpc_at[p])}" for p in places),
            ]
        )
    perf_header = [
        "model",
        "CPU time per step, fp32 / DPC",
        *(name for name, _ in PLACES),
        ELSEWHERE,
    ]
    mask_note = _mask_store()
    console.print(mask_note)
    ops_note = _dispatched_ops()
    console.print(ops_note)
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
        f"{os.cpu_count()} cores ({_cpu()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"kernels `{os.environ.get('DPC_FX_KERNELS', 'native')}`"
        f"{'' if native.layers() else ' (layer operators unavailable)'}"
        f"{'' if native.library() is not None else ' (native loops unavailable)'}. "
        "fp32 and DPC steps interleaved in one process, medians, no profiler. The other "
        "columns: self time per DPC step under `torch.profiler` (three rounds of a quarter as "
        "many steps, alternating with fp32's), by "
        "who spends it: the layer operators' own time is the quantiser loops; the fused "
        "layers' autograd nodes hold their Python, and the loops of layers on the Python path; "
        "the ATen ops are the products, their backward and the rest of the model, in fp32's "
        "step and in DPC's; under `torch.compile`, the compiled graphs' own time is inductor's "
        "generated code, the quantisers' kernels among it on DPC's side. The profiler adds a "
        "little to every op it records, on both sides.",
        "",
        *_markdown(header, rows),
        "",
        "Under `torch.compile` a fused layer is an opaque call that keeps its input's codes. "
        "Where that input is a ReLU's output and nothing else keeps it, the ReLU keeps a bit "
        "an element for its backward, in an opaque call of its own (the bit ReLUs column); "
        "left to inductor, the compiled graph would keep ReLU's mask instead, a one-byte "
        "tensor, which inductor's kernels write and read slowly on this CPU (the mask column "
        "counts the kernels named for `threshold_backward` that remain: ReLUs before layers "
        "that are not fused, on both sides). "
        f"On this machine: {mask_note}",
        "",
        ops_note,
        "",
        "## Where the CPU time goes, by the code that spends it",
        "",
        "Linux `perf record` on the same process, sampling every thread "
        f"{_PERF_HZ} times a second of its CPU time, switched on only while the steps run: "
        "about a second of steps on each side, three rounds, alternating, after the runs "
        "above. CPU time per step, all threads together (two threads: up to twice the "
        "step's wall time), fp32 / DPC, by the shared object each sample fell in. What "
        "`torch.profiler` counts as an op's own time splits here by where it is spent: the "
        "quantiser loops are the operators' own work; the OpenMP runtime's share is a thread "
        "waiting, at the end of a parallel loop for the other to finish its part, or between "
        "loops for the next one; the kernel's is mostly page faults on memory newly "
        "allocated (its first write) and scheduling. Every figure moves from run to run, "
        "the kernel's the most, with what the C library's allocator hands back to the "
        "system between steps.",
        "",
        *(_markdown(perf_header, perf_rows) if perf_rows else [perf_note]),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
