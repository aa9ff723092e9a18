"""The layering DESIGN.md promises: tables and vectors never import the benchmark or the CLI, and the
retrieval side holds no benchmark or report code (one benchmark layer, in embpress/bench)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "embpress"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", ["tables", "vectors"])
def test_lower_layers_do_not_import_bench_or_cli(layer):
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p)
                                                     if m.startswith(("embpress.bench", "embpress.cli")))
                 for p in sorted((PACKAGE / layer).rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_retrieval_package_holds_no_benchmark_report_or_cli():
    assert not {"bench.py", "report.py", "cli.py"} & {p.name for p in (PACKAGE / "vectors").iterdir()}
