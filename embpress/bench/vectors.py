"""The retrieval benchmark grid (``embpress vectors eval``): every codec on one data set, beside its FAISS equivalent.

For each codec spec it fits, encodes, indexes (codes in memory, float32 originals on disk), searches
with and without re-ranking, and appends one record to ``<out>/results.jsonl`` with quality
(recall@k against exact search; nDCG@10 and recall@100 against qrels when given), memory (bytes
per vector with every per-vector overhead) and speed (queries/s on the whole query batch, encode
vectors/s), plus the same figures of the FAISS index that does the same thing, measured in the
same run on the same thread count. A ``float32`` record (exact search) is the reference.

Records have the one layout of :mod:`embpress.bench.records` (``kind="vectors"``). A trial's identity
is its whole configuration: content fingerprints of the base, queries, training sample and qrels,
the codec spec and its parameters, metric, k, oversample, seed, threads and the measuring
settings. A run resumes: codecs whose whole configuration is already recorded are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embpress.atomic import remove_stale
from embpress.bench import records
from embpress.vectors.codec import Codec, as_matrix, build_codec, code_size
from embpress.vectors.evaluate import (
    beir_metrics,
    encode_throughput,
    exact_knn,
    normalize_rows,
    queries_per_second,
    recall_at_k,
)
from embpress.vectors.index import Index
from embpress.vectors.kernels import limit_threads
from embpress.vectors.metric import Metric, as_metric, pairwise_distances

REFERENCE = "float32"
TIMING_METRICS = ("fit_s", "add_s", "encode_vps", "qps", "qps_rerank", "qps_cpu", "qps_rerank_cpu", "faiss_fit_s",
                  "faiss_qps", "faiss_qps_cpu", "faiss_qps_rerank", "faiss_qps_rerank_cpu", "wall_seconds")
"""Metrics that measure speed: they vary between runs of one trial (everything else must not)."""
_ENCODE_SAMPLE = 10_000


@dataclass(frozen=True)
class EvalSet:
    """Vectors to benchmark on.

    Attributes:
        name: data set name (part of every record's key).
        base: (N, D) float32 corpus. queries: (nq, D) float32.
        train: vectors the codecs are fitted on (default: the base).
        corpus_ids, query_ids, qrels: BEIR ids and judgements, for nDCG@10 / recall@100.
        metrics_backend: ``"ranx"`` or ``"numpy"`` (see :func:`beir_metrics`).
    """

    name: str
    base: np.ndarray
    queries: np.ndarray
    train: np.ndarray | None = None
    corpus_ids: Sequence[str] | None = None
    query_ids: Sequence[str] | None = None
    qrels: dict[str, dict[str, int]] | None = None
    metrics_backend: str = "ranx"

    @property
    def has_qrels(self) -> bool:
        return self.qrels is not None


def holdout_queries(x: np.ndarray, n_queries: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split (N, D) vectors into (base, queries): ``n_queries`` random rows become queries.

    >>> base, q = holdout_queries(np.arange(20, dtype="float32").reshape(10, 2), 3)
    >>> base.shape, q.shape
    ((7, 2), (3, 2))
    """
    n = x.shape[0]
    if not 0 < n_queries < n:
        raise ValueError(f"n_queries must be in [1, {n - 1}] to hold out queries from {n} vectors, got {n_queries}")
    perm = np.random.default_rng(seed).permutation(n)
    qi, bi = np.sort(perm[:n_queries]), np.sort(perm[n_queries:])
    return np.ascontiguousarray(x[bi], dtype=np.float32), np.ascontiguousarray(x[qi], dtype=np.float32)


def sample_rows(x: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` random rows of ``x`` (all of it, as float32, when ``n >= len(x)``), in their original order."""
    if n < 1:
        raise ValueError(f"the training sample size must be >= 1, got {n}")
    if n >= x.shape[0]:
        return np.ascontiguousarray(x, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], n, replace=False))
    return np.ascontiguousarray(x[rows], dtype=np.float32)


class _Float32Codec(Codec):
    """The uncompressed reference: codes are the float32 bytes, scored exactly (not registered)."""

    def __init__(self) -> None:
        pass

    def _canonical_spec(self) -> str:
        return REFERENCE

    def _code_bytes_for(self, d: int) -> int:
        return 4 * d

    def _fit(self, x: np.ndarray) -> None:
        pass

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        return codes.view(np.float32).copy()

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        return pairwise_distances(q, codes.view(np.float32), metric)


_FAISS_SIMPLE = [
    (r"fp16", lambda g: "SQfp16"),
    (r"sq8", lambda g: "SQ8"),
    (r"sq4", lambda g: "SQ4"),
    (r"pq(\d+)(?:x(\d+))?", lambda g: f"PQ{g[0]}x{g[1] or 8}np"),
    (r"opq(\d+)(?:x(\d+))?", lambda g: f"OPQ{g[0]},PQ{g[0]}x{g[1] or 8}np"),
    (r"rq(\d+)(?:x(\d+))?", lambda g: f"RQ{g[0]}x{g[1] or 8}"),
]


def faiss_equivalent(spec: str, d: int) -> str | None:
    """The FAISS index doing what ``spec`` does: an ``index_factory`` string, ``"BinaryFlat"`` for
    ``bin`` (signs + Hamming), ``"Flat"`` for the float32 reference, or None (mrl, bebr, ...).

    PQ strings end in ``np``: the factory's default polysemous training only permutes code ids
    (same ADC results) and costs minutes, which would distort the training time.

    >>> faiss_equivalent("pca128+sq8", 384), faiss_equivalent("opq48", 384), faiss_equivalent("bebr1", 384)
    ('PCA128,SQ8', 'OPQ48,PQ48x8np', None)
    """
    spec = spec.strip().lower()
    if spec == REFERENCE:
        return "Flat"
    if spec == "bin":
        return "BinaryFlat"
    m = re.fullmatch(r"itq(\d+)", spec)
    if m:
        return f"ITQ{m[1]},LSH" if int(m[1]) <= d else None
    m = re.fullmatch(r"rbin(\d+)", spec)
    if m:
        return f"LSH{m[1]}rt"
    parts = spec.split("+")
    pre = []
    for p in parts[:-1]:
        m = re.fullmatch(r"pca(\d+)", p)
        if not m:
            return None
        pre.append(f"PCA{m[1]}")
    last = parts[-1]
    m = re.fullmatch(r"pca(\d+)", last)
    if m:
        return ",".join([*pre, f"PCA{m[1]}", "Flat"])
    for pattern, make in _FAISS_SIMPLE:
        m = re.fullmatch(pattern, last)
        if m:
            return ",".join([*pre, make(m.groups())])
    return None


def _threads(n: int | None):
    """Limit BLAS, FAISS and the compiled scans to ``n`` threads for a fair speed comparison."""
    return limit_threads(n)


def _beir(data: EvalSet, ids: np.ndarray, dist: np.ndarray, k: int | None = None) -> dict[str, float]:
    """nDCG@10 and recall@100 against the qrels, and recall@k (``qrels_recall_at_k``) when k is given."""
    assert data.qrels is not None and data.corpus_ids is not None and data.query_ids is not None
    names = ("ndcg@10", "recall@100") + ((f"recall@{k}",) if k is not None and k != 100 else ())
    m = beir_metrics(ids, dist, data.query_ids, data.corpus_ids, data.qrels, names, backend=data.metrics_backend)
    if k is not None:
        m["qrels_recall_at_k"] = m[f"recall@{k}"]
    return m


def _ours(spec: str, data: EvalSet, gt: np.ndarray, *, k: int, oversample: int, metric: Metric, seed: int,
          workdir: Path, step: Callable[[str], None], qps_time: float) -> dict[str, Any]:
    codec: str | Codec = _Float32Codec() if spec == REFERENCE else spec
    index = Index(codec, metric=metric, rerank_path=workdir / "originals.f32", seed=seed)
    step("fit")
    t = time.perf_counter()
    index.fit(data.train if data.train is not None else data.base)
    fit_s = time.perf_counter() - t
    sample = data.base[:_ENCODE_SAMPLE]
    sample = normalize_rows(sample) if metric is Metric.COSINE else sample
    encode_vps = encode_throughput(index.codec_.encode, sample)
    step("add")
    t = time.perf_counter()
    index.add(data.base)
    add_s = time.perf_counter() - t
    q = data.queries
    step("search")
    res = index.search(q, k)
    res_rr = index.search(q, k, oversample=oversample)
    qps = queries_per_second(lambda b: index.search(b, k), q, min_time=qps_time)
    qps_rr = queries_per_second(lambda b: index.search(b, k, oversample=oversample), q, min_time=qps_time)
    n, d = data.base.shape
    rec: dict[str, Any] = {
        "code_bytes": index.codec_.code_bytes,
        "bytes_per_vector": index.bytes_per_vector(),
        "fixed_bytes": index.fixed_bytes(),
        "bytes_per_vector_amortized": index.bytes_per_vector() + index.fixed_bytes() / n,
        "disk_bytes_per_vector": index.disk_bytes_per_vector(),
        "compression": 4 * d / index.bytes_per_vector(),
        "fit_s": fit_s, "add_s": add_s, "encode_vps": encode_vps,
        "recall_at_k": recall_at_k(res.ids, gt, k),
        "recall_at_k_rerank": recall_at_k(res_rr.ids, gt, k),
        "qps": qps.wall, "qps_rerank": qps_rr.wall, "qps_cpu": qps.cpu, "qps_rerank_cpu": qps_rr.cpu,
    }
    if data.has_qrels:
        step("nDCG")
        kb = max(k, 100)
        r = index.search(q, kb)
        m = _beir(data, r.ids, r.distances, k)
        r = index.search(q, kb, oversample=oversample)
        mr = _beir(data, r.ids, r.distances, k)
        rec.update(ndcg_at_10=m["ndcg@10"], recall_at_100=m["recall@100"], qrels_recall_at_k=m["qrels_recall_at_k"],
                   ndcg_at_10_rerank=mr["ndcg@10"], recall_at_100_rerank=mr["recall@100"],
                   qrels_recall_at_k_rerank=mr["qrels_recall_at_k"])
    return rec


def _faiss(spec: str, data: EvalSet, gt: np.ndarray, *, k: int, oversample: int, metric: Metric,
           step: Callable[[str], None], qps_time: float) -> dict[str, Any]:
    """The FAISS equivalent's figures (``faiss_*``), or {} when FAISS has none."""
    import faiss

    d = data.base.shape[1]
    key = faiss_equivalent(spec, d)
    if key is None:
        return {}
    base, q = data.base, data.queries
    train = data.train if data.train is not None else base
    if metric is Metric.COSINE:
        base, q, train = normalize_rows(base), normalize_rows(q), normalize_rows(train)
    base, q, train = (np.ascontiguousarray(a, dtype=np.float32) for a in (base, q, train))
    step("faiss")
    out: dict[str, Any] = {"faiss_index": key}
    t = time.perf_counter()
    if key == "BinaryFlat":
        out["faiss_index"] = "IndexBinaryFlat(sign bits)"
        index = faiss.IndexBinaryFlat(d)
        index.add(np.packbits(base > 0, axis=1))
        qb = np.packbits(q > 0, axis=1)
        out["faiss_fit_s"] = time.perf_counter() - t
        search = lambda b, kk: index.search(np.packbits(b > 0, axis=1), kk)  # noqa: E731
        out["faiss_bytes_per_vector"] = int(index.code_size)
        _, ids = index.search(qb, k)
        out["faiss_recall_at_k"] = recall_at_k(ids, gt, k)
        t = queries_per_second(lambda b: search(b, k), q, min_time=qps_time)
        out.update(faiss_qps=t.wall, faiss_qps_cpu=t.cpu)
        if data.has_qrels:
            dist, ids = index.search(qb, max(k, 100))
            m = _beir(data, ids, dist.astype(np.float32))
            out.update(faiss_ndcg_at_10=m["ndcg@10"], faiss_recall_at_100=m["recall@100"])
        return out
    fm = faiss.METRIC_L2 if (metric is Metric.L2 or "LSH" in key) else faiss.METRIC_INNER_PRODUCT
    base_index = faiss.index_factory(d, key, fm)
    refine = faiss.IndexRefineFlat(base_index)
    refine.train(train)
    refine.add(base)
    out["faiss_fit_s"] = time.perf_counter() - t
    out["faiss_bytes_per_vector"] = int(base_index.sa_code_size())
    params = faiss.IndexRefineSearchParameters(k_factor=float(oversample))

    def sign(dist: np.ndarray, index_metric: int) -> np.ndarray:
        return dist.astype(np.float32) if index_metric == faiss.METRIC_L2 else -dist.astype(np.float32)

    _, ids = base_index.search(q, k)
    _, ids_rr = refine.search(q, k, params=params)
    out["faiss_recall_at_k"] = recall_at_k(ids, gt, k)
    out["faiss_recall_at_k_rerank"] = recall_at_k(ids_rr, gt, k)
    t = queries_per_second(lambda b: base_index.search(b, k), q, min_time=qps_time)
    t_rr = queries_per_second(lambda b: refine.search(b, k, params=params), q, min_time=qps_time)
    out.update(faiss_qps=t.wall, faiss_qps_cpu=t.cpu, faiss_qps_rerank=t_rr.wall, faiss_qps_rerank_cpu=t_rr.cpu)
    if data.has_qrels:
        kb = max(k, 100)
        dist, ids = base_index.search(q, kb)
        m = _beir(data, ids, sign(dist, fm))
        dist, ids = refine.search(q, kb, params=params)
        mr = _beir(data, ids, sign(dist, refine.metric_type))
        out.update(faiss_ndcg_at_10=m["ndcg@10"], faiss_recall_at_100=m["recall@100"],
                   faiss_ndcg_at_10_rerank=mr["ndcg@10"], faiss_recall_at_100_rerank=mr["recall@100"])
    return out


def check_specs(specs: Sequence[str], d: int) -> list[str]:
    """Validate every spec at dim ``d`` before any work (unknown, malformed or unfit specs raise)."""
    out = []
    for s in specs:
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"empty codec spec in {list(specs)!r}; give specs such as 'sq8,pq32'")
        s = s.strip()
        if s != REFERENCE:
            code_size(d, s)  # ValueError naming the spec and the allowed forms
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError("no codec specs given")
    return out


def run_eval(data: EvalSet, codecs: Sequence[str], out_dir: str | Path, *, k: int = 10, oversample: int = 4,
             metric: str | Metric = "ip", seed: int = 0, threads: int | None = 1, with_faiss: bool = True,
             qps_time: float = 0.5, progress: bool = True,
             log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Benchmark ``codecs`` (plus the float32 reference) on ``data``; append records to ``out_dir/results.jsonl``.

    Args:
        data: base, queries and optional qrels.
        codecs: spec strings; all are validated first.
        k: recall@k cut-off. oversample: re-ranking factor (``k * oversample`` candidates).
        metric: ip, cosine or l2. seed: codec seed.
        threads: BLAS / OpenMP threads for ours and FAISS alike (None leaves them as they are).
        with_faiss: measure the FAISS equivalents.
        qps_time: seconds of repeated searches per queries/s figure (best of the repeats counts).
        progress: rich progress bar. log: where to print skip notices (default: nowhere).

    Returns:
        The records of this data set and grid, old (resumed) and new, in ``codecs`` order.
    """
    metric = as_metric(metric)
    base = as_matrix(data.base, name="base")
    queries = as_matrix(data.queries, name="queries")
    if base.shape[0] == 0:
        raise ValueError("the base (corpus) is empty")
    if queries.shape[0] == 0:
        raise ValueError("no queries")
    if queries.shape[1] != base.shape[1]:
        raise ValueError(f"queries have d={queries.shape[1]}, the base has d={base.shape[1]}")
    if not isinstance(k, int) or k < 1 or k > base.shape[0]:
        raise ValueError(f"k must be an int in [1, N={base.shape[0]}], got {k!r}")
    if not isinstance(oversample, int) or oversample < 1:
        raise ValueError(f"oversample must be an int >= 1, got {oversample!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 (or None to leave them as they are), got {threads!r}")
    if not (isinstance(qps_time, int | float) and 0 <= qps_time < float("inf")):
        raise ValueError(f"qps_time must be a number of seconds >= 0, got {qps_time!r}")
    train = None if data.train is None else as_matrix(data.train, name="train")
    data = dataclasses.replace(data, base=base, queries=queries, train=train)
    n, d = base.shape
    specs = [REFERENCE] + [s for s in check_specs(codecs, d) if s != REFERENCE]
    results, recorded = records.open_run(out_dir, "vectors")  # a file or another kind's folder: before any work
    done = {r["trial"]: r for r in recorded if r["status"] == "ok"}
    qrels = None
    if data.has_qrels:
        qrels = records.fingerprint({"qrels": data.qrels, "corpus_ids": list(data.corpus_ids or ()),
                             "query_ids": list(data.query_ids or ()), "backend": data.metrics_backend})
    shared = {"dataset": data.name, "base": records.array_fingerprint(base), "queries": records.array_fingerprint(queries),
              "train": None if train is None else records.array_fingerprint(train), "qrels": qrels, "n": n, "d": d,
              "nq": queries.shape[0], "train_n": n if train is None else train.shape[0], "metric": metric.value,
              "k": k, "oversample": oversample, "seed": seed, "threads": threads, "with_faiss": with_faiss,
              "qps_time": qps_time}
    gt = None
    rows = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[step]}"), disable=not progress) as bar:
        task = bar.add_task(f"{data.name}: codecs", total=len(specs), step="")
        for spec in specs:
            config = {**shared, "codec": spec,
                      "codec_params": "float32 (exact)" if spec == REFERENCE else repr(build_codec(spec, seed=seed))}
            if records.trial_id(config) in done:
                if log:
                    log(f"skip {spec}: already in {results}")
                rows.append(done[records.trial_id(config)])
                bar.advance(task)
                continue

            def step(what: str, spec: str = spec) -> None:
                bar.update(task, step=f"{spec}: {what}")

            if gt is None:
                step("exact ground truth")
                gt = exact_knn(base, queries, k, metric).ids
            results.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(results.parent, ".work-")  # scratch of a run that was killed
            work = Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=results.parent))
            t0 = time.perf_counter()
            try:
                with _threads(threads):
                    metrics = _ours(spec, data, gt, k=k, oversample=oversample, metric=metric, seed=seed,
                                    workdir=work, step=step, qps_time=qps_time)
                    if with_faiss:
                        metrics.update(_faiss(spec, data, gt, k=k, oversample=oversample, metric=metric, step=step,
                                              qps_time=qps_time))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            metrics["wall_seconds"] = time.perf_counter() - t0
            rec = records.make_record("vectors", config, status="ok", metrics=metrics)
            records.append_record(results, rec)
            rows.append(rec)
            bar.advance(task)
    return rows
