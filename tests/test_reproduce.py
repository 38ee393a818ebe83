"""tools/reproduce.py and the models it trains: tiny end-to-end runs, the cost of cyclic
schedules, the tables and the page it writes."""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import dpc_fx
from dpc_fx.cost import bitops
from dpc_fx.meta import Bits
from dpc_fx.quant import Quantizer
from experiments.data import DataError
from experiments.models import (
    MNIST1DCNN,
    MNIST1DMLP,
    CharTransformer,
    MNIST1DResNet,
    cifar_mobilenet_v2,
    cifar_resnet,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rp() -> ModuleType:
    """tools/reproduce.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "tools" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --- models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "x", "out"),
    [
        (MNIST1DResNet(), torch.randn(2, 1, 40), (2, 10)),
        (MNIST1DMLP(widths=(32, 16)), torch.randn(2, 1, 40), (2, 10)),
        (CharTransformer(97, context=16, dim=32), torch.randint(0, 97, (2, 16)), (2, 16, 97)),
        (cifar_resnet(20), torch.randn(2, 3, 32, 32), (2, 10)),
        (cifar_mobilenet_v2(100), torch.randn(2, 3, 32, 32), (2, 100)),
    ],
    ids=["resnet1d", "mlp", "charlm", "resnet20", "mobilenetv2"],
)
def test_models_compile_whole_and_match(model: nn.Module, x: Tensor, out: tuple[int, ...]) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no untraceable leaf, nothing left unquantised
        gm = dpc_fx.compile(model, x, config=dpc_fx.DPCConfig(b_min=16, b_max=16, grad_bits=None))
    assert dpc_fx.coverage(gm).traced
    assert gm(x).shape == out
    torch.testing.assert_close(gm(x), model(x), atol=1e-2, rtol=1e-2)


def test_char_transformer_quantises_attention_matmuls() -> None:
    gm = dpc_fx.compile(CharTransformer(97, context=16, dim=32), torch.randint(0, 97, (2, 16)))
    ops = [m.op for m in dpc_fx.layers(gm)]
    assert ops.count("matmul") == 4  # q @ k^T and att @ v in each of the two blocks


def test_char_transformer_is_causal() -> None:
    model = CharTransformer(97, context=8, dim=16, heads=2).eval()
    x = torch.randint(0, 97, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :5], model(y)[:, :5])


def test_model_sizes_and_defaults() -> None:
    params = sum(p.numel() for p in cifar_resnet(20).parameters())
    assert params == 272_474  # He et al.'s ResNet-20 with 1x1 shortcuts
    assert len([m for m in cifar_resnet(74).modules() if isinstance(m, nn.Conv2d)]) == 73 + 2
    # The MNIST-1D paper's MLP is still the default, with the same state_dict keys.
    assert list(MNIST1DMLP().state_dict()) == [
        f"net.{i}.{k}" for i in (1, 3, 5) for k in ("weight", "bias")
    ]
    assert next(iter(MNIST1DCNN().state_dict())) == "conv1.weight"
    with pytest.raises(ValueError, match=r"depth=21 is not 6n \+ 2"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match=r"dim=30 is not a multiple of heads=4"):
        CharTransformer(10, dim=30)


# --- cost of a cyclic schedule -------------------------------------------------------------


def _mlp_gm(config: dpc_fx.DPCConfig) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(),
        nn.Linear(8, 2),
    )  # fmt: skip
    return dpc_fx.compile(model, torch.randn(4, 8), config=config)


def test_scheduled_saving_matches_a_step_by_step_count(rp: ModuleType) -> None:
    gm = _mlp_gm(dpc_fx.DPCConfig())
    schedule = dpc_fx.CyclicSchedule(gm, low=3, high=8, period=7)
    c = dpc_fx.cost(gm)
    steps, total = 30, 0
    for t in range(steps):
        widths = iter(schedule.bits(t))
        for r in c.layers:
            bits = r.bits if r.bits.full_precision else Bits(*(next(widths),) * 2, r.bits.g)
            total += sum(bitops(r.macs, bits))
    fp32, eight = rp.scheduled_saving(gm, schedule, steps)
    assert fp32 == pytest.approx(1 - total / steps / c.fp32)
    assert eight == pytest.approx(1 - total / steps / c.static8)


def test_scheduled_saving_of_a_flat_schedule_is_the_plans(rp: ModuleType) -> None:
    gm = _mlp_gm(rp.UNIFORM8)
    schedule = dpc_fx.CyclicSchedule(gm, low=8, high=8, period=5)
    assert rp.scheduled_saving(gm, schedule, 12) == pytest.approx(
        (dpc_fx.cost(gm).saving_vs_fp32, 0.0)
    )


# --- runs on a synthetic task ----------------------------------------------------------------


def _toy(rp: ModuleType, seen_bits: list[list[int | None]]) -> tuple[object, object]:
    """A 3-class problem on 8 features, and a workload of a 4-layer MLP on it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x[:, :3].argmax(1)

    def batches(generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            idx = torch.randperm(64, generator=generator)[:16]
            yield x[idx], y[idx]

    def evaluate(model: nn.Module) -> float:
        seen_bits.append([q.bits for q in model.modules() if isinstance(q, Quantizer)])
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8),
            nn.ReLU(), nn.Linear(8, 3),
        )  # fmt: skip

    task = rp.Task(x[:2], batches, nn.functional.cross_entropy, evaluate)
    workload = rp.Workload("toy", "toy", "accuracy", 10, build, None, rp._adam(1e-2), "Adam")
    return workload, task


def test_cyclic_runs_are_evaluated_at_the_plans_bits(rp: ModuleType) -> None:
    seen: list[list[int | None]] = []
    workload, task = _toy(rp, seen)
    steps: list[int] = []
    run = rp.run_one(
        workload, task, rp.METHODS["cpt"], 0, 10, torch.device("cpu"), lambda s, _: steps.append(s)
    )
    assert steps == list(range(1, 11)) and run.metric is not None
    assert set(seen[-1]) == {8}  # CPT tests at 8 bits, not where the cycle ended
    assert run.saving_8bit == 0.0 and 0 < run.avg_saving_8bit < 1
    run = rp.run_one(workload, task, rp.METHODS["dpc+cpt"], 0, 10, torch.device("cpu"))
    assert set(seen[-1]) == {5, 8}  # the DPC plan's own bits


def test_runs_are_reproducible_and_methods_share_seeds(rp: ModuleType) -> None:
    workload, task = _toy(rp, [])
    a = rp.run_one(workload, task, rp.METHODS["dpc"], 3, 10, torch.device("cpu"))
    b = rp.run_one(workload, task, rp.METHODS["dpc"], 3, 10, torch.device("cpu"))
    assert (a.metric, a.train_loss) == (b.metric, b.train_loss)
    assert a.plan == {"0": "fp/fp/fp", "2": "5/5/8", "4": "8/8/8", "6": "fp/fp/fp"}
    assert a.sizes["2"] == [32 * 16 + 16, 32 * 16 * 2]


def test_an_unreachable_budget_is_reported_not_raised(rp: ModuleType) -> None:
    _, task = _toy(rp, [])
    # One linear layer at k >= 3 bits (8-bit gradients) saves 1 - (k*k + 16k) / 192 of static
    # 8-bit's bit-operations: 31.25% at 6 bits, 16.1% at 7, so 30% +- 1 point is out of reach.
    workload = rp.Workload(
        "toy", "toy", "accuracy", 10, lambda: nn.Linear(8, 3), None, rp._adam(1e-2), "Adam"
    )
    run = rp.run_one(workload, task, rp.METHODS["dpc30"], 0, 10, torch.device("cpu"))
    assert run.metric is None and "out of reach" in run.error
    rows = rp.table_rows([run])
    assert rows[0][2] == "n/a"


# --- tables, headline, page -----------------------------------------------------------------


def _runs(rp: ModuleType, workload: str, values: dict[str, list[float]]) -> list[object]:
    kind = "perplexity" if workload == "charlm" else "accuracy"
    return [
        rp.Run(workload, method, seed, 100, kind, metric=v, train_loss=0.1, seconds=2.0,
               saving_fp32=0.8, saving_8bit=0.2, avg_saving_fp32=0.8, avg_saving_8bit=0.2)
        for method, vs in values.items()
        for seed, v in enumerate(vs)
    ]  # fmt: skip


def test_table_rows_show_mean_std_and_delta(rp: ModuleType) -> None:
    runs = _runs(rp, "mnist1d-cnn", {"fp32": [0.90, 0.92, 0.94], "dpc": [0.93, 0.93, 0.93]})
    rows = rp.table_rows(runs)
    assert rows[0][:4] == ["mnist1d-cnn", "fp32", "92.00 ± 2.00", "-"]
    assert rows[1][:6] == ["mnist1d-cnn", "DPC", "93.00 ± 0.00", "+1.00 pt", "80.0%", "20.0%"]
    assert rows[1][-1] == "3"
    assert "| mnist1d-cnn | DPC | 93.00 ± 0.00 | +1.00 pt |" in rp.markdown_table(runs)


def test_headline_verdicts(rp: ModuleType) -> None:
    acc = _runs(rp, "mnist1d-mlp", {"fp32": [0.70, 0.72], "dpc": [0.70, 0.71]})
    ppl = _runs(rp, "charlm", {"fp32": [5.0, 5.0], "dpc": [5.2, 5.2]})
    lines = rp.headline(acc + ppl)
    assert "(-0.50 points, within 0.5 points of fp32 or better)" in lines[0]
    assert "(+4.0%, more than 3% above fp32)" in lines[1]


def test_cli_end_to_end_writes_page_plot_and_json(
    rp: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("Hand-written analysis.\n")
    argv = [
        "mnist1d-cnn", "--seeds", "2", "--steps", "3", "--methods", "fp32", "cpt", "dpc",
        "dpc30", "--out", str(tmp_path / "docs" / "RESULTS.md"), "--plot",
        str(tmp_path / "docs" / "results.png"), "--json", str(tmp_path / "runs.json"),
        "--notes", str(notes),
    ]  # fmt: skip
    assert rp.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mnist1d-cnn" in printed and "DPC 30%" in printed
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "`python tools/reproduce.py mnist1d-cnn --seeds 2 --steps 3" in page
    assert "- Machine: " in page and "- Date: " in page
    assert "![test metric against cost saving, error bars over seeds](results.png)" in page
    assert "| mnist1d-cnn | DPC | " in page and " | 2 |" in page
    assert "DPC is a uniform plan at the rule's mid-point" in page  # conv2 and conv3 are twins
    assert "The 30% budget resolved to b_min=" in page
    assert page.rstrip().endswith("Hand-written analysis.")
    assert (tmp_path / "docs" / "results.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "runs.json").read_text())
    assert record["command"].startswith("python tools/reproduce.py mnist1d-cnn")
    assert len(record["runs"]) == 8 and {r["seed"] for r in record["runs"]} == {0, 1}

    # After looking at the results: the same page with notes, without training again.
    notes.write_text("Why DPC lags here.\n")
    rebuilt = tmp_path / "again.md"
    argv = [
        "--from-json",
        str(tmp_path / "runs.json"),
        "--out",
        str(rebuilt),
        "--notes",
        str(notes),
    ]
    assert rp.main(argv) == 0
    again = rebuilt.read_text()
    assert again.split("- Page rebuilt")[0] == page.split("- Machine:")[0]  # same table, command
    assert (
        "- Page rebuilt from its JSON record with `python tools/reproduce.py --from-json" in again
    )
    assert again.rstrip().endswith("Why DPC lags here.")


def _write_tiny_cifar10(root: Path, n: int = 4) -> None:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / name).write_bytes(records.tobytes())


def test_cifar_workload_runs_on_tiny_files(
    rp: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_tiny_cifar10(tmp_path)
    argv = ["cifar10-resnet20", "--root", str(tmp_path), "--steps", "2", "--seeds", "1",
            "--methods", "fp32", "dpc"]  # fmt: skip
    assert rp.main(argv) == 0
    assert "cifar10-resnet20" in capsys.readouterr().out


def test_cli_errors(rp: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        rp.parse_args(["mnist1d-cnnn"])
    with pytest.raises(SystemExit):
        rp.parse_args([])
    args = rp.parse_args(["--data", "cifar100", "--root", str(tmp_path)])
    assert args.workloads == [
        "cifar100-resnet20", "cifar100-resnet38", "cifar100-resnet74", "cifar100-mobilenetv2"
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"cifar10 needs --root DIR: the folder holding"):
        rp.WORKLOADS["cifar10-resnet20"].task(rp.parse_args(["cifar10-resnet20"]), "cpu")
    assert rp.main(["cifar10-resnet20", "--root", str(tmp_path), "--steps", "1"]) == 2
    assert "reproduce: error: cifar: no cifar10 data under" in capsys.readouterr().err


# --- examples ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "argv", "expect"),
    [
        ("compile_and_train.py", [], "held-out accuracy"),
        ("inspect_plan.py", [], "re-applied"),
        ("mnist1d_experiment.py", ["--steps", "3"], "static 8-bit"),
    ],
)
def test_examples_run(
    script: str,
    argv: list[str],
    expect: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = ROOT / "examples" / script
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the suite's setting
    runpy.run_path(str(path), run_name="__main__")
    assert expect in capsys.readouterr().out
