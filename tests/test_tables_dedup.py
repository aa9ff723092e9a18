"""Dedup invariants: budget arithmetic, exact merge count, duplicates first, serving from blocks + remap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio
from embpress.tables.base import FP32_BYTES, state_nbytes
from embpress.tables.dedup import REMAP_BYTES, DedupTable, merge_blocks


def _table(fields, dim=8, budget=Ratio(4), seed=0, **hp):
    torch.manual_seed(seed)
    return DedupTable(fields=fields, dim=dim, budget=budget, **hp)


def _all_ids(fields):
    n = max(f.num_embeddings for f in fields)
    return torch.stack([torch.arange(n) % f.num_embeddings for f in fields], 1)


def _reconstruct(state, fields, ids, block_rows):
    """Lookups from the serving state alone: row ``remap[g // R] * R + g % R`` of the unique blocks."""
    offsets = np.cumsum([0] + [f.num_embeddings for f in fields])[:-1]
    g = ids.numpy() + offsets
    return state["blocks"][state["remap"][g // block_rows].astype(np.int64) * block_rows + g % block_rows]


@pytest.mark.parametrize("block_rows", [None, 1, 3, 16])
@pytest.mark.parametrize("ratio", [1.5, 4.0])
def test_bytes_arithmetic(small_fields, block_rows, ratio):
    t = _table(small_fields, budget=Ratio(ratio), block_rows=block_rows)
    r, b, m = t.block_rows_, t.num_blocks, t.unique_blocks
    assert b == -(-5307 // r)
    block = r * 8 * FP32_BYTES
    meta = 8 + 8 * 3  # block_rows, the serving spec's one number; the shapes of blocks [M * R, D] and remap [B]
    assert t.serving_bytes() == m * block + b * REMAP_BYTES + meta <= t.max_bytes
    assert m == b or (m + 1) * block + b * REMAP_BYTES + meta > t.max_bytes  # the most unique blocks that fit
    assert t.serving_bytes() == state_nbytes(t.serving_state())  # before deduplication: what it would export
    t.deduplicate_()
    state = t.serving_state()
    assert t.deduplicated and state["blocks"].shape == (m * r, 8) and state["remap"].dtype == np.int32
    assert t.serving_bytes() == state_nbytes(state)
    assert len(np.unique(state["remap"])) == m  # exactly M unique blocks, all used


def test_auto_block_rows_keeps_remap_within_a_quarter(small_fields):
    for ratio in (2, 4, 8, 16):
        t = _table(small_fields, budget=Ratio(ratio))
        assert t.num_blocks * REMAP_BYTES * 4 <= t.array_budget  # the budget less 32 bytes of metadata
        if t.block_rows_ > 1:  # and it is the smallest power of two that does so
            assert -(-5307 // (t.block_rows_ // 2)) * REMAP_BYTES * 4 > t.array_budget


def test_remap_alone_over_budget_raises(small_fields):
    # One int32 per row is 5307 * 4 bytes: more than a 1/8 budget at dim 8.
    with pytest.raises(BudgetError, match="remap of 5,307 blocks"):
        _table(small_fields, budget=Ratio(8), block_rows=1)
    with pytest.raises(BudgetError):
        _table(small_fields, budget=100)


@pytest.mark.parametrize("block_rows", [1, 3])
def test_serving_state_reconstructs_forward(small_fields, block_rows):
    t = _table(small_fields, block_rows=block_rows)
    ids = _all_ids(small_fields)
    planned = t.serving_state()
    t.deduplicate_()
    state = t.serving_state()
    for k in state:  # what the table promised to export is what it became
        np.testing.assert_array_equal(planned[k], state[k])
    t.eval()
    with torch.no_grad():
        out = t(ids).numpy()
    np.testing.assert_array_equal(out, _reconstruct(state, small_fields, ids, t.block_rows_))


def _with_duplicates(fields, dim=8, seed=0, **hp):
    """A table whose odd rows copy the even row before them (half of all rows are duplicates)."""
    t = _table(fields, dim=dim, seed=seed, **hp)
    with torch.no_grad():
        w = t.weight.weight
        w[1::2] = w[0::2][: w[1::2].shape[0]]
    return t


@pytest.mark.parametrize("ratio", [1.2, 1.5, 1.7])
def test_identical_rows_merge_first_and_losslessly(ratio):
    """While the budget needs no more merges than there are duplicates, dedup changes no lookup."""
    fields = [Field("a", 2000), Field("b", 600)]
    t = _with_duplicates(fields, dim=16, budget=Ratio(ratio), block_rows=1)
    assert t.num_blocks - t.unique_blocks <= 1300
    ids = _all_ids(fields)
    with torch.no_grad():
        before = t(ids)
        t.deduplicate_()
        after = t(ids)
    assert torch.equal(before, after) and t.threshold_ == 0.0


@pytest.mark.parametrize("ratio", [2.5, 4.0, 8.0])
def test_identical_rows_share_a_block_at_higher_ratios(ratio):
    fields = [Field("a", 2000), Field("b", 600)]
    t = _with_duplicates(fields, dim=16, budget=Ratio(ratio), block_rows=1)
    t.deduplicate_()
    remap = t.remap.numpy()
    assert (remap[0::2] == remap[1::2]).all()
    assert t.threshold_ > 0


def test_kept_blocks_keep_their_values(small_fields):
    """A group is served by its most frequent block, stored as it was trained."""
    t = _table(small_fields, block_rows=1)
    ids = _all_ids(small_fields)
    offsets = np.cumsum([0] + [f.num_embeddings for f in small_fields])[:-1]
    g = ids.numpy() + offsets
    with torch.no_grad():
        before = t(ids)
        remap, kept, _ = t.plan()
        t.deduplicate_()
        after = t(ids)
    own = np.isin(g, kept)
    assert own.any() and torch.equal(before[torch.from_numpy(own)], after[torch.from_numpy(own)])
    counts = np.concatenate([f.frequencies() for f in small_fields])
    assert int(np.argmax(counts)) in kept


def test_merge_blocks_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    prio = rng.random(500)
    for target in (500, 400, 100, 7, 1):
        remap, kept, thr = merge_blocks(x, target, prio, seed=1)
        assert len(kept) == target and sorted(set(remap.tolist())) == list(range(target))
        assert (remap[kept] == np.arange(target)).all()  # a kept block serves itself
        for u in range(target):  # ... and has the highest priority in its group
            assert prio[kept[u]] == prio[remap == u].max()
    # Determinism, and a padded last block never serves a full one.
    a = merge_blocks(x, 50, prio, seed=3)
    b = merge_blocks(x, 50, prio, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(a[:2], b[:2], strict=True))
    prio[-1] = -1.0
    remap, kept, _ = merge_blocks(x, 50, prio, valid_last=3)
    assert 499 not in kept or (remap == remap[499]).sum() == 1
    with pytest.raises(ValueError, match="target"):
        merge_blocks(x, 0, prio)


def test_stages_and_finetune(small_fields):
    t = _table(small_fields)
    assert [s.name for s in t.stages()] == ["train", "dedup", "finetune"]
    assert t.stages()[1].epochs == 0
    assert [s.name for s in _table(small_fields, finetune_epochs=0).stages()] == ["train", "dedup"]
    # The dedup hook swaps the trained rows for the unique blocks, which the finetune stage trains.
    t.stages()[1].before(type("Ctx", (), {"log": staticmethod(lambda m: None)})())
    assert t.deduplicated and t.sparse_parameters() == [t.weight.weight]
    assert t.weight.weight.shape == (t.unique_blocks * t.block_rows_, 8)
    t(torch.tensor([[1, 2, 3]])).sum().backward()
    assert t.weight.weight.grad is not None


def test_deduplicated_state_loads_into_fresh_table(small_fields):
    t = _table(small_fields, block_rows=2)
    t.deduplicate_()
    fresh = _table(small_fields, block_rows=2, seed=5)
    fresh.load_state_dict(t.state_dict())
    ids = _all_ids(small_fields)
    with torch.no_grad():
        assert torch.equal(fresh(ids), t(ids))
    assert fresh.deduplicated
