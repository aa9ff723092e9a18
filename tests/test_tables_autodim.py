"""AutoDim invariants: the budgeted choice, what is served before and after the search, the stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.data import SyntheticConfig, make_synthetic
from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio
from embpress.tables.autodim import AutoDimTable, default_candidates
from embpress.tables.base import state_nbytes
from embpress.train import TrainConfig, train


def _fields() -> list[Field]:
    return [Field("small", 7), Field("mid", 300), Field("large", 5000)]


def _table(ratio: float = 4, **kw) -> AutoDimTable:
    torch.manual_seed(0)
    return AutoDimTable(fields=_fields(), dim=8, budget=Ratio(ratio), **kw)


def _field_bytes(n: int, d: int, dim: int = 8) -> int:
    return 4 * (n * d + d * dim + dim) + 8 * 5  # rows, map and bias; their five shape words


def test_default_candidates():
    assert default_candidates(8) == [1, 2, 4, 8]
    assert default_candidates(1) == [1]
    assert AutoDimTable(fields=_fields(), dim=8, candidates=[8, 2, 2]).candidates_ == [2, 8]
    with pytest.raises(ValueError, match="candidates"):
        AutoDimTable(fields=_fields(), dim=8, candidates=[0, 4])


def test_argmax_when_it_fits_and_greedy_step_down():
    t = _table(ratio=1)
    with torch.no_grad():
        t.alpha.copy_(torch.tensor([[0, 0, 0, 5.0], [0, 0, 5.0, 0], [0, 5.0, 0, 0]]))
    assert t.plan_dims() == [8, 4, 2]  # argmax fits a 1x budget
    # Two equal fields: the one whose weights are flat loses less weight per byte and steps down first.
    fields = [Field("peaked", 1000), Field("flat", 1000)]
    u = AutoDimTable(fields=fields, dim=8, budget=_field_bytes(1000, 8) + _field_bytes(1000, 4))
    with torch.no_grad():
        u.alpha.copy_(torch.tensor([[0, 0, 0, 6.0], [0, 0, 0.1, 0.2]]))
    assert u.plan_dims() == [8, 4]
    assert u.serving_bytes() == _field_bytes(1000, 8) + _field_bytes(1000, 4)


@pytest.mark.parametrize("ratio", [1.5, 2, 4, 6])
def test_choice_always_fits_and_bytes_match_state(ratio):
    t = _table(ratio)
    g = torch.Generator().manual_seed(int(ratio * 10))
    with torch.no_grad():
        t.alpha.copy_(torch.randn(t.alpha.shape, generator=g) * 3)
    dims = t.plan_dims()
    argmax = [t.candidates_[i] for i in t.alpha.argmax(1).tolist()]
    assert all(d <= a for d, a in zip(dims, argmax, strict=True))
    assert t.serving_bytes() == sum(_field_bytes(f.num_embeddings, d) for f, d in zip(t.fields, dims, strict=True))
    assert t.serving_bytes() <= t.full_bytes / ratio
    state = t.serving_state()
    assert state_nbytes(state) == t.serving_bytes()
    for f, d in zip(t.fields, dims, strict=True):
        assert state[f"{f.name}.weight"].shape == (f.num_embeddings, d)
        assert state[f"{f.name}.proj"].shape == (d, 8) and state[f"{f.name}.bias"].shape == (8,)
    t.finalize_()
    assert t.final_dims.tolist() == dims and t.serving_bytes() == state_nbytes(t.serving_state())


def test_budget_error():
    with pytest.raises(BudgetError, match=r"autodim: every field at the smallest candidate dim 2 .* needs"):
        AutoDimTable(fields=_fields(), dim=8, budget=Ratio(4), candidates=[2, 4, 8])


def test_supernet_mixes_candidates_and_arch_gets_gradients():
    t = _table()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [0, 299, 4999]])
    t(ids).square().sum().backward()
    assert t.alpha.grad is not None and t.alpha.grad.abs().sum() > 0
    assert t.arch_parameters() == [t.alpha]
    # Gumbel noise comes from the table's own seeded generator; eval mode has no noise.
    a, b = _table(seed=5), _table(seed=5)
    assert torch.equal(a(ids), b(ids))
    a.eval()
    assert torch.equal(a(ids), a(ids))
    assert a.temperature() < 1.0  # one training forward so far


def test_finalized_lookup_equals_numpy_and_reloads():
    t = _table()
    with torch.no_grad():
        t.alpha.copy_(torch.tensor([[0, 0, 0, 5.0], [0, 0, 5.0, 0], [5.0, 0, 0, 0]]))
    t.finalize_()
    assert t.supernet is None and t.arch_parameters() == [] and not t.alpha.requires_grad
    assert [e.weight.shape[1] for e in t.final_emb] == t.final_dims.tolist()
    with torch.no_grad():
        for p in t.parameters():
            if p.requires_grad:
                p.normal_()
    t.eval()
    ids = torch.tensor([[1, 2, 3], [6, 299, 4999], [0, 0, 0]])
    with torch.no_grad():
        got = t(ids).numpy()
    state = t.serving_state()
    for j, f in enumerate(t.fields):
        want = state[f"{f.name}.weight"][ids[:, j].numpy()] @ state[f"{f.name}.proj"] + state[f"{f.name}.bias"]
        np.testing.assert_allclose(got[:, j], want, rtol=1e-5, atol=1e-6)
    fresh = _table()
    fresh.load_state_dict(t.state_dict())
    fresh.eval()
    assert fresh.finalized and torch.equal(fresh(ids), t(ids))


def test_stages_search_then_retrain():
    data = make_synthetic(SyntheticConfig(rows=3000, num_dense=2, num_fields=3, min_cardinality=10,
                                          max_cardinality=300, seed=3))
    torch.manual_seed(0)
    table = AutoDimTable(fields=data.fields, dim=8, budget=Ratio(3), search_epochs=1, retrain_epochs=1)
    stages = table.stages()
    assert [(s.name, s.bilevel, s.reset_head) for s in stages] == [("search", True, False), ("retrain", False, True)]
    model = build_model("dlrm", table=table, num_dense=2, bottom=(8,), top=(8,))
    alpha0 = table.alpha.detach().clone()
    res = train(model, data, TrainConfig(epochs=1, batch_size=256, progress=False))
    assert [s.name for s in res.stages] == ["search", "retrain"] and all(s.seconds > 0 for s in res.stages)
    assert not torch.equal(table.alpha.detach(), alpha0)  # updated on validation batches
    assert table.finalized and table.serving_bytes() <= table.full_bytes / 3


def test_supernet_candidates_are_independent_projections():
    """The fused block-diagonal supernet equals, per candidate, BN(E_c[id] W_{f,c} + b_{f,c})."""
    t = _table()
    with torch.no_grad():
        t.supernet.bias.normal_()
    ids = torch.tensor([[1, 2, 3], [6, 299, 4999]])
    g = t.global_ids(ids)
    with torch.no_grad():
        y = t.supernet(g, bn_training=False)  # running stats: mean 0, var 1
        for i, (a, b) in enumerate(t.supernet.slices):
            assert b - a == t.candidates_[i]
            for j in range(3):
                want = t.supernet.emb.weight[g[:, j], a:b] @ t.supernet.weight[j, a:b] + t.supernet.bias[j, i]
                torch.testing.assert_close(y[:, j, i], want / (1 + 1e-5) ** 0.5)
        t.eval()
        w = torch.softmax(t.alpha / t.temperature(), dim=1)
        torch.testing.assert_close(t(ids), torch.einsum("nfcd,fc->nfd", y, w))
