"""Render ``report.md`` and ``pareto.png`` of a retrieval run from its ``results.jsonl`` alone.

Nothing is re-measured: a report can be re-rendered at any time, for example after a resumed run.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embpress.atomic import atomic_write_bytes, atomic_write_text
from embpress.bench.records import read_records

RECALL_NOTE = ("recall@k is the mean over queries of |returned top-k ∩ exact top-k| / k, against exact "
               "float32 search of the same metric (FAISS brute force).")


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


def _groups(records: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = (r.get("dataset"), r.get("metric"), r.get("k"), r.get("oversample"), r.get("n"), r.get("nq"))
        out.setdefault(key, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: (r.get("bytes_per_vector") or 0, r.get("codec", "")))
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
    """The report text: one table per (data set, metric, k, oversample) group, sorted by bytes per vector."""
    lines = ["# Retrieval vectors: quality vs bytes per vector", "", RECALL_NOTE,
             "`+rr` columns re-rank the top k×oversample candidates exactly from float32 originals on disk. "
             "bytes/vec counts every in-memory per-vector byte (code with its norms or scales, attributes; "
             "ids are implicit); `fixed` is the codec's shared state (codebooks, rotations). "
             "Queries/s: the whole query batch searched at once on `threads` threads, ours and FAISS alike, "
             "nq / process CPU seconds (best of repeats; robust to other jobs on a shared machine; the "
             "wall-clock figures are in results.jsonl as `qps`, `faiss_qps`). "
             "FAISS figures come from the equivalent FAISS index in the same run.", ""]
    if not records:
        return "\n".join([*lines, "_No records._", ""])
    for (dataset, metric, k, oversample, n, nq), rs in _groups(records).items():
        qrels = any("ndcg_at_10" in r for r in rs)
        ref = next((r for r in rs if r.get("codec") == "float32"), None)
        threads = rs[0].get("threads")
        lines += [f"## {dataset}", "",
                  f"N = {n:,} vectors of d = {rs[0].get('d')}, {nq:,} queries, metric {metric}, k = {k}, "
                  f"oversample = {oversample}, threads = {threads}.", ""]
        cols = ["codec", "bytes/vec", "×smaller", "fixed", f"recall@{k}", f"recall@{k} +rr",
                f"FAISS recall@{k}", "q/s", "q/s +rr", "FAISS q/s", "FAISS q/s +rr", "encode vec/s", "FAISS index"]
        if qrels:
            cols[7:7] = ["nDCG@10", "nDCG@10 +rr", "% float", "% float +rr", "FAISS nDCG@10", "R@100", "R@100 +rr"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        ref_ndcg = ref.get("ndcg_at_10") if ref else None
        for r in rs:
            row = [f"`{r.get('codec')}`", _fmt(r.get("bytes_per_vector")), _fmt(r.get("compression"), 3),
                   _fmt(r.get("fixed_bytes")), _fmt(r.get("recall_at_k")), _fmt(r.get("recall_at_k_rerank")),
                   _fmt(r.get("faiss_recall_at_k")), _fmt(_qps(r, "qps")), _fmt(_qps(r, "qps_rerank")),
                   _fmt(_qps(r, "faiss_qps")), _fmt(_qps(r, "faiss_qps_rerank")), _fmt(r.get("encode_vps")),
                   r.get("faiss_index") or "–"]
            if qrels:
                def pct(v: Any, ref: Any = ref_ndcg) -> str:
                    return f"{100 * v / ref:.1f}" if (v is not None and ref) else "–"
                row[7:7] = [_fmt(r.get("ndcg_at_10")), _fmt(r.get("ndcg_at_10_rerank")), pct(r.get("ndcg_at_10")),
                            pct(r.get("ndcg_at_10_rerank")), _fmt(r.get("faiss_ndcg_at_10")),
                            _fmt(r.get("recall_at_100")), _fmt(r.get("recall_at_100_rerank"))]
            lines.append("| " + " | ".join(row) + " |")
        notes = _faiss_notes(rs)
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        prov = rs[-1].get("provenance") or {}
        if prov:
            lines += ["", "Produced by " + ", ".join(f"{k}={v}" for k, v in sorted(prov.items()) if v) + "."]
        lines.append("")
    return "\n".join(lines)


def render_pareto_png(records: Sequence[dict[str, Any]]) -> bytes:
    """Quality against bytes per vector (log x): recall@k, and nDCG@10 when there are qrels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    panels = []
    for key, rs in groups.items():
        panels.append((key, rs, "recall_at_k", f"recall@{key[2]}"))
        if any("ndcg_at_10" in r for r in rs):
            panels.append((key, rs, "ndcg_at_10", "nDCG@10"))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5), squeeze=False)
    for ax, (key, rs, field, label) in zip(axes[0], panels, strict=False):
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
        ax.set_ylabel(label)
        ax.set_title(f"{key[0]} ({key[1]})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def render_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``pareto.png`` into ``run_dir`` from its ``results.jsonl`` (atomically)."""
    run_dir = Path(run_dir)
    results = run_dir / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"{results} not found: run `embpress vectors eval ... --out {run_dir}` first")
    records = read_records(results)
    md, png = run_dir / "report.md", run_dir / "pareto.png"
    atomic_write_text(md, render_markdown(records))
    atomic_write_bytes(png, render_pareto_png(records))
    return md, png
