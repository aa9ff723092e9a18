"""PEP invariants: the soft threshold, the prune to exactly the budget's nonzeros, the rewind to the
original initialization, and the served CSR reproducing eval lookups after the stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.pep import GRANULARITIES
from embpress.tables.sparse_storage import csr_bytes, csr_decode
from embpress.train import TrainConfig, train


def _fields() -> list[Field]:
    return [Field("a", 20), Field("b", 400)]


def test_nonzeros_fill_the_budget():
    t = build_table("pep", fields=_fields(), dim=8, budget=Ratio(4))
    n = 420
    shapes = 8 * 4  # meta/shapes: the four CSR arrays' lengths
    assert csr_bytes(n, 8, t.nnz_) + shapes <= t.max_bytes < csr_bytes(n, 8, t.nnz_ + 1) + shapes
    assert t.serving_bytes() == csr_bytes(n, 8, t.nnz_) + shapes
    with pytest.raises(BudgetError, match="one nonzero"):
        build_table("pep", fields=_fields(), dim=8, budget=400)


def test_soft_threshold():
    torch.manual_seed(0)
    t = build_table("pep", fields=_fields(), dim=4, budget=Ratio(2), granularity="global", threshold_init=0.0)
    with torch.no_grad():
        t.weight.weight[3] = torch.tensor([0.2, -0.7, 0.5, 1.5])
    out = t(torch.tensor([[3, 0]]))[0, 0]  # g(0) = 0.5
    assert torch.allclose(out, torch.tensor([0.0, -0.2, 0.0, 1.0]))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_granularities_learn_thresholds(granularity):
    torch.manual_seed(0)
    t = build_table("pep", fields=_fields(), dim=4, budget=Ratio(2), granularity=granularity, threshold_init=-6.0)
    t(torch.tensor([[1, 2], [3, 4]])).square().sum().backward()
    assert t.threshold.grad.abs().sum() > 0


def test_prune_keeps_the_widest_margins_and_rewind_restores_the_initialization():
    torch.manual_seed(0)
    t = build_table("pep", fields=_fields(), dim=8, budget=Ratio(4))
    init = t.weight.weight.detach().clone()
    with torch.no_grad():
        t.weight.weight.mul_(torch.rand_like(init) * 10)  # "training"
        t.threshold.uniform_(-6, -2)
    margins = t.margins()
    t.prune_()
    assert int(t.mask.sum()) == t.nnz_
    assert margins[t.mask].min() >= margins[~t.mask].max()
    rng = torch.get_rng_state()
    t.rewind_()
    assert torch.equal(t.weight.weight, init) and torch.equal(torch.get_rng_state(), rng)
    assert not t.threshold.requires_grad
    out = t(torch.tensor([[1, 5]]))
    assert torch.equal(out, (init[[1, 25]] * t.mask[[1, 25]]).unsqueeze(0))


def _data():
    from embpress.data import SyntheticConfig, make_synthetic

    return make_synthetic(SyntheticConfig(rows=2000, num_dense=1, num_fields=2, min_cardinality=20,
                                          max_cardinality=200, seed=3))


def test_stages_in_the_trainer_then_served_lookups_match():
    data = _data()
    torch.manual_seed(0)
    t = build_table("pep", fields=data.fields, dim=8, budget=Ratio(4), threshold_init=-4.0)
    model = build_model("dlrm", table=t, num_dense=1, bottom=(8,), top=(8,))
    head0 = {k: v.clone() for k, v in model.head_state().items()}
    res = train(model, data, TrainConfig(epochs=1, batch_size=128, progress=False, max_steps_per_epoch=6))
    assert [s.name for s in res.stages] == ["search", "retrain"]
    assert bool(t.pruned) and int(t.mask.sum()) <= t.nnz_
    assert not any(torch.equal(v, head0[k]) for k, v in model.head_state().items() if v.is_floating_point())
    n0, n1 = (f.num_embeddings for f in data.fields)
    ids = torch.stack([torch.arange(n0 - 10, n0), torch.arange(n1 - 10, n1)], 1)
    t.eval()
    with torch.no_grad():
        got = t(ids).numpy()
    state = t.serving_state()
    rows = ids.numpy() + np.array([0, n0])
    want = csr_decode(state, rows.reshape(-1), 8).reshape(10, 2, 8)
    np.testing.assert_array_equal(got, want)


def _search_only(t, data, **cfg):
    """Run PEP's search stage alone (the prune at its end included) and return the history."""
    from embpress.tables.pep import PEPTable

    t.stages = lambda: PEPTable.stages(t)[:1]
    model = build_model("dlrm", table=t, num_dense=1, bottom=(8,), top=(8,))
    return train(model, data, TrainConfig(**{"epochs": 1, "batch_size": 128, "progress": False, **cfg}))


def test_thresholds_learn_and_the_prune_is_not_magnitude_top_k():
    """The search lifts the thresholds (Adam with weight decay, then the task gradient), stops at the
    target sparsity, and keeps a set that magnitude top-k of the same table trained as long without
    thresholds (``magprune``) does not: entries die under the soft threshold along the way."""
    from embpress.tables import Stage
    from embpress.tables.sparse_storage import keep_top

    data = _data()
    torch.manual_seed(0)
    t = build_table("pep", fields=data.fields, dim=8, budget=Ratio(4), threshold_init=-6.0, threshold_lr=0.05,
                    search_epochs=10)
    res = _search_only(t, data, evals_per_epoch=1)
    assert res.history[-1].get("stopped") and res.stages[0].epochs < 10  # the target ended it, not the cap
    steps = res.history[-1]["step"]
    s = t.threshold.detach()
    assert s.min() > -6.0 + 1.0 and s.std() > 0  # moved, by different amounts
    kept = int(t.mask.sum())
    assert 0 < kept <= t.nnz_ and t.nonzeros() <= t.nnz_

    torch.manual_seed(0)  # the same initial table, trained as many steps without thresholds
    m = build_table("magprune", fields=data.fields, dim=8, budget=Ratio(4))
    m.stages = lambda: [Stage("train", epochs=1, early_stopping=False)]
    model = build_model("dlrm", table=m, num_dense=1, bottom=(8,), top=(8,))
    train(model, data, TrainConfig(epochs=1, batch_size=128, progress=False, max_steps_per_epoch=steps))
    top_k = keep_top(m.weight.weight.detach().abs(), kept)
    overlap = float((top_k & t.mask).sum()) / kept
    assert overlap < 0.9, overlap


def test_magprune_keeps_the_largest_magnitudes_then_rewinds():
    torch.manual_seed(0)
    t = build_table("magprune", fields=_fields(), dim=8, budget=Ratio(4))
    init = t.weight.weight.detach().clone()
    with torch.no_grad():
        t.weight.weight.mul_(torch.rand_like(init) * 10)
    w = t.weight.weight.detach().abs().clone()
    t.prune_()
    assert int(t.mask.sum()) == t.nnz_ and w[t.mask].min() >= w[~t.mask].max()
    t.rewind_()
    assert torch.equal(t.weight.weight, init)
    out = t(torch.tensor([[1, 5]]))
    assert torch.equal(out, (init[[1, 25]] * t.mask[[1, 25]]).unsqueeze(0))
