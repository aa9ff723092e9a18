"""The LIMIT probe's figure: critical n against dimension, measured (float32 and through codecs) beside the
paper's cubic fit. Rendered from the probe's records alone (``probe.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from embpress.atomic import atomic_open
from embpress.limit.probe import paper_critical_n


def plot_probe(records: str | os.PathLike, png: str | os.PathLike, *, checks: str | os.PathLike | None = None) -> Path:
    """Draw ``probe.json`` (a list of runs: d, k, codec, critical_n) to ``png``; returns its path.

    ``checks``: a ``checks.json`` of single-n checks (``--at``); each success is drawn as a lower bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(Path(records).read_text())
    if not runs:
        raise ValueError(f"{records}: no probe runs to plot")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    dims = sorted({r["d"] for r in runs})
    if checks is not None:
        dims = sorted(set(dims) | {c["d"] for c in json.loads(Path(checks).read_text())})
    grid = np.geomspace(max(2, min(dims) / 1.5), max(dims) * 1.5, 100)
    ax.plot(grid, [paper_critical_n(d) for d in grid], "k--", lw=1,
            label="paper fit: -10.53 + 4.03d + 0.052d² + 0.0037d³")
    ax.fill_between(grid, [0.75 * paper_critical_n(d) for d in grid], [1.25 * paper_critical_n(d) for d in grid],
                    color="0.85", label="fit ± 25 %")
    markers = {"float32": "o", "sq8": "s", "sq4": "D", "bin": "v"}
    for codec in dict.fromkeys(r["codec"] for r in runs):
        pts = sorted((r["d"], r["critical_n"]) for r in runs if r["codec"] == codec)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(codec.split("x")[0], "^"),
                ls="-" if codec == "float32" else ":", label=f"measured, docs {codec}")
    if checks is not None:
        ok = [c for c in json.loads(Path(checks).read_text()) if c["success"] and c["codec"] == "float32"]
        if ok:
            ax.plot([c["d"] for c in ok], [c["n"] for c in ok], "k^", mfc="none", ms=8,
                    label="float32 succeeds at this n (lower bound, no search)")
            dims = sorted(set(dims) | {c["d"] for c in ok})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dimension d")
    ax.set_ylabel("critical n (every pair a top-2)")
    ax.set_title(f"LIMIT free-embedding probe, k={runs[0]['k']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(png, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    return Path(png)
