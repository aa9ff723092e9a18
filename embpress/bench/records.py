"""Results records: one JSON object per trial, one per line, appended atomically to ``results.jsonl``.

Reports are rendered from the records alone, and an interrupted run resumes by skipping the
trials whose key is already recorded.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    """Numpy scalars to Python; NaN and inf to None (JSON has neither)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as a single line with one ``write`` on an ``O_APPEND`` descriptor.

    The line is written whole or, if the process dies mid-write, left as a truncated last line
    that :func:`read_records` skips with a warning; earlier records are never touched.
    """
    line = json.dumps(_jsonable(record), sort_keys=True, allow_nan=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        # A previous crash may have left a last line without its newline: start on a fresh line.
        if os.fstat(fd).st_size > 0:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a ``results.jsonl``; a missing file gives ``[]``.

    A line that is not valid JSON can only come from an append that was interrupted (records
    are written whole, and the next append starts a fresh line): it is skipped with a warning
    naming the file and line. A valid JSON line that is not an object raises ``ValueError``.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            warnings.warn(f"{path}:{i}: skipping truncated record ({e.msg})", stacklevel=2)
            continue
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: a record must be a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def record_key(record: dict[str, Any], keys: Sequence[str]) -> tuple:
    """The identity of a trial: the values of ``keys`` (missing keys count as None)."""
    return tuple(json.dumps(_jsonable(record.get(k)), sort_keys=True) for k in keys)


def recorded_keys(records: Iterable[dict[str, Any]], keys: Sequence[str]) -> set[tuple]:
    return {record_key(r, keys) for r in records}


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """What produced a record: embpress version, git sha (when in a checkout), library versions."""
    import numpy
    import torch

    from embpress import __version__

    sha = None
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=False)
        if out.returncode == 0:
            sha = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "embpress_version": __version__,
        "git_sha": sha,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
