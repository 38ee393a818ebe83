"""The ``dpc-fx`` command line: ``inspect`` a model's plan.

dpc-fx inspect resnet18 --input 1,3,32,32
dpc-fx inspect mypkg.models:build_net --input 8,3,64,64 --b-min 3 --delta 0.5
dpc-fx inspect mypkg.models:tiny_bert --kwarg input_ids=2,16:long --kwarg labels=2:long

The demo (fp32 vs DPC trained on MNIST-1D) is part of the repository's experiments, not of
the installed library: ``make demo`` in a checkout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import dpc_fx
from dpc_fx import report
from dpc_fx.errors import ConfigError, DPCError

__all__ = ["load_model", "main", "parse_kwarg", "parse_shape"]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``, with an error that shows the expected form."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 0 for d in shape):
        raise ConfigError(f"--input {text!r} is not a shape; write it as e.g. 1,3,32,32.")
    return shape


_DTYPES = {
    "float": torch.float32,
    "float32": torch.float32,
    "long": torch.long,
    "int64": torch.long,
    "int": torch.int32,
    "int32": torch.int32,
    "bool": torch.bool,
}


def parse_kwarg(text: str) -> tuple[str, torch.Tensor]:
    """``"input_ids=2,16:long"`` -> ``("input_ids", tensor of shape (2, 16))``: a keyword
    input of the given shape and dtype (``float`` by default: normal random values; integer
    and ``bool`` tensors are all ones, valid as token ids, masks and class labels)."""
    name, eq, rest = text.partition("=")
    shape_text, _, dtype_name = rest.partition(":")
    dtype = _DTYPES.get(dtype_name or "float")
    if not eq or not name.isidentifier() or dtype is None:
        raise ConfigError(
            f"--kwarg {text!r} is not NAME=SHAPE[:DTYPE]; write it as e.g. input_ids=2,16:long "
            f"(dtypes: {', '.join(_DTYPES)})."
        )
    try:
        shape = parse_shape(shape_text)
    except ConfigError as e:
        raise ConfigError(
            f"--kwarg {text!r}: {shape_text!r} is not a shape; write it as e.g. input_ids=2,16:long."
        ) from e
    if dtype.is_floating_point:
        return name, torch.randn(shape, dtype=dtype)
    return name, torch.ones(shape, dtype=dtype)


def load_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """A model from a torchvision name (``resnet18``) or ``module:callable``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        # As `python -m` does: the user's own package in the current folder is importable.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(
                f"model {spec!r}: cannot import {attr!r} from {module_name!r} ({e}); "
                "use module:callable with the module in the current folder or on PYTHONPATH."
            ) from e
        model = factory()
    else:
        import torchvision

        names = torchvision.models.list_models()
        if spec not in names:
            close = [n for n in names if spec.lower() in n][:5]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"model {spec!r} is not a torchvision model name nor module:callable.{hint}"
            )
        kwargs: dict[str, object] = {"num_classes": num_classes} if num_classes else {}
        builder = torchvision.models.get_model_builder(spec)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # random weights throughout: nothing to download
        model = builder(weights=None, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r} returned {type(model).__name__}, not an nn.Module.")
    return model


def _config(args: argparse.Namespace) -> dpc_fx.DPCConfig:
    base = dpc_fx.DPCConfig()
    if args.config:
        try:
            base = dpc_fx.DPCConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {args.config}: cannot read a JSON config ({e}).") from e
    fields = {
        "b_min": args.b_min,
        "b_max": args.b_max,
        "grad_bits": args.grad_bits,
        "delta": args.delta,
        "capacity": args.capacity,
        "policy": args.policy,
        "budget": args.budget,
    }
    config = base.replace(**{k: v for k, v in fields.items() if v is not None})
    if args.no_pin:
        config = config.replace(pin_first_last=False)
    return config


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=max(Console().width, 130) if not sys.stdout.isatty() else None)
    model = load_model(args.model, args.num_classes)
    model.eval()
    if args.input is None and not args.kwarg:
        raise ConfigError(
            "inspect needs example inputs: --input SHAPE, --kwarg NAME=SHAPE, or both."
        )
    x = None if args.input is None else torch.randn(parse_shape(args.input))
    kwargs = dict(parse_kwarg(k) for k in args.kwarg)
    config = _config(args)
    plan = dpc_fx.Plan.load(args.plan) if args.plan else None
    start = time.perf_counter()
    gm = dpc_fx.compile(model, x, example_kwargs=kwargs or None, config=config, plan=plan)
    elapsed = time.perf_counter() - start
    shapes = [] if x is None else [str(tuple(x.shape))]
    shapes += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items()]
    title = f"{args.model} {' '.join(shapes)}"
    coverage = dpc_fx.coverage(gm)
    if args.json:
        data = report.to_json(gm)
        data["coverage"] = dataclasses.asdict(coverage)
        print(json.dumps(data, indent=2))
    else:
        dpc_fx.show(gm, console=console, title=f"{title}: DPC plan")
        for line in coverage.lines():
            console.print(line, markup=False, highlight=False)
        console.print(f"[dim]compiled in {elapsed:.2f} s[/dim]")
    if args.save_plan:
        dpc_fx.plan_of(gm).save(args.save_plan)
        if not args.json:
            console.print(f"plan written to {args.save_plan}")
    if args.plot:
        report.plot(gm, args.plot, title=title)
        if not args.json:
            console.print(f"plot written to {args.plot}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpc-fx",
        description=__doc__.splitlines()[0],
        epilog="The demo is in the repository, not in the library: run `make demo` there.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="compile a model and print its annotated layers")
    inspect.add_argument("model", help="torchvision model name (resnet18) or module:callable")
    inspect.add_argument("--input", help="example input shape, e.g. 1,3,32,32")
    inspect.add_argument(
        "--kwarg",
        action="append",
        default=[],
        metavar="NAME=SHAPE[:DTYPE]",
        help="a keyword input, e.g. input_ids=2,16:long (repeat for more; float inputs are "
        "random, integer and bool ones all ones)",
    )
    inspect.add_argument("--num-classes", type=int, help="classes of a torchvision model")
    inspect.add_argument("--policy", choices=("dpc", "uniform"))
    inspect.add_argument("--b-min", type=int)
    inspect.add_argument("--b-max", type=int)
    inspect.add_argument("--grad-bits", type=int)
    inspect.add_argument("--delta", type=float)
    inspect.add_argument("--capacity", choices=("params", "macs"))
    inspect.add_argument("--no-pin", action="store_true", help="quantise first and last layers too")
    inspect.add_argument("--budget", type=float, help="target saving vs static 8-bit, e.g. 0.3")
    inspect.add_argument("--config", help="a JSON file of DPCConfig fields (flags override it)")
    inspect.add_argument("--plan", help="apply a saved plan (JSON) instead of a policy")
    inspect.add_argument("--save-plan", metavar="FILE", help="write the plan as JSON")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    inspect.add_argument("--plot", metavar="FILE.png", help="draw bits and capacity per layer")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DPCError as e:
        print(f"dpc-fx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
