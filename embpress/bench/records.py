"""Results records: one JSON object per trial, one per line, appended atomically to ``results.jsonl``.

ONE layout for every benchmark (CTR tables, retrieval vectors, the LIMIT probe)::

    {"layout": 1, "kind": "ctr" | "vectors" | "limit", "trial": "<16 hex>", "config": {...},
     "status": "ok" | "unreachable" | "failed", "reason": str | null, "metrics": {...},
     "provenance": {"embpress_version", "git_sha", "python", "torch", "numpy", "time"}, "check": "<16 hex>"}

``config`` is the trial's identity: every setting that can change its result, including content
fingerprints of the input data. ``trial`` is a hash of ``config`` alone, so resume skips a trial only
when the whole configuration matches, and a report groups by it (never by a subset of it).
``check`` is a hash of the rest of the line: a record edited or damaged after it was written is
refused with its file and line, like a line that is not an embpress record at all.

Reports are rendered from the records alone, and an interrupted run resumes by skipping the
trials already recorded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

LAYOUT = 1
"""Version of the record layout; bump when a field changes meaning."""

KINDS = ("ctr", "vectors", "limit")
STATUSES = ("ok", "unreachable", "failed")
RESULTS = "results.jsonl"
_FIELDS = ("layout", "kind", "trial", "config", "status", "reason", "metrics", "provenance", "check")
_PRODUCERS = {"ctr": "embpress bench", "vectors": "embpress vectors eval", "limit": "embpress limit probe"}


class RecordError(ValueError):
    """A results file holds something that is not an intact embpress record of the expected kind.

    The message names the file and line (``path:line: what``) and the fix.
    """


def _jsonable(value: Any) -> Any:
    """Numpy scalars and arrays to Python; NaN and inf to None (JSON has neither); tuples to lists."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value``: sorted keys, no spaces, numpy scalars as Python, NaN as null.

    >>> canonical_json({"b": (1, 2.0), "a": float("nan")})
    '{"a":null,"b":[1,2.0]}'
    """
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint(value: Any) -> str:
    """sha256 (hex) of :func:`canonical_json` of ``value``.

    >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1}) != fingerprint({"a": 2, "b": 2})
    True
    """
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def array_fingerprint(x: np.ndarray, *, block_rows: int = 1 << 16) -> str:
    """sha256 (hex) of an array's dtype, shape and bytes (C order), read in row blocks (memmaps too).

    >>> a = np.arange(6, dtype="float32").reshape(3, 2)
    >>> array_fingerprint(a) == array_fingerprint(a.copy()) != array_fingerprint(a.reshape(2, 3))
    True
    """
    x = np.asarray(x)
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    if x.ndim == 0:
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        for start in range(0, x.shape[0], block_rows):
            h.update(np.ascontiguousarray(x[start:start + block_rows]).tobytes())
    return h.hexdigest()


def trial_id(config: Mapping[str, Any]) -> str:
    """The identity of a trial: 16 hex digits of the fingerprint of its whole ``config``."""
    return fingerprint(config)[:16]


def _check(record: Mapping[str, Any]) -> str:
    return fingerprint({k: v for k, v in record.items() if k != "check"})[:16]


@lru_cache(maxsize=1)
def _static_provenance() -> dict[str, Any]:
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
    return {"embpress_version": __version__, "git_sha": sha, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__}


def provenance() -> dict[str, Any]:
    """What produced a record and when: embpress version, git sha (in a checkout), library versions, time."""
    return {**_static_provenance(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def make_record(kind: str, config: Mapping[str, Any], *, status: str, metrics: Mapping[str, Any] | None = None,
                reason: str | None = None) -> dict[str, Any]:
    """A complete record of the one layout (see the module docstring), checksum included.

    Raises:
        ValueError: unknown ``kind`` or ``status``, or a ``config``/``metrics`` that JSON cannot hold.

    >>> r = make_record("ctr", {"method": "hash", "seed": 0}, status="ok", metrics={"auc": 0.71})
    >>> r["kind"], r["trial"] == trial_id({"seed": 0, "method": "hash"}), r["metrics"]
    ('ctr', True, {'auc': 0.71})
    """
    if kind not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
    if status not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, got {status!r}")
    try:
        config = json.loads(canonical_json(config))
        metrics = json.loads(canonical_json(metrics or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"a record's config and metrics must be JSON values: {e}") from None
    rec = {"layout": LAYOUT, "kind": kind, "trial": trial_id(config), "config": config, "status": status,
           "reason": reason, "metrics": metrics, "provenance": provenance()}
    rec["check"] = _check(rec)
    return rec


def _drop_torn_tail(fd: int, path: Path) -> None:
    """A last line without its newline is an append that was killed mid-write: cut it off."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        pos, tail = size, b""
        while pos > 0 and b"\n" not in tail:
            step = min(pos, 1 << 16)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
    keep = pos + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
    warnings.warn(f"{path}: dropping a torn last line of {size - keep} bytes (an append that was interrupted)",
                  stacklevel=3)
    os.ftruncate(fd, keep)


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record (from :func:`make_record`) as a single line with one ``write`` on an ``O_APPEND``
    descriptor, then fsync.

    The line is written whole or, if the process dies mid-write, left as a torn last line without
    its newline, which :func:`read_records` skips and the next append cuts off; earlier records are
    never touched.
    """
    if record.get("check") != _check(record):
        raise ValueError("append_record takes records built by make_record (the check field does not match)")
    line = json.dumps(_jsonable(dict(record)), sort_keys=True, allow_nan=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _drop_torn_tail(fd, path)
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _validate(rec: Any, where: str, kind: str | None) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(rec).__name__}; "
                          "remove the line or move the file out of the run folder")
    if "layout" not in rec or "check" not in rec:
        raise RecordError(f"{where}: not an embpress record of layout {LAYOUT} (no 'layout' or 'check' field): "
                          "written by an older embpress or another tool; move it out of the run folder "
                          "or use a new --out folder")
    if rec["layout"] != LAYOUT:
        raise RecordError(f"{where}: record layout {rec['layout']!r}, this embpress reads layout {LAYOUT}; "
                          "use a new --out folder")
    missing = [f for f in _FIELDS if f not in rec]
    extra = sorted(set(rec) - set(_FIELDS))
    if missing or extra:
        raise RecordError(f"{where}: record fields differ from layout {LAYOUT}: missing {missing}, unknown {extra}")
    if rec["check"] != _check(rec):
        raise RecordError(f"{where}: record checksum mismatch: the line was edited or damaged after it was "
                          "written; restore it, or delete the line and re-run to measure the trial again")
    if rec["kind"] not in KINDS or rec["status"] not in STATUSES or not isinstance(rec["config"], dict) \
            or not isinstance(rec["metrics"], dict) or rec["trial"] != trial_id(rec["config"]):
        raise RecordError(f"{where}: inconsistent record (kind {rec['kind']!r}, status {rec['status']!r}, "
                          "trial id or config); delete the line and re-run")
    if kind is not None and rec["kind"] != kind:
        raise RecordError(f"{where}: this run folder holds {rec['kind']} records (from "
                          f"`{_PRODUCERS[rec['kind']]}`), not {kind} records; give `{_PRODUCERS[kind]}` and its "
                          "report another folder")
    return rec


def read_records(path: str | os.PathLike, *, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a ``results.jsonl``, validated; a missing file gives ``[]``.

    A torn last line (no newline at the end of the file, not valid JSON) can only come from an
    append that was killed: it is skipped with a warning. Anything else that is not an intact
    record of layout :data:`LAYOUT` (and of ``kind``, when given) raises :class:`RecordError`
    naming ``path:line``.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise RecordError(f"{path} is not a file")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if i == len(lines):  # the file does not end with a newline: a killed append
                warnings.warn(f"{where}: skipping a torn last line (an append that was interrupted)", stacklevel=2)
                continue
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise RecordError(f"{where}: not a JSON record ({msg}); the file was edited or damaged: "
                              "restore the line or delete it") from None
        records.append(_validate(rec, where, kind))
    return records


def open_run(out: str | os.PathLike, kind: str) -> tuple[Path, list[dict[str, Any]]]:
    """The ``results.jsonl`` of run folder ``out`` and its records of ``kind``, checked before any work.

    Raises:
        NotADirectoryError: ``out`` is a file.
        RecordError: records of the other kind, damaged or foreign records (file:line).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder (it will hold {RESULTS}, report.md, "
                                 "pareto.png)")
    path = out / RESULTS
    return path, read_records(path, kind=kind)


def run_kind(out: str | os.PathLike) -> str | None:
    """The kind of the records in run folder ``out`` (None when it holds none), every line checked.

    Raises:
        RecordError: damaged or foreign records, or records of more than one kind (file:line).
    """
    path = Path(out) / RESULTS
    recs = read_records(path)
    if not recs:
        return None
    first = recs[0]["kind"]
    for i, r in enumerate(recs):
        if r["kind"] != first:
            raise RecordError(f"{path}: holds {first} and {r['kind']} records (record {i + 1}); one run folder "
                              "holds one kind: move one set to another folder")
    return first


def latest_per_trial(records: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """One record per trial: the last ok or unreachable one, else the last failed one; and how many
    records were set aside (repeats of a trial, failures a later record superseded).

    >>> a = make_record("ctr", {"seed": 0}, status="failed", reason="boom")
    >>> b = make_record("ctr", {"seed": 0}, status="ok", metrics={"auc": 0.7})
    >>> recs, dropped = latest_per_trial([a, b, b])
    >>> [r["status"] for r in recs], dropped
    (['ok'], 2)
    """
    best: dict[str, dict[str, Any]] = {}
    n = 0
    for r in records:
        n += 1
        cur = best.get(r["trial"])
        if cur is None or r["status"] != "failed" or cur["status"] == "failed":
            best[r["trial"]] = dict(r)
    return list(best.values()), n - len(best)
