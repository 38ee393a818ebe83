"""Compile every torchvision model and write the coverage table to docs/ZOO.md.

    python tools/zoo.py                          # all families, about 4 minutes on 2 cores
    python tools/zoo.py --models resnet18 raft_small --out /tmp/zoo.md
    python tools/zoo.py --timm                   # 15 timm models: only the file's timm section
    python tools/zoo.py --hf                     # tiny Hugging Face transformers: their section

For each model (random weights, small inputs) it records: traced whole or compiled through
the fallback (untraceable submodules kept as leaves), conv/linear layers quantised out of
all, the share of MACs quantised, compile time, and whether one training step (forward in
train mode, a loss, backward) ran. Detection models get targets and return their loss dict.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision import models as M

import dpc_fx
from dpc_fx import DPCConfig

FAMILIES = {
    "classification": M,
    "segmentation": M.segmentation,
    "video": M.video,
    "detection": M.detection,
    "optical flow": M.optical_flow,
}


@dataclass
class Case:
    """How to build one model and what to feed it."""

    kwargs: dict[str, Any]
    inputs: Callable[[], tuple[Any, ...]]
    shown: str  # the input, as the table shows it
    loss: Callable[[Any, tuple[Any, ...]], torch.Tensor]


def _tensor_loss(model: Any, inputs: tuple[Any, ...]) -> torch.Tensor:
    out = model(*inputs)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum(t.float().mean() for t in leaves if t.is_floating_point())  # type: ignore[return-value]


def _detection_loss(name: str) -> Callable[[Any, tuple[Any, ...]], torch.Tensor]:
    def loss(model: Any, inputs: tuple[Any, ...]) -> torch.Tensor:
        images = inputs[0]
        targets = []
        for _ in images:
            t: dict[str, torch.Tensor] = {
                "boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]),
                "labels": torch.tensor([1]),
            }
            if "keypoint" in name:
                t["keypoints"] = torch.cat([torch.rand(1, 17, 2) * 40 + 4, torch.ones(1, 17, 1)], 2)
            if "mask" in name:
                t["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
                t["masks"][0, 6:44, 4:40] = 1
            targets.append(t)
        return sum(model(images, targets).values())  # type: ignore[return-value]

    return loss


def case(name: str, family: str) -> Case:
    """Constructor kwargs, inputs and loss for one model (small, so the zoo stays fast)."""

    def images(*shape: int) -> Callable[[], tuple[Any, ...]]:
        return lambda: (torch.randn(*shape),)

    kwargs: dict[str, Any] = {"weights": None}
    if family == "classification":
        shape: tuple[int, ...] = (2, 3, 64, 64)
        if name.startswith("vit"):
            kwargs["image_size"] = 56 if name.endswith("14") else 64
            shape = (2, 3, kwargs["image_size"], kwargs["image_size"])
        if name == "inception_v3":
            kwargs.update(aux_logits=False, init_weights=False)
            shape = (2, 3, 80, 80)
        if name == "maxvit_t":  # partitions of 7 at every stage: 224 only
            shape = (2, 3, 224, 224)
        return Case(kwargs, images(*shape), "x".join(map(str, shape)), _tensor_loss)
    if family == "segmentation":
        kwargs["weights_backbone"] = None
        return Case(kwargs, images(2, 3, 64, 64), "2x3x64x64", _tensor_loss)
    if family == "video":
        shape = (2, 3, 4, 64, 64)
        if name == "s3d":  # its final pooling needs 7x7 features: 224 only
            shape = (1, 3, 16, 224, 224)
        if name.startswith("mvit"):  # fixed positional embeddings: 16x224x224 only
            shape = (1, 3, 16, 224, 224)
        return Case(kwargs, images(*shape), "x".join(map(str, shape)), _tensor_loss)
    if family == "detection":
        kwargs["weights_backbone"] = None
        if not name.startswith("ssd"):
            kwargs.update(min_size=64, max_size=64)
        size = (
            "300x300"
            if name.startswith("ssd300")
            else "320x320"
            if name.startswith("ssdlite")
            else "64x64"
        )
        return Case(
            kwargs,
            lambda: ([torch.rand(3, 64, 64), torch.rand(3, 64, 64)],),
            f"2 images 3x64x64 (resized to {size} inside)",
            _detection_loss(name),
        )
    return Case(  # optical flow: two frames
        kwargs,
        lambda: (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)),
        "2 frames 1x3x128x128",
        _tensor_loss,
    )


@dataclass
class Row:
    name: str
    family: str
    shown: str
    status: str = "failed"
    quantised: str = "-"
    reached: str = "-"
    short: bool = False  # fewer than 90% of the layers quantised
    pinned_only: bool = False  # ... and all of them reached by the passes
    unpinned: str = ""  # quantised with pin_first_last=False, for those
    macs: str = "-"
    leaves: str = "-"
    compile_s: float | None = None
    step: str = "-"
    note: str = ""


def run(name: str, family: str) -> Row:
    c = case(name, family)
    row = Row(name, family, c.shown)
    torch.manual_seed(0)
    model = M.get_model(name, **c.kwargs)
    inputs = c.inputs()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = dpc_fx.compile(model, inputs)
    except Exception as e:
        row.note = f"compile: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    row.compile_s = time.perf_counter() - start
    cov = dpc_fx.coverage(gm)
    row.status = "traced" if cov.traced else "fallback"
    pct = cov.quantised / cov.layers if cov.layers else 0.0
    row.quantised = f"{cov.quantised}/{cov.layers} ({pct:.0%})"
    row.reached = f"{cov.compiled}/{cov.layers}"
    row.short = pct < 0.9
    row.pinned_only = row.short and cov.compiled == cov.layers
    if row.pinned_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            free = dpc_fx.compile(model, inputs, config=DPCConfig(pin_first_last=False))
        row.unpinned = f"{dpc_fx.coverage(free).quantised}/{cov.layers}"
    row.macs = "-" if cov.macs_share is None else f"{cov.macs_share:.1%}"
    row.leaves = str(len(cov.leaves)) if cov.leaves else "-"
    row.step = _step(gm, c, inputs)
    return row


def _step(gm: torch.nn.Module, c: Case, inputs: tuple[Any, ...]) -> str:
    gm.train()
    start = time.perf_counter()
    try:
        loss = c.loss(gm, inputs)
        loss.backward()
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return f"failed: {type(e).__name__}: {first[:120]}"
    grads = sum(p.grad is not None for p in gm.parameters())
    total = sum(1 for _ in gm.parameters())
    return f"ok ({time.perf_counter() - start:.1f} s, grads on {grads}/{total} parameters)"


def notes(rows: list[Row]) -> list[str]:
    """Why some models quantise fewer than 90% of their layers, from the rows."""
    short = [r for r in rows if r.short and r.status == "traced"]
    if not short:
        return ["Every traced model quantises 90% or more of its conv/linear layers."]
    pinned = [f"{r.name} ({r.unpinned} unpinned)" for r in short if r.pinned_only]
    other = [r.name for r in short if not r.pinned_only]
    out = ["Traced models that quantise fewer than 90% of their conv/linear layers:", ""]
    if pinned:
        out.append(
            f"- {', '.join(pinned)}: every layer is under the plan (*reached*), but these "
            "models have few layers and the first and the last are pinned to full precision by "
            "default; with `DPCConfig(pin_first_last=False)` the counts in brackets are quantised."
        )
    if other:
        out.append(f"- {', '.join(other)}: some layers are not reached by the passes.")
    return out


# timm models and their input sizes: small where the model allows, 224 where its position
# embeddings, windows or attention biases are sized for it.
TIMM_MODELS = {
    "resnet50": 64,
    "efficientnet_b0": 64,
    "convnext_tiny": 64,
    "vit_tiny_patch16_224": 224,
    "deit_tiny_patch16_224": 224,
    "swin_tiny_patch4_window7_224": 224,
    "mobilenetv3_large_100": 64,
    "regnety_002": 64,
    "densenet121": 64,
    "coat_lite_tiny": 224,
    "levit_128": 224,
    "poolformer_s12": 64,
    "mixer_b16_224": 224,
    "efficientformer_l1": 224,
    "fastvit_t8": 64,
}


@dataclass
class TimmRow:
    name: str
    shown: str
    status: str = "failed"
    quantised: str = "-"
    attention: str = "-"
    macs: str = "-"
    unpinned: str = "-"  # share of the MACs outside the pinned layers that is quantised
    leaves: str = "-"
    compile_s: float | None = None
    step: str = "-"
    note: str = ""


def _fill(row: TimmRow, gm: torch.nn.Module, *, whole: str) -> None:
    """``row``'s coverage cells from the compiled module ``gm``."""
    cov = dpc_fx.coverage(gm)
    row.status = whole if cov.traced else "fallback"
    row.quantised = f"{cov.quantised}/{cov.layers}"
    row.attention = f"{cov.attention_quantised}/{cov.attention}" if cov.attention else "-"
    if cov.macs and cov.quantised_macs is not None:
        pinned = sum(m.macs or 0 for m in dpc_fx.layers(gm) if m.pinned)
        row.macs = f"{cov.quantised_macs / cov.macs:.1%}"
        row.unpinned = f"{cov.quantised_macs / (cov.macs - pinned):.1%}"
    row.leaves = str(len(cov.leaves)) if cov.leaves else "-"


def run_timm(name: str) -> TimmRow:
    import timm

    size = TIMM_MODELS[name]
    row = TimmRow(name, f"2x3x{size}x{size}")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    inputs = (torch.randn(2, 3, size, size),)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = dpc_fx.compile(model, inputs)
    except Exception as e:
        row.note = f"compile: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    row.compile_s = time.perf_counter() - start
    _fill(row, gm, whole="traced")
    row.step = _step(gm, Case({}, lambda: inputs, row.shown, _tensor_loss), inputs)
    return row


def render_timm(rows: list[TimmRow], command: str, seconds: float) -> str:
    """The timm section of docs/ZOO.md."""
    import timm

    lines = [
        TIMM_HEADING,
        "",
        f"Command: `{command}`  ",
        f"timm {timm.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch "
        f"threads on {_cpu()}; {datetime.date.today().isoformat()}, whole run "
        f"{seconds / 60:.1f} min.",
        "",
        "Random weights (`pretrained=False`, 10 classes), default `DPCConfig()`. *quantised*: "
        "matmul-like layers quantised of all (convolutions, linears, products of activations "
        "and attention; the pinned first and last count as not quantised). *attention*: "
        "`scaled_dot_product_attention` layers quantised (`-`: the model writes attention as "
        "matmuls, counted among the layers). *MACs*: share of one forward's MACs, attention's "
        "included, spent in quantised layers; *outside pinned*: the same share of the MACs "
        "outside the pinned layers. *step*: forward in train mode, a loss, backward.",
        "",
    ]
    return "\n".join(lines + _row_table(rows, "input", "step")) + "\n"


def _row_table(rows: list[TimmRow], inputs: str, step: str) -> list[str]:
    """The table of the timm and Hugging Face sections, one line per row."""
    lines = [
        f"| model | {inputs} | status | quantised | attention | MACs | outside pinned | leaves "
        f"| compile | {step} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = "-" if r.compile_s is None else f"{r.compile_s:.1f} s"
        lines.append(
            f"| {r.name} | {r.shown} | {r.status} | {r.quantised} | {r.attention} | {r.macs} "
            f"| {r.unpinned} | {r.leaves} | {t} | {r.note or r.step} |"
        )
    return lines


TIMM_HEADING = "## timm"


def with_section(text: str, section: str, heading: str = TIMM_HEADING) -> str:
    """``text`` (docs/ZOO.md) with its section under ``heading`` replaced by ``section``, or
    added at the end; the rest of the file is kept as it is."""
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    rest = "" if end < 0 else text[end + 1 :]
    return text[:start] + section + ("\n" + rest if rest else "")


def timm_section(text: str, heading: str = TIMM_HEADING) -> str:
    """The section of ``text`` (docs/ZOO.md) under ``heading``, or ``""``."""
    start = text.find(heading + "\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start : end + 1]


def main_timm(args: argparse.Namespace) -> int:
    names = [n for n in TIMM_MODELS if not args.models or n in args.models]
    rows = []
    start = time.perf_counter()
    for name in names:
        try:
            row = run_timm(name)
        except Exception as e:  # building the model failed
            row = TimmRow(name, "-", note=f"{type(e).__name__}: {e}"[:160])
            traceback.print_exc()
        rows.append(row)
        print(f"{name:32s} {row.status:9s} {row.quantised:9s} {row.unpinned:7s} {row.step}")
        gc.collect()
    command = "python tools/zoo.py --timm" + (
        f" --models {' '.join(args.models)}" if args.models else ""
    )
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    out.write_text(with_section(old, render_timm(rows, command, time.perf_counter() - start)))
    print(f"timm section written to {out}")
    return 0


# ----------------------------------------------------------------- Hugging Face transformers

HF_HEADING = "## Hugging Face transformers"
HF_MODELS = ("gpt2", "llama", "bert", "distilbert", "t5", "vit")


def hf_case(name: str) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """A tiny random-weight model (2 layers, width 128) and the keyword inputs it is
    trained with: token ids 2x16 (ViT: 2x3x32x32 pixels), attention mask and labels."""
    import transformers as T

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    small = {"vocab_size": 100}
    classes = torch.tensor([0, 1])
    if name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=128, n_head=4, **small))
        return model, {**text, "labels": ids, "use_cache": False}, "ids 2x16"
    if name == "llama":
        config = T.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            **small,
        )
        return T.LlamaForCausalLM(config), {**text, "labels": ids, "use_cache": False}, "ids 2x16"
    if name == "bert":
        config = T.BertConfig(
            num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=256,
            **small,
        )  # fmt: skip
        return T.BertForSequenceClassification(config), {**text, "labels": classes}, "ids 2x16"
    if name == "distilbert":
        config = T.DistilBertConfig(n_layers=2, dim=128, n_heads=4, hidden_dim=256, **small)
        model = T.DistilBertForSequenceClassification(config)
        return model, {**text, "labels": classes}, "ids 2x16"
    if name == "t5":
        config = T.T5Config(
            num_layers=2, num_decoder_layers=2, d_model=128, d_ff=256, num_heads=4, d_kv=32,
            decoder_start_token_id=0, pad_token_id=0, **small,
        )  # fmt: skip
        model = T.T5ForConditionalGeneration(config)
        return model, {**text, "labels": ids, "use_cache": False}, "ids 2x16"
    assert name == "vit"
    config = T.ViTConfig(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=256,
        image_size=32, patch_size=8, num_labels=10,
    )  # fmt: skip
    pixels = torch.randn(2, 3, 32, 32)
    return (
        T.ViTForImageClassification(config),
        {"pixel_values": pixels, "labels": classes},
        "pixels 2x3x32x32",
    )


def run_hf(name: str, reps: int) -> TimmRow:
    model, kwargs, shown = hf_case(name)
    row = TimmRow(name, shown + " + mask/labels" if "ids" in shown else shown + " + labels")
    model.train()
    reference = copy.deepcopy(model)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = dpc_fx.compile(model, example_kwargs=kwargs)
    except Exception as e:
        row.note = f"compile: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    row.compile_s = time.perf_counter() - start
    _fill(row, gm, whole="whole")

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run_step() -> None:
            module.zero_grad(set_to_none=True)
            module(**kwargs).loss.backward()

        return run_step

    times: dict[str, list[float]] = {"fp32": [], "dpc": []}
    ratios = []
    fns = {"fp32": step(reference), "dpc": step(gm)}
    for fn in fns.values():  # warm-up: compiled kernels, allocator
        fn()
        fn()
    for i in range(reps):
        order = ("fp32", "dpc") if i % 2 == 0 else ("dpc", "fp32")
        pair = {}
        for key in order:
            t0 = time.perf_counter()
            fns[key]()
            pair[key] = time.perf_counter() - t0
            times[key].append(pair[key])
        ratios.append(pair["dpc"] / pair["fp32"])
    row.step = (
        f"{statistics.median(ratios):.2f}x ({statistics.median(times['dpc']) * 1e3:.0f} vs "
        f"{statistics.median(times['fp32']) * 1e3:.0f} ms)"
    )
    return row


def render_hf(rows: list[TimmRow], command: str, seconds: float) -> str:
    """The Hugging Face section of docs/ZOO.md."""
    import transformers

    lines = [
        HF_HEADING,
        "",
        f"Command: `{command}`  ",
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads on {_cpu()}; "
        f"{datetime.date.today().isoformat()}, whole run {seconds / 60:.1f} min.",
        "",
        "Tiny random-weight models built from configs (2 layers, width 128; nothing "
        "downloaded), compiled from the keyword inputs they train with "
        "(`dpc_fx.compile(model, example_kwargs=...)`, the model's cache off), default "
        "`DPCConfig()`. *status* whole: one graph, traced or captured through `torch.export`; "
        "*quantised*, *attention*, *MACs*, *outside pinned* as in the timm table. *step*: "
        "training step (forward with the loss, backward) of the compiled module over the "
        "same step of the plain model, median of interleaved pairs in one process.",
        "",
    ]
    return "\n".join(lines + _row_table(rows, "inputs", "step vs fp32")) + "\n"


def main_hf(args: argparse.Namespace) -> int:
    names = [n for n in HF_MODELS if not args.models or n in args.models]
    rows = []
    start = time.perf_counter()
    for name in names:
        try:
            row = run_hf(name, args.reps)
        except Exception as e:  # building the model failed
            row = TimmRow(name, "-", note=f"{type(e).__name__}: {e}"[:160])
            traceback.print_exc()
        rows.append(row)
        print(f"{name:12s} {row.status:9s} {row.quantised:9s} {row.unpinned:7s} {row.step}")
        gc.collect()
    command = "python tools/zoo.py --hf" + (
        f" --models {' '.join(args.models)}" if args.models else ""
    )
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    section = render_hf(rows, command, time.perf_counter() - start)
    out.write_text(with_section(old, section, HF_HEADING))
    print(f"Hugging Face section written to {out}")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def render(rows: list[Row], command: str, seconds: float) -> str:
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        by = counts.setdefault(r.family, {})
        key = r.status + (", stepped" if r.step.startswith("ok") else ", no step")
        by[key] = by.get(key, 0) + 1
    lines = [
        "# Model zoo: every torchvision model through dpc_fx.compile",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_cpu()}, {os.cpu_count()} cores shared with other work, "
        f"{torch.get_num_threads()} torch threads, no GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}  ",
        f"Date: {datetime.date.today().isoformat()}; whole run {seconds / 60:.1f} min.",
        "",
        "Random weights, default `DPCConfig()` (4-8 bits by parameter count, 8-bit gradients, "
        "first and last layer pinned to full precision). *quantised*: conv/linear layers whose "
        "weights the compiled model quantises, of all its conv/linear layers (modules, and the "
        "input projections of `nn.MultiheadAttention`; pinned ones count as not quantised). "
        "*reached*: those under the plan, pinned ones included. *MACs*: share of one "
        "forward's MACs (torch.utils.flop_counter) spent in quantised layers. *leaves*: "
        "modules kept whole, their children compiled, because torch.fx cannot trace them or "
        "because their own code branches on `self.training` (`dpc_fx.coverage(gm)` lists them "
        "with the reason). *status* fallback: the model has such leaves. *step*: forward in "
        "train mode, a "
        "loss (detection: the model's loss dict with one box per image), backward.",
        "",
        "## Summary",
        "",
    ]
    for family, by in counts.items():
        lines.append(f"- {family}: " + ", ".join(f"{n} {k}" for k, n in sorted(by.items())))
    lines += ["", *notes(rows)]
    for family in FAMILIES:
        mine = [r for r in rows if r.family == family]
        if not mine:
            continue
        lines += [
            "",
            f"## {family.capitalize()}",
            "",
            "| model | input | status | quantised | reached | MACs | leaves | compile | step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in mine:
            t = "-" if r.compile_s is None else f"{r.compile_s:.1f} s"
            step = r.step if not r.note else r.note
            lines.append(
                f"| {r.name} | {r.shown} | {r.status} | {r.quantised} | {r.reached} | {r.macs} "
                f"| {r.leaves} "
                f"| {t} | {step} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model names (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7, help="timed step pairs (--hf)")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "ZOO.md")
    )
    parser.add_argument(
        "--timm", action="store_true", help="the timm models; rewrites only the timm section"
    )
    parser.add_argument(
        "--hf",
        action="store_true",
        help="tiny Hugging Face transformers models; rewrites only their section",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.timm:
        return main_timm(args)
    if args.hf:
        return main_hf(args)
    todo = [(n, f) for f, mod in FAMILIES.items() for n in M.list_models(module=mod)]
    if args.models:
        todo = [(n, f) for n, f in todo if n in args.models]
    rows = []
    start = time.perf_counter()
    for name, family in todo:
        try:
            row = run(name, family)
        except Exception as e:  # building the model or its inputs failed
            row = Row(name, family, "-", note=f"{type(e).__name__}: {e}"[:160])
            traceback.print_exc()
        rows.append(row)
        print(
            f"{name:40s} {row.status:9s} {row.quantised:16s} {row.macs:7s} {row.step}", flush=True
        )
        gc.collect()
    command = "python tools/zoo.py" + (f" --models {' '.join(args.models)}" if args.models else "")
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    kept = "".join(timm_section(old, h) for h in (TIMM_HEADING, HF_HEADING))  # --timm, --hf
    text = render(rows, command, time.perf_counter() - start)
    out.write_text(text + ("\n" + kept if kept else ""))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
