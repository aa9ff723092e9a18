"""What both reports (CTR and retrieval) share: grouping records by their whole configuration,
naming the settings that differ, Pareto fronts, markdown tables, and writing the report files.

A report is rendered from the records alone (``results.jsonl``), never by re-running anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from embpress.atomic import atomic_write_bytes, atomic_write_text
from embpress.bench.records import RESULTS, canonical_json, fingerprint, open_run


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted names.

    >>> flatten({"dim": 4, "train": {"lr": 0.1, "patience": 2}})
    {'dim': 4, 'train.lr': 0.1, 'train.patience': 2}
    """
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def without(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``config`` less the top-level ``keys``."""
    drop = set(keys)
    return {k: v for k, v in config.items() if k not in drop}


def settings_key(config: Mapping[str, Any]) -> str:
    """A hashable key of a whole configuration (canonical JSON)."""
    return canonical_json(config)


def varying(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted names of the settings whose values differ between ``configs`` (absent counts as a value).

    >>> varying([{"dim": 4, "lr": 0.1}, {"dim": 16, "lr": 0.1}, {"dim": 16, "lr": 0.1, "x": 1}])
    ['dim', 'x']
    """
    flat = [flatten(c) for c in configs]
    names = sorted({k for f in flat for k in f})
    missing = object()
    return [k for k in names if len({canonical_json(f.get(k)) if k in f else id(missing) for f in flat}) > 1]


def label(config: Mapping[str, Any], names: Sequence[str]) -> str:
    """``"dim=4, train.lr=0.1"``: the values of ``names`` (dotted, or top-level) in ``config``, or ``""``.

    A nested group given by its top-level name (``data``) shows as ``#`` and 8 hex digits of its
    fingerprint; other long values are cut to 12 characters.

    >>> label({"dim": 4, "data": {"sha": "ab"}, "train": {"lr": 0.1}}, ["dim", "train.lr", "data"])
    'dim=4, train.lr=0.1, data=#12021ba2'
    """
    flat = flatten(config)
    parts = []
    for k in names:
        if k in flat:
            v = flat[k]
            text = v if isinstance(v, str) else canonical_json(v)
            text = text[:12] + "…" if len(text) > 13 else text
        elif isinstance(config.get(k), Mapping):
            text = "#" + fingerprint(config[k])[:8]
        else:
            text = "absent"
        parts.append(f"{k}={text}")
    return ", ".join(parts)


def group_by_settings(records: Iterable[Mapping[str, Any]], *, ignore: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by their whole ``config`` less the top-level ``ignore`` keys, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(settings_key(without(r["config"], ignore)), []).append(dict(r))
    return groups


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point beats: fewer or equal bytes (x) and higher or equal quality
    (y), strictly better in one. Points with a NaN or None are never on the front.

    >>> sorted(pareto_front([(10, 0.7), (20, 0.8), (30, 0.75), (5, 0.6), (20, 0.8)]))
    [0, 1, 3, 4]
    """
    ok = [i for i, (x, y) in enumerate(points)
          if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    front = set()
    for i in ok:
        xi, yi = points[i]
        if not any(points[j][0] <= xi and points[j][1] >= yi and points[j] != points[i] for j in ok):
            front.add(i)
    return front


def md_table(header: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table: ``align`` has one character per column, ``l`` or ``r``.

    >>> md_table(["a", "b"], "lr", [["x", 1]])
    ['| a | b |', '|---|---:|', '| x | 1 |']
    """
    if len(align) != len(header):
        raise ValueError(f"md_table: {len(header)} columns but align {align!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def set_aside_note(dropped: int) -> list[str]:
    """The report line saying how many records :func:`latest_per_trial` set aside, or nothing."""
    if not dropped:
        return []
    return [f"{dropped} record(s) set aside: repeats of a recorded trial (the latest counts, once) or failures "
            "that a later run of the same trial completed.", ""]



def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """A finished matplotlib figure as PNG bytes (laid out, then closed)."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()

def write_report_files(out: str | os.PathLike, kind: str, *, render_markdown: Callable[[list[dict]], str],
                       render_png: Callable[[list[dict]], bytes], producer: str,
                       png_name: str = "pareto.png") -> tuple[Path, Path]:
    """Write ``report.md`` and ``png_name`` into ``out`` (atomically) from its ``results.jsonl``.

    Raises:
        FileNotFoundError: no results file (the message says which command writes one).
        RecordError: a damaged or foreign record, or records of the other kind (file:line).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a run folder (a folder holding {RESULTS})")
    if not (out / RESULTS).is_file():
        raise FileNotFoundError(f"{out / RESULTS} not found: run `{producer} --out {out}` first")
    _, records = open_run(out, kind)
    md, png = out / "report.md", out / png_name
    atomic_write_text(md, render_markdown(records))
    atomic_write_bytes(png, render_png(records))
    return md, png

