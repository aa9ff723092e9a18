"""Evaluation helpers: exact ground truth, recall@k, BEIR metrics, speed and size."""

from __future__ import annotations

import os

import numpy as np
import pytest

from embpress.vectors.evaluate import (
    beir_metrics,
    bytes_per_vector,
    encode_throughput,
    exact_knn,
    queries_per_second,
    recall_at_k,
)
from embpress.vectors.metric import Metric, pairwise_distances


def test_recall_at_k():
    gt = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    ids = np.array([[4, 3, 9, 1], [-1, -1, -1, -1]])
    assert recall_at_k(ids, gt, 4) == pytest.approx((3 / 4 + 0) / 2)
    assert recall_at_k(ids, gt, 2) == 0.0  # only the first k of each: {4, 3} vs {1, 2}
    assert recall_at_k(np.array([[2, 9, 1]]), np.array([[1, 2, 3]]), 2) == 0.5
    assert recall_at_k(gt, gt, 4) == 1.0
    assert recall_at_k(np.full((1, 3), -1), np.full((1, 3), -1), 3) == 0.0  # padding never matches
    with pytest.raises(ValueError, match="columns"):
        recall_at_k(ids[:, :2], gt, 4)
    with pytest.raises(ValueError, match="queries"):
        recall_at_k(ids[:1], gt, 2)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_exact_knn_matches_numpy(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    res = exact_knn(x, q, 5, metric)
    xx, qq = x, q
    if metric == "cosine":
        xx = x / np.linalg.norm(x, axis=1, keepdims=True)
        qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = pairwise_distances(qq, xx, Metric.L2 if metric == "l2" else Metric.IP)
    np.testing.assert_array_equal(res.ids, np.argsort(d, axis=1)[:, :5])
    np.testing.assert_allclose(res.distances, np.sort(d, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    padded = exact_knn(x[:3], q, 5, metric)
    assert (padded.ids[:, 3:] == -1).all() and np.isinf(padded.distances[:, 3:]).all()


def test_beir_metrics_numpy_by_hand():
    corpus = ["a", "b", "c", "d"]
    ids = np.array([[0, 1, 2, 3], [3, 2, -1, -1]])
    dist = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, np.inf, np.inf]], dtype=np.float32)
    qrels = {"q1": {"b": 1, "d": 2}, "q2": {"a": 1}, "q_unjudged_in_run": {"a": 1}}
    out = beir_metrics(ids, dist, ["q1", "q2"], corpus, qrels, ("ndcg@10", "recall@1", "recall@100"),
                       backend="numpy")
    ndcg_q1 = (1 / np.log2(3) + 2 / np.log2(5)) / (2 / np.log2(2) + 1 / np.log2(3))
    assert out["ndcg@10"] == pytest.approx((ndcg_q1 + 0.0) / 2)
    assert out["recall@1"] == pytest.approx(0.0)
    assert out["recall@100"] == pytest.approx((1.0 + 0.0) / 2)
    with pytest.raises(ValueError, match="unknown metric"):
        beir_metrics(ids, dist, ["q1", "q2"], corpus, qrels, ("map@10",), backend="numpy")
    with pytest.raises(ValueError, match="no query"):
        beir_metrics(ids, dist, ["x", "y"], corpus, qrels, backend="numpy")


@pytest.mark.skipif(not os.environ.get("EMBPRESS_SLOW_TESTS"),
                    reason="ranx compiles with numba for minutes on a busy CPU; set EMBPRESS_SLOW_TESTS=1")
def test_beir_metrics_ranx_agrees_with_numpy():
    rng = np.random.default_rng(0)
    corpus = [f"d{i}" for i in range(50)]
    ids = np.stack([rng.permutation(50) for _ in range(20)])
    dist = np.sort(rng.random((20, 50)), axis=1).astype(np.float32)
    qrels = {f"q{i}": {f"d{j}": int(rng.integers(1, 3)) for j in rng.choice(50, 3, replace=False)} for i in range(20)}
    qids = [f"q{i}" for i in range(20)]
    a = beir_metrics(ids, dist, qids, corpus, qrels, backend="numpy")
    b = beir_metrics(ids, dist, qids, corpus, qrels, backend="ranx")
    assert a == pytest.approx(b)


def test_speed_and_size_helpers():
    x = np.ones((100, 4), dtype=np.float32)
    t = queries_per_second(lambda b: b.sum(), x, min_time=0.0)
    assert t.wall > 0 and t.cpu > 0
    assert encode_throughput(lambda b: b * 2, x) > 0
    assert bytes_per_vector(32, id_bytes=8, attribute_bytes=16, norm_bytes=4) == 60
