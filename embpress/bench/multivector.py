"""Multi-vector evaluation on a BEIR folder: one vector per text against late interaction over the same
model's frozen token states (exact Chamfer), and MUVERA (FDE codes through a codec, then Chamfer re-rank).

Rows (one dict each): ``single`` (the model's pooled vector, exact inner product), ``chamfer`` (exact
Chamfer over every document), ``fde`` (FDE codes alone, no re-rank) and ``fde+rerank`` at several
candidate counts. Each row has nDCG@10, recall@k, bytes per document in memory and on disk, and
queries/s (one thread; wall clock on a shared machine, so noisy). ``cand_recall`` is the share of the exact
Chamfer top-k found among the FDE candidates.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embpress.atomic import atomic_write_text
from embpress.vectors.evaluate import beir_metrics, exact_knn
from embpress.vectors.multivector import (
    FDEEncoder,
    MultiVectorIndex,
    as_ragged,
    ball_carve,
    chamfer_search,
    parse_fde_spec,
    rerank_chamfer,
)


def _metrics(ids: np.ndarray, dist: np.ndarray, query_ids: Sequence[str], corpus_ids: Sequence[str],
             qrels: dict, k: int) -> dict[str, float]:
    return beir_metrics(ids, dist, query_ids, corpus_ids, qrels, ("ndcg@10", f"recall@{k}"), backend="numpy")


def _carve_queries(queries: tuple[np.ndarray, np.ndarray], tau: float) -> tuple[np.ndarray, np.ndarray]:
    qv, qo = queries
    parts = [ball_carve(np.asarray(qv[qo[i]:qo[i + 1]], dtype=np.float32), tau) for i in range(qo.shape[0] - 1)]
    return as_ragged(parts, name="queries")


def run_multivector_eval(*, corpus_ids: Sequence[str], query_ids: Sequence[str], qrels: dict,
                         doc_vectors: np.ndarray, query_vectors: np.ndarray, doc_tokens: Any, query_tokens: Any,
                         encoder: FDEEncoder | str, codecs: Sequence[str], candidates: Sequence[int] = (10, 20, 50, 100),
                         k: int = 10, seed: int = 0, carve_tau: float | None = None,
                         log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate single vector, exact Chamfer and FDE + codec (+ Chamfer re-rank); returns the rows."""
    say = log or (lambda m: None)
    dtok = as_ragged(doc_tokens, name="documents")
    qtok = as_ragged(query_tokens, name="queries")
    n, nq = dtok[1].shape[0] - 1, qtok[1].shape[0] - 1
    if n != len(corpus_ids) or nq != len(query_ids):
        raise ValueError(f"token states cover {n} documents and {nq} queries, the set has {len(corpus_ids)} "
                         f"and {len(query_ids)}")
    token_disk = (dtok[0].shape[0] * dtok[0].shape[1] * np.asarray(dtok[0][:1]).itemsize + 8 * (n + 1)) / n
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        say("  ".join(f"{key}={val:.4f}" if isinstance(val, float) else f"{key}={val}" for key, val in row.items()))

    t = time.perf_counter()
    single = exact_knn(doc_vectors, query_vectors, max(k, 10), "ip")
    dt = time.perf_counter() - t
    add({"method": "single", **_metrics(single.ids, single.distances, query_ids, corpus_ids, qrels, k),
         "bytes_per_doc": int(doc_vectors.shape[1] * 4), "disk_bytes_per_doc": 0.0, "qps": nq / dt})
    t = time.perf_counter()
    exact = chamfer_search(qtok, dtok, max(k, 10))
    dt = time.perf_counter() - t
    add({"method": "chamfer", **_metrics(exact.ids, exact.distances, query_ids, corpus_ids, qrels, k),
         "bytes_per_doc": 0, "disk_bytes_per_doc": round(token_disk, 1), "qps": nq / dt,
         "avg_doc_tokens": round(dtok[0].shape[0] / n, 1), "avg_query_tokens": round(qtok[0].shape[0] / nq, 1)})
    enc = parse_fde_spec(encoder) if isinstance(encoder, str) else encoder
    spec_name = encoder if isinstance(encoder, str) else "fde"
    q_search = _carve_queries(qtok, carve_tau) if carve_tau is not None else qtok
    if not hasattr(enc, "simhash_"):
        enc.fit(dtok[0].shape[1])
    t = time.perf_counter()
    doc_fde = enc.encode_documents(dtok).astype(np.float32, copy=False)
    encode_s = time.perf_counter() - t
    say(f"FDE {spec_name}: {n} documents encoded in {encode_s:.1f} s ({n / encode_s:.0f} docs/s, one thread)")
    for codec in codecs:
        t = time.perf_counter()
        mv = MultiVectorIndex(enc, codec=codec, seed=seed).build(dtok, fde=doc_fde)
        build_s = time.perf_counter() - t
        base = {"fde": spec_name, "codec": codec, "fde_dim": mv.encoder_.output_dim,
                "bytes_per_doc": mv.bytes_per_doc(), "fde_encode_docs_per_s": round(n / encode_s, 1),
                "codec_fit_add_s": round(build_s, 1)}
        cmax = max(candidates)
        t = time.perf_counter()
        qf = mv.encoder_.encode_queries(q_search).astype(np.float32, copy=False)
        res = mv.index_.search(qf, cmax)
        dt = time.perf_counter() - t
        cand = res.ids
        add({"method": "fde", **base, **_metrics(cand[:, :k], res.distances[:, :k], query_ids, corpus_ids, qrels, k),
             "disk_bytes_per_doc": 0.0, "qps": nq / dt})
        for c in sorted(candidates):
            t = time.perf_counter()
            qf = mv.encoder_.encode_queries(q_search).astype(np.float32, copy=False)
            cc = mv.index_.search(qf, c).ids
            rr = rerank_chamfer(qtok, dtok, cc, k)
            dt = time.perf_counter() - t
            hit = np.mean([np.isin(exact.ids[i, :k], cc[i]).mean() for i in range(nq)])
            add({"method": "fde+rerank", **base, "candidates": c,
                 **_metrics(rr.ids, rr.distances, query_ids, corpus_ids, qrels, k),
                 "cand_recall": float(hit), "disk_bytes_per_doc": round(token_disk, 1), "qps": nq / dt,
                 **({"carve_tau": carve_tau} if carve_tau is not None else {})})
    return rows


def write_multivector_report(rows: list[dict[str, Any]], out: str | os.PathLike, *, title: str, k: int) -> Path:
    """``multivector.json`` (the rows) and ``multivector.md`` (a table) in folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "multivector.json", json.dumps(rows, indent=1))
    lines = [f"# {title}", "", f"| method | codec | candidates | nDCG@10 | recall@{k} | FDE cand. recall of Chamfer "
             f"top-{k} | bytes/doc in memory | bytes/doc on disk | queries/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('codec', '')} | {r.get('candidates', '')} | {r['ndcg@10']:.4f} | "
                     f"{r[f'recall@{k}']:.4f} | {r['cand_recall']:.3f} |" if "cand_recall" in r else
                     f"| {r['method']} | {r.get('codec', '')} | {r.get('candidates', '')} | {r['ndcg@10']:.4f} | "
                     f"{r[f'recall@{k}']:.4f} | |")
        lines[-1] += f" {r['bytes_per_doc']:,} | {r['disk_bytes_per_doc']:,.0f} | {r['qps']:.1f} |"
    lines += ["", "queries/s: one thread, wall clock, on a shared 2-core machine (noisy)."]
    atomic_write_text(out / "multivector.md", "\n".join(lines) + "\n")
    return out / "multivector.md"
