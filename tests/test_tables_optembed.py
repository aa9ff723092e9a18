"""OptEmbed invariants: the straight-through step, row pruning to the budget, the budgeted evolutionary
search, lottery-ticket retraining, and lookups from the bitmap + rank state alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.data import SyntheticConfig, make_synthetic
from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio
from embpress.tables.base import state_nbytes
from embpress.tables.optembed import RETRAIN, SEARCH, BinaryStep, OptEmbedTable, evolve
from embpress.train import TrainConfig, train


def _fields() -> list[Field]:
    return [Field("small", 7), Field("mid", 300), Field("large", 5000)]


def _table(ratio: float = 4, seed: int = 0, **kw) -> OptEmbedTable:
    torch.manual_seed(seed)
    return OptEmbedTable(fields=_fields(), dim=8, budget=Ratio(ratio), **kw)


def _numpy_lookup(state: dict[str, np.ndarray], fields: list[Field], ids: np.ndarray) -> np.ndarray:
    """Field-local ids ``[N, F]`` -> ``[N, F, D]`` (zero-padded) from the bitmap, rank and per-field rows."""
    bits, rank = state["keep_bits"], state["keep_rank"].astype(np.int64)

    def kept_before(g: int) -> int:  # kept ids below global id g
        w, b = divmod(g, 64)
        return int(rank[w]) + int(np.bitwise_count(bits[w] & np.uint64((1 << b) - 1))) if w < len(bits) \
            else int(rank[-1] + np.bitwise_count(bits[-1]))

    out = np.zeros((*ids.shape, 8), dtype=np.float32)
    offset = 0
    for j, f in enumerate(fields):
        rows = state[f"{f.name}.weight"]
        first = kept_before(offset)
        for r, i in enumerate(ids[:, j]):
            g = offset + int(i)
            if (int(bits[g // 64]) >> (g % 64)) & 1:
                out[r, j, : rows.shape[1]] = rows[kept_before(g) - first]
        offset += f.num_embeddings
    return out


def _ids(n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, f.num_embeddings, (n,), generator=g) for f in _fields()], 1)
    ids[0] = 0
    ids[1] = torch.tensor([6, 299, 4999])
    return ids


def test_binary_step_straight_through_shape():
    x = torch.tensor([-2.0, -0.8, -0.2, 0.0, 0.1, 0.5, 1.0, 1.5], requires_grad=True)
    y = BinaryStep.apply(x)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([0, 0.4, 1.2, 2.0, 1.6, 0.4, 0.4, 0])


def test_evolve_respects_budget_and_is_seeded():
    seen = []

    def score(c):
        seen.append(c.copy())
        return float(c @ np.array([1.0, 2.0, 3.0, 0.5]))

    def fits(c):
        return c.sum() <= 12

    best, s = evolve(score, num_fields=4, dim=8, fits=fits, rng=np.random.default_rng(1), iterations=8)
    assert all(fits(c) for c in seen) and fits(best) and s == max(score(c) for c in seen[:])
    again, _ = evolve(score, num_fields=4, dim=8, fits=fits, rng=np.random.default_rng(1), iterations=8)
    assert again.tolist() == best.tolist()
    one, _ = evolve(lambda c: float(c[0]), num_fields=1, dim=8, fits=fits, rng=np.random.default_rng(0), iterations=3)
    assert one.tolist() == [8]  # no crossover with one field; mutation still explores


def test_supernet_prunes_rows_below_threshold_and_masks_dims():
    t = _table()
    with torch.no_grad():
        t.weight.weight.normal_(0, 0.1)
        t.threshold.fill_(0.6)
    ids = _ids()
    norms = t.weight(t.global_ids(ids)).abs().sum(-1)
    t.eval()
    with torch.no_grad():
        out = t(ids)
    assert torch.equal(out.abs().sum(-1) > 0, norms > 0.6)
    t.train()
    out = t(ids)
    nz = out.detach() != 0
    width = nz.sum(-1)  # nonzero coordinates form a prefix of a random length
    assert torch.equal(nz, torch.arange(8) < width.unsqueeze(-1))
    assert len(set(width[norms > 0.6].tolist())) > 4
    # the threshold learns through the straight-through step and the regularizer
    loss = out.sum() + t.regularizer()
    loss.backward()
    assert t.threshold.grad is not None and t.threshold.grad.abs().sum() > 0
    assert t.regularizer().item() == pytest.approx(3e-4 * 3 * np.exp(-0.6), rel=1e-5)


@pytest.mark.parametrize("ratio", [4, 12])
def test_row_pruning_fits_budget_at_dim_one(ratio):
    t = _table(ratio)
    with torch.no_grad():
        t.weight.weight.normal_(0, 0.1)
        t.threshold.copy_(torch.tensor([0.0, 0.5, 0.6]))
    margin = (t.weight.weight.abs().sum(1) - t.threshold[t.field_of]).detach().numpy()
    t.prune_rows_()
    keep = t.row_keep.numpy()
    room = (t.max_bytes - 12 * t.num_words) // 4
    assert int(t.stage) == SEARCH and not t.threshold.requires_grad and t.regularizer() is None
    if (margin > 0).sum() <= room:  # the thresholds alone decide
        assert (keep == (margin > 0)).all()
    else:  # cut to the budget by margin, largest kept
        assert keep.sum() == room and margin[keep].min() >= margin[~keep].max()
    assert t.candidate_fits(np.ones(3, dtype=np.int64))
    assert t.serving_bytes() <= t.max_bytes and t.serving_bytes() == state_nbytes(t.serving_state())


def test_search_only_tries_candidates_within_budget():
    t = _table(4, search_iterations=4)
    t.prune_rows_()
    tried = []

    def evaluate():
        dims = t.field_dims.numpy().copy()
        tried.append(dims)
        return float(-np.abs(dims - np.array([8, 3, 1])).sum())  # a fake validation AUC

    t.search_dims_(evaluate)
    assert tried and all(t.candidate_fits(d) for d in tried)
    assert t.candidate_fits(t.field_dims.numpy()) and t.field_dims.tolist()[2] == 1


def test_serving_bytes_and_numpy_lookup_in_every_stage():
    t = _table(4)
    ids = _ids()
    with torch.no_grad():
        t.weight.weight.normal_(0, 0.1)
        t.threshold.fill_(0.5)
    for stage in ("supernet", "search", "retrain"):
        if stage == "search":
            t.prune_rows_()
            t.field_dims.copy_(torch.tensor([5, 2, 1]))
        if stage == "retrain":
            t.start_retrain_()
            with torch.no_grad():
                t.weight.weight.normal_()
        keep, dims = t.plan()
        kept = np.add.reduceat(keep.astype(int), [0, 7, 307])
        state = t.serving_state()
        shapes = 8 * (2 * 3 + 2)  # meta/shapes: three weights [kept, d], keep_bits, keep_rank
        assert t.serving_bytes() == 4 * int((kept * dims).sum()) + 12 * 83 + shapes == state_nbytes(state)
        assert t.serving_bytes() <= t.full_bytes / 4
        if stage != "supernet":  # the supernet serves full rows; the plan truncates them
            t.eval()
            with torch.no_grad():
                got = t(ids).numpy()
            np.testing.assert_allclose(got, _numpy_lookup(state, t.fields, ids.numpy()), rtol=1e-6)


def test_retrain_restarts_kept_rows_from_their_initial_values():
    t = _table(4, seed=7)
    init = t.weight.weight.detach().clone()
    with torch.no_grad():
        t.weight.weight.add_(1.0)  # "training" ...
        t.weight.weight[::3] = 0.0  # ... that leaves every third row below the threshold
        t.threshold.fill_(0.01)
    t.prune_rows_()
    t.field_dims.copy_(torch.tensor([8, 2, 1]))
    t.start_retrain_()
    keep = t.row_keep
    assert int(t.stage) == RETRAIN and t.weight.num_embeddings == int(keep.sum()) < t.total_ids
    torch.testing.assert_close(t.weight.weight.detach(), init[keep])
    fresh = _table(4, seed=1)
    fresh.load_state_dict(t.state_dict())
    ids = _ids()
    fresh.eval()
    t.eval()
    assert torch.equal(fresh(ids), t(ids)) and fresh.serving_bytes() == t.serving_bytes()


def test_budget_error():
    with pytest.raises(BudgetError, match=r"optembed: the kept-row bitmap .* needs [\d,]+ bytes"):
        OptEmbedTable(fields=_fields(), dim=8, budget=500)


def test_stages_supernet_search_retrain():
    data = make_synthetic(SyntheticConfig(rows=3000, num_dense=2, num_fields=3, min_cardinality=10,
                                          max_cardinality=300, seed=3))
    torch.manual_seed(0)
    table = OptEmbedTable(fields=data.fields, dim=8, budget=Ratio(3), supernet_epochs=1, retrain_epochs=1,
                          search_iterations=2)
    assert [(s.name, s.epochs, s.reset_head) for s in table.stages()] == [
        ("supernet", 1, False), ("search", 0, False), ("retrain", 1, True)]
    model = build_model("dlrm", table=table, num_dense=2, bottom=(8,), top=(8,))
    res = train(model, data, TrainConfig(epochs=1, batch_size=256, progress=False))
    assert [s.name for s in res.stages] == ["supernet", "search", "retrain"]
    assert int(table.stage) == RETRAIN and table.serving_bytes() <= table.full_bytes / 3


def test_rows_kept_respond_to_alpha_monotonically():
    """The thresholds have their own plain SGD (reference: SGD at t_lr): a larger alpha lifts them
    further and keeps fewer rows; alpha 0 keeps every row after as many steps."""
    data = make_synthetic(SyntheticConfig(rows=3000, num_dense=2, num_fields=3, min_cardinality=10,
                                          max_cardinality=300, seed=3))
    kept, thresholds = [], []
    for alpha in (0.0, 1e-3, 1e-2, 1e-1):
        torch.manual_seed(0)
        t = OptEmbedTable(fields=data.fields, dim=8, budget=None, alpha=alpha, threshold_lr=1.0, supernet_epochs=2)
        t.stages = lambda t=t: OptEmbedTable.stages(t)[:1]  # the supernet stage (and its row prune) only
        model = build_model("dlrm", table=t, num_dense=2, bottom=(8,), top=(8,))
        train(model, data, TrainConfig(epochs=1, batch_size=256, progress=False))
        kept.append(int(t.row_keep.sum()))
        thresholds.append(float(t.threshold.mean()))
    assert kept[0] == t.total_ids and kept[-1] < kept[0], kept
    assert all(a >= b for a, b in zip(kept, kept[1:], strict=False)), kept
    assert all(a < b for a, b in zip(thresholds, thresholds[1:], strict=False)), thresholds


def test_threshold_is_trained_by_its_own_sgd():
    """The supernet stage names the thresholds as their own plain-SGD group (the trainer runs it:
    tests/test_stage_contract.py checks what a group optimiser does)."""
    from embpress.tables import ParamGroup

    t = _table(alpha=0.5, threshold_lr=0.01)
    (group,) = t.stages()[0].groups()
    assert isinstance(group, ParamGroup) and group.optimizer == "sgd" and group.lr == 0.01
    assert group.params[0] is t.threshold
