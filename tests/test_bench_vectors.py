"""The retrieval benchmark (``embpress vectors eval`` / ``report``): records, report, resume, errors;
BEIR from cached vectors; FAISS equivalents and held-out queries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embpress.bench.records import read_records
from embpress.bench.vectors import faiss_equivalent, holdout_queries
from embpress.cli import app
from embpress.vectors.encode import cache_path

runner = CliRunner()
FIELDS = {"codec", "bytes_per_vector", "k", "recall_at_k", "recall_at_k_rerank", "qps", "qps_rerank",
          "encode_vps", "dataset", "metric", "oversample", "base", "queries", "codec_params", "threads"}


def flat(path: Path) -> list[dict]:
    """The records of a run, each as one level: config and metrics."""
    return [{**r["config"], **r["metrics"], "kind": r["kind"]} for r in read_records(path)]


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((10, d)).astype(np.float32) * 3
    return (centers[rng.integers(0, 10, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vec") / "syn.npy"
    np.save(path, clustered(1500, 32, 0))
    return path


def run(*args: str):
    return runner.invoke(app, ["vectors", "eval", *args, "--no-progress", "--qps-time", "0"], catch_exceptions=False)


def test_eval_base_writes_records_report_and_resumes(base_file, tmp_path):
    out = tmp_path / "run"
    res = run("--base", str(base_file), "--codecs", "sq8,bin,pq4x4", "--n-queries", "60", "--out", str(out))
    assert res.exit_code == 0, res.output
    recs = flat(out / "results.jsonl")
    assert [r["codec"] for r in recs] == ["float32", "sq8", "bin", "pq4x4"]
    for r in recs:
        assert r["kind"] == "vectors"
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["n"] == 1440 and r["nq"] == 60 and r["k"] == 10
    by = {r["codec"]: r for r in recs}
    assert by["float32"]["recall_at_k"] == 1.0 and by["float32"]["bytes_per_vector"] == 128
    assert by["bin"]["bytes_per_vector"] == 4 and by["sq8"]["bytes_per_vector"] == 32
    assert by["sq8"]["faiss_index"] == "SQ8"
    assert by["sq8"]["recall_at_k"] == pytest.approx(by["sq8"]["faiss_recall_at_k"], abs=0.02)
    assert by["bin"]["recall_at_k"] == pytest.approx(by["bin"]["faiss_recall_at_k"], abs=0.02)
    assert by["pq4x4"]["recall_at_k_rerank"] >= by["pq4x4"]["recall_at_k"]
    report = (out / "report.md").read_text()
    assert "|returned top-k ∩ exact top-k| / k" in report and "`pq4x4`" in report
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".work-*"))  # no scratch left behind
    (out / ".work-999999999-abc").mkdir()  # the scratch of a run that was killed (its process is gone)
    (out / ".work-999999999-abc" / "originals.f32").write_bytes(b"x" * 64)
    # resume: recorded codecs are skipped, new ones appended
    res = run("--base", str(base_file), "--codecs", "sq8,fp16", "--n-queries", "60", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "skip sq8" in res.output
    assert not list(out.glob(".work-*"))  # the killed run's scratch was removed
    assert [r["codec"] for r in flat(out / "results.jsonl")] == ["float32", "sq8", "bin", "pq4x4", "fp16"]
    # re-render from records alone
    (out / "report.md").unlink()
    res = runner.invoke(app, ["vectors", "report", str(out)])
    assert res.exit_code == 0 and "`fp16`" in (out / "report.md").read_text()


def test_eval_explicit_queries_l2_without_faiss(base_file, tmp_path):
    q = tmp_path / "q.npy"
    np.save(q, clustered(20, 32, 5))
    res = run("--base", str(base_file), "--queries", str(q), "--codecs", "fp16", "--metric", "l2",
              "--no-faiss", "--k", "5", "--out", str(tmp_path / "r"))
    assert res.exit_code == 0, res.output
    recs = flat(tmp_path / "r" / "results.jsonl")
    assert recs[1]["metric"] == "l2" and recs[1]["k"] == 5 and "faiss_qps" not in recs[1]


@pytest.mark.parametrize("args,match", [
    (["--codecs", "sq8,pq7y"], "unknown or malformed codec spec 'pq7y'"),
    (["--codecs", "sq8", "--metric", "manhattan"], "unknown metric"),
    (["--codecs", "pca64+sq8"], "pca64"),  # d=32 cannot reduce to 64
    (["--codecs", "sq8", "--k", "0"], "k must be"),
])
def test_eval_bad_input(base_file, tmp_path, args, match):
    res = run("--base", str(base_file), *args, "--n-queries", "10", "--out", str(tmp_path / "r"))
    assert res.exit_code == 2
    assert match in " ".join(res.output.split())
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_eval_needs_one_source(tmp_path):
    res = run("--codecs", "sq8", "--out", str(tmp_path))
    assert res.exit_code == 2 and "exactly one of --base" in res.output
    res = run("--base", str(tmp_path / "missing.npy"), "--codecs", "sq8", "--out", str(tmp_path))
    assert res.exit_code == 2 and "not found" in res.output


def test_eval_beir_from_cached_vectors(tmp_path):
    """The --beir path end to end with vectors pre-seeded in the cache: no model is loaded."""
    from embpress.vectors.beir import load_beir

    folder = tmp_path / "mini"
    (folder / "qrels").mkdir(parents=True)
    x = clustered(300, 16, 1)
    with open(folder / "corpus.jsonl", "w") as fh:
        for i in range(300):
            fh.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"}) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for i in range(30):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i * 7}\t1\n" for i in range(30)))
    ds = load_beir(folder)
    cache = tmp_path / "cache"
    for texts, vecs in ((ds.corpus_texts, x), (ds.query_texts, x[::7][:30] + 0.01)):
        p = cache_path(texts, model="fake-model", cache_dir=cache)
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, vecs.astype(np.float32))
    out = tmp_path / "run"
    res = run("--beir", str(folder), "--model", "fake-model", "--cache", str(cache), "--codecs", "sq8,bin",
              "--metrics-backend", "numpy", "--metric", "l2", "--out", str(out))
    assert res.exit_code == 0, res.output
    recs = flat(out / "results.jsonl")
    ref = recs[0]
    assert ref["codec"] == "float32" and ref["dataset"] == "mini:fake-model"
    assert ref["ndcg_at_10"] == pytest.approx(1.0) and ref["recall_at_100"] == pytest.approx(1.0)
    assert ref["qrels_recall_at_k"] == pytest.approx(1.0)  # recall@10 against the qrels: the judged doc is first
    for r in recs:
        assert {"ndcg_at_10", "ndcg_at_10_rerank", "recall_at_100", "recall_at_100_rerank", "qrels_recall_at_k",
                "qrels_recall_at_k_rerank"} <= set(r)
    assert "nDCG@10" in (out / "report.md").read_text() and "qrels R@10" in (out / "report.md").read_text()


def test_faiss_equivalents():
    assert faiss_equivalent("sq8", 384) == "SQ8"
    assert faiss_equivalent("fp16", 384) == "SQfp16"
    assert faiss_equivalent("pq48", 384) == "PQ48x8np"
    assert faiss_equivalent("pq16x4", 384) == "PQ16x4np"
    assert faiss_equivalent("rq16x8", 384) == "RQ16x8"
    assert faiss_equivalent("opq32", 384) == "OPQ32,PQ32x8np"
    assert faiss_equivalent("pca128+sq8", 384) == "PCA128,SQ8"
    assert faiss_equivalent("pca128", 384) == "PCA128,Flat"
    assert faiss_equivalent("bin", 384) == "BinaryFlat"
    assert faiss_equivalent("float32", 384) == "Flat"
    assert faiss_equivalent("itq64", 384) == "ITQ64,LSH"
    assert faiss_equivalent("itq768", 384) is None
    for none in ("mrl192+sq8", "bebr1", "mrl64"):
        assert faiss_equivalent(none, 384) is None


def test_holdout_queries_is_disjoint_and_seeded():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    base, q = holdout_queries(x, 10, seed=3)
    assert base.shape == (90, 2) and q.shape == (10, 2)
    assert not set(base[:, 0]) & set(q[:, 0])
    np.testing.assert_array_equal(q, holdout_queries(x, 10, seed=3)[1])
    with pytest.raises(ValueError, match="n_queries"):
        holdout_queries(x, 100)


def test_settings_that_differ_are_separate_tables_and_resume_needs_them_all(base_file, tmp_path):
    out = tmp_path / "run"
    common = ("--base", str(base_file), "--codecs", "sq8", "--n-queries", "60", "--no-faiss", "--out", str(out))
    assert run(*common).exit_code == 0
    assert run(*common, "--k", "5").exit_code == 0  # another k: new trials, not skipped
    res = run(*common, "--oversample", "2")
    assert res.exit_code == 0 and "skip" not in res.output
    res = run(*common)  # the first configuration again: everything skipped
    assert res.exit_code == 0 and res.output.count("skip") == 2
    recs = flat(out / "results.jsonl")
    assert len(recs) == 6 and len({(r["k"], r["oversample"]) for r in recs}) == 3
    report = (out / "report.md").read_text()
    assert "## syn (k=10, oversample=4)" in report and "## syn (k=5, oversample=4)" in report
    assert "## syn (k=10, oversample=2)" in report


def test_other_data_under_the_same_name_is_another_trial(tmp_path):
    """Two files of the same name (stem) and shape but other content are two data sets to resume."""
    out = tmp_path / "run"
    for seed in (0, 1):
        folder = tmp_path / f"v{seed}"
        folder.mkdir()
        np.save(folder / "syn.npy", clustered(300, 16, seed))
        res = run("--base", str(folder / "syn.npy"), "--codecs", "sq8", "--n-queries", "30", "--no-faiss",
                  "--out", str(out))
        assert res.exit_code == 0 and "skip" not in res.output, res.output
    recs = read_records(out / "results.jsonl")
    assert len(recs) == 4 and len({r["config"]["base"] for r in recs}) == 2
    assert "## syn (base=" in (out / "report.md").read_text()
