"""Semantic-ID tokenizers and tables: codes, sizing, serving bytes, and cold items that get their code's vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from content_vectors import clustered_content
from sklearn.metrics import roc_auc_score

from embpress import serving
from embpress.data import CTRDataset, Split
from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.mgqe import code_bits, packed_bytes
from embpress.tables.sid_tokenize import RQVAE, RQKMeans, add_collision_suffix, collision_stats
from embpress.train import TrainConfig, train

SID = ("sid", "sid-ngram", "sid-hash")


# ----------------------------------------------------------------------------- tokenizers


def test_rq_kmeans_levels_reduce_error_and_codes_are_deterministic():
    x = clustered_content(2000, dim=16, clusters=30, seed=1)
    errors = [RQKMeans(levels=lv, codes=16, seed=0).fit(x).reconstruction_error(x) for lv in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    a = RQKMeans(levels=3, codes=16, seed=4).fit(x).encode(x)
    b = RQKMeans(levels=3, codes=16, seed=4).fit(x).encode(x)
    assert a.shape == (2000, 3) and a.dtype == np.int64 and np.array_equal(a, b) and a.max() < 16


def test_rq_vae_learns():
    """Training moves the encoder, decoder and codebooks: the reconstruction beats the k-means-initialised start."""
    x = clustered_content(1500, dim=16, clusters=20, seed=2)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start = RQVAE(levels=2, codes=16, latent=8, hidden=(32,), epochs=0, batch_size=256, seed=0).fit(x)
    trained = RQVAE(levels=2, codes=16, latent=8, hidden=(32,), epochs=40, batch_size=256, lr=3e-3, seed=0).fit(x)
    assert trained.history_[-1] < 0.5 * trained.history_[0]
    assert trained.reconstruction_error(x) < 0.5 * start.reconstruction_error(x)
    assert not torch.equal(trained.books_[0], start.books_[0])
    codes = trained.encode(x)
    assert codes.shape == (1500, 2) and 0 <= codes.min() and codes.max() < 16
    assert collision_stats(codes)["unique"] > 16


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="content vectors"):
        RQKMeans().fit(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="at least as many"):
        RQKMeans(codes=64).fit(np.zeros((10, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        RQKMeans(codes=2).fit(np.full((10, 4), np.nan, dtype=np.float32))
    with pytest.raises(RuntimeError, match="not fitted"):
        RQKMeans().encode(np.zeros((3, 4), dtype=np.float32))


def test_collision_suffix_makes_tuples_unique():
    codes = np.random.default_rng(0).integers(0, 3, size=(200, 2))
    stats = collision_stats(codes)
    assert stats["unique"] <= 9 and stats["collision_rate"] == 1.0
    full = add_collision_suffix(codes)
    assert np.array_equal(full[:, :2], codes)
    assert collision_stats(full)["unique"] == 200 and full[:, 2].max() == stats["max_share"] - 1


# ----------------------------------------------------------------------------- tables


def _fields(n_items=2000, seed=0):
    return [Field("user", 400), Field("item", n_items, content=clustered_content(n_items, seed=seed)),
            Field("genre", 12)]


@pytest.mark.parametrize("method", SID)
def test_sizing_shrinks_codes_with_the_budget(method):
    fields = _fields()
    loose = build_table(method, fields=fields, dim=8, budget=Ratio(3))
    tight = build_table(method, fields=fields, dim=8, budget=Ratio(20))
    assert 2 <= tight.codes_ < loose.codes_ <= 256
    for t in (loose, tight):
        assert t.serving_bytes() <= t.max_bytes
        code_bytes = packed_bytes(2000 * t.levels, code_bits(t.codes_))
        assert t.serving_state()["item/codes"].nbytes == code_bytes
        assert t.serving_state()["item/book"].shape == (t._semantic_rows(t.codes_), 8)
    with pytest.raises(BudgetError, match="smallest configuration"):
        build_table(method, fields=fields, dim=8, budget=packed_bytes(2000 * 3, 1) + 100)


def test_items_with_equal_codes_share_their_vector_and_ngram_rows():
    fields = _fields()
    t = build_table("sid", fields=fields, dim=8, budget=Ratio(10))
    codes = t.codes_1.numpy()
    _, first, inverse = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    twin = next(i for i in range(len(codes)) if first[inverse.reshape(-1)[i]] != i)
    a, b = int(first[inverse.reshape(-1)[twin]]), twin
    out = t(torch.tensor([[0, a, 0], [0, b, 0]]))
    assert torch.equal(out[0, 1], out[1, 1])
    g = build_table("sid-ngram", fields=fields, dim=8, budget=Ratio(10))
    rows = g.semantic_rows_of(1, torch.arange(2000))
    assert rows.shape == (2000, 2) and int(rows.max()) < 2 * g.codes_ ** 2
    c = g.codes_1
    assert torch.equal(rows[:, 1], c[:, 1] + c[:, 2] * g.codes_ + g.codes_ ** 2)


def test_sid_hash_gate_separates_items_with_equal_codes():
    fields = _fields()
    t = build_table("sid-hash", fields=fields, dim=8, budget=Ratio(10), levels=1, max_codes=8)
    assert t.id_rows_[1] == t.codes_ and t.codes_ == 8
    codes = t.codes_1.numpy()[:, 0]
    a, b = np.flatnonzero(codes == codes[0])[:2]
    out = t(torch.tensor([[0, int(a), 0], [0, int(b), 0]]))
    assert not torch.equal(out[0, 1], out[1, 1])  # the hashed ID rows differ


def _cold_start_data(seed=0, n_users=200, n_items=400, rows=40_000, cold=0.2):
    """Items in 20 content clusters; an item's effect is its cluster's; ``cold`` of the items only in test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 16))
    cluster = rng.integers(0, 20, n_items)
    content = (centres[cluster] + 0.2 * rng.normal(size=(n_items, 16))).astype(np.float32)
    effect = 1.5 * rng.normal(size=20)
    u, i = rng.integers(0, n_users, rows), rng.integers(0, n_items, rows)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(rng.normal(size=n_users)[u] + effect[cluster[i]])))).astype(np.float32)
    is_cold = np.zeros(n_items, bool)
    is_cold[rng.permutation(n_items)[: int(cold * n_items)]] = True
    warm = np.flatnonzero(~is_cold[i])
    tr, va = warm[: int(0.9 * len(warm))], warm[int(0.9 * len(warm)):]
    te = np.concatenate([va, np.flatnonzero(is_cold[i])])
    sparse = np.stack([u, i], 1)

    def split(idx):
        return Split(dense=np.zeros((len(idx), 0), np.float32), sparse=sparse[idx], label=y[idx])

    counts = [np.bincount(sparse[tr, j], minlength=n) for j, n in enumerate((n_users, n_items))]
    fields = (Field("user", n_users, counts[0]), Field("item", n_items, counts[1], content=content))
    data = CTRDataset(name="cold", fields=fields, dense_names=(), train=split(tr), valid=split(va), test=split(te))
    return data, is_cold[i[te]]


def _cold_auc(method, data, cold):
    torch.manual_seed(0)
    table = build_table(method, fields=data.fields, dim=8, budget=Ratio(8))
    before = {k: v.detach().clone() for k, v in table.state_dict().items()}
    model = build_model("dlrm", table=table, num_dense=0, bottom=(8,), top=(16,))
    train(model, data, TrainConfig(epochs=2, batch_size=512, lr=5e-3, sparse_lr=5e-3, progress=False))
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.zeros(len(data.test), 0), torch.from_numpy(data.test.sparse))).numpy()
    moved = [k for k, v in table.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    return roc_auc_score(data.test.label[cold], p[cold]), moved


@pytest.fixture(scope="module")
def cold_start():
    return _cold_start_data()


@pytest.fixture(scope="module")
def hash_cold_auc(cold_start):
    return _cold_auc("hash", *cold_start)[0]


@pytest.mark.parametrize("method", SID)
def test_cold_items_get_their_codes_vector(method, cold_start, hash_cold_auc):
    """Cold items never trained: hash gives them a colliding row, semantic IDs their cluster's learned rows."""
    auc, moved = _cold_auc(method, *cold_start)
    assert "books.1.weight" in moved
    if method == "sid-hash":
        assert "gates.1.weight" in moved and "id_tables.1.weight" in moved
    assert auc > hash_cold_auc + 0.1, (method, auc, hash_cold_auc)


@pytest.mark.parametrize("method", SID)
def test_served_from_artifact_with_content(method, cold_start, tmp_path):
    data, _ = cold_start
    table = build_table(method, fields=data.fields, dim=8, budget=Ratio(8))
    with torch.no_grad():
        for p in table.parameters():
            p.add_(0.1 * torch.randn_like(p))
    table.eval().save_serving(tmp_path / "t.safetensors")
    served = serving.load(tmp_path / "t.safetensors")
    assert served.serving_bytes() == table.serving_bytes() <= table.max_bytes
    ids = torch.from_numpy(np.asarray(data.test.sparse[:300], dtype=np.int64))
    with torch.no_grad():
        torch.testing.assert_close(served(ids), table(ids), rtol=1e-6, atol=1e-7)


def test_field_content_is_checked_and_ignored_by_other_methods():
    with pytest.raises(ValueError, match="'item': content must have shape"):
        Field("item", 10, content=np.zeros((9, 4), np.float32))
    with pytest.raises(ValueError, match="'item': content must hold floats"):
        Field("item", 10, content=np.zeros((10, 4), np.int64))
    with pytest.raises(ValueError, match="'item': content has NaN"):
        Field("item", 10, content=np.full((10, 4), np.inf, np.float32))
    plain, rich = Field("item", 500), Field("item", 500, content=clustered_content(500))
    assert plain == rich
    torch.manual_seed(0)
    a = build_table("hash", fields=[plain], dim=4, budget=Ratio(4))(torch.tensor([[7]]))
    torch.manual_seed(0)
    b = build_table("hash", fields=[rich], dim=4, budget=Ratio(4))(torch.tensor([[7]]))
    assert torch.equal(a, b)


def test_a_table_without_content_fields_says_so():
    with pytest.raises(ValueError, match="no field carries content vectors"):
        build_table("sid", fields=[Field("user", 100)], dim=4, budget=Ratio(2))
