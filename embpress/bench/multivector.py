"""Multi-vector evaluation on a BEIR folder: one vector per text against late interaction over the same
model's frozen token states (exact Chamfer), and MUVERA (FDE codes through a codec, then Chamfer re-rank).

Rows: ``single`` (the model's pooled vector, exact inner product), ``chamfer`` (exact Chamfer over every
document), ``fde`` (FDE codes alone, no re-rank) and ``fde+rerank`` at several candidate counts. Each row
has nDCG@10 and recall at the cut-offs (k, 10 and 100, those the row ranks deep enough for), bytes per
document in memory and on disk, and queries/s (one thread; wall clock on a shared machine, so noisy).
``cand_recall`` is the share of the exact Chamfer top-k found among the FDE candidates.

Every row is one record (``kind="vectors"``, ``config["eval"] == "multivector"``) appended to
``<out>/results.jsonl`` in the one layout of :mod:`embpress.bench.records`. Its identity is its whole
configuration: content fingerprints of the corpus and query ids, qrels, pooled vectors and token
states, the model, the method, the FDE parameters, codec, seed, candidates, ball-carving tau, k, the
cut-offs and threads. A rerun resumes: recorded rows are not measured again, and a codec whose rows
are all recorded is not built. ``embpress report`` renders them (:func:`render_multivector_markdown`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embpress.bench import records
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

EVAL = "multivector"
MV_TIMING = ("qps", "fde_encode_docs_per_s", "codec_fit_add_s")
"""Metrics of a multi-vector row that measure speed (they vary between runs of one trial)."""


def _carve_queries(queries: tuple[np.ndarray, np.ndarray], tau: float) -> tuple[np.ndarray, np.ndarray]:
    qv, qo = queries
    parts = [ball_carve(np.asarray(qv[qo[i]:qo[i + 1]], dtype=np.float32), tau) for i in range(qo.shape[0] - 1)]
    return as_ragged(parts, name="queries")


def _cutoffs(k: int, n: int) -> tuple[int, ...]:
    return tuple(sorted({c for c in (k, 10, 100) if c <= max(n, k)}))


def _metrics(ids: np.ndarray, dist: np.ndarray, query_ids: Sequence[str], corpus_ids: Sequence[str],
             qrels: dict, cuts: Sequence[int]) -> dict[str, float]:
    """nDCG@10 and recall@c for each cut-off c the result ranks deep enough for (record metric names)."""
    depth = ids.shape[1]
    names = ["ndcg@10"] + [f"recall@{c}" for c in cuts if c <= depth]
    m = beir_metrics(ids, dist, query_ids, corpus_ids, qrels, names, backend="numpy")
    return {key.replace("@", "_at_"): v for key, v in m.items()}


def _ragged_fingerprint(r: tuple[np.ndarray, np.ndarray]) -> str:
    return records.fingerprint([records.array_fingerprint(r[0]), records.array_fingerprint(r[1])])


def _fde_params(enc: FDEEncoder) -> dict[str, Any]:
    return {"repetitions": enc.repetitions, "simhash_bits": enc.simhash_bits, "dproj": enc.dproj,
            "projection": enc.projection, "final_dim": enc.final_dim, "fill_empty": enc.fill_empty,
            "seed": enc.seed}


def run_multivector_eval(*, out: str | os.PathLike, dataset: str, model: str, corpus_ids: Sequence[str],
                         query_ids: Sequence[str], qrels: dict, doc_vectors: np.ndarray, query_vectors: np.ndarray,
                         doc_tokens: Any, query_tokens: Any, encoder: str, codecs: Sequence[str],
                         candidates: Sequence[int] = (10, 20, 50, 100), k: int = 10, seed: int = 0,
                         carve_tau: float | None = None, threads: int | None = None,
                         log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate single vector, exact Chamfer and FDE + codec (+ Chamfer re-rank), one record per row appended
    to ``out/results.jsonl`` (recorded rows are reused, not measured again); returns the records in row order.

    Args:
        dataset, model: names recorded with every row. encoder: an FDE spec (``"fde:R=20,k=5,dproj=8"``).
        candidates: FDE candidates re-ranked (each >= k). carve_tau: ball-carve the query tokens before their
            FDE is encoded (the re-rank scores every query token).
        threads: the thread limit the caller set (recorded: it changes the speed figures).
    """
    say = log or (lambda m: None)
    enc = parse_fde_spec(encoder)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < k for c in candidates):
        raise ValueError(f"candidates must be ints >= k={k}, got {list(candidates)!r}")
    path, recorded = records.open_run(out, "vectors")
    done = {r["trial"]: r for r in recorded if r["status"] == "ok"}
    dtok = as_ragged(doc_tokens, name="documents")
    qtok = as_ragged(query_tokens, name="queries")
    n, nq = dtok[1].shape[0] - 1, qtok[1].shape[0] - 1
    if n != len(corpus_ids) or nq != len(query_ids):
        raise ValueError(f"token states cover {n} documents and {nq} queries, the set has {len(corpus_ids)} "
                         f"and {len(query_ids)}")
    cuts = _cutoffs(k, n)
    depth = min(max(cuts), n)
    say(f"fingerprinting the inputs ({dtok[0].shape[0]:,} document tokens) ...")
    shared = {"eval": EVAL, "dataset": dataset, "model": model, "n": n, "nq": nq,
              "corpus": records.fingerprint(list(corpus_ids)),
              "qrels": records.fingerprint({"qrels": qrels, "query_ids": list(query_ids)}),
              "doc_vectors": records.array_fingerprint(np.asarray(doc_vectors)),
              "query_vectors": records.array_fingerprint(np.asarray(query_vectors)),
              "doc_tokens": _ragged_fingerprint(dtok), "query_tokens": _ragged_fingerprint(qtok),
              "k": k, "cutoffs": list(cuts), "threads": threads, "metrics_backend": "numpy"}
    token_disk = (dtok[0].shape[0] * dtok[0].shape[1] * np.asarray(dtok[0][:1]).itemsize + 8 * (n + 1)) / n
    rows: list[dict[str, Any]] = []

    def emit(config: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        tid = records.trial_id(config)
        if tid in done:
            rec = done[tid]
            say(f"skip {config['method']} {config.get('codec', '')} {config.get('candidates', '')}: "
                f"already in {path}")
        else:
            rec = records.make_record("vectors", config, status="ok", metrics=measure())
            records.append_record(path, rec)
            done[tid] = rec
            m = rec["metrics"]
            say("  ".join([config["method"], *(str(config[x]) for x in ("codec", "candidates") if x in config),
                           *(f"{key}={val:.4f}" if isinstance(val, float) else f"{key}={val}"
                             for key, val in m.items())]))
        rows.append(rec)
        return rec

    def single() -> dict[str, Any]:
        t = time.perf_counter()
        res = exact_knn(doc_vectors, query_vectors, depth, "ip")
        dt = time.perf_counter() - t
        return {**_metrics(res.ids, res.distances, query_ids, corpus_ids, qrels, cuts),
                "bytes_per_doc": int(np.asarray(doc_vectors).shape[1] * 4), "disk_bytes_per_doc": 0.0, "qps": nq / dt}

    exact_cache: list[Any] = []

    def exact() -> Any:
        if not exact_cache:
            t = time.perf_counter()
            exact_cache.append((chamfer_search(qtok, dtok, depth), time.perf_counter() - t))
        return exact_cache[0]

    def chamfer() -> dict[str, Any]:
        res, dt = exact()
        return {**_metrics(res.ids, res.distances, query_ids, corpus_ids, qrels, cuts), "bytes_per_doc": 0,
                "disk_bytes_per_doc": round(token_disk, 1), "qps": nq / dt,
                "avg_doc_tokens": round(dtok[0].shape[0] / n, 1), "avg_query_tokens": round(qtok[0].shape[0] / nq, 1)}

    emit({**shared, "method": "single"}, single)
    emit({**shared, "method": "chamfer"}, chamfer)
    t = time.perf_counter()
    q_search = _carve_queries(qtok, carve_tau) if carve_tau is not None else qtok
    carve_s = time.perf_counter() - t  # per-query work: counted in the FDE rows' queries/s
    fde_cfg = {"fde": encoder, "fde_params": _fde_params(enc), "seed": seed, "carve_tau": carve_tau}
    plans = []
    for codec in codecs:
        base_cfg = {**shared, **fde_cfg, "codec": codec}
        cfgs = [{**base_cfg, "method": "fde"}] + [{**base_cfg, "method": "fde+rerank", "candidates": c}
                                                  for c in sorted(set(candidates))]
        plans.append((codec, cfgs))
    doc_fde: list[Any] = []
    for codec, cfgs in plans:
        if all(records.trial_id(c) in done for c in cfgs):
            for c in cfgs:
                emit(c, dict)
            continue
        if not doc_fde:
            if not hasattr(enc, "simhash_"):
                enc.fit(dtok[0].shape[1])
            t = time.perf_counter()
            doc_fde.append(enc.encode_documents(dtok).astype(np.float32, copy=False))
            doc_fde.append(time.perf_counter() - t)
            say(f"FDE {encoder}: {n} documents encoded in {doc_fde[1]:.1f} s ({n / doc_fde[1]:.0f} docs/s)")
        t = time.perf_counter()
        mv = MultiVectorIndex(enc, codec=codec, seed=seed).build(dtok, fde=doc_fde[0])
        build_s = time.perf_counter() - t
        info = {"fde_dim": mv.encoder_.output_dim, "bytes_per_doc": mv.bytes_per_doc(),
                "fde_encode_docs_per_s": round(n / doc_fde[1], 1), "codec_fit_add_s": round(build_s, 1)}

        def fde_only(mv: MultiVectorIndex = mv, info: dict = info) -> dict[str, Any]:
            t = time.perf_counter()
            qf = mv.encoder_.encode_queries(q_search).astype(np.float32, copy=False)
            res = mv.index_.search(qf, depth)
            dt = time.perf_counter() - t + carve_s
            return {**info, **_metrics(res.ids, res.distances, query_ids, corpus_ids, qrels, cuts),
                    "disk_bytes_per_doc": 0.0, "qps": nq / dt, "query_vectors_searched": q_search[0].shape[0] / nq,
                    "carve_s": carve_s}

        def rerank(c: int, mv: MultiVectorIndex = mv, info: dict = info) -> dict[str, Any]:
            t = time.perf_counter()
            qf = mv.encoder_.encode_queries(q_search).astype(np.float32, copy=False)
            cc = mv.index_.search(qf, c).ids
            rr = rerank_chamfer(qtok, dtok, cc, min(c, depth))
            dt = time.perf_counter() - t + carve_s
            ex = exact()[0].ids[:, :k]
            hit = float(np.mean([np.isin(ex[i], cc[i]).mean() for i in range(nq)]))
            return {**info, **_metrics(rr.ids, rr.distances, query_ids, corpus_ids, qrels,
                                       [x for x in cuts if x <= c]),
                    "cand_recall": hit, "disk_bytes_per_doc": round(token_disk, 1), "qps": nq / dt}

        emit(cfgs[0], fde_only)
        for cfg in cfgs[1:]:
            emit(cfg, lambda cfg=cfg: rerank(cfg["candidates"]))
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _bytes(v: Any) -> str:
    return "–" if v is None else f"{v:,.0f}"


_ORDER = {"single": 0, "chamfer": 1, "fde": 2, "fde+rerank": 3}


def mv_groups(recs: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Multi-vector rows grouped by their inputs and shared settings (one table each): flat dicts
    (config and metrics on one level) in the order single, chamfer, then per codec FDE and re-ranks."""
    from embpress.bench.render import group_by_settings, label, varying

    latest, _ = records.latest_per_trial(r for r in recs if r["status"] == "ok")
    row_keys = ("method", "fde", "fde_params", "seed", "carve_tau", "codec", "candidates")
    groups = list(group_by_settings(latest, ignore=row_keys).values())
    configs = [{key: v for key, v in g[0]["config"].items() if key not in row_keys} for g in groups]
    out = []
    for g, c in zip(groups, configs, strict=True):
        differ = varying([x for x in configs if x["dataset"] == c["dataset"]])
        rows = [{**r["config"], **r["metrics"]} for r in g]
        rows.sort(key=lambda r: (_ORDER.get(r["method"], 9), str(r.get("fde", "")), r.get("carve_tau") is not None,
                                 r.get("carve_tau") or 0.0,
                                 r.get("bytes_per_doc") or 0, str(r.get("codec", "")), r.get("candidates") or 0))
        extra = label(c, differ)
        out.append((f"{c['dataset']} ({c['model']})" + (f", {extra}" if extra else ""), rows))
    return out


def render_multivector_markdown(recs: Sequence[dict[str, Any]]) -> list[str]:
    """The report lines of multi-vector records: one table per data set and inputs."""
    lines = ["# Multi-vector: single vector, exact Chamfer over token states, MUVERA FDE + codec + re-rank", "",
             "nDCG@10 and recall@c against the qrels. `cand. recall`: share of the exact-Chamfer top-k among the "
             "FDE candidates. bytes/doc in memory: the pooled float32 vector (single) or the FDE code (fde); "
             "on disk: the token vectors at their stored precision plus an offset (read by Chamfer). carve τ: "
             "the query tokens are ball-carved (cluster sums) for the query FDE only; the Chamfer re-rank uses every "
             "query token (the carving time is counted in queries/s). "
             "queries/s: wall clock, one thread, shared machine (noisy).", ""]
    for title, rows in mv_groups(recs):
        k = rows[0]["k"]
        cuts = rows[0]["cutoffs"]
        c0 = next((r for r in rows if r["method"] == "chamfer"), rows[0])
        lines += [f"## {title}", "", f"N = {rows[0]['n']:,} documents, {rows[0]['nq']:,} queries, k = {k}"
                  + (f", {c0['avg_doc_tokens']} tokens per document, {c0['avg_query_tokens']} per query"
                     if "avg_doc_tokens" in c0 else "") + ".", ""]
        head = ["method", "FDE", "carve τ", "codec", "cand.", "nDCG@10", *[f"R@{c}" for c in cuts],
                f"cand. recall of Chamfer top-{k}", "bytes/doc mem", "bytes/doc disk", "q/s"]
        table = []
        for r in rows:
            table.append([r["method"], r.get("fde", ""), _fmt(r.get("carve_tau")) if "fde" in r else "",
                          r.get("codec", ""), r.get("candidates", ""), _fmt(r.get("ndcg_at_10")),
                          *[_fmt(r.get(f"recall_at_{c}")) for c in cuts], _fmt(r.get("cand_recall"), 3),
                          _bytes(r.get("bytes_per_doc")), _bytes(r.get("disk_bytes_per_doc")), _fmt(r.get("qps"), 1)])
        from embpress.bench.render import md_table

        lines += md_table(head, "lllll" + "r" * (len(head) - 5), table)
        lines.append("")
    return lines


def draw_multivector_panel(ax: Any, title: str, rows: Sequence[dict[str, Any]]) -> None:
    """nDCG@10 against in-memory bytes per document: FDE codes alone and re-ranked (most candidates), with
    the single-vector and exact-Chamfer levels as lines."""
    for method, style, colour in (("single", "--", "tab:gray"), ("chamfer", ":", "k")):
        v = next((r.get("ndcg_at_10") for r in rows if r["method"] == method), None)
        if v is not None:
            ax.axhline(v, ls=style, color=colour, lw=1, label=f"{method} (exact)")
    fde = [r for r in rows if r["method"] == "fde"]
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] == "fde+rerank":
            key = (r.get("fde"), r.get("codec"), r.get("carve_tau"))
            if key not in best or r["candidates"] > best[key]["candidates"]:
                best[key] = r
    for pts, marker, name in ((fde, "o", "FDE codes"), (list(best.values()), "^", "FDE + Chamfer re-rank (most cand.)")):
        if pts:
            ax.scatter([r["bytes_per_doc"] for r in pts], [r["ndcg_at_10"] for r in pts], marker=marker, label=name)
            for r in pts:
                ax.annotate(str(r.get("codec")), (r["bytes_per_doc"], r["ndcg_at_10"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per document in memory (log scale)")
    ax.set_ylabel("nDCG@10")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
