"""LIMIT: the free-embedding probe (learns, succeeds where the geometry allows, fails where it cannot),
the critical-n search, the codec storage check, and the LIMIT-style data generator."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from embpress.limit.probe import (
    codec_check,
    critical_n,
    fit_free_embeddings,
    paper_critical_n,
    subset_qrels,
    topk_accuracy,
)


def test_subset_qrels_are_every_pair():
    q = subset_qrels(6, 2)
    assert q.shape == (15, 2) and len({tuple(r) for r in q.tolist()}) == 15 and (q[:, 0] < q[:, 1]).all()
    assert subset_qrels(5, 3).shape == (10, 3)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        subset_qrels(2, 3)


def test_free_embeddings_learn_every_pair_when_the_dimension_allows():
    torch.manual_seed(0)
    before = fit_free_embeddings(6, 4, max_iters=1, seed=3)
    res = fit_free_embeddings(6, 4, seed=3)
    assert res.success and res.iterations > 1
    assert not torch.allclose(before.docs, res.docs, atol=1e-3)  # the documents moved
    assert before.accuracy < 1.0  # random vectors do not already solve it
    rel = torch.from_numpy(subset_qrels(6, 2))
    assert topk_accuracy(res.queries, res.docs, rel) == 1.0
    assert torch.allclose(res.docs.norm(dim=1), torch.ones(6), atol=1e-5)


def test_two_dimensions_cannot_express_every_pair_of_six():
    # on the unit circle only pairs of (roughly) neighbouring points can be a top-2
    res = fit_free_embeddings(6, 2, seed=0, patience=300, max_iters=6000)
    assert not res.success and res.accuracy < 1.0


def test_critical_n_gallops_and_bisects():
    calls = []

    def oracle(n):
        calls.append(n)
        return n <= 100

    assert critical_n(oracle, 10, step=1)[0] == 100
    assert critical_n(lambda n: n <= 7, 50, step=2)[0] == 7
    assert len(set(calls)) == len(calls)  # every n tried once
    assert critical_n(lambda n: False, 5, lo_bound=3)[0] == 2


def test_codec_check_lossless_keeps_and_one_bit_breaks():
    base = fit_free_embeddings(7, 4, seed=1)
    assert base.success
    assert codec_check(base, "fp16").success
    assert not codec_check(base, "bin", patience=200, max_iters=1500).success  # 1 bit/dim: 16 points at most


def test_paper_fit_values():
    assert paper_critical_n(4) == pytest.approx(6.66, abs=0.01)
    assert round(paper_critical_n(1024)) == 4_031_487  # the paper: "about 4M at d=1024"


def test_generated_limit_has_the_published_statistics(tmp_path):
    from embpress.limit.data import dense_docs_needed, generate_limit, write_limit
    from embpress.vectors.beir import load_beir

    data = generate_limit(300, n_queries=100, items_per_doc=20, seed=4)
    assert dense_docs_needed(100, 2) == 15
    assert all(len(lk) == 20 for lk in data.likes) and len(set(data.corpus_ids)) == 300
    assert all(len(v) == 2 for v in data.qrels.values()) and len(data.qrels) == 100
    relevant = {d for v in data.qrels.values() for d in v}
    assert len(relevant) == 15  # the dense block; the other 285 documents are distractors
    by_id = dict(zip(data.corpus_ids, data.likes, strict=True))
    for qid, text in zip(data.query_ids, data.query_texts, strict=True):
        item = text.removeprefix("Who likes ").removesuffix("?")
        likers = {d for d, lk in by_id.items() if item in lk}
        assert likers == set(data.qrels[qid])  # exactly its two relevant people like the query's item
    again = generate_limit(300, n_queries=100, items_per_doc=20, seed=4)
    assert again.corpus_texts == data.corpus_texts  # deterministic
    assert generate_limit(300, n_queries=100, items_per_doc=20, seed=5).corpus_texts != data.corpus_texts
    ds = load_beir(write_limit(data, tmp_path / "lim"))
    assert len(ds.corpus_ids) == 300 and len(ds.query_ids) == 100
    assert json.loads((tmp_path / "lim" / "qrels.jsonl").read_text().splitlines()[0])["score"] == 1
    with pytest.raises(ValueError, match="need at least 15 documents"):
        generate_limit(10, n_queries=100)


def test_probe_records_resume_and_share_trials_with_checks(tmp_path, monkeypatch):
    from embpress.bench import limit as bench_limit
    from embpress.bench.records import read_records

    out = tmp_path / "run"
    first = bench_limit.run_probe(out, [2], codecs_for=lambda d: ("sq8",), patience=200, max_iters=3000, threads=1)
    assert [(s["storage"], s["critical_n"]) for s in first] == [("float32", 3), ("sq8", 3)]
    recs = read_records(out / "results.jsonl", kind="limit")
    assert {(r["config"]["storage"], r["config"]["n"]) for r in recs} == {("float32", 3), ("float32", 4), ("sq8", 3)}
    assert all(r["config"]["patience"] == 200 and r["config"]["lr"] == 0.01 for r in recs)

    def no_fit(*a, **kw):
        raise AssertionError("a recorded trial was measured again")

    probe_mod = sys.modules["embpress.limit.probe"]
    monkeypatch.setattr(probe_mod, "fit_free_embeddings", no_fit)
    again = bench_limit.run_probe(out, [2], codecs_for=lambda d: ("sq8",), patience=200, max_iters=3000, threads=1)
    assert [s["critical_n"] for s in again] == [3, 3] and len(read_records(out / "results.jsonl")) == len(recs)
    monkeypatch.setattr(probe_mod, "fit_free_embeddings", fit_free_embeddings)
    check = bench_limit.run_probe(out, [2], at=4, patience=200, max_iters=3000, threads=1,
                                  codecs_for=lambda d: ("sq8",))  # float32 at n=4 is recorded: reused
    assert [(c["storage"], c["trials"][0]["success"]) for c in check] == [("float32", False)]
    assert len(read_records(out / "results.jsonl")) == len(recs)
    other = bench_limit.run_probe(out, [2], patience=300, max_iters=3000, threads=1)  # another setting: new trials
    assert other[0]["critical_n"] == 3 and len(read_records(out / "results.jsonl")) == len(recs) + 2
    md = bench_limit.render_markdown(read_records(out / "results.jsonl"))
    assert md.count("## k = 2 (patience=") == 2 and "| 2 | – | 3 | 3 |" in md


def test_probe_bounds_from_trials():
    from embpress.bench.limit import bounds

    t = [{"n": n, "success": ok} for n, ok in ((10, True), (12, True), (20, False), (11, False))]
    assert bounds(t) == {"critical_n": 12, "first_failure": 20, "exact": False, "failures_below": 1}
    assert bounds([{"n": 5, "success": False}])["critical_n"] is None
    assert bounds([{"n": 5, "success": True}, {"n": 6, "success": False}])["exact"]


def test_probe_sweep_measures_around_the_critical_n_as_the_reference():
    from embpress.limit.probe import probe

    seen = []
    runs = probe(2, patience=200, max_iters=3000, sweep=True, on_trial=lambda s, n, o: seen.append(n))
    assert runs[0].critical_n == 3 and sorted(set(seen)) == [3, 4, 5, 6, 7, 8]  # 3 - 4 .. 3 + 5, from n = 3
    assert len(seen) == len(set(seen))  # each n measured once
