"""The LIMIT probe as a recorded benchmark (``embpress limit probe``): one record per optimisation.

A trial is one free-embedding optimisation at one (d, k, n) with the documents stored one way
(``float32``, or through a codec after the float32 fit): its identity is that and every setting that
can change its outcome (seed, learning rate, temperature, iteration cap, patience, the codec re-fit cap,
torch threads). A search (galloping then binary, :func:`embpress.limit.probe.probe`) and a single-n check
(``--at``) measure the same trials, so they share records: a resumed or widened search skips every n
already recorded, as the reference does with its results file. The report (``report.md``,
``probe.png``) is rendered from the records alone: per d and storage the largest n that succeeded and
the smallest larger n that failed; the critical n is exact when they are adjacent, otherwise a bound.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embpress.bench import records
from embpress.bench.render import (
    figure_png,
    group_by_settings,
    label,
    md_table,
    set_aside_note,
    varying,
    write_report_files,
)
from embpress.limit.probe import check_at, codec_check, fit_free_embeddings, paper_critical_n, probe

EXPERIMENT = "limit-free-embedding"
FLOAT = "float32"
_TRIAL_KEYS = ("d", "n", "storage")
"""Within one table, trials differ only in these."""


def _default(fn: Callable, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


def trial_config(*, d: int, k: int, n: int, storage: str, seed: int, max_iters: int, patience: int,
                 threads: int | None) -> dict[str, Any]:
    """The whole configuration (identity) of one probe trial."""
    cfg = {"experiment": EXPERIMENT, "d": d, "k": k, "n": n, "storage": storage, "seed": seed,
           "lr": _default(fit_free_embeddings, "lr"), "temperature": _default(fit_free_embeddings, "temperature"),
           "min_delta": _default(fit_free_embeddings, "min_delta"),
           "eval_every": _default(fit_free_embeddings, "eval_every"), "max_iters": max_iters, "patience": patience,
           "torch_threads": threads}
    if storage != FLOAT:
        cfg["codec_max_iters"] = _default(codec_check, "max_iters")
    return cfg


def run_probe(out: str | os.PathLike, dims: Sequence[int], *, k: int = 2,
              codecs_for: Callable[[int], tuple[str, ...]] = lambda d: (), seed: int = 0, max_iters: int = 100_000,
              patience: int = 1000, threads: int | None = None, start: int | None = None, step: int = 1,
              sweep: bool = False, at: int | None = None,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Search the critical n (or check one n, ``at``) at each of ``dims``, appending a record per new trial to
    ``out/results.jsonl`` and reusing the recorded ones. Returns one summary per (d, storage):
    ``{"d", "storage", "critical_n" (None for a check), "trials"}``."""
    path, recorded = records.open_run(out, "limit")  # a file, or another kind's folder: before any work
    summaries = []
    for d in dims:
        def config(storage: str, n: int, d: int = d) -> dict[str, Any]:
            return trial_config(d=d, k=k, n=n, storage=storage, seed=seed, max_iters=max_iters, patience=patience,
                                threads=threads)

        ids = {}
        for r in recorded:
            if r["status"] == "ok":
                c = r["config"]
                ids[r["trial"]] = ((c["storage"], c["n"]), r["metrics"])
        known = {}
        for key, metrics in ids.values():
            if records.trial_id(config(*key)) in ids:
                known[key] = metrics

        def on_trial(storage: str, n: int, outcome: dict, config=config) -> None:
            rec = records.make_record("limit", config(storage, n), status="ok", metrics=outcome)
            records.append_record(path, rec)
            recorded.append(rec)

        codecs = tuple(codecs_for(d))
        if at is not None:
            for o in check_at(at, d, k=k, codecs=codecs, seed=seed, max_iters=max_iters, patience=patience,
                              known=known, on_trial=on_trial, log=log):
                summaries.append({"d": d, "storage": o["storage"], "critical_n": None, "trials": [o]})
            continue
        for run in probe(d, k=k, codecs=codecs, start=start, step=step, seed=seed, max_iters=max_iters,
                         patience=patience, sweep=sweep, known=known, on_trial=on_trial, log=log):
            summaries.append({"d": d, "storage": run.codec, "critical_n": run.critical_n, "trials": run.trials})
    return summaries


def bounds(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """From the trials of one (d, storage): the largest n that succeeded, the smallest larger n that failed,
    whether they are adjacent (the critical n is then exact), and failures below the largest success.

    >>> t = [{"n": 7, "success": True}, {"n": 9, "success": False}, {"n": 8, "success": True}]
    >>> bounds(t)["critical_n"], bounds(t)["exact"]
    (8, True)
    """
    ok = [t["n"] for t in trials if t["success"]]
    bad = [t["n"] for t in trials if not t["success"]]
    lo = max(ok) if ok else None
    above = [n for n in bad if lo is None or n > lo]
    hi = min(above) if above else None
    return {"critical_n": lo, "first_failure": hi, "exact": lo is not None and hi == lo + 1,
            "failures_below": sum(1 for n in bad if lo is not None and n < lo)}


def _with_float_failures(cells: dict[tuple[int, str], list[dict]], d: int, storage: str) -> list[dict]:
    """The trials of (d, storage); for a codec also float32's failures (stored float documents cannot do better,
    so the search does not measure a codec where float32 failed)."""
    ts = list(cells.get((d, storage), []))
    if storage != FLOAT and ts:
        seen = {t["n"] for t in ts}
        ts += [t for t in cells.get((d, FLOAT), []) if not t["success"] and t["n"] not in seen]
    return ts


def _cell(b: dict[str, Any], capped: int) -> str:
    lo, hi = b["critical_n"], b["first_failure"]
    if lo is None:
        text = f"< {hi}" if hi is not None else "–"
    elif b["exact"]:
        text = str(lo)
    elif hi is None:
        text = f"≥ {lo}"
    else:
        text = f"≥ {lo} (< {hi})"
    notes = []
    if b["failures_below"]:
        notes.append(f"{b['failures_below']} failure(s) below")
    if capped:
        notes.append(f"{capped} capped")
    return text + (f" [{'; '.join(notes)}]" if notes else "")


def _tables(recs: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[tuple[int, str], list[dict]]]]:
    latest, _ = records.latest_per_trial(r for r in recs if r["status"] == "ok")
    out = []
    for group in group_by_settings(latest, ignore=(*_TRIAL_KEYS, "codec_max_iters")).values():
        cells: dict[tuple[int, str], list[dict]] = {}
        for r in group:
            c = r["config"]
            cells.setdefault((c["d"], c["storage"]), []).append({"n": c["n"], **r["metrics"],
                                                                 "max_iters": c["max_iters"]})
        settings = json.loads(records.canonical_json(group[0]["config"]))
        for key in (*_TRIAL_KEYS, "codec_max_iters"):
            settings.pop(key, None)
        out.append((settings, cells))
    return out


def render_markdown(recs: Sequence[dict[str, Any]]) -> str:
    """``report.md``: per group of settings, critical n per d (rows) and storage (columns) against the paper's fit."""
    lines = ["# LIMIT free-embedding probe: critical n per dimension", "",
             "Critical n: the largest corpus whose every k-subset is some query's top-k after optimising free "
             "query and document vectors (google-deepmind/limit `free_embedding_experiment.py`). A cell is the "
             "largest n that succeeded; exact when n + 1 was measured to fail, else a bound (`≥ n (< m)`: n + 1 .. "
             "m − 1 not measured). `capped`: trials that stopped at the iteration cap without success (counted "
             "as failures; a longer run might succeed). Storage other than float32: the float32 documents "
             "stored through the codec, queries re-fit against the decoded documents (a lower bound).", ""]
    if not recs:
        return "\n".join([*lines, "_No records._", ""])
    lines += set_aside_note(records.latest_per_trial(recs)[1])
    tables = _tables(recs)
    differ = varying([s for s, _ in tables])
    for settings, cells in tables:
        title = label(settings, differ)
        lines += [f"## k = {settings['k']}" + (f" ({title})" if title else ""), "",
                  f"seed {settings['seed']}, Adam lr {settings['lr']}, temperature {settings['temperature']}, "
                  f"at most {settings['max_iters']:,} steps, patience {settings['patience']} (min delta "
                  f"{settings['min_delta']}), top-k checked every {settings['eval_every']} steps, torch threads "
                  f"{settings['torch_threads']}.", ""]
        storages = sorted({s for _, s in cells}, key=lambda s: (s != FLOAT, s))
        rows = []
        for d in sorted({d for d, _ in cells}):
            fit = paper_critical_n(d) if settings["k"] == 2 and paper_critical_n(d) >= 1 else math.nan
            row = [str(d), f"{fit:,.1f}" if math.isfinite(fit) else "–"]
            for s in storages:
                ts = _with_float_failures(cells, d, s)
                if not ts:
                    row.append("")
                    continue
                capped = sum(1 for t in ts if not t["success"] and t["iterations"] >= t["max_iters"])
                b = bounds(ts)
                cell = _cell(b, capped)
                if s == FLOAT and b["critical_n"] is not None and math.isfinite(fit):
                    cell += f" ({b['critical_n'] / fit - 1:+.0%})"
                row.append(cell)
            secs = sum(t["seconds"] for s in storages for t in cells.get((d, s), []))
            row += [str(sum(len(cells.get((d, s), [])) for s in storages)), f"{secs:,.0f}"]
            rows.append(row)
        lines += md_table(["d", "paper fit", *storages, "trials", "seconds"], "rr" + "l" * len(storages) + "rr", rows)
        lines.append("")
        lines += ["Trials (n: outcome, top-k accuracy, steps, seconds):", ""]
        for (d, s), ts in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != FLOAT, kv[0][1])):
            parts = [f"{t['n']}: {'ok' if t['success'] else 'fail'} {t['accuracy']:.5f} {t['iterations']} "
                     f"{t['seconds']:.0f}s" for t in sorted(ts, key=lambda t: t["n"])]
            lines.append(f"- d={d} {s}: " + "; ".join(parts))
        prov = group_provenance(recs)
        if prov:
            lines += ["", "Produced by " + prov + "."]
        lines.append("")
    return "\n".join(lines)


def group_provenance(recs: Sequence[dict[str, Any]]) -> str:
    prov = recs[-1].get("provenance") or {}
    return ", ".join(f"{k}={v}" for k, v in sorted(prov.items()) if v and k != "time")


def render_png(recs: Sequence[dict[str, Any]]) -> bytes:
    """``probe.png``: critical n against d (log-log) per storage, bounds as open markers, beside the paper's fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    tables = _tables(recs)
    differ = varying([s for s, _ in tables])
    dims = sorted({d for _, cells in tables for d, _ in cells}) or [4, 32]
    grid = np.geomspace(max(2, min(dims) / 1.5), max(dims) * 1.5, 100)
    ax.plot(grid, [paper_critical_n(d) for d in grid], "k--", lw=1,
            label="paper fit: -10.53 + 4.03d + 0.052d² + 0.0037d³")
    ax.fill_between(grid, [0.75 * paper_critical_n(d) for d in grid], [1.25 * paper_critical_n(d) for d in grid],
                    color="0.88", label="fit ± 25 %")
    markers = {"float32": "o", "sq8": "s", "sq4": "D", "bin": "v"}
    for settings, cells in tables:
        tag = f" ({label(settings, differ)})" if len(tables) > 1 else ""
        for s in sorted({s for _, s in cells}, key=lambda s: (s != FLOAT, s)):
            pts = []
            for d in sorted({d for d, st in cells if st == s}):
                b = bounds(_with_float_failures(cells, d, s))
                if b["critical_n"] is not None:
                    pts.append((d, b["critical_n"], b["exact"]))
            if not pts:
                continue
            m = markers.get(s.split("x")[0], "^")
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="-" if s == FLOAT else ":", marker=None,
                           label=f"docs {s}{tag}")[0]
            ax.scatter([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], marker=m, color=line.get_color())
            ax.scatter([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], marker=m,
                       facecolors="none", edgecolors=line.get_color(), s=60)
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="k", label="open: lower bound (not searched out)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dimension d")
    ax.set_ylabel("critical n (every k-subset a top-k)")
    ax.set_title("LIMIT free-embedding probe")
    ax.legend(fontsize=7)
    return figure_png(fig, dpi=120)


def write_report(out: str | os.PathLike) -> tuple[Path, Path]:
    """(Re-)render ``report.md`` and ``probe.png`` in ``out`` from its ``results.jsonl`` (limit records)."""
    return write_report_files(out, "limit", render_markdown=render_markdown, render_png=render_png,
                              producer="embpress limit probe", png_name="probe.png")
