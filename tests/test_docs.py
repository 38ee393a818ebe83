"""The examples in docstrings (the library's and the experiments') and in the README run and
print what they claim."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import dpc_fx
import dpc_fx.passes
import experiments

MODULES = sorted(
    {f"dpc_fx.{m.name}" for m in pkgutil.iter_modules(dpc_fx.__path__)}
    | {f"dpc_fx.passes.{m.name}" for m in pkgutil.iter_modules(dpc_fx.passes.__path__)}
    | {f"experiments.{m.name}" for m in pkgutil.iter_modules(experiments.__path__)}
    | {"dpc_fx", "dpc_fx.passes", "experiments"}
)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python examples"
    monkeypatch.chdir(tmp_path)  # examples may write files
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
