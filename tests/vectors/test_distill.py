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
from embpress.vectors.distill import distill_coarse_centroids
from embpress.vectors.evaluate import exact_knn, recall_at_k

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
