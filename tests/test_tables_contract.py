"""One contract suite over every registered table method (DESIGN.md, "Tables")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.models import build_model
from embpress.tables import BudgetError, Embedding, Ratio, build_table, registered_tables, table_class
from embpress.tables.base import state_nbytes
from embpress.train import TrainConfig, evaluate, train

METHODS = registered_tables()
COMPRESSED = [m for m in METHODS if not table_class(m).reference]

# Most methods are checked at 4x. Quantizers reach at most 4x (less at small dims; int8 at dim 8 reaches
# 2x less its metadata).
CONTRACT_RATIO = {"int8": 1.95, "int16": 1.3, "int8-qat": 3.9, "int16-qat": 1.9}
LEARN_RATIO = {"int8": 1.95, "int16": 1.3, "int8-qat": 3.9, "int16-qat": 1.9}
TINY_HPARAMS = {"dhe": {"num_hash": 64}}
"""Settings for the suite's tiny tables: dhe's 1024 int32 hash pairs alone are 8 KB, more than these budgets."""


def _hparams(spec):
    return TINY_HPARAMS.get(spec.split("+", 1)[0], {})


def _build(method, fields, dim=8, ratio=None, seed=0):
    torch.manual_seed(seed)
    ratio = CONTRACT_RATIO.get(method, 4.0) if ratio is None else ratio
    budget = None if table_class(method).reference else Ratio(ratio)
    return build_table(method, fields=fields, dim=dim, budget=budget, **_hparams(method))


@pytest.mark.parametrize("method", METHODS)
def test_forward_shape_dtype(method, small_fields):
    t = _build(method, small_fields)
    ids = torch.tensor([[0, 0, 0], [6, 299, 4999], [3, 17, 1234]])
    out = t(ids)
    assert out.shape == (3, 3, 8) and out.dtype == torch.float32
    # leading dimensions are preserved
    assert t(ids.reshape(1, 3, 3)).shape == (1, 3, 3, 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_serving_bytes_match_state_and_budget(method, small_fields):
    t = _build(method, small_fields)
    state = t.serving_state()
    assert state, "serving_state must list what a server stores"
    for name, arr in state.items():
        assert isinstance(arr, np.ndarray), f"{name} must be a numpy array at stored precision"
    assert t.serving_bytes() == state_nbytes(state)
    if not table_class(method).reference:
        assert t.serving_bytes() <= t.full_bytes / CONTRACT_RATIO.get(method, 4.0)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_with_seed(method, small_fields):
    ids = torch.tensor([[1, 2, 3], [6, 200, 4000]])
    a = _build(method, small_fields, seed=3)(ids)
    b = _build(method, small_fields, seed=3)(ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "ids, exc, msg",
    [
        (torch.tensor([[0, 0, 5000]]), ValueError, "field 'large'"),
        (torch.tensor([[-1, 0, 0]]), ValueError, "field 'small'"),
        (torch.tensor([[0, 0]]), ValueError, "F=3"),
        (torch.tensor([[0.0, 0.0, 0.0]]), TypeError, "integer"),
    ],
)
def test_bad_ids_raise(method, small_fields, ids, exc, msg):
    t = _build(method, small_fields)
    with pytest.raises(exc, match=msg):
        t(ids)


SERVING_ONLY = ("pep", "deeplight", "autosrh", "autosrh-cols", "optembed", "autodim", "dedup", "int8", "dpq", "mgqe")
"""Methods that train a full-size table (or supernet) and compress it afterwards."""
DURING_TRAINING = ("hash", "qr", "unified", "tt", "robe", "dhash", "mde", "dhe", "dhe-shared")


@pytest.mark.parametrize("method", METHODS)
def test_train_state_counts_training_memory(method, small_fields):
    t = _build(method, small_fields)
    state = t.train_state_bytes()
    assert state >= t.serving_bytes()
    if method in SERVING_ONLY:
        assert state >= t.full_bytes, "trains a full-size table: visible in its train state"
    if method in DURING_TRAINING:
        assert state <= 5 * t.serving_bytes(), "compresses during training too: weights, moments, a little more"


def test_trainer_records_the_largest_train_state_over_stages(tiny_ctr):
    torch.manual_seed(0)
    table = build_table("optembed", fields=tiny_ctr.fields, dim=8, budget=Ratio(4))
    model = build_model("dlrm", table=table, num_dense=tiny_ctr.num_dense, bottom=(16,), top=(16,))
    start = table.train_state_bytes()
    res = train(model, tiny_ctr, TrainConfig(epochs=1, batch_size=256, max_steps_per_epoch=2, progress=False))
    assert res.train_state_bytes >= max(start, table.train_state_bytes()) > table.serving_bytes()


@pytest.mark.parametrize("method", COMPRESSED)
def test_impossible_budget_raises(method, small_fields):
    with pytest.raises(BudgetError):
        build_table(method, fields=small_fields, dim=8, budget=16)


def test_unknown_method_and_hparam(small_fields):
    with pytest.raises(ValueError, match="unknown table method"):
        build_table("nope", fields=small_fields, dim=8)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_table("hash", fields=small_fields, dim=8, budget=Ratio(2), bogus=1)


def test_every_method_has_a_family_and_registration_checks_it():
    from embpress.tables import CompressedTable, register_table

    fams = {m: table_class(m).family for m in registered_tables()}
    assert set(fams.values()) == {"inter", "intra", "reference"}
    assert fams["full"] == fams["noid"] == "reference" and fams["robe"] == "inter" and fams["pep"] == "intra"

    class NoFamily(CompressedTable):
        pass

    with pytest.raises(TypeError, match="family must be one of"):
        register_table("no-family")(NoFamily)
    assert "no-family" not in registered_tables()


def test_embedding_dropin():
    emb = Embedding(1000, 8, method="hash", budget=Ratio(10))
    out = emb(torch.tensor([[1, 2, 3], [4, 5, 999]]))
    assert out.shape == (2, 3, 8)
    assert emb.serving_bytes() <= 1000 * 8 * 4 / 10


def _learn(method, data):
    torch.manual_seed(0)
    budget = None if table_class(method).reference else Ratio(LEARN_RATIO.get(method, 4.0))
    table = build_table(method, fields=data.fields, dim=8, budget=budget, **_hparams(method))
    model = build_model("dlrm", table=table, num_dense=data.num_dense, bottom=(16,), top=(32,))
    res = train(model, data, TrainConfig(epochs=3, batch_size=256, lr=3e-3, sparse_lr=3e-3,
                                         progress=False, patience=2))
    # the reported test AUC is the AUC of the model as it stands after the last stage
    assert res.test_auc == pytest.approx(evaluate(model, data.test)[0])
    return res.test_auc


@pytest.fixture(scope="module")
def noid_auc(tiny_ctr):
    return _learn("noid", tiny_ctr)


def test_noid_floor_is_informative(noid_auc):
    # dense features carry a little signal, per-id effects carry most of it
    assert 0.4 < noid_auc < 0.7


@pytest.mark.parametrize("method", [m for m in METHODS if m != "noid"])
def test_learns_tiny_ctr_task(method, tiny_ctr, noid_auc):
    """Every method must beat the no-id floor on a task whose signal sits in per-id effects."""
    auc = _learn(method, tiny_ctr)
    assert auc > noid_auc + 0.03, (method, auc, noid_auc)


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, small_fields):
    """Each parameter the trainer would optimise in the first stage receives a nonzero gradient
    from a batch that holds every id plus the table's regularizer, as the trainer's loss (a
    parameter that never does is dead weight in the optimiser)."""
    t = _build(method, small_fields)
    t.train()
    n = max(f.num_embeddings for f in small_fields)
    ids = torch.stack([torch.arange(n) % f.num_embeddings for f in small_fields], 1)
    g = torch.Generator().manual_seed(0)
    out = t(ids)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    reg = t.regularizer()
    (loss if reg is None else loss + reg).backward()
    dead = []
    for name, p in t.named_parameters():
        if not p.requires_grad:
            continue
        grad = p.grad
        if grad is not None and grad.is_sparse:
            grad = grad.coalesce().values()
        if grad is None or float(grad.abs().sum()) == 0:
            dead.append(name)
    assert not dead, f"{method}: no gradient reaches {dead}"


def _train_all_stages(spec, data, ratio, seed=0):
    torch.manual_seed(seed)
    table = build_table(spec, fields=data.fields, dim=8, budget=Ratio(ratio), **_hparams(spec))
    model = build_model("dlrm", table=table, num_dense=data.num_dense, bottom=(8,), top=(8,))
    train(model, data, TrainConfig(epochs=1, batch_size=128, max_steps_per_epoch=3, evals_per_epoch=1,
                                   progress=False, seed=seed))
    return table.eval()


@pytest.fixture(scope="module")
def micro_ctr():
    import dataclasses

    from content_vectors import clustered_content

    from embpress.data import SyntheticConfig, make_synthetic

    data = make_synthetic(SyntheticConfig(rows=2000, num_dense=2, num_fields=3, min_cardinality=20,
                                          max_cardinality=600, zipf=1.1, seed=5))
    big = max(range(len(data.fields)), key=lambda j: data.fields[j].num_embeddings)
    fields = tuple(dataclasses.replace(f, content=clustered_content(f.num_embeddings, seed=j)) if j == big else f
                   for j, f in enumerate(data.fields))  # the largest carries content (semantic-ID tables)
    return dataclasses.replace(data, fields=fields)


@pytest.mark.parametrize("method", COMPRESSED)
def test_trained_result_is_deterministic_and_within_budget(method, micro_ctr):
    """Two runs with one seed end in the same table (every stage, not only the initialisation),
    and after the last stage the serving state is exactly serving_bytes() and within the budget."""
    ratio = CONTRACT_RATIO.get(method, 4.0)
    a = _train_all_stages(method, micro_ctr, ratio)
    b = _train_all_stages(method, micro_ctr, ratio)
    ids = torch.from_numpy(micro_ctr.test.sparse[:256].astype("int64"))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    sa, sb = a.serving_state(), b.serving_state()
    assert sorted(sa) == sorted(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert a.serving_bytes() == state_nbytes(sa) <= a.max_bytes


INT8_RATIO = {"alpt": 6.0, "int8-qat": 3.8, "int16-qat": 1.9, "dhe": 3.0, "qr": 6.0}
"""``METHOD+int8`` at 8x (the inner method gets about 2x), less where the method reaches less: a QAT
table's int8/int16 codes are no float arrays, +int8 only quantizes its per-field scales; dhe's hash pairs and
per-network metadata (array shapes), and qr's per-array scales, offsets and shapes once it needs three or four
partitions, leave too little of these 9 KB tables' budgets at 8x."""
QUANTIZABLE = [m for m in COMPRESSED if m not in ("int8", "int16")]


@pytest.mark.parametrize("method", QUANTIZABLE)
def test_every_method_composes_with_int8(method, micro_ctr, tmp_path):
    """``METHOD+int8`` builds within its budget, trains through the inner stages and the quantize
    stage, stays within the budget, and its artifact serves exactly its eval lookups."""
    from embpress import serving

    spec = f"{method}+int8"
    ratio = INT8_RATIO.get(method, 8.0)
    fresh = build_table(spec, fields=micro_ctr.fields, dim=8, budget=Ratio(ratio), **_hparams(spec))
    assert fresh.serving_bytes() == state_nbytes(fresh.serving_state()) <= fresh.max_bytes
    t = _train_all_stages(spec, micro_ctr, ratio)
    state = t.serving_state()
    assert t.serving_bytes() == state_nbytes(state) <= t.max_bytes
    assert not any(np.issubdtype(v.dtype, np.floating) and v.size > 1 and k.endswith(".codes") for k, v in state.items())
    assert any(k.endswith(".codes") and v.dtype == np.uint8 for k, v in state.items())
    t.save_serving(tmp_path / "t.safetensors")
    served = serving.load(tmp_path / "t.safetensors")
    ids = torch.from_numpy(micro_ctr.test.sparse[:256].astype("int64"))
    with torch.no_grad():
        torch.testing.assert_close(served(ids), t(ids), rtol=0, atol=1e-6)
