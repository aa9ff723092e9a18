"""AutoSrh invariants: the study's form (``autosrh``: alpha searched on validation batches with the
head fixed, then ``w * alpha`` pruned unstructured to CSR after the retrain) and the column-pruning
variant (``autosrh-cols``: frequency blocks, the budgeted greedy column selection, lookups
reproduced from the block-column export alone)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.autosrh import frequency_blocks
from embpress.tables.base import state_nbytes
from embpress.tables.sparse_storage import block_columns_decode


def _fields() -> list[Field]:
    c = (1e4 / np.arange(1, 601) ** 1.2).astype(np.int64) + 1
    return [Field("a", 30, c[:30] * 3), Field("b", 600, c)]


def test_frequency_blocks_are_equal_sized_ranges_with_ties_together():
    fields = _fields()
    b = frequency_blocks(fields, 6)
    assert b.shape == (2, 7) and np.all(np.diff(b, axis=1) >= 0) and b[0, -1] == 30 and b[1, -1] == 600
    sizes = (b[:, 1:] - b[:, :-1]).sum(0)
    counts = np.concatenate([f.counts for f in fields])
    assert sizes.sum() == 630 and sizes[:3].max() <= 105 + np.bincount(counts).max()
    for f, row in zip(fields, b, strict=True):  # ids of equal count never straddle a bound
        for x in row[1:-1]:
            if 0 < x < f.num_embeddings:
                assert f.counts[x - 1] != f.counts[x]
    with pytest.raises(ValueError, match="descending training frequency"):
        frequency_blocks([Field("z", 3, np.array([1, 5, 2]))], 2)


def test_selection_fits_the_budget_and_follows_salience():
    torch.manual_seed(0)
    t = build_table("autosrh-cols", fields=_fields(), dim=8, budget=Ratio(4))
    assert t.serving_bytes() <= t.max_bytes and t.serving_bytes() == state_nbytes(t.serving_state())
    sal = torch.rand(6, 8)
    sal[5, 3] = 10.0  # the rarest block's dim 3 is most salient
    kept = t._select(sal).numpy()
    assert kept[5, 3]
    cost = lambda k: t._bytes(k) + 8 * (4 + 2 * 6)  # noqa: E731  (the arrays and their shape words)
    assert cost(kept) <= t.max_bytes
    for b, d in zip(*np.nonzero(~kept), strict=True):  # nothing left out would still fit
        more = kept.copy()
        more[b, d] = True
        assert cost(more) > t.max_bytes
    with pytest.raises(BudgetError, match="block layout"):
        build_table("autosrh-cols", fields=_fields(), dim=8, budget=40)


def test_prune_freezes_alpha_and_masks_columns():
    torch.manual_seed(0)
    t = build_table("autosrh-cols", fields=_fields(), dim=8, budget=Ratio(4))
    t.phase.fill_(1)
    assert t.regularizer() is not None and t.arch_parameters() == [t.alpha]
    with torch.no_grad():
        t.weight.weight[t._block == 0] = 1.0  # the most frequent block carries large values...
        t.alpha[0, :4] = 0.0  # ... but its alpha drops dims 0..3
    t.prune_()
    assert not t.kept[0, :4].any() and t.kept[0, 4:].all()
    assert not t.alpha.requires_grad and t.regularizer() is None
    out = t(torch.tensor([[0, 0]]))
    assert torch.all(out[0, :, :4] == 0)


def test_stages_in_the_trainer_then_served_lookups_match():
    from embpress.data import SyntheticConfig, make_synthetic
    from embpress.train import TrainConfig, train

    data = make_synthetic(SyntheticConfig(rows=2000, num_dense=1, num_fields=2, min_cardinality=20,
                                          max_cardinality=200, seed=3))
    torch.manual_seed(0)
    t = build_table("autosrh-cols", fields=data.fields, dim=8, budget=Ratio(4), nsplit=4)
    model = build_model("dlrm", table=t, num_dense=1, bottom=(8,), top=(8,))
    res = train(model, data, TrainConfig(epochs=1, batch_size=128, progress=False, max_steps_per_epoch=6))
    assert [s.name for s in res.stages] == ["warmup", "search", "retrain"]
    assert int(t.phase) == 2 and not torch.all(t.alpha == 1)  # alpha moved on validation batches
    assert t.alpha.min() >= 0 and t.alpha.max() <= 1
    t.eval()
    state = t.serving_state()
    assert state_nbytes(state) == t.serving_bytes() <= t.max_bytes
    for f in range(2):
        ids = torch.arange(data.fields[f].num_embeddings)
        full = torch.zeros(len(ids), 2, dtype=torch.long)
        full[:, f] = ids
        with torch.no_grad():
            got = t(full)[:, f].numpy()
        np.testing.assert_allclose(got, block_columns_decode(state, f, ids.numpy(), 8), rtol=1e-6)


def test_budget_without_a_column_for_the_most_frequent_block_is_unreachable():
    # 90 ids tied at count 5 form block 0; the 10 rare ids form block 1. A budget that holds a column
    # of the small rare block but not of the frequent one would serve zeros for 90% of the ids.
    fields = [Field("a", 100, np.array([5] * 90 + [1] * 10))]
    probe = build_table("autosrh-cols", fields=fields, dim=8, budget=None, nsplit=2)
    assert probe.block_rows_.tolist() == [90, 10]
    rare_only = np.zeros((2, 8), dtype=bool)
    rare_only[1, 0] = True
    frequent = np.zeros((2, 8), dtype=bool)
    frequent[0, 0] = True
    shapes = 8 * (4 + 2 * 2)  # meta/shapes: bounds [F, 3], col_ptr, cols, values/0 and values/1 [rows, k]
    budget = probe._bytes(rare_only) + shapes
    assert budget < probe._bytes(frequent) + shapes
    with pytest.raises(BudgetError, match="most frequent block"):
        build_table("autosrh-cols", fields=fields, dim=8, budget=budget, nsplit=2)
    ok = build_table("autosrh-cols", fields=fields, dim=8, budget=probe._bytes(frequent) + shapes, nsplit=2)
    assert ok.serving_bytes() <= ok.max_bytes


# ----------------------------------------------------------------------------- autosrh: the study's form


def _tiny_data():
    from embpress.data import SyntheticConfig, make_synthetic

    return make_synthetic(SyntheticConfig(rows=2000, num_dense=1, num_fields=2, min_cardinality=20,
                                          max_cardinality=200, seed=3))


def test_alpha_moves_in_the_search_with_the_head_fixed_then_csr_at_the_target_nnz(tmp_path):
    from embpress import serving
    from embpress.tables.sparse_storage import csr_bytes, csr_decode
    from embpress.train import TrainConfig, train

    data = _tiny_data()
    torch.manual_seed(0)
    t = build_table("autosrh", fields=data.fields, dim=8, budget=Ratio(4), nsplit=4, alpha_lr=0.05)
    model = build_model("dlrm", table=t, num_dense=1, bottom=(8,), top=(8,))
    head = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("table.")}
    seen = {}

    def snapshot(ctx):
        seen["head"] = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("table.")}
        seen["weight"] = t.weight.weight.detach().clone()

    stages = t.stages()
    assert [s.name for s in stages] == ["warmup", "search", "retrain"] and not stages[1].train_head
    search = stages[1]
    t.stages = lambda: [stages[0], dataclasses.replace(search, before=lambda c: (snapshot(c), search.before(c))),
                        stages[2]]
    res = train(model, data, TrainConfig(epochs=1, batch_size=128, progress=False, max_steps_per_epoch=6,
                                         evals_per_epoch=1))
    assert [s.name for s in res.stages] == ["warmup", "search", "retrain"]
    assert int(t.phase) == 3 and not t.alpha.requires_grad
    assert not torch.all(t.alpha == 1) and t.alpha.min() >= 0 and t.alpha.max() <= 1  # alpha moved, clipped
    assert any(not torch.equal(head[k], v) for k, v in seen["head"].items())  # the warmup trained the head
    # the final state is CSR with exactly the target number of nonzeros: the largest |w * alpha|
    assert int(t.mask.sum()) == t.nnz_
    scaled = t.scaled_weight().detach()
    kept = scaled.abs()[t.mask]
    assert float(kept.min()) >= float(scaled.abs()[~t.mask].max())
    state = t.serving_state()
    assert state["values"].size == t.nnz_ and state["indices"].dtype == np.uint8
    assert t.serving_bytes() == state_nbytes(state) == csr_bytes(t.total_ids, 8, t.nnz_) + 8 * 4 <= t.max_bytes
    t.eval()
    ids = torch.tensor([[0, 0], [5, 19], [19, 3]])
    rows = (ids + t._offsets).reshape(-1).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(t(ids).reshape(-1, 8).numpy(), csr_decode(state, rows, 8), rtol=1e-6)
    t.save_serving(tmp_path / "a.safetensors")
    torch.testing.assert_close(serving.load(tmp_path / "a.safetensors")(ids), t(ids))


def test_search_stage_trains_only_the_table_and_steps_alpha_by_normalised_sgd():
    """In the search the head is fixed (train_head=False); alpha's step is SGD on its block-normalised
    gradient, so every block's row moves by alpha_lr times a unit-mean step."""
    from embpress.tables.autosrh import normalize_alpha_grad
    from embpress.train import TrainConfig, train

    data = _tiny_data()
    torch.manual_seed(0)
    t = build_table("autosrh", fields=data.fields, dim=8, budget=Ratio(4), nsplit=2, warmup_epochs=0,
                    retrain_epochs=0, l1=0.0)
    model = build_model("dlrm", table=t, num_dense=1, bottom=(8,), top=(8,))
    head = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("table.")}
    w0 = t.weight.weight.detach().clone()
    with torch.no_grad():
        t.alpha.fill_(0.5)  # away from the clip at 0 and 1
    train(model, data, TrainConfig(epochs=1, batch_size=128, progress=False, max_steps_per_epoch=1,
                                   evals_per_epoch=1))
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("table.")}
    assert all(torch.equal(head[k], after[k]) for k in head)  # head fixed during the search
    assert not torch.equal(w0, t.weight.weight)               # embeddings trained
    step = (0.5 - t.alpha).abs()                              # one SGD step from alpha = 0.5
    moved = step.sum(1) > 0
    assert moved.any()
    torch.testing.assert_close(step[moved].mean(1), torch.full((int(moved.sum()),), t.alpha_lr), rtol=0.02,
                               atol=1e-6)
    g = torch.tensor([[1.0, -3.0], [0.0, 0.0]])
    torch.testing.assert_close(normalize_alpha_grad(g), torch.tensor([[0.5, -1.5], [0.0, 0.0]]))


def test_autosrh_bad_hparams():
    with pytest.raises(ValueError, match="alpha_lr"):
        build_table("autosrh", fields=_fields(), dim=8, budget=Ratio(4), alpha_lr=0)
    with pytest.raises(ValueError, match="nsplit"):
        build_table("autosrh", fields=_fields(), dim=8, budget=Ratio(4), nsplit=0)
    with pytest.raises(BudgetError, match="CSR"):
        build_table("autosrh", fields=_fields(), dim=8, budget=40)
