"""MUVERA FDE encoder (hand-computed cases, the reference's Gray code, fastembed equality), Chamfer
search, the multi-vector index, and the ragged token cache."""

from __future__ import annotations

import numpy as np
import pytest

from embpress.vectors.multivector import (
    FDEEncoder,
    MultiVectorIndex,
    as_ragged,
    ball_carve,
    chamfer_scores,
    chamfer_search,
    parse_fde_spec,
)


def _identity_encoder(simhash: np.ndarray, **kw) -> FDEEncoder:
    """R=1, no projection, the given (D, k) hyperplanes."""
    d, k = simhash.shape
    enc = FDEEncoder(repetitions=1, simhash_bits=k, dproj=None, **kw).fit(d)
    enc.simhash_ = simhash[None].astype(np.float32)
    return enc


def test_hand_computed_one_bit():
    enc = _identity_encoder(np.array([[1.0], [0.0]]))  # bit = x > 0
    q = np.array([[1, 2], [3, -1], [-1, 1]], dtype=np.float32)
    # partition 0 holds (-1, 1); partition 1 holds (1, 2) + (3, -1)
    np.testing.assert_allclose(enc.encode_queries([q])[0], [-1, 1, 4, 1])
    np.testing.assert_allclose(enc.encode_documents([q])[0], [-1, 1, 2, 0.5])
    # every point in partition 1: partition 0 is filled with the nearest point (all tie: the first)
    d = np.array([[1, 0], [3, 2]], dtype=np.float32)
    np.testing.assert_allclose(enc.encode_documents([d])[0], [1, 0, 2, 1])
    no_fill = _identity_encoder(np.array([[1.0], [0.0]]), fill_empty=False)
    np.testing.assert_allclose(no_fill.encode_documents([d])[0], [0, 0, 2, 1])


def test_hand_computed_gray_code_partitions_and_filling():
    # two hyperplanes: bits (x > 0, y > 0); the reference folds them as p = (p << 1) + (bit ^ (p & 1)):
    # (1,1) -> 2, (1,0) -> 3, (0,1) -> 1, (0,0) -> 0; a partition's sketch bits are p ^ (p >> 1).
    enc = _identity_encoder(np.eye(2))
    q = np.array([[1, 1], [-2, -2], [1, -1]], dtype=np.float32)
    np.testing.assert_allclose(enc.encode_queries([q])[0], [-2, -2, 0, 0, 1, 1, 1, -1])
    # A = (-1, 3): bits 01 -> partition 1; B = (-2, -1): bits 00 -> partition 0.
    # Empty partition 2 has sketch 11: A at Hamming 1, B at 2 -> A. Partition 3 has sketch 10: B at 1 -> B.
    # (Reading the partition index itself as the sketch, the wrong inverse, would swap them.)
    doc = np.array([[-1, 3], [-2, -1]], dtype=np.float32)
    np.testing.assert_allclose(enc.encode_documents([doc])[0], [-2, -1, -1, 3, -1, 3, -2, -1])


def test_ams_projection_and_count_sketch_structure():
    enc = FDEEncoder(repetitions=3, simhash_bits=2, dproj=4, final_dim=16, seed=1).fit(10)
    p = enc.projection_
    assert p.shape == (3, 10, 4)
    assert ((p != 0).sum(axis=2) == 1).all() and set(np.unique(p)) == {-1.0, 0.0, 1.0}
    rng = np.random.default_rng(0)
    clouds = [rng.standard_normal((int(rng.integers(1, 9)), 10)).astype(np.float32) for _ in range(7)]
    full = FDEEncoder(repetitions=3, simhash_bits=2, dproj=4, seed=1).fit(10)
    inner = full.encode_documents(clouds)
    sketch = np.zeros((enc.inner_dim, 16), dtype=np.float32)
    sketch[np.arange(enc.inner_dim), enc.sketch_index_] = enc.sketch_sign_
    np.testing.assert_allclose(enc.encode_documents(clouds), inner @ sketch, rtol=1e-5, atol=1e-5)
    assert enc.output_dim == 16 and full.output_dim == 3 * 4 * 4


def test_batched_equals_one_by_one_and_float64_kept():
    rng = np.random.default_rng(3)
    clouds = [rng.standard_normal((int(rng.integers(1, 20)), 24)) for _ in range(30)]
    enc = FDEEncoder(repetitions=5, simhash_bits=3, dproj=6, seed=2).fit(24)
    batched = enc.encode_documents(clouds, batch=7)
    assert batched.dtype == np.float64
    for i in (0, 13, 29):
        np.testing.assert_allclose(batched[i], enc.encode_documents([clouds[i]])[0], rtol=1e-12)
    q = enc.encode_queries([c.astype(np.float32) for c in clouds])
    assert q.dtype == np.float32 and q.shape == (30, 5 * 8 * 6)


def _fastembed_layout(k: int) -> np.ndarray:
    """fastembed numbers a partition by its sketch bits, first hyperplane in the lowest bit; ours by the
    reference's Gray fold. Returns, for each of our partitions, fastembed's number."""
    p = np.arange(2**k)
    code = p ^ (p >> 1)
    return np.array([sum(((c >> (k - 1 - j)) & 1) << j for j in range(k)) for c in code])


@pytest.mark.parametrize("k, dproj", [(3, 8), (1, 32)])
def test_equals_fastembed_muvera_with_its_matrices(k, dproj):
    muvera = pytest.importorskip("fastembed.postprocess.muvera", reason="fastembed (dev extra) not installed")
    d, r = 32, 4
    fe = muvera.Muvera(d, k_sim=k, dim_proj=dproj, r_reps=r, random_seed=5)
    enc = FDEEncoder(repetitions=r, simhash_bits=k, dproj=dproj if dproj < d else None, projection="dense").fit(d)
    enc.simhash_ = np.stack([s.simhash_vectors for s in fe.simhash_projections])
    if dproj < d:
        enc.projection_ = fe.dim_reduction_projections / np.sqrt(dproj)
    rng = np.random.default_rng(0)
    clouds = [rng.standard_normal((int(rng.integers(1, 12)), d)) for _ in range(40)]
    fid = _fastembed_layout(k)

    def ours_layout(x: np.ndarray) -> np.ndarray:
        return x.reshape(r, 2**k, dproj)[:, fid].reshape(-1)

    theirs_q = np.stack([ours_layout(fe.process_query(c)) for c in clouds])
    np.testing.assert_allclose(enc.encode_queries(clouds), theirs_q, rtol=1e-10, atol=1e-10)
    ours_d = enc.encode_documents(clouds).reshape(len(clouds), r, 2**k, dproj)
    theirs_d = np.stack([ours_layout(fe.process_document(c)) for c in clouds]).reshape(ours_d.shape)
    if k == 1:  # one occupied partition at most: no tie to break, documents equal everywhere
        np.testing.assert_allclose(ours_d, theirs_d, rtol=1e-10, atol=1e-10)
        return
    # Occupied partitions equal; an empty one may differ only by a tie: fastembed takes the first point of
    # the lowest-numbered nearest partition, the reference the first nearest point.
    for i, c in enumerate(clouds):
        for rep in range(r):
            bits = (c @ enc.simhash_[rep] > 0).astype(int)
            code = (bits << np.arange(k - 1, -1, -1)).sum(1)
            part = np.bitwise_xor.accumulate(bits, axis=1) @ (1 << np.arange(k - 1, -1, -1))
            proj = c @ enc.projection_[rep]
            for p in range(2**k):
                if (part == p).any():
                    np.testing.assert_allclose(ours_d[i, rep, p], theirs_d[i, rep, p], rtol=1e-10, atol=1e-10)
                    continue
                dist = np.array([bin(int(s) ^ int(p ^ (p >> 1))).count("1") for s in code])
                nearest = np.flatnonzero(dist == dist.min())
                np.testing.assert_allclose(ours_d[i, rep, p], proj[nearest[0]], rtol=1e-10, atol=1e-10)
                assert any(np.allclose(theirs_d[i, rep, p], proj[j]) for j in nearest)


def _brute_chamfer(q: np.ndarray, d: np.ndarray) -> float:
    return float(sum(max(float(a @ b) for b in d) for a in q))


def test_chamfer_search_matches_brute_force():
    rng = np.random.default_rng(1)
    docs = [rng.standard_normal((int(rng.integers(1, 9)), 8)).astype(np.float32) for _ in range(40)]
    qs = [rng.standard_normal((int(rng.integers(1, 5)), 8)).astype(np.float32) for _ in range(6)]
    brute = np.array([[_brute_chamfer(q, d) for d in docs] for q in qs])
    res = chamfer_search(qs, docs, k=5, block_tokens=16)  # several document blocks
    np.testing.assert_array_equal(res.ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(-res.distances, np.sort(brute, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    np.testing.assert_allclose(chamfer_scores(qs[0], as_ragged(docs), np.array([3, 0])), brute[0, [3, 0]],
                               rtol=1e-5)


def test_index_recovers_exact_chamfer_with_enough_candidates():
    rng = np.random.default_rng(2)
    docs = [rng.standard_normal((int(rng.integers(3, 12)), 16)).astype(np.float32) for _ in range(200)]
    docs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in docs]
    qs = [d[:3] + 0.1 * rng.standard_normal((3, 16)).astype(np.float32) for d in docs[:20]]
    exact = chamfer_search(qs, docs, k=5)
    mv = MultiVectorIndex("fde:R=10,k=3,dproj=8", codec="sq8").build(docs)
    assert mv.bytes_per_doc() == 10 * 8 * 8  # sq8: a byte per FDE coordinate
    all_cand = mv.search(qs, k=5, candidates=200)  # every document re-ranked: exact
    np.testing.assert_array_equal(all_cand.ids, exact.ids)
    found = mv.candidates(qs, 10)  # 5 % of the corpus
    assert np.mean([exact.ids[i, 0] in found[i] for i in range(20)]) >= 0.9  # exact best among FDE candidates
    assert (mv.search(qs, k=1, candidates=20).ids[:, 0] == np.arange(20)).mean() >= 0.9


def test_ball_carve_merges_close_points_and_keeps_far_ones():
    x = np.array([[1, 0], [0.99, 0.141], [0, 1], [0.1, 0.995]], dtype=np.float32)
    out = ball_carve(x, tau=0.7)
    np.testing.assert_allclose(out, [x[0] + x[1], x[2] + x[3]], rtol=1e-6)
    assert ball_carve(x, tau=1.01).shape == (4, 2)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="point cloud 1 is empty"):
        as_ragged((np.zeros((2, 3)), np.array([0, 2, 2])))
    with pytest.raises(ValueError, match="fit on D=4"):
        FDEEncoder(repetitions=1, simhash_bits=1, dproj=2).fit(4).encode_queries([np.zeros((1, 5))])
    with pytest.raises(ValueError, match="unknown setting"):
        parse_fde_spec("fde:R=2,bogus=1")
    with pytest.raises(ValueError, match="simhash_bits must be <= 30"):
        FDEEncoder(simhash_bits=31).fit(4)
    with pytest.raises(ValueError, match="not fitted"):
        FDEEncoder().encode_documents([np.zeros((1, 4))])
    assert parse_fde_spec("fde:R=20,k=5,dproj=8,final=1024").final_dim == 1024
