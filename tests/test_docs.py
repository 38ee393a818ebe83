"""The examples in docstrings (the library's and the experiments') and in the README run and
print what they claim."""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib
import io
import pkgutil
import re
import tokenize
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


def _statements(block: str) -> list[tuple[ast.Module, str | None]]:
    """The top-level statements of a README block, each with the output the README shows
    for it: the comment after a ``print(...)`` call, or ``None``."""
    comments = {
        tok.start[0]: tok.string.removeprefix("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(block).readline)
        if tok.type == tokenize.COMMENT
    }
    out = []
    for stmt in ast.parse(block).body:
        is_print = (
            isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name)
            and stmt.value.func.id == "print"
        )
        shown = comments.get(stmt.end_lineno or stmt.lineno) if is_print else None
        out.append((ast.Module([stmt], type_ignores=[]), shown))
    return out


def test_readme_blocks_print_what_the_readme_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every README python block runs; where a ``print`` has a comment showing its output
    (``...`` standing for any text, as in doctests), that is what it prints."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python examples"
    monkeypatch.chdir(tmp_path)  # examples may write files
    namespace: dict[str, object] = {}
    checker = doctest.OutputChecker()
    checked = []
    for block in blocks:
        for module, shown in _statements(block):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(module, str(README), "exec"), namespace)
            if shown is not None:
                got = printed.getvalue()
                assert checker.check_output(shown + "\n", got, doctest.ELLIPSIS), (
                    f"README line {ast.unparse(module)!r} prints {got!r}, the README shows {shown!r}"
                )
                checked.append(shown)
    assert len(checked) >= 2, f"README shows the output of only {checked}"
