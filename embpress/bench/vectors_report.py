"""Render ``report.md`` and ``pareto.png`` of a retrieval run from its ``results.jsonl`` alone.

Nothing is re-measured: a report can be re-rendered at any time, for example after a resumed run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
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
    varying,
    without,
    write_report_files,
)

CODEC_KEYS = ("codec", "codec_params")
"""A table of the report shares every setting but the codec: one row per codec."""

RECALL_NOTE = ("recall@k is the mean over queries of |returned top-k ∩ exact top-k| / k, against exact "
               "float32 search of the same metric (FAISS brute force). With qrels, nDCG@10, R@100 and qrels R@k are "
               "against the judgements.")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}".rstrip("0").rstrip(".")
        return f"{v:.{digits}g}"
    return str(v)


def _qps(r: dict[str, Any], field: str) -> Any:
    """Queries/s by CPU time when recorded, else by wall clock."""
    return r.get(f"{field}_cpu", r.get(field))


def _is_multivector(r: dict[str, Any]) -> bool:
    return r["config"].get("eval") == "multivector"


def _groups(records: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Records grouped by their whole configuration less the codec, each group titled by its data set
    and the settings that set it apart from the other groups of that data set. Rows are flat
    dicts (config, metrics and provenance on one level), sorted by bytes per vector.
    """
    latest, _ = latest_per_trial(r for r in records if r["status"] == "ok" and not _is_multivector(r))
    groups = list(group_by_settings(latest, ignore=CODEC_KEYS).values())
    configs = [without(g[0]["config"], CODEC_KEYS) for g in groups]
    out = []
    for g, c in zip(groups, configs, strict=True):
        differ = [k for k in varying([x for x in configs if x["dataset"] == c["dataset"]])]
        rows = [{**r["config"], **r["metrics"], "provenance": r["provenance"]} for r in g]
        rows.sort(key=lambda r: (r.get("bytes_per_vector") or 0, r.get("codec", "")))
        extra = label(c, differ)
        out.append((f"{c['dataset']}" + (f" ({extra})" if extra else ""), rows))
    return out


def _faiss_notes(rs: Sequence[dict[str, Any]]) -> list[str]:
    """Where a FAISS counterpart is not the same algorithm, say so under the table."""
    keys = {str(r.get("faiss_index") or "") for r in rs}
    metric = rs[0].get("metric")
    notes = []
    if metric in ("ip", "cosine") and any(k.startswith("PCA") for k in keys):
        notes.append("FAISS `PCA…` pre-transforms centre the query as well as the corpus, which changes "
                     "inner-product rankings; embpress's `pca` scores queries against the decoded vectors. "
                     "Their recalls can differ under IP when the data mean is far from zero.")
    if any(k.startswith("LSH") for k in keys):
        notes.append("`rbin{B}` vs FAISS `LSH{B}rt`: both take signs of random rotations, but FAISS "
                     "thresholds at per-bit medians where embpress centres by the mean: close, not identical.")
    if any(k.startswith("ITQ") for k in keys):
        notes.append("`itq{B}` vs FAISS `ITQ{B},LSH`: FAISS's ITQTransform also L2-normalises each centred "
                     "vector before PCA + rotation, and initialises differently: same method, not the same "
                     "implementation.")
    if any(k.startswith("RQ") for k in keys):
        notes.append("`rq` stores a 4-byte norm per code (counted in bytes/vec) to score L2 without decoding; "
                     "FAISS `RQ…` (decompress search) stores none; both train with beam 5, from different seeds.")
    return notes


def render_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The report text: one table per configuration less the codec, rows sorted by bytes per vector; then the
    multi-vector evaluations (:mod:`embpress.bench.multivector`), one table each."""
    from embpress.bench.multivector import render_multivector_markdown

    multi = [r for r in records if _is_multivector(r)]
    records = [r for r in records if not _is_multivector(r)]
    if multi and not records:
        return "\n".join([*set_aside_note(latest_per_trial(multi)[1]), *render_multivector_markdown(multi)])
    tail = render_multivector_markdown(multi) if multi else []
    lines = ["# Retrieval vectors: quality vs bytes per vector", "", RECALL_NOTE,
             "`+rr` columns re-rank the top k×oversample candidates exactly from float32 originals on disk. "
             "bytes/vec counts every in-memory per-vector byte (code with its norms or scales, attributes; "
             "ids are implicit); `fixed` is the codec's shared state (codebooks, rotations). "
             "Queries/s: the whole query batch searched at once on `threads` threads, ours and FAISS alike, "
             "nq / process CPU seconds (best of repeats; robust to other jobs on a shared machine; the "
             "wall-clock figures are in results.jsonl as `qps`, `faiss_qps`). "
             "FAISS figures come from the equivalent FAISS index in the same run. "
             "A table is one whole configuration (content fingerprints of base, queries, training sample and "
             "qrels, metric, k, oversample, seed, threads); tables of one data set differ in the settings "
             "named in their titles. ★ marks the codecs on the Pareto front of recall@k (+rr when re-ranked "
             "is better) against bytes per vector.", ""]
    if not records:
        return "\n".join([*lines, "_No records._", ""])
    lines += set_aside_note(latest_per_trial(records)[1])
    for title, rs in _groups(records):
        qrels = any("ndcg_at_10" in r for r in rs)
        ref = next((r for r in rs if r.get("codec") == "float32"), None)
        c = rs[0]
        k = c["k"]
        lines += [f"## {title}", "",
                  f"N = {c['n']:,} vectors of d = {c['d']}, {c['nq']:,} queries, metric {c['metric']}, k = {k}, "
                  f"oversample = {c['oversample']}, threads = {c['threads']}, codecs fitted on "
                  f"{c['train_n']:,} vectors.", ""]
        best = [max((r.get("recall_at_k") or -1), (r.get("recall_at_k_rerank") or -1)) for r in rs]
        front = pareto_front([(r.get("bytes_per_vector"), b) for r, b in zip(rs, best, strict=True)])
        cols = ["codec", "bytes/vec", "×smaller", "fixed", f"recall@{k}", f"recall@{k} +rr",
                f"FAISS recall@{k}", "q/s", "q/s +rr", "FAISS q/s", "FAISS q/s +rr", "encode vec/s", "FAISS index",
                "Pareto"]
        if qrels:
            cols[7:7] = ["nDCG@10", "nDCG@10 +rr", "% float", "% float +rr", "FAISS nDCG@10", "R@100", "R@100 +rr",
                         f"qrels R@{k}", f"qrels R@{k} +rr"]
        ref_ndcg = ref.get("ndcg_at_10") if ref else None
        table = []
        for i, r in enumerate(rs):
            row = [f"`{r.get('codec')}`", _fmt(r.get("bytes_per_vector")), _fmt(r.get("compression"), 3),
                   _fmt(r.get("fixed_bytes")), _fmt(r.get("recall_at_k")), _fmt(r.get("recall_at_k_rerank")),
                   _fmt(r.get("faiss_recall_at_k")), _fmt(_qps(r, "qps")), _fmt(_qps(r, "qps_rerank")),
                   _fmt(_qps(r, "faiss_qps")), _fmt(_qps(r, "faiss_qps_rerank")), _fmt(r.get("encode_vps")),
                   r.get("faiss_index") or "–", "★" if i in front else ""]
            if qrels:
                def pct(v: Any, ref: Any = ref_ndcg) -> str:
                    return f"{100 * v / ref:.1f}" if (v is not None and ref) else "–"
                row[7:7] = [_fmt(r.get("ndcg_at_10")), _fmt(r.get("ndcg_at_10_rerank")), pct(r.get("ndcg_at_10")),
                            pct(r.get("ndcg_at_10_rerank")), _fmt(r.get("faiss_ndcg_at_10")),
                            _fmt(r.get("recall_at_100")), _fmt(r.get("recall_at_100_rerank")),
                            _fmt(r.get("qrels_recall_at_k")), _fmt(r.get("qrels_recall_at_k_rerank"))]
            table.append(row)
        lines += md_table(cols, "l" + "r" * (len(cols) - 3) + "ll", table)
        notes = _faiss_notes(rs)
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        prov = rs[-1].get("provenance") or {}
        if prov:
            lines += ["", "Produced by " + ", ".join(f"{k}={v}" for k, v in sorted(prov.items()) if v) + "."]
        lines.append("")
    return "\n".join([*lines, *tail])


def render_pareto_png(records: Sequence[dict[str, Any]]) -> bytes:
    """Quality against bytes per vector (log x): recall@k, and nDCG@10 when there are qrels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embpress.bench.multivector import draw_multivector_panel, mv_groups

    panels = []
    for title, rs in mv_groups([r for r in records if _is_multivector(r)]):
        panels.append((title, rs, "multivector", ""))
    for title, rs in _groups(records):
        panels.append((title, rs, "recall_at_k", f"recall@{rs[0]['k']}"))
        if any("ndcg_at_10" in r for r in rs):
            panels.append((title, rs, "ndcg_at_10", "nDCG@10"))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5), squeeze=False)
    for ax, (title, rs, field, ylabel) in zip(axes[0], panels, strict=False):
        if field == "multivector":
            draw_multivector_panel(ax, title, rs)
            continue
        for suffix, style, name in (("", "o", "codes"), ("_rerank", "^", "codes + re-rank"),
                                    ("faiss", "x", "FAISS")):
            f = f"faiss_{field}" if suffix == "faiss" else field + suffix
            xs = [r["faiss_bytes_per_vector" if suffix == "faiss" else "bytes_per_vector"] for r in rs
                  if r.get(f) is not None]
            ys = [r[f] for r in rs if r.get(f) is not None]
            if xs:
                ax.scatter(xs, ys, marker=style, label=name, s=36 if style != "x" else 48)
        for r in rs:
            if r.get(field) is not None:
                ax.annotate(r["codec"], (r["bytes_per_vector"], r[field]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ref = next((r.get(field) for r in rs if r.get("codec") == "float32"), None)
        if ref is not None:
            ax.axhline(ref, ls="--", lw=1, color="gray", label="float32 exact")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per vector (in memory, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({rs[0]['metric']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return figure_png(fig)


def render_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``pareto.png`` into ``run_dir`` from its ``results.jsonl`` (vectors records)."""
    return write_report_files(run_dir, "vectors", render_markdown=render_markdown, render_png=render_pareto_png,
                              producer="embpress vectors eval ...")
