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

from embpress.atomic import atomic_open, atomic_write_text
from embpress.bench.records import read_records
from embpress.tables import method_family


@dataclass
class Row:
    """Aggregate over seeds of one (dataset, model, method, ratio)."""

    dataset: str
    model: str
    method: str
    ratio: float
    status: str
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


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def aggregate(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Group ok and unreachable records by (dataset, model, method, ratio); failed ones are left out."""
    rows: dict[tuple, Row] = {}
    for r in records:
        status = r.get("status")
        if status not in ("ok", "unreachable"):
            continue
        key = (r["dataset"], r["model"], r["method"], float(r["ratio"]))
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(*key, status=status)
        if status == "unreachable":
            row.reason = r.get("reason", "")
            continue
        row.status = "ok"
        row.aucs.append(r["auc"])
        row.loglosses.append(r["logloss"])
        row.serving.append(r["serving_bytes"])
        row.achieved.append(r["achieved_ratio"])
        row.train_sps.append(r.get("train_samples_per_s"))
        row.infer_lps.append(r.get("infer_lookups_per_s"))
        row.train_state.append(r.get("train_state_bytes", math.nan))
        row.peak_rss.append(r.get("peak_rss_bytes", math.nan))
        row.flops = r.get("flops_per_lookup")
        row.full_bytes = r.get("full_bytes")
        for name, sec in (r.get("stage_seconds") or {}).items():
            row.stages[name].append(sec)
    return sorted(rows.values(), key=lambda x: (x.dataset, x.model, x.ratio, -x.auc if x.aucs else 0))


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
    by_ratio: dict[float, list[Row]] = defaultdict(list)
    for r in rows:
        if r.status == "ok" and not r.reference:
            by_ratio[r.ratio].append(r)
    for ratio, rs in sorted(by_ratio.items()):
        best = max(rs, key=lambda r: r.auc)
        spread = best.auc_std if math.isfinite(best.auc_std) else 0.0
        close = sorted((r for r in rs if r.auc >= best.auc - spread), key=lambda r: -r.auc)
        out[ratio] = ([r.method for r in close], spread)
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
                cells += [f"{r.method} ({_mean(r.achieved):.1f}x)", _pm(r.auc, r.auc_std)]
        diff = f"{intra.auc - inter.auc:+.4f}" if inter is not None and intra is not None else ""
        lines.append(f"| {ratio:g}x | {' | '.join(cells)} | {diff} |")
    return [*lines, ""]


def render_markdown(records: Sequence[dict[str, Any]]) -> str:
    rows = aggregate(records)
    def trial(r: dict[str, Any]) -> tuple:
        return r.get("dataset"), r.get("model"), r.get("method"), r.get("ratio"), r.get("seed")

    # a failure that a later run of the same trial completed (ok or unreachable) is history, not news
    done = {trial(r) for r in records if r.get("status") in ("ok", "unreachable")}
    failed = [r for r in records if r.get("status") == "failed" and trial(r) not in done]
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
        "stage: at one epoch per stage it can beat a single-stage `full` that saw it once.",
        "Training memory is the study's second axis: `train state` counts what training holds for the "
        "table (parameters, buffers such as supernets and masks, Adam's two moments per trainable "
        "parameter, dense gradients), the largest over the stages; `peak RSS` is the measured peak "
        "resident memory of the process over the trial (model head, data pages and allocator included). "
        "A method with `train state` far above its `serving bytes` compresses at serving only.",
        "",
    ]
    names = {r["dataset"]: r["dataset_name"] for r in records if r.get("dataset") and r.get("dataset_name")}
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, r.model)].append(r)
    for (ds, model), rs in groups.items():
        full = next((r for r in rs if r.method == "full" and r.status == "ok"), None)
        name = names.get(ds, ds)
        lines += [f"## {name} — {model}", ""]
        if name != ds:
            lines += [f"Dataset spec: `{ds}`.", ""]
        if full is not None and full.full_bytes:
            lines += [f"Full fp32 table: {_fmt_bytes(full.full_bytes)}.", ""]
        lines += [
            "| method | target ratio | achieved ratio | serving bytes | train state | peak RSS | test AUC "
            "| log loss | ΔAUC vs full | train samples/s | infer lookups/s | MFLOP/lookup | stage times (s) | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in sorted(rs, key=lambda r: (r.ratio, -(r.auc if r.aucs else -1))):
            if r.status == "unreachable":
                lines.append(f"| {r.method} | {r.ratio:g}x | cannot reach | | | | | | | | | | "
                             f"{r.reason.splitlines()[0][:140]} | |")
                continue
            delta = r.auc - full.auc if full is not None and r is not full else math.nan
            stages = ", ".join(f"{k} {_mean(v):.1f}" for k, v in r.stages.items())
            flops = f"{r.flops / 1e6:.3f}" if r.flops else "-"
            lines.append(
                f"| {r.method} | {'ref' if r.reference else f'{r.ratio:g}x'} | {_mean(r.achieved):.1f}x "
                f"| {_fmt_bytes(_mean(r.serving))} | {_fmt_bytes(_mean(r.train_state))} "
                f"| {_fmt_bytes(_mean(r.peak_rss))} | {_pm(r.auc, r.auc_std)} "
                f"| {_pm(_mean(r.loglosses), _std(r.loglosses))} "
                f"| {'' if not math.isfinite(delta) else f'{delta:+.4f}'} | {_rate(_mean(r.train_sps))} "
                f"| {_rate(_mean(r.infer_lps))} | {flops} | {stages} | {len(r.aucs)} |"
            )
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
            lines.append(f"- {r['dataset']} {r['model']} {r['method']}@{r['ratio']:g}x seed {r['seed']}: "
                         f"{r.get('reason', '').splitlines()[0]}")
        lines.append("")
    lines.append("![AUC against serving bytes](pareto.png)")
    return "\n".join(lines) + "\n"


def render_pareto(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """AUC against serving bytes (log scale), one panel per (dataset, model), one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in aggregate(records) if r.status == "ok"]
    names = {r["dataset"]: r["dataset_name"] for r in records if r.get("dataset") and r.get("dataset_name")}
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, r.model)].append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    methods = sorted({r.method for r in rows})
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}
    # inter-feature methods solid with circles, intra-feature dashed with squares: 20 colours
    # alone repeat once there are more than 20 methods
    style = {"inter": ("o", "-"), "intra": ("s", "--")}
    for ax, ((ds, model), rs) in zip(axes[0], groups.items(), strict=False):
        compressed = [r.auc - (r.auc_std if math.isfinite(r.auc_std) else 0) for r in rs if not r.reference]
        # the y range follows the compressed methods and full: a far-off noid floor would squash them
        lo = min(compressed + [r.auc for r in rs if r.method == "full"], default=0.5)
        for m in methods:
            pts = sorted((r for r in rs if r.method == m), key=lambda r: _mean(r.serving))
            if not pts:
                continue
            xs = [_mean(r.serving) for r in pts]
            ys = [r.auc for r in pts]
            es = [r.auc_std if math.isfinite(r.auc_std) else 0 for r in pts]
            if m in ("full", "noid"):
                if ys[0] >= lo - 0.05:
                    ax.axhline(ys[0], color=color[m], ls=":", lw=1, label=f"{m} (AUC {ys[0]:.4f})")
                    ax.plot(xs, ys, "*", color=color[m], ms=10)
                else:
                    ax.plot([], [], " ", label=f"{m} (AUC {ys[0]:.4f}, below the axis)")
            else:
                marker, ls = style.get(method_family(m), ("^", "-."))
                ax.errorbar(xs, ys, yerr=es, marker=marker, ls=ls, color=color[m], label=m, capsize=2, ms=4)
        if compressed:
            top = max(r.auc for r in rs)
            pad = 0.05 * max(top - lo, 0.01)
            ax.set_ylim(lo - pad, top + pad)
        ax.set_xscale("log")
        ax.set_xlabel("serving bytes (log)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{names.get(ds, ds)} — {model}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def write_report(out: str | Path) -> tuple[Path, Path]:
    """(Re-)render ``report.md`` and ``pareto.png`` in ``out`` from ``out/results.jsonl``."""
    out = Path(out)
    path = out / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `embpress bench --out {out}` first")
    records = read_records(path)
    md, png = out / "report.md", out / "pareto.png"
    atomic_write_text(md, render_markdown(records))
    render_pareto(records, png)
    return md, png
