"""Index: blockwise top-k, exact re-ranking from disk, filters, padding, save/load, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from embpress.vectors.codec import NotFittedError, build_codec
from embpress.vectors.evaluate import exact_knn, recall_at_k
from embpress.vectors.index import FORMAT_VERSION, HEADER, Index, attribute_equals, attribute_in


def clustered(n: int, d: int = 24, *, n_clusters: int = 12, seed: int = 0) -> np.ndarray:
    """Clustered Gaussian vectors (N, D) float32."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32) * 3
    return (centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(1200, seed=1)
    q = clustered(40, seed=2)
    return x, q


def build(x, spec="sq4", *, metric="ip", tmp_path=None, block_size=256, attrs=None, chunks=3):
    idx = Index(spec, metric=metric, rerank_path=None if tmp_path is None else tmp_path / "orig.f32",
                block_size=block_size).fit(x)
    for part in np.array_split(np.arange(len(x)), chunks):  # several adds, several blocks
        idx.add(x[part], attributes=None if attrs is None else attrs[part])
    return idx


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_rerank_with_large_oversample_equals_exact(data, tmp_path, metric):
    x, q = data
    idx = build(x, metric=metric, tmp_path=tmp_path)
    res = idx.search(q, 10, oversample=len(x))  # every vector is a candidate: exact search
    ref = exact_knn(x, q, 10, metric)
    # FAISS-style check tolerant to ties: the distances agree; the ids agree where not tied.
    np.testing.assert_allclose(res.distances, ref.distances, rtol=1e-4, atol=1e-3)
    assert recall_at_k(res.ids, ref.ids, 10) >= 0.99


def test_rerank_recall_equals_candidate_recall(data, tmp_path):
    """Re-ranked recall@10 == fraction of the exact top-10 among the k*oversample candidates (faiss TestRefine)."""
    x, q = data
    idx = build(x, "pq4x4", tmp_path=tmp_path)
    gt = exact_knn(x, q, 10, "ip").ids
    cand = idx.search(q, 40).ids
    rr = idx.search(q, 10, oversample=4).ids
    expected = np.mean([len(set(c) & set(g)) / 10 for c, g in zip(cand, gt, strict=True)])
    assert recall_at_k(rr, gt, 10) == pytest.approx(expected)
    assert recall_at_k(rr, gt, 10) > recall_at_k(idx.search(q, 10).ids, gt, 10)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_blockwise_topk_matches_brute_force_on_codes(data, metric):
    x, q = data
    idx = build(x, "sq8", metric=metric, block_size=100)
    codec = idx.codec_
    full = codec.distances(q, codec.encode(x), metric)
    res = idx.search(q, 7)
    expected = np.sort(full, axis=1)[:, :7]
    np.testing.assert_allclose(res.distances, expected, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, res.ids, axis=1), res.distances, rtol=1e-5)
    assert (np.diff(res.distances, axis=1) >= 0).all()


def test_k_larger_than_corpus_pads(data):
    x, q = data
    idx = build(x[:30], "fp16", chunks=1)
    res = idx.search(q[:3], 50)
    assert res.ids.shape == (3, 50) and res.distances.dtype == np.float32 and res.ids.dtype == np.int64
    assert (res.ids[:, 30:] == -1).all() and np.isinf(res.distances[:, 30:]).all()
    assert sorted(res.ids[0, :30].tolist()) == list(range(30))
    d, i = res  # unpacks
    assert i is res.ids


def test_cosine_normalises(data):
    x, q = data
    idx = build(x, "fp16", metric="cosine")
    res = idx.search(q * 5.0, 5)
    ref = exact_knn(x, q, 5, "cosine")
    np.testing.assert_allclose(res.distances, ref.distances, atol=2e-3)


def test_filters(data, tmp_path):
    x, q = data
    rng = np.random.default_rng(3)
    attrs = np.stack([rng.integers(0, 4, len(x)), rng.integers(0, 50, len(x))], axis=1)
    idx = build(x, "sq8", tmp_path=tmp_path, attrs=attrs)
    codec_d = idx.codec_.distances(q, idx.codec_.encode(x), "ip")

    def brute(allowed: np.ndarray, k: int) -> np.ndarray:
        d = np.where(allowed, codec_d, np.inf)
        return np.sort(d, axis=1)[:, :k]

    # shared predicate on attributes
    res = idx.search(q, 5, filter=attribute_equals(0, 2))
    assert (attrs[res.ids, 0] == 2).all()
    np.testing.assert_allclose(res.distances, brute(attrs[:, 0] == 2, 5), rtol=1e-6)
    # per-query equality (one value per query) and per-query callables agree
    wanted = np.arange(len(q)) % 4
    res = idx.search(q, 5, filter=attribute_equals(0, wanted))
    assert (attrs[res.ids, 0] == wanted[:, None]).all()
    res2 = idx.search(q, 5, filter=[attribute_equals(0, int(w)) for w in wanted])
    np.testing.assert_array_equal(res.ids, res2.ids)
    # shared and per-query bool masks
    mask = attrs[:, 1] < 3
    res = idx.search(q, 10, filter=mask)
    allowed_count = int(mask.sum())
    assert ((res.ids == -1) | mask[np.maximum(res.ids, 0)]).all()
    assert (res.ids[:, :min(10, allowed_count)] >= 0).all()
    per_q = np.zeros((len(q), len(x)), dtype=bool)
    per_q[np.arange(len(q)), np.arange(len(q))] = True  # query i may only return id i
    res = idx.search(q, 3, filter=per_q)
    assert (res.ids[:, 0] == np.arange(len(q))).all() and (res.ids[:, 1:] == -1).all()
    # filters combine with re-ranking
    res = idx.search(q, 5, oversample=4, filter=attribute_in(1, [1, 2, 3]))
    assert np.isin(attrs[res.ids[res.ids >= 0], 1], [1, 2, 3]).all()
    # nothing allowed: all padding
    res = idx.search(q, 4, filter=np.zeros(len(x), dtype=bool))
    assert (res.ids == -1).all() and np.isinf(res.distances).all()


def test_filter_errors(data):
    x, q = data
    idx = build(x, "sq8")
    with pytest.raises(ValueError, match="attributes"):
        idx.search(q, 5, filter=attribute_equals(0, 1))
    with pytest.raises(ValueError, match="shape"):
        idx.search(q, 5, filter=np.ones(len(x) - 1, dtype=bool))
    with pytest.raises(TypeError, match="bool"):
        idx.search(q, 5, filter=np.ones(len(x), dtype=np.int64))
    idx2 = build(x, "sq8", attrs=np.zeros(len(x), dtype=np.int64))
    with pytest.raises(ValueError, match="one predicate per query"):
        idx2.search(q, 5, filter=[attribute_equals(0, 0)] * (len(q) - 1))
    with pytest.raises(ValueError, match="bool array"):
        idx2.search(q, 5, filter=lambda a: a[:, 0])


def test_bad_input(data, tmp_path):
    x, q = data
    with pytest.raises(ValueError, match="unknown metric"):
        Index("sq8", metric="hamming")
    with pytest.raises(ValueError, match="unknown or malformed codec spec"):
        Index("sq3x")
    idx = Index("sq8")
    with pytest.raises(NotFittedError):
        idx.add(x)
    with pytest.raises(ValueError, match="empty"):
        idx.fit(x[:0])
    idx.fit(x)
    with pytest.raises(ValueError, match="empty"):
        idx.search(q, 5)
    with pytest.raises(ValueError, match="empty"):
        idx.add(x[:0])
    with pytest.raises(ValueError, match="d=23"):
        idx.add(x[:, :23])
    bad = x[:10].copy()
    bad[4, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        idx.add(bad)
    bad[4, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        idx.add(bad)
    idx.add(x)
    with pytest.raises(ValueError, match="d=23"):
        idx.search(q[:, :23], 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        idx.search(np.full_like(q, np.nan), 5)
    with pytest.raises(ValueError, match="2-D"):
        idx.search(q[0], 5)
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            idx.search(q, k)
    with pytest.raises(ValueError, match="rerank_path"):
        idx.search(q, 5, oversample=4)
    with pytest.raises(ValueError, match="attribute"):
        idx.add(x[:5], attributes=np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="retrain"):
        idx.fit(x)
    idx3 = Index("sq8").fit(x)
    with pytest.raises(ValueError, match="shape"):
        idx3.add(x[:5], attributes=np.zeros(4, dtype=np.int64))
    with pytest.raises(TypeError, match="integers"):
        idx3.add(x[:5], attributes=np.zeros(5, dtype=np.float32))


def test_bytes_per_vector(data, tmp_path):
    x, _ = data
    idx = build(x, "pq4x8", tmp_path=tmp_path, attrs=np.zeros((len(x), 2), dtype=np.int64))
    assert idx.bytes_per_vector() == idx.codec_.code_bytes + 16
    assert idx.disk_bytes_per_vector() == 4 * x.shape[1]
    assert idx.fixed_bytes() > 0
    assert os.path.getsize(tmp_path / "orig.f32") == x.nbytes


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(data, tmp_path, mmap):
    x, q = data
    attrs = np.arange(len(x)) % 5
    idx = build(x, "pca16+sq8", metric="l2", tmp_path=tmp_path, attrs=attrs)
    before = idx.search(q, 8, oversample=3, filter=attribute_equals(0, 1))
    plain = idx.search(q, 8)
    idx.save(tmp_path / "idx")
    header = json.loads((tmp_path / "idx" / HEADER).read_text())
    assert header["version"] == FORMAT_VERSION and header["n"] == len(x) and header["metric"] == "l2"
    assert set(header["files"]) == {"codes.npy", "codec_state.npz", "attributes.npy", "originals.f32"}
    loaded = Index.load(tmp_path / "idx", mmap=mmap)
    assert loaded.ntotal == len(x) and loaded.codec_.spec == "pca16+sq8"
    after = loaded.search(q, 8, oversample=3, filter=attribute_equals(0, 1))
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_allclose(before.distances, after.distances)
    np.testing.assert_array_equal(plain.ids, loaded.search(q, 8).ids)
    # a loaded index does not grow the saved folder's originals in place
    with pytest.raises(ValueError, match="set_rerank_path"):
        loaded.add(x[:3], attributes=attrs[:3])
    loaded.set_rerank_path(tmp_path / "grow.f32")
    loaded.add(x[:3], attributes=attrs[:3])
    assert loaded.ntotal == len(x) + 3
    Index.load(tmp_path / "idx")  # still intact


def test_save_overwrites_atomically(data, tmp_path, monkeypatch):
    x, q = data
    target = tmp_path / "idx"
    small = build(x[:100], "sq8", chunks=1)
    small.save(target)
    big = build(x, "sq4", chunks=1)
    big.save(target)  # replaces the existing index
    assert Index.load(target).ntotal == len(x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp or old folder left

    def boom(self, folder):
        (folder / "codes.npy").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Index, "_write_folder", boom)
    with pytest.raises(OSError, match="disk full"):
        small.save(target)
    assert Index.load(target).ntotal == len(x)  # the previous index is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_save_refuses_foreign_folder(data, tmp_path):
    x, _ = data
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an embpress index"):
        build(x[:50], "sq8", chunks=1).save(tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_originals_inside_saved_folder(data, tmp_path):
    x, q = data
    folder = tmp_path / "idx"
    idx = Index("sq8", rerank_path=folder / "originals.f32").fit(x)
    idx.add(x)
    before = idx.search(q, 5, oversample=4)
    idx.save(folder)
    np.testing.assert_array_equal(idx.search(q, 5, oversample=4).ids, before.ids)
    np.testing.assert_array_equal(Index.load(folder).search(q, 5, oversample=4).ids, before.ids)


def test_load_detects_truncation_tampering_and_versions(data, tmp_path):
    x, _ = data
    idx = build(x, "sq8", tmp_path=tmp_path)
    folder = tmp_path / "idx"
    idx.save(folder)
    codes = folder / "codes.npy"
    raw = codes.read_bytes()
    codes.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="codes.npy.*truncated"):
        Index.load(folder)
    tampered = bytearray(raw)
    tampered[-1] ^= 0xFF
    codes.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="codes.npy.*sha256"):
        Index.load(folder)
    codes.write_bytes(raw)
    orig = folder / "originals.f32"
    orig.write_bytes(orig.read_bytes()[:-4])
    with pytest.raises(ValueError, match="originals.f32"):
        Index.load(folder)
    idx.save(folder)
    header = json.loads((folder / HEADER).read_text())
    header["version"] = FORMAT_VERSION + 1
    (folder / HEADER).write_text(json.dumps(header))
    with pytest.raises(ValueError, match="version"):
        Index.load(folder)
    (folder / HEADER).write_text("{not json")
    with pytest.raises(ValueError, match="header"):
        Index.load(folder)
    (folder / HEADER).unlink()
    with pytest.raises(ValueError, match="not an embpress index"):
        Index.load(folder)


def test_prefitted_codec_instance(data):
    x, q = data
    codec = build_codec("sq8").fit(x)
    idx = Index(codec)
    idx.add(x)
    assert idx.search(q, 3).ids.shape == (len(q), 3)


def test_empty_index_saves_and_loads(tmp_path):
    x = clustered(50)
    idx = Index("sq8", rerank_path=tmp_path / "o.f32").fit(x)
    idx.save(tmp_path / "empty")
    loaded = Index.load(tmp_path / "empty")
    assert loaded.ntotal == 0
    with pytest.raises(ValueError, match="empty"):
        loaded.search(x[:2], 3)


def test_vecio_roundtrips_and_errors(tmp_path):
    from embpress.vectors.vecio import append_f32, open_f32, read_vectors, write_f32

    x = clustered(10, 6)
    write_f32(tmp_path / "a.f32", x)
    append_f32(tmp_path / "a.f32", x[:2])
    np.testing.assert_array_equal(open_f32(tmp_path / "a.f32", 6), np.concatenate([x, x[:2]]))
    with pytest.raises(ValueError, match="whole number"):
        open_f32(tmp_path / "a.f32", 5)
    with pytest.raises(ValueError, match="expected 10"):
        open_f32(tmp_path / "a.f32", 6, n=10)
    fv = np.concatenate([np.full((10, 1), 6, dtype="<i4").view("<f4"), x], axis=1)
    fv.tofile(tmp_path / "a.fvecs")
    np.testing.assert_array_equal(read_vectors(tmp_path / "a.fvecs"), x)
    np.save(tmp_path / "a.npy", x)
    np.testing.assert_array_equal(read_vectors(tmp_path / "a.npy"), x)
    np.save(tmp_path / "b.npy", x[0])
    with pytest.raises(ValueError, match="2-D"):
        read_vectors(tmp_path / "b.npy")
    with pytest.raises(ValueError, match="needs its dimension"):
        read_vectors(tmp_path / "a.f32")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unknown vector file"):
        read_vectors(tmp_path / "x.csv")
