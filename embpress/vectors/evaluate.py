"""Retrieval evaluation: exact ground truth, recall@k against it, BEIR metrics, speed and size.

Small free functions on numpy arrays (STYLE §8). Shapes: N base vectors, nq queries, D dim.

``recall_at_k`` is the k-NN overlap used by FAISS's ``knn_intersection_measure`` and ANN
benchmarks: the mean over queries of ``|returned top-k ∩ exact top-k| / k``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from embpress.vectors.metric import Metric, SearchResult, as_metric


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero): (N, D) float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int, metric: str | Metric = "ip") -> SearchResult:
    """Exact k nearest neighbours with FAISS brute force, in embpress's distance convention.

    Args:
        base: (N, D) float32. queries: (nq, D) float32. k: neighbours (padded with -1 if k > N).
        metric: ip / cosine (both normalised first for cosine) / l2.

    Returns:
        SearchResult (nq, k): L2 squared distances, or negated similarities for IP / cosine.

    >>> x = np.eye(4, dtype="float32")
    >>> exact_knn(x, x[:2], 2, "l2").ids[:, 0].tolist()
    [0, 1]
    """
    import faiss

    metric = as_metric(metric)
    base = np.ascontiguousarray(base, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if metric is Metric.COSINE:
        base, queries = normalize_rows(base), normalize_rows(queries)
    fm = faiss.METRIC_L2 if metric is Metric.L2 else faiss.METRIC_INNER_PRODUCT
    kk = min(k, base.shape[0])
    dist, ids = faiss.knn(queries, base, kk, metric=fm)
    dist = dist.astype(np.float32)
    if metric is not Metric.L2:
        dist = -dist
    if kk < k:
        dist = np.concatenate([dist, np.full((dist.shape[0], k - kk), np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((ids.shape[0], k - kk), -1, np.int64)], axis=1)
    return SearchResult(dist, ids.astype(np.int64))


def recall_at_k(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean over queries of ``|ids[:, :k] ∩ gt[:, :k]| / k``; -1 ids never match.

    Args:
        ids: (nq, >=k) int64 returned ids. gt: (nq, >=k) int64 exact neighbours.

    >>> recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 1, 9]]), 3)
    0.6666666666666666
    """
    ids, gt = np.asarray(ids), np.asarray(gt)
    if ids.shape[0] != gt.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} queries, gt has {gt.shape[0]}")
    if ids.shape[1] < k or gt.shape[1] < k:
        raise ValueError(f"recall@{k} needs at least {k} columns, got ids {ids.shape} and gt {gt.shape}")
    a, b = ids[:, :k], gt[:, :k]
    hits = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)
    return float(hits.any(axis=2).sum(axis=1).mean() / k)


def to_ranx_run(ids: np.ndarray, distances: np.ndarray, query_ids: Sequence[str],
                corpus_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """A ranx/pytrec_eval run dict from search results: score = -distance; -1 ids are skipped."""
    corpus = np.asarray(corpus_ids, dtype=object)
    run: dict[str, dict[str, float]] = {}
    for qi, qid in enumerate(query_ids):
        valid = ids[qi] >= 0
        docs = corpus[ids[qi][valid]]
        scores = -distances[qi][valid].astype(np.float64)
        run[str(qid)] = {str(d): float(s) for d, s in zip(docs, scores, strict=True)}
    return run


def _metric_numpy(name: str, cut: int, ranked: list[str], rels: dict[str, int]) -> float:
    """One query's nDCG@cut (linear gain, as trec_eval and ranx) or recall@cut."""
    top = [rels.get(d, 0) for d in ranked[:cut]]
    if name == "recall":
        return sum(1 for r in top if r > 0) / sum(1 for r in rels.values() if r > 0)
    dcg = sum(r / np.log2(i + 2) for i, r in enumerate(top))
    ideal = sorted(rels.values(), reverse=True)[:cut]
    idcg = sum(r / np.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def beir_metrics(ids: np.ndarray, distances: np.ndarray, query_ids: Sequence[str], corpus_ids: Sequence[str],
                 qrels: dict[str, dict[str, int]], metrics: Sequence[str] = ("ndcg@10", "recall@100"), *,
                 backend: str = "ranx") -> dict[str, float]:
    """BEIR metrics of a search result, averaged over the judged queries: {"ndcg@10": .., "recall@100": ..}.

    Args:
        ids, distances: (nq, k) search results for the queries ``query_ids`` (k >= the metric cut-offs).
        corpus_ids: N document ids, indexed by the ids. qrels: query id -> {doc id: relevance > 0}.
        metrics: ``ndcg@K`` and ``recall@K`` names.
        backend: ``"ranx"`` (the reference; compiles with numba on first use, which takes a while)
            or ``"numpy"`` (the same definitions: linear-gain nDCG as trec_eval, in plain Python).

    >>> ids = np.array([[0, 1]]); dist = np.array([[0.0, 1.0]])
    >>> beir_metrics(ids, dist, ["q"], ["a", "b"], {"q": {"b": 1}}, ("ndcg@10",), backend="numpy")
    {'ndcg@10': 0.6309297535714575}
    """
    parsed = []
    for m in metrics:
        name, _, cut = m.partition("@")
        if name not in ("ndcg", "recall") or not cut.isdigit() or int(cut) < 1:
            raise ValueError(f"unknown metric {m!r}; use ndcg@K or recall@K")
        parsed.append((m, name, int(cut)))
    run = to_ranx_run(ids, distances, query_ids, corpus_ids)
    judged = {q: r for q, r in qrels.items() if q in run and any(v > 0 for v in r.values())}
    if not judged:
        raise ValueError("no query of the run has relevance judgements")
    if backend == "numpy":
        out = {}
        for m, name, cut in parsed:
            vals = [_metric_numpy(name, cut, sorted(run[q], key=lambda d, q=q: -run[q][d]), judged[q])
                    for q in judged]
            out[m] = float(np.mean(vals))
        return out
    if backend != "ranx":
        raise ValueError(f"backend must be 'ranx' or 'numpy', got {backend!r}")
    import warnings

    from ranx import Qrels, Run, evaluate

    for q in judged:
        if not run[q]:  # ranx rejects empty rankings: a dummy doc that is never relevant
            run[q] = {"\x00none": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba type-safety chatter inside ranx
        res = evaluate(Qrels(judged), Run({q: run[q] for q in judged}), [m for m, _, _ in parsed],
                       make_comparable=True)
    if isinstance(res, float | np.floating):
        res = {parsed[0][0]: res}
    return {m: float(v) for m, v in res.items()}


class Throughput(NamedTuple):
    """Queries per second by wall clock and by process CPU time (the latter is robust to a busy machine;
    with one thread they agree on an idle one)."""

    wall: float
    cpu: float


def queries_per_second(search: Callable[[np.ndarray], Any], queries: np.ndarray, *, min_time: float = 0.5,
                       max_repeats: int = 5) -> Throughput:
    """Throughput of ``search(queries)`` on the whole batch: nq / best time over repeats, wall and CPU.

    Repeats until ``min_time`` wall seconds have passed (at least once, at most ``max_repeats``).
    """
    best_wall, best_cpu, spent, reps = np.inf, np.inf, 0.0, 0
    while reps < max_repeats and (reps == 0 or spent < min_time):
        t, c = time.perf_counter(), time.process_time()
        search(queries)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        best_wall, best_cpu = min(best_wall, dt), min(best_cpu, dc)
        spent, reps = spent + dt, reps + 1
    nq = queries.shape[0]
    return Throughput(float(nq / max(best_wall, 1e-9)), float(nq / max(best_cpu, 1e-9)))


def encode_throughput(encode: Callable[[np.ndarray], Any], x: np.ndarray) -> float:
    """Vectors per second of ``encode(x)`` (one timed call on all of ``x``)."""
    t = time.perf_counter()
    encode(x)
    return float(x.shape[0] / max(time.perf_counter() - t, 1e-9))


def bytes_per_vector(code_bytes: int, *, id_bytes: int = 0, attribute_bytes: int = 0, norm_bytes: int = 0) -> int:
    """In-memory bytes per indexed vector: code (with in-code scales) + id + attributes + separate norms.

    embpress indexes use implicit ids (0), as do the FAISS flat indexes it is compared with; an
    IVF-style index would pass ``id_bytes=8``.

    >>> bytes_per_vector(48, id_bytes=8)
    56
    """
    return int(code_bytes + id_bytes + attribute_bytes + norm_bytes)
