"""The dpc-fx command line, run in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import dpc_fx
from dpc_fx.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_resnet18_prints_all_21_layers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", "resnet18", "--input", "1,3,32,32")
    assert code == 0
    rows = [line for line in out.splitlines() if "Conv2d" in line or "Linear" in line]
    assert len(rows) == 21
    assert "layer4.1.conv2" in out and "fc (pinned)" in out
    assert "fewer than static 8-bit" in out


def test_inspect_json_budget_and_saved_plan(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan_path = tmp_path / "plan.json"
    code, out, _ = run(
        capsys,
        "inspect",
        "resnet18",
        "--input",
        "1,3,32,32",
        "--num-classes",
        "10",
        "--budget",
        "0.25",
        "--json",
        "--save-plan",
        str(plan_path),
    )
    assert code == 0
    data = json.loads(out)
    assert len(data["layers"]) == 21
    assert data["cost"]["saving_vs_8bit"] == pytest.approx(0.25, abs=0.01)
    plan = dpc_fx.Plan.load(plan_path)
    assert plan.fingerprint == data["fingerprint"]

    code, out, _ = run(
        capsys,
        "inspect",
        "resnet18",
        "--input",
        "1,3,32,32",
        "--num-classes",
        "10",
        "--plan",
        str(plan_path),
        "--json",
    )
    assert json.loads(out)["cost"] == data["cost"]


def test_inspect_config_file_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"b_min": 3, "b_max": 6, "overrides": [["fc", 8]]}))
    png = tmp_path / "plan.png"
    code, out, _ = run(
        capsys,
        "inspect",
        "resnet18",
        "--input",
        "1,3,32,32",
        "--config",
        str(config),
        "--json",
        "--plot",
        str(png),
    )
    assert code == 0
    bits = {row["layer"]: row["bits"] for row in json.loads(out)["layers"]}
    assert bits["fc"] == {"w": 8, "a": 8, "g": 8}
    assert max(b["w"] for b in bits.values() if b["w"]) <= 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_callable_models(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", "experiments.models:MNIST1DCNN", "--input", "2,1,40")
    assert code == 0 and "conv2" in out


def test_the_demo_is_not_a_command_of_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo lives in the repository's experiments (`make demo`); the help says where."""
    with pytest.raises(SystemExit) as exc:
        main(["demo"])
    assert exc.value.code == 2
    assert "invalid choice: 'demo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "make demo" in capsys.readouterr().out


def test_a_model_from_a_package_in_the_current_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the README shows it: `dpc-fx inspect mypackage.models:build` run where mypackage is
    (the installed command, unlike `python -m`, does not put that folder on the path)."""
    package = tmp_path / "dpc_cli_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64),"
        " nn.ReLU(), nn.Linear(64, 4))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "dpc_cli_test_pkg", raising=False)
    code, out, _ = run(
        capsys, "inspect", "dpc_cli_test_pkg.models:build", "--input", "4,128", "--json"
    )
    assert code == 0
    assert json.loads(out)["model"] == "Sequential"
    for name in ("dpc_cli_test_pkg", "dpc_cli_test_pkg.models"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["inspect", "resnet1", "--input", "1,3,32,32"],
            "not a torchvision model name.*Did you mean",
        ),
        (["inspect", "resnet18", "--input", "one"], "is not a shape; write it as e.g. 1,3,32,32"),
        (["inspect", "resnet18", "--input", "1,3"], "node 'conv1'.*failed on inputs"),
        (
            ["inspect", "no_such_module:f", "--input", "1"],
            "cannot import 'f' from 'no_such_module'",
        ),
        (
            ["inspect", "resnet18", "--input", "1,3,32,32", "--b-min", "9"],
            "b_min=9 is greater than b_max=8",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("dpc-fx: error: ")
    assert __import__("re").search(message, err), err
