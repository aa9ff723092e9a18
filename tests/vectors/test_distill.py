"""Learned PQ/OPQ (dvq, dopq): FAISS layout and scan kept, codebooks move, distillation learns."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from embpress.vectors import (
    DistilledOPQ,
    DistilledPQ,
    Index,
    OptimizedProductQuantizer,
    ProductQuantizer,
    build_codec,
    code_size,
    codec_from_state,
)
from embpress.vectors.distill import (
    anisotropic_codes,
    anisotropic_kmeans_round,
    anisotropic_loss,
    distill_coarse_centroids,
    parallel_cost_multiplier,
)
from embpress.vectors.evaluate import exact_knn, recall_at_k
from embpress.vectors.scan import unpack_fields

D = 16


@pytest.fixture(scope="module")
def data(make_clustered):
    x = make_clustered(1560, D, seed=7, clusters=12, latent=8)
    return x[:1500], x[1500:]


@pytest.fixture(scope="module")
def dopq(data):
    x, _ = data
    return DistilledOPQ(m=4, nbits=4, niter=3, train_rotation=True, epochs=3, lr=2e-3, n_random=64,
                         val_size=50).fit(x)


def test_codes_stay_faiss_pq(dopq, data):
    """Learned codes are FAISS's: IndexPQ holding the learned centroids (after the learned rotation)
    encodes the same bytes, and the standard PQ scan over them gives the learned codec's scores."""
    x, q = data
    codes = dopq.encode(x)
    ref = faiss.IndexPQ(D, 4, 4, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(dopq.centroids_.ravel(), ref.pq.centroids)
    ref.is_trained = True
    xr = np.ascontiguousarray(x @ dopq.rotation_.T)
    np.testing.assert_array_equal(ref.pq.compute_codes(xr), codes)
    plain = OptimizedProductQuantizer(m=4, nbits=4)
    plain.d_, plain.rotation_, plain.centroids_ = D, dopq.rotation_, dopq.centroids_
    np.testing.assert_array_equal(plain.distances(q, codes, "ip"), dopq.distances(q, codes, "ip"))
    mine, theirs = dopq.search_lists(q, codes, 10, "ip"), plain.search_lists(q, codes, 10, "ip")
    np.testing.assert_array_equal(mine.ids, theirs.ids)
    ref.add(xr)
    fd, fi = ref.search(np.ascontiguousarray(q @ dopq.rotation_.T), 10)
    np.testing.assert_allclose(-fd, mine.distances, rtol=1e-4, atol=1e-4)


def test_codebooks_and_rotation_move(dopq, data):
    x, _ = data
    start = OptimizedProductQuantizer(m=4, nbits=4, niter=10).fit(x)
    assert dopq.best_epoch_ >= 1, dopq.val_recall_history_
    assert np.abs(dopq.centroids_ - start.centroids_).max() > 1e-3
    assert np.abs(dopq.rotation_ - start.rotation_).max() > 1e-4
    np.testing.assert_allclose(dopq.rotation_ @ dopq.rotation_.T, np.eye(D), atol=1e-4)  # stays orthogonal
    assert dopq.loss_history_.shape == (3,) and dopq.val_recall_history_.shape == (4,)


def test_distillation_lowers_loss_and_raises_recall(data):
    """On a tiny task the distillation loss falls and held-out recall@10 beats FAISS's PQ start."""
    x, q = data
    torch.manual_seed(0)
    c = DistilledPQ(m=4, nbits=4, epochs=4, lr=3e-3, n_random=64, val_size=50).fit(x)
    assert c.loss_history_[-1] < c.loss_history_[0] - 0.01, c.loss_history_
    assert c.val_recall_history_.max() > c.val_recall_history_[0], c.val_recall_history_
    gt = exact_knn(x, q, 10).ids
    base = ProductQuantizer(m=4, nbits=4).fit(x)
    r0 = recall_at_k(base.search_lists(q, base.encode(x), 10, "ip").ids, gt, 10)
    r1 = recall_at_k(c.search_lists(q, c.encode(x), 10, "ip").ids, gt, 10)
    assert r1 > r0, (r0, r1)


def test_zero_epochs_is_faiss_and_init_is_the_start(data):
    x, q = data
    start = ProductQuantizer(m=4, nbits=4).fit(x)
    c = DistilledPQ(m=4, nbits=4, epochs=0).fit(x)
    np.testing.assert_array_equal(c.centroids_, start.centroids_)
    opq = OptimizedProductQuantizer(m=4, nbits=4, niter=5).fit(x)
    frozen = DistilledOPQ(m=4, nbits=4, epochs=1, n_random=32).fit(x, init=opq)
    np.testing.assert_array_equal(frozen.rotation_, opq.rotation_)  # train_rotation=False keeps it
    assert (frozen.best_epoch_ == 0) == np.array_equal(frozen.centroids_, opq.centroids_)
    with pytest.raises(ValueError, match="init must be a fitted OptimizedProductQuantizer"):
        DistilledOPQ(m=4, nbits=4).fit(x, init=start)


def test_train_queries_and_contrastive(data):
    x, q = data
    rng = np.random.default_rng(0)
    tq = x[rng.choice(len(x), 200, replace=False)] + 0.05 * rng.standard_normal((200, D)).astype(np.float32)
    pairs = np.stack([np.arange(200), exact_knn(x, tq, 1).ids[:, 0]], 1)
    c = DistilledPQ(m=4, nbits=4, epochs=2, loss="contrastive", n_random=32, val_size=20, lr=2e-3)
    c.fit(x, queries=tq, positives=pairs)
    assert c.loss_history_[-1] < c.loss_history_[0], c.loss_history_
    d = DistilledPQ(m=4, nbits=4, epochs=1, pseudo="noisy", n_random=32).fit(x)
    assert d.encode(x).shape == (len(x), 2)
    e = DistilledPQ(m=4, nbits=4, epochs=1, n_random=32).fit(x, queries=tq)
    assert e.loss_history_.shape == (1,)


def test_state_round_trip(dopq, data, tmp_path):
    x, q = data
    clone = codec_from_state(dopq.get_state())
    codes = dopq.encode(x)
    np.testing.assert_array_equal(clone.encode(x), codes)
    np.testing.assert_array_equal(clone.distances(q, codes, "ip"), dopq.distances(q, codes, "ip"))
    assert isinstance(clone, DistilledOPQ) and clone.best_epoch_ == dopq.best_epoch_
    assert code_size(384, "dopq48") == 48 and code_size(384, "dvq32x4") == 16


def test_bad_input(data):
    x, q = data
    with pytest.raises(ValueError, match="loss must be one of"):
        build_codec("dvq4").__class__(m=4, loss="kl").fit(x)
    with pytest.raises(ValueError, match="contrastive.*needs"):
        DistilledPQ(m=4, nbits=4, loss="contrastive").fit(x)
    with pytest.raises(ValueError, match="positives row 0"):
        DistilledPQ(m=4, nbits=4, loss="contrastive").fit(x, queries=q, positives=np.array([[0, 10**6]]))
    with pytest.raises(ValueError, match="queries have d=8"):
        DistilledPQ(m=4, nbits=4).fit(x, queries=q[:, :8])
    with pytest.raises(ValueError, match="pseudo must be"):
        DistilledOPQ(m=4, pseudo="held").fit(x)



def test_code_negatives_and_linear_schedule(data):
    """The codes' own top documents as candidates and the warm-up/decay schedule still learn; the
    schedule warms up over the first tenth of the steps, then decays to 0."""
    x, q = data
    c = DistilledPQ(m=4, nbits=4, epochs=3, lr=3e-3, n_random=32, n_code_top=16, schedule="linear",
                    val_size=50).fit(x)
    assert c.loss_history_[-1] < c.loss_history_[0], c.loss_history_
    assert c.val_recall_history_.max() > c.val_recall_history_[0], c.val_recall_history_
    full = DistilledPQ(m=4, nbits=4, epochs=1, lr=3e-3, n_random=10**6, batch_size=256, val_size=50)
    assert len(full._candidates(np.array([3]), np.random.default_rng(0), len(x))) == len(x)  # every document
    full.fit(x)
    assert full.val_recall_history_[1] > full.val_recall_history_[0], full.val_recall_history_
    f = c._lr_factor(100)
    assert [round(f(s), 3) for s in (0, 9, 10, 55, 99)] == [0.1, 1.0, 1.0, 0.5, 0.011]
    with pytest.raises(ValueError, match="schedule must be one of"):
        DistilledPQ(m=4, nbits=4, schedule="cosine").fit(x)
    with pytest.raises(ValueError, match="n_code_top must be"):
        DistilledPQ(m=4, nbits=4, n_code_top=-1).fit(x)
    with pytest.raises(ValueError, match="rotation_lr must be"):
        DistilledOPQ(m=4, nbits=4, rotation_lr=0.0).fit(x)


def test_pseudo_modes_and_teacher_temperature_change_the_training(data, monkeypatch):
    """Every pseudo mode holds out the same clean corpus vectors (one yardstick), ``"mixed"`` trains on
    twice the queries (corpus + noisy copies), and each mode and the teacher's temperature change the
    codebooks learned."""
    x, _ = data
    kw = dict(m=4, nbits=4, epochs=1, lr=3e-3, n_random=32)
    starts = {p: DistilledPQ(pseudo=p, val_size=50, **kw).fit(x).val_recall_history_[0]
              for p in ("corpus", "noisy", "mixed")}
    assert len(set(starts.values())) == 1, starts
    steps = []
    real = DistilledPQ._distill_step

    def counted(self, batch, *args):
        steps.append(len(batch))
        return real(self, batch, *args)

    monkeypatch.setattr(DistilledPQ, "_distill_step", counted)
    fits = {}
    for name, extra in (("corpus", {}), ("noisy", {"pseudo": "noisy"}), ("mixed", {"pseudo": "mixed"}),
                        ("teacher", {"teacher_temperature": 0.01})):
        steps.clear()
        fits[name] = (DistilledPQ(val_size=0, **extra, **kw).fit(x), sum(steps))  # val_size=0: last epoch kept
    assert fits["corpus"][1] == fits["noisy"][1] == len(x) and fits["mixed"][1] == 2 * len(x)
    start = ProductQuantizer(m=4, nbits=4).fit(x).centroids_
    cents = {k: c.centroids_ for k, (c, _) in fits.items()}
    for k, c in cents.items():
        assert np.abs(c - start).max() > 1e-3, k
    names = sorted(cents)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(cents[a] - cents[b]).max() > 1e-4, (a, b)
    with pytest.raises(ValueError, match="teacher_temperature must be"):
        DistilledPQ(m=4, nbits=4, teacher_temperature=0.0).fit(x)


def test_coarse_distillation_moves_centroids_and_fills_probed_lists(make_clustered):
    """Distilled IVF centroids move and put more of the held-out queries' float top-10 in the probed
    lists than k-means does; the Index uses them and still finds the exact neighbours at full nprobe."""
    x = make_clustered(2000, D, seed=3, clusters=30, latent=10)
    km = faiss.Kmeans(D, 32, niter=10, seed=1234)  # held-out share of the float top-10 in 1 list: 0.84
    km.train(x)
    fit = distill_coarse_centroids(km.centroids, x, epochs=4, lr=1e-2, n_random=64, val_size=200, val_nprobe=1)
    assert fit.val_history.shape == (5,) and fit.loss_history[-1] < fit.loss_history[0], fit.loss_history
    assert fit.best_epoch >= 1 and fit.val_history.max() > fit.val_history[0] + 0.01, fit.val_history
    assert np.abs(fit.centroids - km.centroids).max() > 1e-3
    idx = Index("ivf32,sq8", metric="ip", coarse_epochs=2).fit(x)
    idx.add(x)
    assert idx.coarse_history_.val_history.shape == (3,)
    hit = idx.search(x[:50], 10, nprobe=32).ids
    assert recall_at_k(hit, exact_knn(x, x[:50], 10).ids, 10) > 0.9
    with pytest.raises(ValueError, match="coarse_epochs=2 trains IVF centroids"):
        Index("sq8", coarse_epochs=2)
    with pytest.raises(ValueError, match="centroids .* and x .* must be 2-D"):
        distill_coarse_centroids(km.centroids[:, :8], x)


# ---------------------------------------------------------------------- score-aware (ScaNN) codes
def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def test_parallel_cost_multiplier_is_scanns_formula():
    x = torch.tensor([[1.0, 0, 0, 0], [0.5, 0, 0, 0], [0.1, 0, 0, 0]])
    eta = parallel_cost_multiplier(x, threshold=0.2)
    # (d - 1) r / (1 - r), r = T^2 / |x|^2; a row no longer than T gets 1
    np.testing.assert_allclose(eta.numpy(), [3 * 0.04 / 0.96, 3 * 0.16 / 0.84, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(parallel_cost_multiplier(x, eta=4.0).numpy(), [4.0, 4.0, 4.0])
    with pytest.raises(ValueError, match="threshold or eta"):
        parallel_cost_multiplier(x)


def _reference_anisotropic_codes(xr, cb, eta, sweeps=10):
    """The plain torch coordinate descent (whole (N, M, K) tables), the compiled kernel's reference."""
    m, n = cb.shape[0], xr.shape[0]
    sub = xr.reshape(n, m, -1)
    h = sub / xr.norm(dim=1)[:, None, None]
    err = (cb * cb).sum(-1)[None] - 2 * torch.einsum("nmd,mkd->nmk", sub, cb)
    par = (sub * h).sum(-1)[..., None] - torch.einsum("nmd,mkd->nmk", h, cb)
    codes = err.argmin(-1)
    own = par.gather(2, codes[..., None])[..., 0]
    for _ in range(sweeps):
        for j in range(m):
            rest = own.sum(1) - own[:, j]
            codes[:, j] = (err[:, j] + (eta - 1)[:, None] * (rest[:, None] + par[:, j]) ** 2).argmin(1)
            own[:, j] = par[:, j].gather(1, codes[:, j:j + 1])[:, 0]
    return codes


def test_compiled_anisotropic_codes_match_the_torch_reference():
    """Same codes as the plain torch coordinate descent (up to float near-ties), same or lower loss."""
    xr = _unit(1500, 48, 5)
    cb = torch.randn(6, 32, 8, generator=torch.Generator().manual_seed(2)) * 0.2
    eta = torch.rand(1500, generator=torch.Generator().manual_seed(3)) * 10 + 0.5
    mine, ref = anisotropic_codes(xr, cb, eta), _reference_anisotropic_codes(xr, cb, eta)
    assert mine.shape == (1500, 6) and mine.dtype == torch.int64
    assert float((mine == ref).all(1).float().mean()) > 0.995
    assert float(anisotropic_loss(xr, cb, mine, eta).sum()) <= float(anisotropic_loss(xr, cb, ref, eta).sum()) * (1 + 1e-5)


def test_anisotropic_codes_are_a_coordinate_minimum_below_the_nearest_codes():
    """From the nearest centroids, coordinate descent never raises a row's loss, cuts the parallel
    error on average, stops where no single sub-space change lowers the loss, and with eta = 1 it
    keeps the nearest centroids."""
    xr = _unit(400, 12, 0)
    cb = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(1)) * 0.3
    eta = torch.full((400,), 6.0)
    nearest = anisotropic_codes(xr, cb, torch.ones(400))
    dist = ((xr.reshape(400, 3, 1, 4) - cb[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest.numpy(), dist.argmin(-1).numpy())
    codes = anisotropic_codes(xr, cb, eta)
    before, after = anisotropic_loss(xr, cb, nearest, eta), anisotropic_loss(xr, cb, codes, eta)
    assert (after <= before + 1e-5).all() and float(after.mean()) < 0.9 * float(before.mean())
    for j in range(3):  # no single change of one sub-space's code lowers any row's loss
        for k in range(8):
            alt = codes.clone()
            alt[:, j] = k
            assert (anisotropic_loss(xr, cb, alt, eta) >= after - 1e-5).all()


def test_score_aware_kmeans_never_raises_the_loss_and_eta_one_is_lloyd():
    xr = _unit(600, 12, 2)
    cb0 = xr[torch.randperm(600, generator=torch.Generator().manual_seed(0))[:16]].reshape(16, 3, 4).transpose(0, 1).contiguous()
    eta = parallel_cost_multiplier(xr, threshold=0.5)  # 11 * 0.25 / 0.75 = 3.67
    cb, codes = cb0.clone(), anisotropic_codes(xr, cb0, eta)
    losses = [float(anisotropic_loss(xr, cb, codes, eta).sum())]
    for _ in range(4):
        anisotropic_kmeans_round(xr, cb, codes, eta)
        losses.append(float(anisotropic_loss(xr, cb, codes, eta).sum()))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.95 * losses[0] and (cb - cb0).abs().max() > 1e-3
    # eta = 1: each centroid becomes the mean of its sub-vectors (k-means), empty ones stay
    one = torch.ones(600)
    cb1, c1 = cb0.clone(), anisotropic_codes(xr, cb0, one)
    anisotropic_kmeans_round(xr, cb1, c1, one)
    sub = xr.reshape(600, 3, 4)
    for j in range(3):
        for k in range(16):
            rows = c1[:, j] == k
            want = sub[rows, j].mean(0) if rows.any() else cb0[j, k]
            np.testing.assert_allclose(cb1[j, k].numpy(), want.numpy(), atol=1e-5)


def test_anisotropic_codec_keeps_faiss_layout_and_scan(data, tmp_path):
    """Score-aware dopq: the codebooks move (score-aware k-means), held-out recall does not fall
    below the start, codes are in FAISS's layout and decode to the centroids they name, the plain
    OPQ scan serves them, and the state round trip encodes the same bytes."""
    x, q = data
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    start = OptimizedProductQuantizer(m=4, nbits=4, niter=5).fit(x)
    c = DistilledOPQ(m=4, nbits=4, niter=5, epochs=1, n_random=64, val_size=50, anisotropic_threshold=0.5,
                     avq_rounds=3).fit(x, init=start)
    assert c.avq_loss_history_.shape == (4,) and (np.diff(c.avq_loss_history_) <= 1e-6).all()
    assert c.avq_recall_history_.max() == c.avq_recall_history_[c.avq_best_round_]
    assert c.val_recall_history_[0] == c.avq_recall_history_.max()  # the distillation starts there
    assert np.abs(c.centroids_ - start.centroids_).max() > 1e-3
    codes = c.encode(x)
    assert codes.shape == (len(x), 2) and codes.dtype == np.uint8
    idx = unpack_fields(codes, 4, 4)
    xr = torch.from_numpy(np.ascontiguousarray(x @ c.rotation_.T))
    want = anisotropic_codes(xr, torch.from_numpy(c.centroids_), parallel_cost_multiplier(xr, threshold=0.5))
    np.testing.assert_array_equal(idx, want.numpy())
    assert (idx != unpack_fields(start.encode(x), 4, 4)).any()  # not FAISS's nearest codes
    plain = OptimizedProductQuantizer(m=4, nbits=4)
    plain.d_, plain.rotation_, plain.centroids_ = D, c.rotation_, c.centroids_
    np.testing.assert_array_equal(plain.search_lists(q, codes, 10, "ip").ids, c.search_lists(q, codes, 10, "ip").ids)
    np.testing.assert_array_equal(codec_from_state(c.get_state()).encode(x), codes)
    d8 = DistilledPQ(m=4, nbits=8, epochs=0, anisotropic_eta=3.0, avq_rounds=1).fit(x)
    assert d8.encode(x[:5]).shape == (5, 4)


@pytest.mark.parametrize("kw,match", [({"anisotropic_eta": 0.0}, "anisotropic_eta must be None"),
                                      ({"anisotropic_threshold": float("nan")}, "anisotropic_threshold must be"),
                                      ({"anisotropic_eta": 2.0, "anisotropic_threshold": 0.2}, "not both"),
                                      ({"avq_rounds": -1}, "avq_rounds must be a non-negative int")])
def test_anisotropic_bad_params(data, kw, match):
    with pytest.raises(ValueError, match=match):
        DistilledPQ(m=4, nbits=4, **kw).fit(data[0])


def test_anisotropic_spec_names_the_setting():
    """The spec carries the score-aware setting, so two settings never share a name (or a row)."""
    a, t = build_codec("dopq32a4"), build_codec("dvq8x4t0.2")
    assert (a.anisotropic_eta, a.anisotropic_threshold, a.spec) == (4.0, None, "dopq32a4")
    assert (t.anisotropic_eta, t.anisotropic_threshold, t.nbits) == (None, 0.2, 4)
    assert a._canonical_spec() == "dopq32x8a4" and build_codec("dopq32")._canonical_spec() == "dopq32x8"
    assert build_codec("dvq4x4a2.5").anisotropic_eta == 2.5 and code_size(384, "dopq48a4") == 48
    with pytest.raises(ValueError, match="anisotropic_eta must be None"):
        build_codec("dopq4a0")


def test_anisotropic_codes_in_an_ivf_encode_the_whole_vector(data):
    x, q = data
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    idx = Index("ivf8,dvq4x4a3", metric="ip").fit(x)
    idx.add(x)
    assert not idx.residual_ and Index("ivf8,dvq4x4", metric="ip").fit(x).residual_
    np.testing.assert_array_equal(idx.search(q, 10, nprobe=8).ids, idx.codec_.search_lists(q, idx.codec_.encode(x), 10, "ip").ids)
