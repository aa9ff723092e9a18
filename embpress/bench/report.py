"""Render ``report.md`` and ``pareto.png`` from CTR benchmark records alone.

A report can be re-rendered at any time from ``results.jsonl`` (``embpress report DIR``),
without re-running anything.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embpress.bench.records import latest_per_trial
from embpress.bench.render import (
    figure_png,
    group_by_settings,
    label,
    md_table,
    pareto_front,
    set_aside_note,
    settings_key,
    varying,
    without,
    write_report_files,
)
from embpress.tables import method_family

ROW_IGNORE = ("seed",)
"""A row of the report is every setting but the seed: its seeds are averaged."""
SECTION_IGNORE = ("seed", "method", "ratio", "hparams")
"""A section (one table) shares every setting but the method, its ratio and its hyper-parameters."""


@dataclass
class Row:
    """Aggregate over seeds of one configuration (everything but the seed)."""

    dataset: str
    model: str
    method: str
    ratio: float
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    seeds: list[int] = field(default_factory=list)
    aucs: list[float] = field(default_factory=list)
    loglosses: list[float] = field(default_factory=list)
    serving: list[int] = field(default_factory=list)
    achieved: list[float] = field(default_factory=list)
    train_sps: list[float] = field(default_factory=list)
    infer_lps: list[float] = field(default_factory=list)
    train_state: list[float] = field(default_factory=list)
    peak_rss: list[float] = field(default_factory=list)
    flops: float | None = None
    stages: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    reason: str = ""
    full_bytes: int | None = None

    @property
    def auc(self) -> float:
        return statistics.fmean(self.aucs) if self.aucs else math.nan

    @property
    def auc_std(self) -> float:
        return statistics.stdev(self.aucs) if len(self.aucs) > 1 else math.nan

    @property
    def reference(self) -> bool:
        return self.method in ("full", "noid")

    @property
    def tuned(self) -> bool:
        return "tune" in self.config

    @property
    def section(self) -> str:
        return settings_key(without(untuned(self.config), SECTION_IGNORE))


def untuned(config: dict[str, Any]) -> dict[str, Any]:
    """A tuned trial's configuration with the grid's learning rates in place of the chosen ones and no
    search settings: the section it is compared in is the one of its grid's default rows."""
    if "tune" not in config:
        return config
    base = config["tune"]["base_lr"]
    out = {k: v for k, v in config.items() if k != "tune"}
    out["lr"] = base
    out["train"] = {**config["train"], "sparse_lr": base}
    return out


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def aggregate(records: Iterable[dict[str, Any]]) -> list[Row]:
    """One row per configuration less the seed (ok and unreachable trials; failed ones are left out).

    Records of one trial (same whole configuration, seed included) count once: the latest.
    """
    latest, _ = latest_per_trial(records)
    rows = []
    for group in group_by_settings((r for r in latest if r["status"] in ("ok", "unreachable")),
                                   ignore=ROW_IGNORE).values():
        c = without(group[0]["config"], ROW_IGNORE)
        row = Row(c["dataset"], c["model"], c["method"], float(c["ratio"]), status="unreachable", config=c)
        for r in group:
            m = r["metrics"]
            row.name = m.get("dataset_name") or row.name
            if r["status"] == "unreachable":
                row.reason = r.get("reason") or ""
                continue
            row.status = "ok"
            row.seeds.append(r["config"]["seed"])
            row.aucs.append(m["auc"])
            row.loglosses.append(m["logloss"])
            row.serving.append(m["serving_bytes"])
            row.achieved.append(m["achieved_ratio"])
            row.train_sps.append(m.get("train_samples_per_s"))
            row.infer_lps.append(m.get("infer_lookups_per_s"))
            row.train_state.append(m.get("train_state_bytes", math.nan))
            row.peak_rss.append(m.get("peak_rss_bytes", math.nan))
            row.flops = m.get("flops_per_lookup")
            row.full_bytes = m.get("full_bytes")
            for name, sec in (m.get("stage_seconds") or {}).items():
                row.stages[name].append(sec)
        rows.append(row)
    return sorted(rows, key=lambda x: (x.dataset, x.model, x.section, x.ratio, -x.auc if x.aucs else 0))


def sections(rows: Sequence[Row]) -> list[tuple[str, list[Row]]]:
    """Rows grouped into tables of one shared configuration (all but method, ratio, hparams, seed),
    each titled by its dataset and model plus the settings that set it apart from the other tables."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.section, []).append(r)
    configs = {k: without(rs[0].config, SECTION_IGNORE) for k, rs in groups.items()}
    out = []
    for key, rs in groups.items():
        same_data = [c for c in configs.values()
                     if (c["dataset"], c["model"]) == (rs[0].dataset, rs[0].model)]
        differ = varying(same_data)
        names = [k for k in differ if not k.startswith("data.")]
        extra = label(configs[key], names + (["data"] if len(names) < len(differ) else []))
        name = rs[0].name or rs[0].dataset
        out.append((f"{name} — {rs[0].model}" + (f" ({extra})" if extra else ""), rs))
    return out


def _row_labels(rs: Sequence[Row]) -> dict[int, str]:
    """Method names, with the hyper-parameters that tell apart rows of one method at one ratio."""
    by: dict[tuple[str, float], list[Row]] = defaultdict(list)
    for r in rs:
        by[(r.method, r.ratio)].append(r)
    out = {}
    for group in by.values():
        plain = [r for r in group if not r.tuned]
        differ = varying([r.config for r in plain]) if len(plain) > 1 else []
        for r in group:
            if r.tuned:  # the chosen values are listed under the table
                out[id(r)] = f"{r.method} (tuned)"
            else:
                out[id(r)] = r.method + (f" ({label(r.config, differ)})" if differ else "")
    return out


def _fmt_bytes(n: float) -> str:
    if not math.isfinite(n):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n}"


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def _rate(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:,.0f}"


def recommend(rows: Sequence[Row]) -> dict[float, tuple[list[str], float]]:
    """At each target ratio, the compressed methods whose mean AUC is within the seed spread of the best.

    The spread is the standard deviation over seeds of the best method's AUC (with one seed, only
    the best is listed). Returns ``{ratio: (methods, spread)}``.
    """
    out: dict[float, tuple[list[str], float]] = {}
    names = _row_labels(rows)
    by_ratio: dict[float, list[Row]] = defaultdict(list)
    for r in rows:
        if r.status == "ok" and not r.reference:
            by_ratio[r.ratio].append(r)
    for ratio, rs in sorted(by_ratio.items()):
        best = max(rs, key=lambda r: r.auc)
        spread = best.auc_std if math.isfinite(best.auc_std) else 0.0
        close = sorted((r for r in rs if r.auc >= best.auc - spread), key=lambda r: -r.auc)
        out[ratio] = ([names[id(r)] for r in close], spread)
    return out


def best_by_family(rows: Sequence[Row]) -> dict[float, dict[str, Row]]:
    """At each target ratio, the best compressed method (by mean AUC) of each family (``inter``,
    ``intra``; see :attr:`embpress.tables.CompressedTable.family`): ``{ratio: {family: row}}``."""
    out: dict[float, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        fam = method_family(r.method)
        if r.status != "ok" or r.reference or fam not in ("inter", "intra"):
            continue
        cur = out[r.ratio].get(fam)
        if cur is None or r.auc > cur.auc:
            out[r.ratio][fam] = r
    return dict(sorted(out.items()))


def _family_lines(rs: Sequence[Row]) -> list[str]:
    best = best_by_family(rs)
    names = _row_labels(rs)
    if not best:
        return []
    lines = ["### Intra-feature against inter-feature methods", "",
             "Inter-feature methods may share storage across ids or fields (hashing, composition, shared "
             "codebooks, networks); intra-feature methods keep one vector per id and make each cheaper "
             "(dimensions, pruning, precision). Best of each family at each ratio, mean ± std over seeds:", "",
             "| target ratio | best inter-feature | test AUC | best intra-feature | test AUC | intra − inter |",
             "|---:|---|---:|---|---:|---:|"]
    for ratio, fams in best.items():
        inter, intra = fams.get("inter"), fams.get("intra")
        cells = []
        for fam, r in (("inter", inter), ("intra", intra)):
            if r is None:
                tried = any(x.ratio == ratio and method_family(x.method) == fam for x in rs)
                cells += ["none reaches it" if tried else "none run", ""]
            else:
                cells += [f"{names[id(r)]} ({_mean(r.achieved):.1f}x)", _pm(r.auc, r.auc_std)]
        diff = f"{intra.auc - inter.auc:+.4f}" if inter is not None and intra is not None else ""
        lines.append(f"| {ratio:g}x | {' | '.join(cells)} | {diff} |")
    return [*lines, ""]


def render_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The report: one table per shared configuration, one row per configuration less the seed."""
    latest, dropped = latest_per_trial(records)
    rows = aggregate(latest)
    failed = [r for r in latest if r["status"] == "failed"]
    lines = ["# embpress benchmark report", ""]
    if not rows:
        lines.append("No completed trials yet.")
    lines += [
        "Quality is test AUC and log loss at the best validation AUC, mean ± std over seeds.",
        "`serving bytes` counts every byte needed to serve lookups at stored precision; the ratio is "
        "`full_bytes / serving_bytes` against the fp32 full table. Train throughput is samples/s over the "
        "training loops (evaluation excluded); inference is table lookups/s (ids/s) in eval mode. "
        "Stages train for the grid's epochs (or the epochs the method fixes for a stage), so a "
        "multi-stage method (search then retrain, train then finetune) sees the training data once per "
        "stage: at one epoch per stage it can beat a single-stage `full` that saw it once. "
        "A row is one whole configuration (data fingerprint, model, method, ratio, hyper-parameters, "
        "dim, epochs, batch size, learning rates, threads) over its seeds, each seed counted once; "
        "tables differ in the settings named in their titles. ★ marks the rows on the Pareto front "
        "of test AUC against serving bytes.",
        "Training memory is the study's second axis: `train state` counts what training holds for the "
        "table (parameters, buffers such as supernets and masks, Adam's two moments per trainable "
        "parameter, dense gradients), the largest over the stages; `peak RSS` is the measured peak "
        "resident memory of the process over the trial (model head, data pages and allocator included). "
        "A method with `train state` far above its `serving bytes` compresses at serving only.",
        "",
        *set_aside_note(dropped),
    ]
    for title, rs in sections(rows):
        full = next((r for r in rs if r.method == "full" and r.status == "ok"), None)
        names = _row_labels(rs)
        lines += [f"## {title}", ""]
        if rs[0].name and rs[0].name != rs[0].dataset:
            lines += [f"Dataset spec: `{rs[0].dataset}`.", ""]
        if full is not None and full.full_bytes:
            lines += [f"Full fp32 table: {_fmt_bytes(full.full_bytes)}.", ""]
        ordered = sorted(rs, key=lambda r: (r.ratio, -(r.auc if r.aucs else -1)))
        ok = [r for r in ordered if r.status == "ok"]
        front = {id(ok[i]) for i in pareto_front([(_mean(r.serving), r.auc) for r in ok])}
        table = []
        for r in ordered:
            if r.status == "unreachable":
                table.append([names[id(r)], f"{r.ratio:g}x", "cannot reach", *[""] * 9,
                              r.reason.splitlines()[0][:140] if r.reason else "", "", ""])
                continue
            delta = r.auc - full.auc if full is not None and r is not full else math.nan
            stages = ", ".join(f"{k} {_mean(v):.1f}" for k, v in r.stages.items())
            table.append([
                names[id(r)], "ref" if r.reference else f"{r.ratio:g}x", f"{_mean(r.achieved):.1f}x",
                _fmt_bytes(_mean(r.serving)), _fmt_bytes(_mean(r.train_state)), _fmt_bytes(_mean(r.peak_rss)),
                _pm(r.auc, r.auc_std), _pm(_mean(r.loglosses), _std(r.loglosses)),
                "" if not math.isfinite(delta) else f"{delta:+.4f}", _rate(_mean(r.train_sps)),
                _rate(_mean(r.infer_lps)), f"{r.flops / 1e6:.3f}" if r.flops else "-", stages, len(r.seeds),
                "★" if id(r) in front else ""])
        lines += md_table(["method", "target ratio", "achieved ratio", "serving bytes", "train state", "peak RSS",
                           "test AUC", "log loss",
                           "ΔAUC vs full", "train samples/s", "infer lookups/s", "MFLOP/lookup", "stage times (s)",
                           "seeds", "Pareto"], "lrrrrrrrrrrrlrl", table)
        lines.append("")
        tuned = [r for r in ordered if r.tuned and r.status == "ok"]
        if tuned:
            lines += ["Tuned rows (`embpress bench --tune`): the values a search chose on validation AUC "
                      "(never test AUC), then used for every seed:", ""]
            for r in tuned:
                t = r.config["tune"]
                chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in sorted(t["chosen"].items()))
                lines.append(f"- {r.method} at {r.ratio:g}x: {chosen} ({t['trials']} trials, "
                             f"{t['scheduler']['name'].upper()}, seed {t['search_seed']})")
            lines.append("")
        rec = recommend(rs)
        if rec:
            lines += ["### Which method at which budget", "",
                      "At each ratio, the compressed methods whose mean test AUC is within the seed spread "
                      "(std over seeds) of the best:", ""]
            for ratio, (methods, spread) in rec.items():
                sp = f"spread {spread:.4f}" if spread > 0 else "one seed: best only"
                lines.append(f"- **{ratio:g}x** ({sp}): {', '.join(methods)}")
            lines.append("")
        lines += _family_lines(rs)
    if failed:
        lines += ["## Failed trials", ""]
        for r in failed:
            c = r["config"]
            lines.append(f"- {c['dataset']} {c['model']} {c['method']}@{c['ratio']:g}x seed {c['seed']}: "
                         f"{(r.get('reason') or '').splitlines()[0] if r.get('reason') else ''}")
        lines.append("")
    lines.append("![AUC against serving bytes](pareto.png)")
    return "\n".join(lines) + "\n"


def render_pareto(records: Sequence[dict[str, Any]]) -> bytes:
    """PNG bytes: AUC against serving bytes (log scale), one panel per section, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(title, [r for r in rs if r.status == "ok"]) for title, rs in sections(aggregate(records))]
    groups = [(t, rs) for t, rs in groups if rs]
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    methods = sorted({r.method for _, rs in groups for r in rs})
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}
    # inter-feature methods solid with circles, intra-feature dashed with squares: 20 colours
    # alone repeat once there are more than 20 methods
    style = {"inter": ("o", "-"), "intra": ("s", "--")}
    for ax, (title, rs) in zip(axes[0], groups, strict=False):
        names = _row_labels(rs)
        compressed = [r.auc - (r.auc_std if math.isfinite(r.auc_std) else 0) for r in rs if not r.reference]
        # the y range follows the compressed methods and full: a far-off noid floor would squash them
        lo = min(compressed + [r.auc for r in rs if r.method == "full"], default=0.5)
        series: dict[str, list[Row]] = defaultdict(list)
        for r in rs:
            series[names[id(r)]].append(r)
        for name, pts in series.items():
            m = pts[0].method
            pts = sorted(pts, key=lambda r: _mean(r.serving))
            xs = [_mean(r.serving) for r in pts]
            ys = [r.auc for r in pts]
            es = [r.auc_std if math.isfinite(r.auc_std) else 0 for r in pts]
            if m in ("full", "noid"):
                if ys[0] >= lo - 0.05:
                    ax.axhline(ys[0], color=color[m], ls=":", lw=1, label=f"{name} (AUC {ys[0]:.4f})")
                    ax.plot(xs, ys, "*", color=color[m], ms=10)
                else:
                    ax.plot([], [], " ", label=f"{name} (AUC {ys[0]:.4f}, below the axis)")
            else:
                marker, ls = style.get(method_family(m), ("^", "-."))
                ax.errorbar(xs, ys, yerr=es, marker=marker, ls=ls, color=color[m], label=name, capsize=2, ms=4)
        front = sorted((rs[i] for i in pareto_front([(_mean(r.serving), r.auc) for r in rs])),
                       key=lambda r: _mean(r.serving))
        if len(front) > 1:
            ax.plot([_mean(r.serving) for r in front], [r.auc for r in front], color="black", lw=0.8, alpha=0.4,
                    label="Pareto front")
        if compressed:
            top = max(r.auc for r in rs)
            pad = 0.05 * max(top - lo, 0.01)
            ax.set_ylim(lo - pad, top + pad)
        ax.set_xscale("log")
        ax.set_xlabel("serving bytes (log)")
        ax.set_ylabel("test AUC")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return figure_png(fig)


def write_report(out: str | Path) -> tuple[Path, Path]:
    """(Re-)render ``report.md`` and ``pareto.png`` in ``out`` from ``out/results.jsonl`` (CTR records)."""
    return write_report_files(out, "ctr", render_markdown=render_markdown, render_png=render_pareto,
                              producer="embpress bench")
