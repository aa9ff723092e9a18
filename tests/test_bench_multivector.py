"""Multi-vector evaluation records (``vectors eval --multivector``): one record per row in the shared layout,
identity = the whole configuration (input fingerprints included), resume without re-measuring, and a report
rendered from the records alone."""

from __future__ import annotations

import numpy as np
import pytest

from embpress.bench import multivector as bench_mv
from embpress.bench.records import read_records
from embpress.bench.vectors_report import render_report
from embpress.cli import main


def _tiny(seed: int = 0):
    rng = np.random.default_rng(seed)
    docs = [rng.standard_normal((int(rng.integers(3, 7)), 16)).astype(np.float32) for _ in range(30)]
    docs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in docs]
    queries, qrels = [], {}
    for i in range(8):
        a, b = 2 * i, 2 * i + 1  # each query holds two tokens of each of its two relevant documents
        q = np.concatenate([docs[a][:2], docs[b][:2]]) + 0.05 * rng.standard_normal((4, 16)).astype(np.float32)
        queries.append(q.astype(np.float32))
        qrels[f"q{i}"] = {f"d{a}": 1, f"d{b}": 1}

    def pool(c):
        m = np.stack([x.mean(0) for x in c])
        return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)

    return dict(dataset="tiny", model="test", corpus_ids=[f"d{i}" for i in range(30)],
                query_ids=[f"q{i}" for i in range(8)], qrels=qrels, doc_vectors=pool(docs),
                query_vectors=pool(queries), doc_tokens=docs, query_tokens=queries)


def test_rows_are_records_that_resume_and_render(tmp_path, monkeypatch):
    data = _tiny()
    kw = dict(encoder="fde:R=4,k=2,dproj=8", codecs=("fp16", "sq8"), candidates=(5, 10), k=2, threads=1)
    recs = bench_mv.run_multivector_eval(out=tmp_path, **data, **kw)
    methods = [(r["config"]["method"], r["config"].get("codec"), r["config"].get("candidates")) for r in recs]
    assert methods == [("single", None, None), ("chamfer", None, None), ("fde", "fp16", None),
                       ("fde+rerank", "fp16", 5), ("fde+rerank", "fp16", 10), ("fde", "sq8", None),
                       ("fde+rerank", "sq8", 5), ("fde+rerank", "sq8", 10)]
    on_disk = read_records(tmp_path / "results.jsonl", kind="vectors")
    assert [r["trial"] for r in on_disk] == [r["trial"] for r in recs]
    m = {r["config"]["method"] + str(r["config"].get("codec")) + str(r["config"].get("candidates")): r["metrics"]
         for r in recs}
    assert m["chamferNoneNone"]["recall_at_2"] == 1.0  # each query holds tokens of both relevant documents
    assert set(m["chamferNoneNone"]) >= {"ndcg_at_10", "recall_at_2", "recall_at_10", "qps", "avg_doc_tokens"}
    assert "recall_at_10" not in m["fde+rerankfp165"]  # 5 candidates rank no 10 deep
    assert m["fde+rerankfp1610"]["cand_recall"] == 1.0  # 10 of 30 candidates hold the Chamfer top-2 here
    assert m["fdesq8None"]["bytes_per_doc"] < m["fdefp16None"]["bytes_per_doc"] == 2 * 4 * 4 * 8

    def boom(*a, **k):
        raise AssertionError("a recorded row was measured again")

    monkeypatch.setattr(bench_mv, "chamfer_search", boom)
    monkeypatch.setattr(bench_mv.FDEEncoder, "encode_documents", boom)
    again = bench_mv.run_multivector_eval(out=tmp_path, **data, **kw)
    assert [r["trial"] for r in again] == [r["trial"] for r in recs]
    assert len(read_records(tmp_path / "results.jsonl")) == len(recs)
    with pytest.raises(AssertionError, match="measured again"):  # one token changed: every row is a new trial
        changed = {**data, "doc_tokens": [d.copy() for d in data["doc_tokens"]]}
        changed["doc_tokens"][3][0, 0] += 1e-3
        bench_mv.run_multivector_eval(out=tmp_path, **changed, **kw)
    monkeypatch.undo()
    before = len(read_records(tmp_path / "results.jsonl"))  # + the changed set's single row, measured before the raise
    more = bench_mv.run_multivector_eval(out=tmp_path, **data, **{**kw, "candidates": (5, 20)})
    assert len(read_records(tmp_path / "results.jsonl")) == before + 2  # only fp16 and sq8 at 20 candidates
    assert {r["config"]["candidates"] for r in more if "candidates" in r["config"]} == {5, 20}
    md, png = render_report(tmp_path)
    md.unlink()
    with pytest.raises(SystemExit) as done:  # the one report command renders vectors folders too
        main(["report", str(tmp_path)])
    assert done.value.code == 0
    text = md.read_text()
    assert "## tiny (test)" in text and "| chamfer |" in text and "| fde+rerank | fde:R=4,k=2,dproj=8 |" in text
    assert png.stat().st_size > 0


def test_bad_candidates_are_refused_before_any_record(tmp_path):
    with pytest.raises(ValueError, match="candidates must be ints >= k=10"):
        bench_mv.run_multivector_eval(out=tmp_path, **_tiny(), encoder="fde:R=2,k=1,dproj=4", codecs=("fp16",),
                                      candidates=(5,), k=10)
    assert not (tmp_path / "results.jsonl").exists()
