"""DNIS invariants: frequency blocks, budgeted selection, folding, lookups from the state alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.data import SyntheticConfig, make_synthetic
from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio
from embpress.tables.base import state_nbytes
from embpress.tables.dnis import DNISTable, equal_blocks, select_entries
from embpress.train import TrainConfig, train


def _fields() -> list[Field]:
    return [Field("small", 7), Field("mid", 300), Field("large", 5000)]


def _table(ratio: float = 4, **kw) -> DNISTable:
    torch.manual_seed(0)
    return DNISTable(fields=_fields(), dim=8, budget=Ratio(ratio), **kw)


def _random_alpha(t: DNISTable, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t.alpha.copy_(torch.rand(t.alpha.shape, generator=g))


def _numpy_lookup(state: dict[str, np.ndarray], dim: int, g: np.ndarray) -> np.ndarray:
    """Global ids -> vectors from ``values``, ``kept`` and ``block_end`` alone."""
    end = state["block_end"].astype(np.int64)
    keep = np.unpackbits(state["kept"])[: len(end) * dim].reshape(len(end), dim).astype(bool)
    start = np.concatenate([[0], end[:-1]])
    k = keep.sum(1)
    offset = np.concatenate([[0], np.cumsum((end - start) * k)[:-1]])
    out = np.zeros((len(g), dim), dtype=np.float32)
    for r, i in enumerate(g):
        b = int(np.searchsorted(end, i, side="right"))
        o = offset[b] + (i - start[b]) * k[b]
        out[r, keep[b]] = state["values"][o:o + k[b]]
    return out


def test_equal_blocks_and_selection():
    assert equal_blocks(300, 4).tolist() == [0, 75, 150, 225, 300]
    assert equal_blocks(3, 4).tolist() == [0, 1, 2, 3]
    a = np.array([[0.9, 0.2, 0.7], [0.8, 0.1, 0.3]])
    rows = np.array([10, 1])
    keep = select_entries(a, rows, capacity=4 * 10 + 4 * 1 + 4 * 1)
    # 0.9 (40 B) fits, 0.8 (4 B), 0.7 (40 B) no longer fits, 0.3 (4 B) fits, then nothing is left.
    assert keep.tolist() == [[True, False, False], [True, False, True]]
    assert (select_entries(a, rows, capacity=10**6)).all()


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_budget_arithmetic_before_and_after_pruning(ratio):
    t = _table(ratio)
    _random_alpha(t, ratio)
    keep = t.plan()
    rows = np.array([2, 2, 1, 2, 75, 75, 75, 75, 1250, 1250, 1250, 1250])
    assert t.num_blocks == 12 and t._rows.tolist() == rows.tolist()
    want = 4 * int((rows * keep.sum(1)).sum()) + (12 * 8 + 7) // 8 + 4 * 12 + 8 * 3  # + three arrays' shapes
    assert t.serving_bytes() == want == state_nbytes(t.serving_state())
    assert t.serving_bytes() <= t.full_bytes / ratio
    # Greedy by salience: no dropped entry fits the leftover bytes, and within a block (entries of one
    # cost) every kept salience is at least every dropped one; each field keeps its frequent block.
    a = t.salience().numpy()
    assert keep[[0, 4, 8]].any(axis=1).all()
    leftover = t.max_bytes - t.serving_bytes()
    assert (4 * np.broadcast_to(rows[:, None], keep.shape)[~keep] > leftover).all()
    for b in range(12):
        if keep[b].any() and (~keep[b]).any():
            assert a[b][keep[b]].min() >= a[b][~keep[b]].max()
    t.prune_()
    assert (t.plan() == keep).all() and t.serving_bytes() == want == state_nbytes(t.serving_state())


def test_prune_folds_weights_and_freezes_alpha():
    t = _table()
    _random_alpha(t)
    t.eval()
    ids = torch.tensor([[0, 0, 0], [6, 299, 4999], [3, 100, 2000]])
    with torch.no_grad():
        before = t(ids)
    keep = torch.from_numpy(t.plan())
    blocks = t.block_of(t.global_ids(ids))
    t.prune_()
    with torch.no_grad():
        after = t(ids)
    torch.testing.assert_close(after, before * keep[blocks])
    assert not t.alpha.requires_grad and t.arch_parameters() == [] and t.regularizer() is None
    assert torch.equal(t.alpha, keep.float())
    # fine-tuning: masked columns get no gradient
    t.train()
    t(ids).sum().backward()
    grad = t.weight.weight.grad.coalesce().to_dense()
    g = t.global_ids(ids).reshape(-1)
    assert (grad[g][~keep[t.block_of(g)]] == 0).all()


def test_lookup_equals_numpy_from_state():
    t = _table()
    _random_alpha(t, 3)
    with torch.no_grad():
        t.weight.weight.normal_()
    ids = torch.stack([torch.arange(300) % 7, torch.arange(300), torch.arange(0, 5000, 5000 // 300)[:300]], 1)
    for pruned in (False, True):
        if pruned:
            t.prune_()
        t.eval()
        with torch.no_grad():
            got = t(ids)
            kept = got * torch.from_numpy(t.plan())[t.block_of(t.global_ids(ids))]  # served columns only
        want = _numpy_lookup(t.serving_state(), 8, t.global_ids(ids).reshape(-1).numpy())
        np.testing.assert_allclose(kept.reshape(-1, 8).numpy(), want, rtol=1e-6, atol=1e-7)


def test_search_clips_alpha_and_penalizes_it():
    t = _table(l1=1e-3)
    with torch.no_grad():
        t.alpha.fill_(1.5)
        t.alpha[0, 0] = -0.2
    search = t.stages()[0]
    search.on_step(None)  # what the trainer calls after each step of the search stage
    assert t.alpha.min() == 0 and t.alpha.max() == 1
    assert t.regularizer().item() == pytest.approx(1e-3 * float(t.alpha.detach().abs().sum()))
    assert t.arch_parameters() == [t.alpha]


def test_budget_error():
    with pytest.raises(BudgetError, match=r"dnis: the keep mask and bounds of 12 blocks .* needs [\d,]+ bytes"):
        DNISTable(fields=_fields(), dim=8, budget=200)


def test_stages_search_then_finetune():
    data = make_synthetic(SyntheticConfig(rows=3000, num_dense=2, num_fields=3, min_cardinality=10,
                                          max_cardinality=300, seed=3))
    torch.manual_seed(0)
    table = DNISTable(fields=data.fields, dim=8, budget=Ratio(3), search_epochs=1, finetune_epochs=1)
    assert [(s.name, s.bilevel) for s in table.stages()] == [("search", True), ("finetune", False)]
    model = build_model("dlrm", table=table, num_dense=2, bottom=(8,), top=(8,))
    res = train(model, data, TrainConfig(epochs=1, batch_size=256, progress=False))
    assert [s.name for s in res.stages] == ["search", "finetune"]
    assert bool(table.pruned) and table.serving_bytes() <= table.full_bytes / 3
    fresh = DNISTable(fields=data.fields, dim=8, budget=Ratio(3))
    fresh.load_state_dict(table.state_dict())
    assert bool(fresh.pruned) and not fresh.alpha.requires_grad
    assert fresh.serving_bytes() == table.serving_bytes()
