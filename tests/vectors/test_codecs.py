"""Codec contract over the registry (STYLE §10) plus per-family invariants and FAISS equivalence."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from embpress.vectors import (
    Metric,
    NotFittedError,
    OptimizedProductQuantizer,
    ProductQuantizer,
    ScalarQuantizer,
    SignBinarizer,
    as_metric,
    build_codec,
    code_size,
    codec_from_state,
    pairwise_distances,
    registered_codecs,
)

D = 32
METRICS = [Metric.L2, Metric.IP, Metric.COSINE]
# Families whose compressed scoring equals exact scoring against the decoded vectors.
EXACT_PREFIXES = ("fp16", "sq", "pq", "opq", "rq", "pca", "mrl")




@pytest.fixture(scope="module")
def synth(make_clustered) -> dict[str, np.ndarray]:
    x = make_clustered(1224, D, seed=1338)
    return {"train": x[:1200], "query": x[1200:]}


@pytest.fixture(scope="module")
def fitted(synth):
    """Each registered spec fitted once (lazily), shared by the contract checks."""
    cache: dict[str, object] = {}

    def get(spec: str):
        if spec not in cache:
            codec = build_codec(spec, seed=0)
            assert codec.fit(synth["train"]) is codec  # fit returns self
            cache[spec] = codec
        return cache[spec]

    return get


SPECS = registered_codecs()


def test_registry_covers_every_family():
    families = {"fp", "sq", "bin", "rbin", "itq", "pq", "opq", "rq", "pca", "mrl", "bebr"}
    prefixes = {re.match(r"[a-z]+", s).group() for s in SPECS}
    assert families <= prefixes
    assert any("+" in s for s in SPECS)


# ---------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("spec", SPECS)
def test_encode_decode_shapes(spec, fitted, synth):
    codec = fitted(spec)
    x = synth["train"]
    assert codec.d_ == D and codec.spec == spec
    codes = codec.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (len(x), codec.code_bytes)
    assert code_size(D, spec) == codec.code_bytes
    dec = codec.decode(codes)
    assert dec.dtype == np.float32 and dec.shape == x.shape and np.isfinite(dec).all()
    assert codec.encode(x[:0]).shape == (0, codec.code_bytes)


@pytest.mark.parametrize("spec", SPECS)
def test_state_round_trip(spec, fitted, synth, tmp_path):
    codec = fitted(spec)
    x, q = synth["train"][:300], synth["query"]
    codes = codec.encode(x)
    state = codec.get_state()
    assert all(isinstance(v, np.ndarray | int | float | str) for v in state.values())
    np.savez(tmp_path / "state.npz", **state)
    with np.load(tmp_path / "state.npz") as f:
        loaded = {k: f[k] for k in f.files}
    for clone in (codec_from_state(state), codec_from_state(loaded)):
        assert clone.spec == codec.spec and clone.code_bytes == codec.code_bytes
        np.testing.assert_array_equal(clone.encode(x), codes)
        for metric in METRICS:
            np.testing.assert_array_equal(
                clone.distances(q, codes, metric), codec.distances(q, codes, metric)
            )


@pytest.mark.parametrize("spec", SPECS)
def test_distances_shape_and_blocks(spec, fitted, synth):
    codec = fitted(spec)
    x, q = synth["train"][:400], synth["query"]
    codes = codec.encode(x)
    for metric in METRICS:
        dist = codec.distances(q, codes, metric)
        assert dist.dtype == np.float32 and dist.shape == (len(q), len(x)) and np.isfinite(dist).all()
        blocks = np.concatenate(
            [codec.distances(q, codes[:150], metric), codec.distances(q, codes[150:], metric)], 1
        )
        np.testing.assert_allclose(blocks, dist, rtol=1e-5, atol=1e-5)
    assert codec.distances(q, codes[:0], "ip").shape == (len(q), 0)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.startswith(EXACT_PREFIXES)])
def test_distances_match_decoded(spec, fitted, synth):
    codec = fitted(spec)
    x, q = synth["train"][:400], synth["query"]
    codes = codec.encode(x)
    dec = codec.decode(codes)
    for metric in METRICS:
        ref = pairwise_distances(q, dec, Metric.IP if metric is Metric.COSINE else metric)
        np.testing.assert_allclose(codec.distances(q, codes, metric), ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_compressed_ranking_is_useful(spec, fitted, synth):
    """Every codec ranks far better than chance (1 hit in 10 of 1200 by luck is ~0.8%)."""
    codec = fitted(spec)
    x, q = synth["train"], synth["query"]
    gt = np.argsort(pairwise_distances(q, x, Metric.IP), axis=1)[:, :10]
    ids = np.argsort(codec.distances(q, codec.encode(x), Metric.IP), axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt, strict=True)])
    assert recall > 0.15, recall


@pytest.mark.parametrize("spec", SPECS)
def test_bad_input_raises(spec, fitted, synth):
    unfitted = build_codec(spec)
    with pytest.raises(NotFittedError):
        unfitted.encode(synth["query"])
    with pytest.raises(NotFittedError):
        _ = unfitted.code_bytes
    with pytest.raises(ValueError, match="empty"):
        unfitted.fit(np.zeros((0, D), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        unfitted.fit(synth["train"][0])
    codec = fitted(spec)
    bad = synth["query"].copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(bad)
    with pytest.raises(ValueError, match="NaN"):
        build_codec(spec).fit(np.vstack([synth["train"][:50], bad]))
    with pytest.raises(ValueError, match=f"fit on d={D}, got d={D - 1}"):
        codec.encode(synth["query"][:, :-1])
    codes = codec.encode(synth["query"])
    with pytest.raises(ValueError, match=f"fit on d={D}, got d={D + 1}"):
        codec.distances(np.hstack([synth["query"], synth["query"][:, :1]]), codes, "l2")
    with pytest.raises(ValueError, match="codes must have shape"):
        codec.decode(codes[:, :-1])
    with pytest.raises(TypeError, match="uint8"):
        codec.decode(codes.astype(np.int16))
    with pytest.raises(ValueError, match="unknown metric"):
        codec.distances(synth["query"], codes, "hamming")


# ---------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    "spec",
    ["pq", "pq0", "pq8x0", "pq8x17", "sq3", "pca0+sq8", "foo", "", "+sq8", "pca16+", "sq8+pca16", "bebr9"],
)
def test_malformed_spec_raises(spec):
    with pytest.raises(ValueError, match="spec") as err:
        build_codec(spec)
    assert repr(spec) in str(err.value)


def test_unknown_spec_lists_allowed_forms():
    with pytest.raises(ValueError, match=r"pq\{M\}\[x\{nbits\}\]") as err:
        build_codec("foo")
    assert "bebr{u}[d{D}]" in str(err.value) and "pca128+sq8" in str(err.value)


@pytest.mark.parametrize(
    ("d", "spec", "nbytes"),
    [
        (768, "fp16", 1536),
        (768, "sq8", 768),
        (7, "sq4", 4),
        (768, "bin", 96),
        (30, "bin", 4),
        (768, "pq16", 16),
        (768, "pq16x8", 16),
        (768, "pq32x4", 16),
        (768, "opq16x6", 12),
        (768, "rq8x8", 12),
        (768, "pca128", 512),
        (768, "pca128+sq4", 64),
        (768, "mrl256+pq32", 32),
        (768, "pca256+mrl128+sq8", 128),
        (384, "bebr1", 96),
        (384, "bebr2d192", 72),
        (384, "itq768", 96),
        (384, "rbin100", 13),
    ],
)
def test_code_size_without_fitting(d, spec, nbytes):
    assert code_size(d, spec) == nbytes


@pytest.mark.parametrize(("d", "spec"), [(30, "pq8"), (32, "pca64"), (32, "mrl33+sq8"), (0, "sq8")])
def test_code_size_rejects_incompatible_dims(d, spec):
    with pytest.raises(ValueError, match="d"):
        code_size(d, spec)


def test_spec_is_kept_and_canonical_when_built_directly():
    assert build_codec("pq16").spec == "pq16"
    assert ProductQuantizer(m=16).spec == "pq16x8"
    assert build_codec(" PCA16+SQ8 ").spec == "PCA16+SQ8"


def test_incompatible_dim_raises_at_fit(synth):
    with pytest.raises(ValueError, match="must divide d=32"):
        build_codec("pq5").fit(synth["train"])


def test_metric_aliases():
    assert as_metric("dot") is Metric.IP and as_metric("inner_product") is Metric.IP
    assert as_metric("COS") is Metric.COSINE and as_metric("euclidean") is Metric.L2
    assert as_metric(Metric.L2) is Metric.L2
    with pytest.raises(ValueError, match="allowed"):
        as_metric("manhattan")


# ---------------------------------------------------------------------------------------- scalar
@pytest.mark.parametrize("bits", [8, 4])
def test_sq_error_bound_and_faiss_codes(bits, synth):
    x = synth["train"]
    sq = ScalarQuantizer(bits=bits).fit(x)
    err = np.abs(sq.decode(sq.encode(x)) - x)
    levels = (1 << bits) - 1
    assert (err <= sq.vdiff_ / levels * 0.5 + 1e-6).all()
    ref = faiss.ScalarQuantizer(
        D, faiss.ScalarQuantizer.QT_8bit if bits == 8 else faiss.ScalarQuantizer.QT_4bit
    )
    ref.train(x)
    np.testing.assert_array_equal(sq.encode(x), ref.compute_codes(x))


def test_sq4_odd_dim_round_trip():
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    sq = build_codec("sq4").fit(x)
    assert sq.code_bytes == 4 and sq.decode(sq.encode(x)).shape == (50, 7)


def test_fp16_is_near_lossless(synth):
    c = build_codec("fp16").fit(synth["train"])
    np.testing.assert_allclose(c.decode(c.encode(synth["train"])), synth["train"], atol=1e-3)


# ---------------------------------------------------------------------------------------- FAISS equivalence
@pytest.fixture(scope="module")
def big(make_clustered):
    x = make_clustered(5100, D, seed=7, clusters=50)
    xb, xq = x[:5000], x[5000:]
    _, gt = faiss.knn(xq, xb, 10)
    return xb, xq, gt


def _recall(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, gt, strict=True)]))


def _faiss_pair(spec: str, d: int):
    """(our codec, FAISS index, objects to keep alive) with the same training settings."""
    if spec == "sq8":
        return build_codec("sq8"), faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit), ()
    if spec == "pq8":
        index = faiss.IndexPQ(d, 8, 8)
        index.pq.cp.seed = 0
        return build_codec("pq8", seed=0), index, ()
    if spec == "opq4":
        opq = faiss.OPQMatrix(d, 4)
        opq.niter = 4
        inner = faiss.IndexPQ(d, 4, 8)
        inner.pq.cp.seed = 0
        index = faiss.IndexPreTransform(opq, inner)
        return OptimizedProductQuantizer(m=4, niter=4, seed=0), index, (opq, inner)
    if spec == "rq4x6":
        index = faiss.IndexResidualQuantizer(d, 4, 6, faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_norm_float)
        index.rq.cp.seed = 0
        return build_codec("rq4x6", seed=0), index, ()
    raise AssertionError(spec)


@pytest.mark.parametrize("spec", ["sq8", "pq8", "opq4", "rq4x6"])
def test_matches_faiss_index(spec, big):
    xb, xq, gt = big
    codec, index, _keep = _faiss_pair(spec, D)
    train = xb[:2000] if spec.startswith("opq") else xb  # OPQ training is the slow one
    codec.fit(train)
    index.train(train)
    index.add(xb)
    codes = codec.encode(xb)
    np.testing.assert_array_equal(codes, index.sa_encode(xb))
    ours = np.argsort(codec.distances(xq, codes, "l2"), axis=1, kind="stable")[:, :10]
    dist, theirs = index.search(xq, 10)
    assert abs(_recall(ours, gt) - _recall(theirs, gt)) <= 0.01
    ours_d = np.take_along_axis(codec.distances(xq, codes, "l2"), theirs, axis=1)
    np.testing.assert_allclose(ours_d, dist, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- binary
def test_bin_distances_are_hamming(synth):
    x, q = synth["train"][:200], synth["query"]
    c = SignBinarizer().fit(x)
    codes = c.encode(x)
    bq, bx = q > 0, x > 0
    ham = (bq[:, None, :] != bx[None, :, :]).sum(-1)
    np.testing.assert_array_equal(c.distances(q, codes, "l2"), 4 * ham)
    np.testing.assert_array_equal(c.distances(q, codes, "ip"), 2 * ham - D)


def test_bin_asymmetric_scores_float_queries(synth):
    x, q = synth["train"][:200], synth["query"]
    c = SignBinarizer(asymmetric=True).fit(x)
    pm1 = np.where(x > 0, 1.0, -1.0).astype(np.float32)
    np.testing.assert_allclose(c.distances(q, c.encode(x), "ip"), -(q @ pm1.T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["itq16", "itq32", "rbin16"])
def test_projections_are_orthonormal(spec, synth):
    c = build_codec(spec, seed=3).fit(synth["train"])
    np.testing.assert_allclose(c.proj_.T @ c.proj_, np.eye(c.bits), atol=1e-4)


def test_itq_expansion_beyond_d(synth):
    c = build_codec("itq64").fit(synth["train"])
    assert c.code_bytes == 8 and c.encode(synth["query"]).shape == (len(synth["query"]), 8)


def test_itq_lowers_quantization_error_vs_its_start(synth):
    x = synth["train"]
    start = build_codec("itq16").fit(x)
    start.niter = 0
    start.fit(x)
    trained = build_codec("itq16").fit(x)

    def err(c):
        v = (x - c.mean_) @ c.proj_
        return float(((np.where(v > 0, 1.0, -1.0) * np.abs(v).mean() - v) ** 2).mean())

    assert err(trained) < err(start)


# ---------------------------------------------------------------------------------------- reducers
def test_pca_full_dim_is_lossless(synth):
    c = build_codec(f"pca{D}").fit(synth["train"])
    np.testing.assert_allclose(c.decode(c.encode(synth["train"])), synth["train"], atol=1e-5)
    np.testing.assert_allclose(c.components_ @ c.components_.T, np.eye(D), atol=1e-5)


def test_mrl_keeps_normalised_prefix(synth):
    c = build_codec("mrl8").fit(synth["train"])
    y = c.transform(synth["query"])
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(
        y * np.linalg.norm(synth["query"][:, :8], axis=1, keepdims=True),
        synth["query"][:, :8],
        rtol=1e-5,
        atol=1e-6,
    )


def test_composition_reduces_then_codes(synth):
    c = build_codec("pca16+sq8").fit(synth["train"])
    assert c.reducer.out_dim == 16 and c.inner.d_ == 16 and c.d_ == D and c.code_bytes == 16
    direct = c.inner.encode(c.reducer.transform(synth["query"]))
    np.testing.assert_array_equal(c.encode(synth["query"]), direct)


@pytest.mark.parametrize(("nq", "m", "k", "n"), [(1, 1, 4, 1), (3, 5, 16, 1000), (7, 8, 256, 300)])
def test_lut_scan_is_the_sum_of_table_entries(nq, m, k, n):
    from embpress.vectors.scan import lut_scan

    rng = np.random.default_rng(nq)
    luts = rng.standard_normal((nq, m, k)).astype(np.float32)
    idx = rng.integers(0, k, (n, m))
    want = np.zeros((nq, n), dtype=np.float32)
    for j in range(m):  # the same sub-code order, so the float sums agree exactly
        want += luts[:, j, :][:, idx[:, j]]
    np.testing.assert_array_equal(lut_scan(luts, idx), want)
    np.testing.assert_array_equal(lut_scan(luts, idx.astype(np.uint8 if k <= 256 else np.int64)), want)


@pytest.mark.parametrize("nbytes", [1, 5, 8, 48, 40])  # 40 bytes = 320 bits: counts above 255
def test_hamming_counts_differing_bits(nbytes):
    from embpress.vectors.scan import hamming

    rng = np.random.default_rng(nbytes)
    q = rng.integers(0, 256, (9, nbytes), dtype=np.uint8)
    c = rng.integers(0, 256, (70, nbytes), dtype=np.uint8)
    c[0] = ~q[0]  # every bit differs
    want = np.unpackbits(q[:, None, :] ^ c[None, :, :], axis=2).sum(axis=2)
    got = hamming(q, c)
    assert got.dtype == np.int32 and got[0, 0] == 8 * nbytes
    np.testing.assert_array_equal(got, want)
