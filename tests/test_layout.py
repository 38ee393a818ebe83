"""The package's imports run one way: leaves <- passes <- driver, leaves <- readers <- driver.

* leaves (records, config, errors, the quantisers and their kernels) import only leaves;
* passes import leaves and other passes, never the policy, plans, cost, reports or the
  driver;
* the policy and the readers of compiled modules (plan, cost, report, schedule, export,
  distributed) import leaves and each other, never a pass: they read compiled modules
  through :mod:`dpc_fx.meta`;
* the driver (compiler, parts, probe, assemble, coverage) composes all of them; the CLI and ``__init__`` sit
  on top.

Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LEAVES = {
    "errors",
    "config",
    "meta",
    "inputs",
    "kernels",
    "native",
    "quant",
    "int8",
    "fused",
    "sdpa",
    "sizes",
}
READERS = {"policy", "plan", "cost", "report", "schedule", "export", "distributed"}
DRIVER = {"compiler", "parts", "probe", "assemble", "coverage"}
TOP = {"__init__", "cli"}


def _modules() -> dict[str, Path]:
    found = {f"dpc_fx.{p.stem}": p for p in (ROOT / "dpc_fx").glob("*.py")}
    found |= {f"dpc_fx.passes.{p.stem}": p for p in (ROOT / "passes").glob("*.py")}
    return found


def _imports(path: Path) -> set[str]:
    """The dpc_fx modules a file imports (``from dpc_fx import x`` counts as dpc_fx.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dpc_fx")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpc_fx"):
            assert node.module is not None
            names = {f"{node.module}.{a.name}" for a in node.names}
            out |= {n for n in names if n in _modules()} or {node.module}
    return out


def _kind(module: str) -> str:
    if module.startswith("dpc_fx.passes"):
        return "passes"
    name = "__init__" if module == "dpc_fx" else module.removeprefix("dpc_fx.")
    for kind, members in (("leaves", LEAVES), ("readers", READERS), ("driver", DRIVER)):
        if name in members:
            return kind
    assert name in TOP, f"dpc_fx.{name} is in no layer of tests/test_layout.py; add it to one"
    return "top"


ALLOWED = {
    "leaves": {"leaves"},
    "passes": {"leaves", "passes"},
    "readers": {"leaves", "readers"},
    "driver": {"leaves", "passes", "readers", "driver"},
    "top": {"leaves", "passes", "readers", "driver", "top"},
}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_one_way(module: str) -> None:
    kind = _kind(module)
    wrong = sorted(m for m in _imports(_modules()[module]) if _kind(m) not in ALLOWED[kind])
    assert not wrong, f"{module} ({kind}) imports {wrong}, against the layering"


def test_the_check_sees_a_wrong_way_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dpc_fx.plan import Plan\n")
    assert _imports(bad) == {"dpc_fx.plan"} and "readers" not in ALLOWED["passes"]
