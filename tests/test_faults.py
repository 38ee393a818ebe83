"""Fault injection, with the plain model as the oracle: non-finite values in inputs,
activations, losses and gradients under AMP's ``GradScaler``; checkpoints through
``state_dict`` (in this process and a fresh one); Hogwild training in spawned workers;
example inputs of the wrong dtype.

The probes of issue 13 and their results. Held before this file: zero, constant, huge and
denormal inputs; float64, bfloat16 and float16 models; channels_last; tied weights;
threads; fork and spawn; bit-exact determinism; resuming from ``torch.save`` of the whole
module; 23 invalid config values. Failed before, fixed and tested here: an ``inf`` in an
output gradient came out finite (GradScaler stepped) and an all-``inf`` float16 gradient
came out 0 (``test_an_infinite_output_gradient...``, ``test_an_all_infinite...``,
``test_grad_scaler_...``, ``test_float16_overflow...``); an ``inf`` input gave finite
logits (``test_a_non_finite_input...``); a ``state_dict`` checkpoint lost the calibration
(``test_state_dict_...``, ``test_export_after...``); Hogwild lost the ``observed`` flag
(``test_hogwild_...``); integer example inputs compiled silently (``test_integer_...``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import toys
from torch import Tensor, nn

import dpc_fx
from dpc_fx import DPCConfig, ShapeError
from dpc_fx.quant import ActQuantizer

ALL_LAYERS = DPCConfig(pin_first_last=False)
LOWERED = DPCConfig(pin_first_last=False, lower=True)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def compiled(model: nn.Module, config: DPCConfig = ALL_LAYERS) -> nn.Module:
    return dpc_fx.compile(model, torch.randn(8, 16), config=config)


def act_quantizers(module: nn.Module) -> list[ActQuantizer]:
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("config", [ALL_LAYERS, LOWERED], ids=["simulated", "lowered"])
def test_an_infinite_output_gradient_gives_non_finite_parameter_gradients(
    config: DPCConfig,
) -> None:
    model = mlp()
    gm = compiled(copy.deepcopy(model), config)
    for module in (model, gm):
        out = module(torch.randn(32, 16))
        (out.square().mean() + out[0, 0] * float("inf")).backward()
    for (name, p), q in zip(model.named_parameters(), gm.parameters(), strict=True):
        assert not bool(p.grad.isfinite().all()), name  # the oracle overflows ...
        assert not bool(q.grad.isfinite().all()), name  # ... and so must the compiled module


@pytest.mark.parametrize("config", [ALL_LAYERS, LOWERED], ids=["simulated", "lowered"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_input_gives_the_same_non_finite_rows(
    config: DPCConfig, mode: str, bad: float
) -> None:
    model = mlp()
    gm = compiled(copy.deepcopy(model), config)
    gm(torch.randn(32, 16))  # a training batch: eval then uses the running ranges
    x = torch.randn(4, 16)
    x[1, 3] = bad
    model.train(mode == "train"), gm.train(mode == "train")
    expected, got = model(x), gm(x)
    assert not bool(expected[1].isfinite().all())
    assert torch.equal(got.isfinite().all(1), expected.isfinite().all(1))


def test_an_all_infinite_float16_gradient_stays_infinite() -> None:
    from dpc_fx.quant import GradQuantizer

    q = GradQuantizer(8)
    y = torch.zeros(6, dtype=torch.float16, requires_grad=True)
    q(y * 1).backward(torch.full((6,), float("inf"), dtype=torch.float16))
    assert bool(torch.isinf(y.grad).all())


def _inject(kind: str, value: float) -> tuple[Callable[[nn.Module], object], Callable]:
    """``(hook installer, loss transform)`` that put ``value`` into one tensor of a step."""

    def install(module: nn.Module) -> object:
        if kind == "activation":  # one element of the first ReLU's output

            def poke(m: nn.Module, args: object, out: Tensor) -> Tensor:
                out = out.clone()
                out.view(-1)[0] = value
                return out

            return module.get_submodule("1").register_forward_hook(poke)
        if kind == "gradient":  # one element of the gradient of the second ReLU's output

            def put(grad: Tensor, out: Tensor) -> Tensor:
                grad = grad.clone()
                grad.view(-1)[int(torch.nonzero(out.view(-1) > 0)[0])] = value
                return grad

            def watch(m: nn.Module, args: object, out: Tensor) -> None:
                out.register_hook(lambda g: put(g, out.detach()))

            return module.get_submodule("3").register_forward_hook(watch)
        return None

    def loss(out: Tensor) -> Tensor:
        base = out.float().square().mean()
        return base + out[0, 0].float() * value if kind == "loss" else base

    return install, loss


def _train_with_scaler(
    module: nn.Module,
    *,
    dtype: torch.dtype,
    inject: str,
    value: float,
    bad_steps: set[int],
    init_scale: float,
    steps: int = 5,
) -> tuple[list[bool], float, list[Tensor]]:
    """Steps of SGD under autocast and a CPU GradScaler: which steps were skipped, the final
    scale, and the parameters."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    autocast: AbstractContextManager[object] = (
        nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
    )
    install, loss_fn = _inject(inject, value)
    skipped = []
    for step in range(steps):
        x = torch.randn(32, 16)
        bad = step in bad_steps
        if bad and inject == "input":
            x[0, 0] = value
        handle = install(module) if bad else None
        with autocast:
            out = module(x)
            loss = loss_fn(out) if bad else out.float().square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in module.parameters()]
        scaler.step(opt)
        scaler.update()
        skipped.append(
            all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
        )
        if handle is not None:
            handle.remove()  # type: ignore[attr-defined]
    return skipped, scaler.get_scale(), [p.detach() for p in module.parameters()]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("inject", ["input", "activation", "loss", "gradient"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_grad_scaler_skips_the_steps_it_skips_for_the_plain_model(
    dtype: torch.dtype, inject: str, value: float
) -> None:
    model = mlp()
    gm = compiled(copy.deepcopy(model))
    kwargs = {"dtype": dtype, "inject": inject, "value": value, "init_scale": 2.0**8}
    plain_skips, plain_scale, _ = _train_with_scaler(model, bad_steps={1, 3}, **kwargs)
    skips, scale, params = _train_with_scaler(gm, bad_steps={1, 3}, **kwargs)
    assert plain_skips == [False, True, False, True, False]
    assert skips == plain_skips
    assert scale == plain_scale
    assert all(bool(p.isfinite().all()) for p in params)


def test_lowered_layers_skip_the_same_steps_as_the_plain_model() -> None:
    model = mlp()
    gm = compiled(copy.deepcopy(model), LOWERED)
    kwargs = {"dtype": torch.float32, "value": float("inf"), "init_scale": 2.0**8}
    for inject in ("input", "activation", "loss", "gradient"):
        plain, plain_scale, _ = _train_with_scaler(model, inject=inject, bad_steps={2}, **kwargs)
        ours, scale, _ = _train_with_scaler(gm, inject=inject, bad_steps={2}, **kwargs)
        assert plain == ours == [False, False, True, False, False], inject
        assert scale == plain_scale


def test_float16_overflow_backs_the_scale_off_as_for_the_plain_model() -> None:
    """A scale of 2**24 overflows float16 gradients on the first steps: the scaler must see
    it (not all-zero gradients) and back off as it does for the plain model. Near the
    threshold the quantised gradients may overflow one step longer than the float ones."""
    model = mlp()
    gm = compiled(copy.deepcopy(model))
    initial = [p.detach().clone() for p in gm.parameters()]
    kwargs = {"dtype": torch.float16, "inject": "none", "value": 0.0, "init_scale": 2.0**24}
    plain, plain_scale, _ = _train_with_scaler(model, bad_steps=set(), steps=12, **kwargs)
    ours, scale, params = _train_with_scaler(gm, bad_steps=set(), steps=12, **kwargs)
    assert plain[:4] == [True] * 4 and not any(plain[5:])
    assert ours[: plain.index(False)] == plain[: plain.index(False)]
    assert not any(ours[6:])
    assert plain_scale / 2 <= scale <= plain_scale < 2.0**24
    assert not all(torch.equal(p, q) for p, q in zip(params, initial, strict=True))


# ---------------------------------------------------------------------- checkpoints


def _trained_cnn(steps: int = 3) -> tuple[nn.Module, nn.Module, Tensor]:
    torch.manual_seed(0)
    model = toys.small_cnn()
    x = torch.randn(8, 3, 16, 16)
    gm = dpc_fx.compile(model, x, config=ALL_LAYERS)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        gm(x * 3).square().mean().backward()
        opt.step()
    return model, gm, x


def test_state_dict_holds_the_calibration_and_restores_eval_exactly() -> None:
    _, gm, x = _trained_cnn()
    state = gm.state_dict()
    ranges = [k for k in state if k.endswith(("running_min", "running_max", "seen"))]
    assert ranges and all(k.startswith("dpc.") for k in ranges)
    torch.manual_seed(5)
    fresh = dpc_fx.compile(toys.small_cnn(), x, config=ALL_LAYERS)
    fresh.load_state_dict(state, strict=True)
    assert all(q.observed for q in act_quantizers(fresh))
    assert torch.equal(fresh.eval()(x), gm.eval()(x))


def test_a_plain_checkpoint_loads_strictly_and_keeps_the_calibration() -> None:
    model, gm, _ = _trained_cnn()
    before = {k: v.clone() for k, v in gm.state_dict().items() if k.startswith("dpc.")}
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.01)
    gm.load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(gm.get_parameter(k), v) for k, v in plain.named_parameters())
    # A damaged checkpoint (part of a quantiser's state) is still reported.
    damaged = gm.state_dict()
    del damaged[next(k for k in before if k.endswith("seen"))]
    with pytest.raises(RuntimeError, match="Missing key"):
        gm.load_state_dict(damaged, strict=True)


def test_model_state_dict_loads_into_the_plain_model_strictly() -> None:
    model, gm, x = _trained_cnn()
    fresh = toys.small_cnn()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(gm.state_dict(), strict=True)
    fresh.load_state_dict(dpc_fx.model_state_dict(gm), strict=True)
    assert list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_export_after_a_state_dict_round_trip_writes_the_same_file(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    _, gm, x = _trained_cnn()
    torch.manual_seed(5)
    fresh = dpc_fx.compile(toys.small_cnn(), x, config=ALL_LAYERS)
    fresh.load_state_dict(gm.state_dict(), strict=True)
    a = dpc_fx.export_onnx(gm, x, tmp_path / "a.onnx").read_bytes()
    b = dpc_fx.export_onnx(fresh, x, tmp_path / "b.onnx").read_bytes()
    assert a == b


_CONTINUE = """
import sys, torch, toys, dpc_fx
torch.set_num_threads(1)
state_path, out_path = sys.argv[1], sys.argv[2]
saved = torch.load(state_path)
torch.manual_seed(5)
gm = dpc_fx.compile(toys.small_cnn(), saved["x"], config=dpc_fx.DPCConfig(pin_first_last=False))
gm.load_state_dict(saved["model"], strict=True)
opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
opt.load_state_dict(saved["opt"])
torch.manual_seed(11)
for _ in range(3):
    opt.zero_grad()
    gm(saved["x"] * 3).square().mean().backward()
    opt.step()
torch.save({"state": gm.state_dict(), "eval": gm.eval()(saved["x"])}, out_path)
"""


def test_state_dict_round_trip_into_a_fresh_process_continues_bit_exactly(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    gm = dpc_fx.compile(toys.small_cnn(), x, config=ALL_LAYERS)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            gm(x * 3).square().mean().backward()
            opt.step()

    steps(2)
    torch.save({"model": gm.state_dict(), "opt": opt.state_dict(), "x": x}, tmp_path / "ck.pt")
    torch.manual_seed(11)
    steps(3)
    expected = {"state": gm.state_dict(), "eval": gm.eval()(x)}

    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(_CONTINUE))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        timeout=300,
    )
    got = torch.load(tmp_path / "out.pt")
    assert list(got["state"]) == list(expected["state"])
    for key, value in expected["state"].items():
        assert torch.equal(got["state"][key], value), key
    assert torch.equal(got["eval"], expected["eval"])


def test_a_module_pickled_before_the_flag_was_a_buffer_still_loads() -> None:
    q = ActQuantizer(4).train()
    q(torch.tensor([-2.0, 6.0]))
    state = q.__getstate__().copy()  # as an older dpc_fx pickled it: flag an attribute
    state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != "seen"}
    state["_non_persistent_buffers_set"] = {"running_min", "running_max"}
    state["observed"] = True
    old = ActQuantizer.__new__(ActQuantizer)
    old.__setstate__(state)
    assert old.observed and list(old.state_dict()) == ["running_min", "running_max", "seen"]


# ------------------------------------------------------------------------ Hogwild


def _hogwild_worker(gm: nn.Module, seed: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        gm(torch.randn(16, 16) * 2).square().mean().backward()
        opt.step()


def test_hogwild_workers_leave_the_running_ranges_valid_in_the_parent() -> None:
    gm = compiled(mlp())
    gm.share_memory()
    assert not any(q.observed for q in act_quantizers(gm))
    context = mp.get_context("spawn")
    workers = [context.Process(target=_hogwild_worker, args=(gm, s)) for s in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert all(q.observed and q.running_max > q.running_min for q in act_quantizers(gm))
    gm.eval()
    x = torch.randn(16, 16) * 5
    # Running ranges, not the batch's: a row's output does not depend on the rest of the batch.
    assert torch.allclose(gm(x)[:2], gm(x[:2]), rtol=0, atol=1e-5)


# -------------------------------------------------------------------- example inputs


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_example_inputs_for_a_float_model_are_refused(dtype: torch.dtype) -> None:
    with pytest.raises(ShapeError, match=r"input 'input' reaches layer '0' as .*float32"):
        dpc_fx.compile(mlp(), torch.randint(0, 3, (8, 16), dtype=dtype))


def test_integer_inputs_that_only_index_are_still_accepted() -> None:
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 4))
    gm = dpc_fx.compile(model, torch.randint(0, 10, (2, 5)), config=ALL_LAYERS)
    assert gm(torch.randint(0, 10, (2, 5))).shape == (2, 5, 4)
