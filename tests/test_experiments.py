"""The experiments package: kept out of the installed library, and its demo runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from experiments import demo

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_does_not_ship_the_experiments(tmp_path: Path) -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not [p for p in packages["packages"] if p.split(".")[0] == "experiments"]
    # A fresh interpreter outside the repository sees what an installed dpc_fx holds.
    probe = (
        "import importlib.util, pkgutil, sys, dpc_fx, dpc_fx.cli\n"
        "print(sorted(m.name for m in pkgutil.iter_modules(dpc_fx.__path__)))\n"
        "print(importlib.util.find_spec('experiments'))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'mnist1d', 'sklearn'}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules, spec, loaded = done.stdout.splitlines()
    assert "cli" in modules and "demo" not in modules and "data" not in modules, modules
    assert spec == "None"  # not importable outside the repository
    assert loaded == "[]"  # nor are the experiments' data dependencies loaded


def test_demo_prints_the_plan_and_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--steps", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "ResNet-18 (1, 3, 32, 32): DPC plan" in out
    assert "layer4.1.conv2" in out
    _, _, table = out.partition("MNIST-1D test accuracy after 3 steps (seed 1)")
    rows = [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in table.splitlines()
        if line.startswith("│")
    ]
    assert [row[0] for row in rows] == ["fp32", "DPC"]
    assert all(0 <= float(row[1].rstrip("%")) <= 100 for row in rows)
    assert rows[0][2] == "-" and 0 < float(rows[1][2].rstrip("%")) < 100  # bit-ops saved


def test_demo_rejects_a_step_count_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--steps", "0"])
    assert exc.value.code == 2
    assert "--steps 0: train for at least one step" in capsys.readouterr().err
