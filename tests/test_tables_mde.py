"""MDE invariants: the alpha-power rule, budget arithmetic with projections, lookups from the state alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio
from embpress.tables.base import state_nbytes
from embpress.tables.mde import MDETable, alpha_power_dims, block_bounds, block_popularity


def _fields() -> list[Field]:
    rng = np.random.default_rng(0)
    out = []
    for name, n in (("small", 12), ("mid", 300), ("large", 5000), ("huge", 20_000)):
        c = np.sort((1e5 / np.arange(1, n + 1) ** 1.1).astype(np.int64) + rng.integers(0, 2, n))[::-1].copy()
        out.append(Field(name, n, c))
    return out


def _numpy_lookup(t: MDETable, ids: np.ndarray) -> np.ndarray:
    """Lookups from ``serving_state()`` alone: block by the stored bounds, row, then projection."""
    state = t.serving_state()
    bounds = state["inner_bounds"]
    out = np.zeros((*ids.shape, t.dim), dtype=np.float64)
    for j, f in enumerate(t.fields):
        starts = np.concatenate([[0], bounds[j]])
        for r, i in enumerate(ids[:, j]):
            k = int(np.searchsorted(bounds[j], i, side="right"))
            row = state[f"{f.name}.block{k}.weight"][i - starts[k]].astype(np.float64)
            proj = state.get(f"{f.name}.block{k}.proj")
            out[r, j] = row if proj is None else row @ proj
    return out


def _ids(fields, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, f.num_embeddings, (n,), generator=g) for f in fields], 1)
    ids[0] = 0
    ids[1] = torch.tensor([f.num_embeddings - 1 for f in fields])
    return ids


def test_block_bounds_and_popularity():
    b = block_bounds(5000, 4)
    assert b[0] == 0 and b[-1] == 5000 and (np.diff(b) > 0).all()
    assert block_bounds(3, 4).tolist() == [0, 1, 2, 2, 3]  # empty blocks allowed for tiny fields
    # one block per field: the reference's 1 / n rule (each field is queried once per sample)
    p = block_popularity(np.arange(100, 0, -1), np.array([0, 100]))
    assert p == pytest.approx([1 / 100])
    c = np.array([50, 30, 10, 5, 5])
    p = block_popularity(c, np.array([0, 1, 5]))
    assert p == pytest.approx([0.5, 0.5 / 4])


def test_alpha_power_rule_matches_reference():
    """dlrm md_solver: d_i = d0 * (n_0 / n_i) ** alpha, rounded to a power of two, with p_i = 1 / n_i."""
    n = np.array([12, 300, 5000, 20_000])
    d = alpha_power_dims(1 / n, 0.3, 16, 16, round_dim=True)
    ref = 2 ** np.rint(np.log2(np.maximum(np.rint(16 * (12 / n) ** 0.3), 1)))
    assert d.tolist() == ref.astype(int).tolist() == [16, 8, 4, 2]


@pytest.mark.parametrize("ratio, blocks", [(2, 1), (4, 1), (8, 1), (4, 3), (12, 4)])
def test_budget_arithmetic_and_smallest_alpha(ratio, blocks):
    torch.manual_seed(0)
    fields = _fields()
    t = MDETable(fields=fields, dim=16, budget=Ratio(ratio), blocks_per_field=blocks)
    state = t.serving_state()
    values = sum(v.size for k, v in state.items() if k.endswith(".weight"))
    proj = sum(v.size for k, v in state.items() if k.endswith(".proj"))
    shapes = 8 * sum(v.ndim for k, v in state.items() if not k.startswith("meta/"))  # meta/shapes
    assert shapes == 8 * (2 + 2 * sum(k.endswith((".weight", ".proj")) for k in state))
    assert t.serving_bytes() == 4 * (values + proj) + 4 * len(fields) * (blocks - 1) + shapes == state_nbytes(state)
    assert t.serving_bytes() <= t.full_bytes / ratio
    rows = sum(v.shape[0] for k, v in state.items() if k.endswith(".weight"))
    assert rows == sum(f.num_embeddings for f in fields) == sum(e.num_embeddings for e in t.rows)
    for k, v in state.items():  # a projection exactly where a block is narrower than D
        if k.endswith(".weight"):
            assert (k.replace(".weight", ".proj") in state) == (v.shape[1] < 16)
    # dims fall with popularity; a block is widened to D only where its projection would not pay
    raw = alpha_power_dims(t._pop, t.alpha_, t.base_dim_, 16, round_dim=True)
    assert (np.diff(raw[np.argsort(-t._pop, kind="stable")]) <= 0).all()
    widened = np.array(t.dims_) != raw
    assert (np.array(t.dims_)[widened] == 16).all()
    assert (t._rows * raw + raw * 16 >= t._rows * 16)[widened].all()
    if t.base_dim_ == 16 and t.alpha_ > 0:  # the least skewed alpha that fits (to the rounding step)
        assert not t.fits(t._bytes(t._dims(t.alpha_ - 2e-6, 16)))


def test_fixed_alpha_lowers_base_dim():
    torch.manual_seed(0)
    t = MDETable(fields=_fields(), dim=16, budget=Ratio(8), alpha=0.0)
    assert t.alpha_ == 0.0 and len(set(t.dims_)) == 1 and t.base_dim_ < 16
    assert t.serving_bytes() <= t.full_bytes / 8


def test_budget_error_names_bytes():
    with pytest.raises(BudgetError, match=r"mde: dimension 1 for every block .* needs [\d,]+ bytes"):
        MDETable(fields=_fields(), dim=16, budget=Ratio(200))


@pytest.mark.parametrize("blocks", [1, 3])
def test_lookup_equals_numpy_from_state(blocks):
    torch.manual_seed(1)
    fields = _fields()
    t = MDETable(fields=fields, dim=8, budget=Ratio(4), blocks_per_field=blocks)
    with torch.no_grad():  # non-trivial values everywhere
        for p in t.parameters():
            p.normal_()
    t.eval()
    ids = _ids(fields, 200)
    with torch.no_grad():
        got = t(ids).double().numpy()
    np.testing.assert_allclose(got, _numpy_lookup(t, ids.numpy()), rtol=1e-5, atol=1e-6)


def test_gradients_reach_rows_and_projections():
    torch.manual_seed(0)
    t = MDETable(fields=_fields(), dim=8, budget=Ratio(4), blocks_per_field=2)
    ids = _ids(t.fields, 64)
    t(ids).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t.proj)
    touched = [e.weight.grad for e in t.rows if e.weight.grad is not None]
    assert touched and all(g.is_sparse for g in touched)
    assert {id(p) for p in t.sparse_parameters()} == {id(e.weight) for e in t.rows}
