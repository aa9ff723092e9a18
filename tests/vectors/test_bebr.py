"""BEBR recurrent binarization: code layout, SDC scoring, determinism, and that training helps."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from embpress.vectors import BEBRCodec, Metric, build_codec, code_size, codec_from_state


@pytest.fixture(scope="module")
def data(make_clustered):
    x = make_clustered(1700, 32, seed=0, clusters=30, spread=0.6, noise=0.15, scaled=True)
    xb, xq = x[:1500], x[1500:]
    _, gt = faiss.knn(xq, xb, 10, faiss.METRIC_INNER_PRODUCT)
    return xb, xq, gt


@pytest.fixture(scope="module")
def trained(data):
    return BEBRCodec(loops=1, dim=16, epochs=4, seed=0).fit(data[0])


def recall_at_10(codec, xb, xq, gt) -> float:
    ids = np.argsort(codec.distances(xq, codec.encode(xb), Metric.COSINE), axis=1, kind="stable")[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt, strict=True)]))


@pytest.mark.parametrize(
    ("spec", "nbytes"), [("bebr1", 8), ("bebr2", 12), ("bebr1d16", 4), ("bebr2d12", 6), ("bebr0d8", 1)]
)
def test_code_layout(spec, nbytes):
    assert code_size(32, spec) == nbytes


def test_spec_parsing():
    c = build_codec("bebr2d64", seed=3)
    assert (c.loops, c.dim, c.seed) == (2, 64, 3)
    for bad in ("bebr8", "bebr1d0", "bebr", "bebr1x2"):
        with pytest.raises(ValueError, match="spec"):
            build_codec(bad)


def test_codes_are_packed_bit_planes(trained, data):
    xq = data[1]
    codes = trained.encode(xq)
    assert codes.shape == (len(xq), 2 * 2)
    z = trained.recurrent_codes(codes)
    # Each coordinate is b0 + b1 / 2 with b0, b1 in {-1, +1}.
    assert set(np.unique(z).tolist()) <= {-1.5, -0.5, 0.5, 1.5}


def test_sdc_equals_cosine_of_recurrent_codes(trained, data):
    xb, xq, _ = data
    codes = trained.encode(xb[:300])
    zq = trained.recurrent_codes(trained.encode(xq)).astype(np.float64)
    zx = trained.recurrent_codes(codes).astype(np.float64)
    cos = (zq @ zx.T) / np.linalg.norm(zq, axis=1)[:, None] / np.linalg.norm(zx, axis=1)[None, :]
    np.testing.assert_allclose(trained.distances(xq, codes, "cosine"), -cos, atol=1e-5)
    np.testing.assert_allclose(trained.distances(xq, codes, "ip"), -cos, atol=1e-5)
    np.testing.assert_allclose(trained.distances(xq, codes, "l2"), 2 - 2 * cos, atol=1e-5)


def test_deterministic_with_seed(trained, data):
    xb = data[0]
    again = BEBRCodec(loops=1, dim=16, epochs=4, seed=0).fit(xb)
    np.testing.assert_array_equal(again.encode(xb), trained.encode(xb))
    other = BEBRCodec(loops=1, dim=16, epochs=4, seed=1).fit(xb)
    assert not np.array_equal(other.encode(xb), trained.encode(xb))


def test_state_round_trip_keeps_network(trained, data):
    clone = codec_from_state(trained.get_state())
    np.testing.assert_array_equal(clone.encode(data[1]), trained.encode(data[1]))
    np.testing.assert_allclose(clone.decode(trained.encode(data[1])), trained.decode(trained.encode(data[1])))


def test_learns_and_beats_fixed_projections_at_equal_bits(trained, data):
    """32 bits each: bebr1d16 (16 dims x 2 bits) vs random-rotation, ITQ and plain sign bits."""
    xb, xq, gt = data
    assert trained.loss_history_[-1] < trained.loss_history_[0]
    ours = recall_at_10(trained, xb, xq, gt)
    for spec in ("rbin32", "itq32", "bin"):
        base = build_codec(spec, seed=0).fit(xb)
        assert base.code_bytes == trained.code_bytes
        assert ours > recall_at_10(base, xb, xq, gt) + 0.05, spec


def test_decode_reconstructs_direction(trained, data):
    xq = data[1]
    dec = trained.decode(trained.encode(xq))
    cos = (dec * xq).sum(1) / np.linalg.norm(dec, axis=1) / np.linalg.norm(xq, axis=1)
    assert cos.mean() > 0.6


def test_num_threads_is_restored(data):
    before = torch.get_num_threads()
    BEBRCodec(loops=0, dim=8, epochs=1, num_threads=1).fit(data[0][:300])
    assert torch.get_num_threads() == before


def test_held_out_recall_picks_the_epoch_kept(trained, data):
    hist = trained.val_recall_history_
    assert hist.shape == (4 + 1,) and np.all((hist >= 0) & (hist <= 1))
    assert trained.best_epoch_ == int(np.argmax(hist))  # the first best; 0 is the ITQ start
    assert hist.max() > hist[0]  # training improved on the start here
    small = BEBRCodec(loops=1, dim=8, epochs=1).fit(data[0][:99])  # too few vectors to hold any out
    assert np.isnan(small.val_recall_history_).all() and small.best_epoch_ == 1


def test_paper_infonce_loss_trains(data):
    c = BEBRCodec(loops=1, dim=16, epochs=2, loss="infonce", seed=0).fit(data[0])
    assert c.loss_history_[-1] < c.loss_history_[0] and c.encode(data[1]).shape == (len(data[1]), 4)


@pytest.mark.parametrize(("kw", "msg"), [({"loss": "mse"}, "loss"), ({"val_size": -1}, "val_size"),
                                         ({"itq_iters": 1.5}, "itq_iters")])
def test_bad_training_options(data, kw, msg):
    with pytest.raises(ValueError, match=msg):
        BEBRCodec(loops=1, **kw).fit(data[0][:200])
