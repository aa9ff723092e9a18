"""Compiled scans (search_lists) against brute force, IVF lists, streaming builds, format checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embpress.vectors.codec import build_codec, registered_codecs
from embpress.vectors.evaluate import exact_knn, recall_at_k
from embpress.vectors.index import HEADER, Index, attribute_equals
from embpress.vectors.kernels import as_words
from embpress.vectors.vecio import VectorFile, write_f32


@pytest.fixture(scope="module")
def data(make_clustered):
    x = make_clustered(3025, 32, seed=1, clusters=30)
    return x[:3000], x[3000:]


def brute_topk(full: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k of a (nq, N) distance matrix, ordered by (distance, id)."""
    ids = np.arange(full.shape[1]) if ids is None else ids
    order = np.lexsort((np.broadcast_to(ids, full.shape), full), axis=1)[:, :k]
    d = np.take_along_axis(full, order, axis=1)
    i = np.where(np.isfinite(d), ids[order], -1)
    return d, i


CODECS = registered_codecs() + ["bebr1", "bin", "sq8", "pq8"]
ASYMMETRIC = ["bin", "rbin48", "itq16"]


def _fitted(spec: str, x: np.ndarray, asymmetric: bool = False):
    codec = build_codec(spec, seed=0)
    if asymmetric:
        codec.asymmetric = True
    return codec.fit(x)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("spec", sorted(set(CODECS)) + [f"{s}/asym" for s in ASYMMETRIC])
def test_search_lists_equals_brute_force(data, spec, metric):
    """Every codec's scan equals sorting its full distance matrix, ties by id; with a shared mask too."""
    x, q = data
    name, _, asym = spec.partition("/")
    codec = _fitted(name, x[:2000], asymmetric=bool(asym))
    codes = codec.encode(x)
    full = codec.distances(q, codes, metric)
    res = codec.search_lists(q, codes, 10, metric)
    ref_d, ref_i = brute_topk(full, 10)
    np.testing.assert_array_equal(res.ids, ref_i)
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-5, atol=1e-4)
    mask = np.random.default_rng(0).random(len(x)) < 0.3
    res = codec.search_lists(q, codes, 10, metric, mask=mask)
    ref_d, ref_i = brute_topk(np.where(mask, full, np.inf), 10)
    np.testing.assert_array_equal(res.ids, ref_i)
    assert mask[res.ids].all()


@pytest.mark.parametrize("spec", ["pq8", "bin", "bebr1", "sq8", "rq4x4", "pca16+sq8"])
def test_search_lists_over_lists_with_bias_and_per_query_masks(data, spec):
    """A random partition into lists, random probes, a per-list bias and per-query masks."""
    x, q = data
    rng = np.random.default_rng(5)
    codec = _fitted(spec, x[:2000])
    lists = rng.integers(0, 12, len(x))
    order = np.argsort(lists, kind="stable")
    codes, ids = codec.encode(x)[order], order.astype(np.int64)
    offsets = np.r_[0, np.cumsum(np.bincount(lists, minlength=12))]
    probes = np.stack([rng.choice(12, 4, replace=False) for _ in range(len(q))])
    probes[0, 2] = -1  # "no list" slots are skipped
    bias = rng.standard_normal(probes.shape).astype(np.float32) if codec.residual_ok else None
    mask = rng.random((len(q), len(x))) < 0.7
    res = codec.search_lists(q, codes, 8, "ip", offsets=offsets, ids=ids, probes=probes, bias=bias, mask=mask)
    full = codec.distances(q, codec.encode(x), "ip")
    expected = np.full_like(full, np.inf)
    for qi in range(len(q)):
        for p, lst in enumerate(probes[qi]):
            if lst < 0:
                continue
            members = ids[offsets[lst]:offsets[lst + 1]]
            expected[qi, members] = full[qi, members] + (bias[qi, p] if bias is not None else 0)
    ref_d, ref_i = brute_topk(np.where(mask, expected, np.inf), 8)
    np.testing.assert_array_equal(res.ids, ref_i)
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-5, atol=1e-4)


def test_search_lists_bad_arguments(data):
    x, q = data
    codec = build_codec("sq8").fit(x)
    codes = codec.encode(x)
    with pytest.raises(ValueError, match="k must be"):
        codec.search_lists(q, codes, 0, "ip")
    with pytest.raises(ValueError, match="offsets"):
        codec.search_lists(q, codes, 3, "ip", offsets=np.array([0, 5]))
    with pytest.raises(ValueError, match="probes"):
        codec.search_lists(q, codes, 3, "ip", probes=np.full((len(q), 1), 3))
    with pytest.raises(ValueError, match="mask"):
        codec.search_lists(q, codes, 3, "ip", mask=np.ones(len(x), dtype=np.int8))
    with pytest.raises(ValueError, match="bias"):
        codec.search_lists(q, codes, 3, "ip", bias=np.zeros((len(q), 2), np.float32))


def test_as_words_pads_planes():
    codes = np.arange(2 * 6, dtype=np.uint8).reshape(2, 6)  # 2 planes of 3 bytes
    w = as_words(codes, 2)
    assert w.shape == (2, 2, 1) and w.dtype == np.uint64
    assert w[0, 1, 0] == int.from_bytes(bytes([3, 4, 5, 0, 0, 0, 0, 0]), "little")


# ---------------------------------------------------------------------- IVF


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("spec", ["pq8", "sq8", "bin", "fp16"])
def test_ivf_all_lists_equals_scoring_reconstructions(data, spec, metric):
    """nprobe = nlist scans everything: the result is the top-k over each vector's reconstruction."""
    x, q = data
    idx = Index(f"ivf16,{spec}", metric=metric, nprobe=16).fit(x)
    idx.add(x[:1000])
    idx.add(x[1000:])  # two adds: the lists are merged
    assert idx.list_sizes().sum() == len(x) and (idx.list_sizes() > 0).sum() > 8
    res = idx.search(q, 10)
    xs = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    qs = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
    lists = idx._assign(xs)
    codes = idx._encode(xs, lists)
    m = "ip" if metric == "cosine" else metric
    full = idx.codec_.distances(qs, codes, m)
    if idx.residual_:
        full = full - qs @ idx.centroids_[lists].T  # -<q, c + r>
    ref_d, ref_i = brute_topk(full, 10)
    assert recall_at_k(res.ids, ref_i, 10) >= 0.98  # float rounding may swap near-ties
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-4, atol=1e-4)


def test_ivf_residual_only_under_inner_product():
    assert Index("ivf4,pq8", metric="ip").residual_
    assert Index("ivf4,sq8", metric="cosine").residual_
    assert not Index("ivf4,pq8", metric="l2").residual_
    assert not Index("ivf4,bin", metric="ip").residual_
    assert not Index("ivf4,pca16+sq8", metric="ip").residual_


def test_ivf_recall_grows_with_nprobe_and_rerank_is_exact(data, tmp_path):
    x, q = data
    idx = Index("ivf32,pq8", metric="ip", rerank_path=tmp_path / "o.f32").fit(x)
    idx.add(x)
    gt = exact_knn(x, q, 10, "ip").ids
    recalls = [recall_at_k(idx.search(q, 10, nprobe=p).ids, gt, 10) for p in (1, 4, 32)]
    assert recalls[0] < recalls[2] and recalls[0] <= recalls[1] + 0.02
    exact = idx.search(q, 10, nprobe=32, oversample=len(x))
    assert recall_at_k(exact.ids, gt, 10) >= 0.99
    assert recall_at_k(idx.search(q, 10, nprobe=8, oversample=8).ids, gt, 10) > recalls[1]


def test_ivf_filters_inside_lists(data):
    x, q = data
    attrs = np.arange(len(x)) % 7
    idx = Index("ivf8,sq8", metric="l2", nprobe=8).fit(x)
    idx.add(x, attributes=attrs)
    res = idx.search(q, 5, filter=attribute_equals(0, 3))
    assert (attrs[res.ids] == 3).all()
    flat = Index("sq8", metric="l2").fit(x)
    flat.add(x, attributes=attrs)
    # IVF over every list with a filter finds the same neighbours as the flat scan (same sq8 codes
    # up to the residual: compare against exact search restricted to the filter)
    allowed = attrs == 3
    ref = exact_knn(x[allowed], q, 5, "l2")
    assert recall_at_k(res.ids, np.flatnonzero(allowed)[ref.ids], 5) >= 0.9
    per_query = [lambda a, v=v: a[:, 0] == v % 7 for v in range(len(q))]
    res = idx.search(q, 4, filter=per_query)
    assert all((attrs[res.ids[i]] == i % 7).all() for i in range(len(q)))


def test_ivf_bad_input(data, tmp_path):
    x, q = data
    with pytest.raises(ValueError, match="at least 64 training vectors"):
        Index("ivf64,sq8").fit(x[:50])
    with pytest.raises(ValueError, match="nprobe=9 exceeds nlist=8"):
        Index("ivf8,sq8", nprobe=9)
    idx = Index("ivf8,sq8").fit(x)
    idx.add(x)
    with pytest.raises(ValueError, match="nprobe=9 exceeds nlist=8"):
        idx.search(q, 3, nprobe=9)
    with pytest.raises(ValueError, match="nprobe must be a positive int"):
        idx.search(q, 3, nprobe=0)
    with pytest.raises(ValueError, match="IVF indexes only"):
        Index("sq8").fit(x).search(q, 3, nprobe=2)
    with pytest.raises(ValueError, match="malformed IVF spec"):
        Index("ivf,sq8")
    with pytest.raises(ValueError, match="says nlist=8"):
        Index("ivf8,sq8", nlist=16)
    with pytest.raises(ValueError, match="nlist must be"):
        Index("sq8", nlist=-2)
    with pytest.raises(ValueError, match="trained on d=32"):
        idx.add(x[:, :16])


def test_ivf_save_load_roundtrip(data, tmp_path):
    x, q = data
    idx = Index("ivf16,pq8", metric="ip", nprobe=4, rerank_path=tmp_path / "o.f32").fit(x)
    idx.add(x, attributes=np.arange(len(x)) % 3)
    before = idx.search(q, 10, oversample=3)
    idx.save(tmp_path / "ivf")
    header = json.loads((tmp_path / "ivf" / HEADER).read_text())
    assert header["nlist"] == 16 and {"centroids.npy", "offsets.npy", "ids.npy"} <= set(header["files"])
    for mmap in (True, False):
        loaded = Index.load(tmp_path / "ivf", mmap=mmap)
        assert loaded.spec == "ivf16,pq8" and loaded.nprobe == 4 and loaded.residual_
        after = loaded.search(q, 10, oversample=3)
        np.testing.assert_array_equal(before.ids, after.ids)
        np.testing.assert_allclose(before.distances, after.distances)
    assert loaded.bytes_per_vector() == 1 * 8 + 8 + 8  # pq8 code + int64 id + one attribute column
    assert loaded.fixed_bytes() > 16 * 32 * 4


def test_header_checksum_and_version_one_folders(data, tmp_path):
    x, q = data
    idx = Index("sq8").fit(x)
    idx.add(x)
    idx.save(tmp_path / "i")
    hpath = tmp_path / "i" / HEADER
    header = json.loads(hpath.read_text())
    header["metric"] = "l2"  # an edit that leaves every data file intact
    hpath.write_text(json.dumps(header))
    with pytest.raises(ValueError, match="header checksum"):
        Index.load(tmp_path / "i")
    # a version-1 folder (flat, no header checksum) still loads
    header = {k: v for k, v in header.items() if k not in ("header_sha256", "nlist", "nprobe", "residual")}
    header.update(version=1, metric="ip")
    hpath.write_text(json.dumps(header))
    np.testing.assert_array_equal(Index.load(tmp_path / "i").search(q, 5).ids, idx.search(q, 5).ids)


def test_leftover_temporaries_are_removed(data, tmp_path):
    x, _ = data
    idx = Index("sq8").fit(x)
    idx.add(x[:100])
    (tmp_path / ".i.abc123.tmp").mkdir()
    (tmp_path / ".i.abc123.tmp" / "codes.npy").write_bytes(b"half")
    (tmp_path / ".i.old-deadbeef").mkdir()
    idx.save(tmp_path / "i")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i"]
    (tmp_path / ".i.xyz.tmp").mkdir()
    Index.load(tmp_path / "i")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i"]


def test_originals_changed_under_the_index(data, tmp_path):
    x, q = data
    idx = Index("sq8", rerank_path=tmp_path / "o.f32").fit(x)
    idx.add(x)
    idx.search(q, 3, oversample=2)
    with open(tmp_path / "o.f32", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match="changed under the index"):
        idx.search(q, 3, oversample=2)
    (tmp_path / "o.f32").unlink()
    with pytest.raises(ValueError, match="gone"):
        idx.search(q, 3, oversample=2)


# ---------------------------------------------------------------------- streaming


@pytest.mark.parametrize("spec", ["sq8", "ivf8,pq8", "ivf8,bin"])
@pytest.mark.parametrize("suffix", [".npy", ".f32"])
def test_add_file_equals_add(data, tmp_path, spec, suffix):
    x, q = data
    path = tmp_path / f"base{suffix}"
    np.save(path, x) if suffix == ".npy" else write_f32(path, x)
    d = None if suffix == ".npy" else 32
    mem = Index(spec, metric="ip", nprobe=3).fit(x)
    mem.add(x)
    streamed = Index(spec, metric="ip", nprobe=3, block_size=700, rerank_path=tmp_path / "o.f32").fit(x)
    stats = streamed.add_file(path, d=d)
    assert stats["n"] == len(x) and stats["vectors_per_s"] > 0
    mem._consolidate()
    np.testing.assert_array_equal(streamed._codes, mem._codes)
    a, b = mem.search(q, 10), streamed.search(q, 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.distances, b.distances)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "o.f32", dtype=np.float32).reshape(x.shape), x)
    # a second file goes through the pending path and appends
    streamed.add_file(path, d=d)
    assert streamed.ntotal == 2 * len(x) and streamed.list_sizes().sum() == 2 * len(x)
    assert set(streamed.search(q[:1], 2 * len(x), nprobe=3 if streamed.is_ivf else None).ids[0]) - {-1} <= set(
        range(2 * len(x)))


def test_vector_file_errors(tmp_path, data):
    x, _ = data
    np.save(tmp_path / "a.npy", x)
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        VectorFile(tmp_path / "t.npy")
    np.save(tmp_path / "one.npy", x[0])
    with pytest.raises(ValueError, match="2-D"):
        VectorFile(tmp_path / "one.npy")
    with pytest.raises(ValueError, match="needs its dimension"):
        VectorFile(tmp_path / "a.f32") if (tmp_path / "a.f32").write_bytes(b"\0" * 16) else None
    with pytest.raises(ValueError, match="whole number"):
        VectorFile(tmp_path / "a.f32", d=3)
    with pytest.raises(FileNotFoundError):
        VectorFile(tmp_path / "missing.npy")
    idx = Index("sq8").fit(x)
    np.save(tmp_path / "d16.npy", x[:, :16])
    with pytest.raises(ValueError, match="d=16.*trained on d=32"):
        idx.add_file(tmp_path / "d16.npy")
    np.testing.assert_array_equal(VectorFile(tmp_path / "a.npy").read(5, 9), x[5:9])


def test_build_index_cli_path(data, tmp_path):
    from embpress.vectors.build import build_index

    x, q = data
    np.save(tmp_path / "base.npy", x)
    idx, t = build_index(tmp_path / "base.npy", "ivf8,sq8", tmp_path / "out", train_size=1500, nprobe=8)
    assert idx.ntotal == len(x) and idx.has_originals and t["n"] == len(x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.npy", "out"]  # no build leftovers
    gt = exact_knn(x, q, 10, "ip").ids
    assert recall_at_k(idx.search(q, 10, oversample=4).ids, gt, 10) >= 0.95


def test_two_open_indexes_never_share_a_rerank_file(data, tmp_path):
    x, q = data
    first = Index("sq8", rerank_path=tmp_path / "o.f32").fit(x)
    first.add(x)
    second = Index("sq8", rerank_path=tmp_path / "o.f32").fit(x)
    with pytest.raises(ValueError, match="another open index"):
        second.add(x[:10])
    assert (tmp_path / "o.f32").stat().st_size == x.nbytes  # the first index's file is untouched
    np.testing.assert_array_equal(first.search(q, 3, oversample=2).ids, first.search(q, 3, oversample=2).ids)
    other = Index("sq8", rerank_path=tmp_path / "p.f32").fit(x)
    other.add(x[:10])
    with pytest.raises(ValueError, match="another open index"):
        other.set_rerank_path(tmp_path / "o.f32")
    del first
    import gc

    gc.collect()
    second.add(x[:10])  # the file is free once its index is gone
    assert second.search(q, 3, oversample=2).ids.max() < 10


def test_index_folder_byte_flips_are_all_detected(data, tmp_path):
    """Flip one random byte of a random file of a saved IVF index folder, 60 times: every load fails."""
    x, _ = data
    idx = Index("ivf8,pq8", rerank_path=tmp_path / "o.f32").fit(x)
    idx.add(x[:500], attributes=np.arange(500) % 3)
    idx.save(tmp_path / "i")
    files = sorted((tmp_path / "i").iterdir())
    originals = {f: f.read_bytes() for f in files}
    rng = np.random.default_rng(0)
    detected = 0
    for trial in range(60):
        f = files[trial % len(files)]
        raw = bytearray(originals[f])
        pos = int(rng.integers(len(raw)))
        raw[pos] ^= int(rng.integers(1, 256))
        f.write_bytes(bytes(raw))
        try:
            Index.load(tmp_path / "i")
        except ValueError:
            detected += 1
        f.write_bytes(originals[f])
    assert detected == 60
    Index.load(tmp_path / "i")  # intact again


@pytest.mark.parametrize("spec", ["sq8", "ivf8,pq8"])
def test_add_file_with_a_bad_block_leaves_the_index_as_it_was(data, tmp_path, spec):
    x, q = data
    bad = x.copy()
    bad[2500, 3] = np.nan  # in the last of three 1,000-row blocks
    np.save(tmp_path / "bad.npy", bad)
    idx = Index(spec, nprobe=8, block_size=1000, rerank_path=tmp_path / "o.f32").fit(x)
    with pytest.raises(ValueError, match=r"bad.npy rows 2000:3000 contains NaN"):
        idx.add_file(tmp_path / "bad.npy")  # streamed into place: empty index
    orig = tmp_path / "o.f32"
    assert idx.ntotal == 0 and (not orig.exists() or orig.stat().st_size == 0)
    idx.add(x[:100])
    with pytest.raises(ValueError, match="NaN"):
        idx.add_file(tmp_path / "bad.npy")  # appended through the pending path
    assert idx.ntotal == 100 and (tmp_path / "o.f32").stat().st_size == x[:100].nbytes
    assert idx.search(q, 3, oversample=2).ids.max() < 100
