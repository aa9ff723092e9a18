"""The README's Python examples run as written (STYLE §9: docs that run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBPRESS_CACHE", str(tmp_path))
    namespace: dict = {}
    # blocks build on each other, as a reader runs them in order
    for block in BLOCKS[: i + 1]:
        exec(compile(block, f"README.md block {i}", "exec"), namespace)
