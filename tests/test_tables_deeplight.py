"""DeepLight invariants: the sparsity schedule, monotone magnitude pruning to exactly the budget's
nonzeros, and the served CSR reproducing eval lookups after the stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.sparse_storage import csr_bytes, csr_decode
from embpress.train import TrainConfig, train


def _fields() -> list[Field]:
    return [Field("a", 20), Field("b", 400)]


def test_schedules():
    t = build_table("deeplight", fields=_fields(), dim=8, budget=Ratio(4))
    s = t.target_sparsity_
    assert s == pytest.approx(1 - t.nnz_ / (420 * 8))
    poly = [t.sparsity_at(i, 100) for i in range(101)]
    assert poly[0] == 0 and poly[-1] == pytest.approx(s) and np.all(np.diff(poly) >= 0)
    assert poly[50] == pytest.approx(s * (1 - 0.5**3))
    e = build_table("deeplight", fields=_fields(), dim=8, budget=Ratio(4), schedule="exponential")
    assert e.sparsity_at(100, 10) == pytest.approx(s * (1 - 0.99))  # the reference code's rate
    shapes = 8 * 4  # meta/shapes: the four CSR arrays' lengths
    assert csr_bytes(420, 8, t.nnz_) + shapes <= t.max_bytes < csr_bytes(420, 8, t.nnz_ + 1) + shapes
    with pytest.raises(BudgetError, match="deeplight: a CSR table of 420 rows needs 433 bytes"):
        build_table("deeplight", fields=_fields(), dim=8, budget=432)  # 420 lengths + 8 pointers + 5


def test_prune_is_by_magnitude_monotone_and_exact():
    torch.manual_seed(0)
    t = build_table("deeplight", fields=_fields(), dim=8, budget=Ratio(4))
    w = t.weight.weight.detach().clone()
    t.prune_to_(2000)
    assert int(t.mask.sum()) == 2000
    assert w.abs()[t.mask].min() >= w.abs()[~t.mask].max()
    assert torch.all(t.weight.weight[~t.mask] == 0)
    first = t.mask.clone()
    with torch.no_grad():
        t.weight.weight.add_(torch.randn_like(w))  # pruned entries would win now, but stay pruned
    t.prune_to_(2500)
    assert torch.equal(t.mask, first)
    t.prune_to_(10)
    assert int(t.mask.sum()) == t.nnz_  # never below the budget's nonzeros


def test_gradual_pruning_during_the_stage():
    torch.manual_seed(0)
    t = build_table("deeplight", fields=_fields(), dim=8, budget=Ratio(4), prune_every=5)
    counts = []
    t.train()
    for step in range(1, 21):
        t(torch.randint(0, 20, (64, 2))).sum().backward()
        t.prune_step_(step, 20)  # what the prune stage's on_step does after each optimiser step
        counts.append(int(t.mask.sum()))
    assert counts[3] == 420 * 8 and counts[4] < counts[3]  # first prune at step 5
    assert np.all(np.diff(counts) <= 0) and counts[-1] == t.nnz_


def test_stages_in_the_trainer_then_served_lookups_match():
    from embpress.data import SyntheticConfig, make_synthetic

    data = make_synthetic(SyntheticConfig(rows=2000, num_dense=1, num_fields=2, min_cardinality=20,
                                          max_cardinality=200, seed=3))
    torch.manual_seed(0)
    t = build_table("deeplight", fields=data.fields, dim=8, budget=Ratio(4))
    model = build_model("dlrm", table=t, num_dense=1, bottom=(8,), top=(8,))
    res = train(model, data, TrainConfig(epochs=1, batch_size=128, progress=False, max_steps_per_epoch=6))
    assert [s.name for s in res.stages] == ["warmup", "prune", "finetune"]
    assert bool(t.pruned) and int(t.mask.sum()) == t.nnz_
    n0, n1 = (f.num_embeddings for f in data.fields)
    ids = torch.stack([torch.arange(n0 - 10, n0), torch.arange(n1 - 10, n1)], 1)
    t.eval()
    with torch.no_grad():
        got = t(ids).numpy()
    rows = ids.numpy() + np.array([0, n0])
    want = csr_decode(t.serving_state(), rows.reshape(-1), 8).reshape(10, 2, 8)
    np.testing.assert_array_equal(got, want)
