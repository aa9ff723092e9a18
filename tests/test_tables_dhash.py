"""Frequency-based double hashing: frequent ids own rows, rare ids combine two hashed rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.hashing import PRIME


def _numpy_lookup(state: dict[str, np.ndarray], sizes: list[int], ids: np.ndarray, combine: str) -> np.ndarray:
    """Serve lookups from the exported arrays alone."""
    freq, hashed = state["num_frequent"], state["hashed_rows"]
    f_off = np.concatenate([[0], np.cumsum(freq)[:-1]])
    h_off = np.concatenate([[0], np.cumsum(hashed)[:-1]])
    out = []
    for row in ids:
        vecs = []
        for f, x in enumerate(row):
            if x < freq[f]:
                vecs.append(state["frequent_weight"][f_off[f] + x])
                continue
            h = [((int(state["hash_a"][f, j]) * (int(x) % PRIME) + int(state["hash_b"][f, j])) % PRIME) % hashed[f]
                 for j in (0, 1)]
            pair = state["hashed_weight"][h_off[f] + np.array(h)]
            vecs.append(pair.sum(0) if combine == "sum" else pair.reshape(-1))
        out.append(np.stack(vecs))
    return np.stack(out)


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_serving_state_reproduces_forward(small_fields, combine):
    torch.manual_seed(0)
    t = build_table("dhash", fields=small_fields, dim=8, budget=Ratio(6), combine=combine)
    ids = torch.tensor([[0, 0, 0], [6, 299, 4999], [3, 17, 1234], [1, 150, 60]])
    expect = _numpy_lookup(t.serving_state(), [f.num_embeddings for f in small_fields], ids.numpy(), combine)
    np.testing.assert_allclose(t.eval()(ids).detach().numpy(), expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_budget_arithmetic(small_fields, combine):
    t = build_table("dhash", fields=small_fields, dim=8, budget=Ratio(6), combine=combine)
    width = 8 if combine == "sum" else 4
    expect = (sum(t.frequent) * 8 + sum(t.hashed) * width) * 4 + 6 * 8 * len(small_fields)
    expect += 8 * 10  # meta/shapes: two weights [rows, D], hash_a/hash_b [F, 2], two [F] arrays
    assert t.serving_bytes() == expect <= t.full_bytes // 6
    # little is left unspent: under one row per hashed field (the common cap) plus the rounding
    assert t.max_bytes - t.serving_bytes() < 3 * 8 * 4
    # the small field is stored whole; the large one is split by frequent_fraction
    assert (t.frequent[0], t.hashed[0]) == (7, 0)
    per_row = 1 if combine == "sum" else 2
    r = t.frequent[2] + t.hashed[2] // per_row
    assert t.frequent[2] == int(0.5 * r)


def test_frequent_ids_own_rows_rare_ids_hash_twice(small_fields):
    torch.manual_seed(0)
    t = build_table("dhash", fields=small_fields, dim=8, budget=Ratio(6)).eval()
    k = t.frequent[2]
    ids = torch.zeros(5000, 3, dtype=torch.long)
    ids[:, 2] = torch.arange(5000)
    vec = t(ids)[:, 2].detach()
    # frequent ids (the lowest ids: ids are numbered by descending frequency) are all distinct rows
    assert torch.equal(vec[:k], t.frequent_weight.weight[t.frequent_offsets[2] : t.frequent_offsets[2] + k].detach())
    # a rare id is the sum of its two hashed rows
    rows = t.hashed_rows(ids[k:])[:, 2]
    assert torch.allclose(vec[k:], t.hashed_weight.weight[rows].sum(1).detach())
    # two rare ids share a vector only when both hashes collide: far fewer than single-hash collisions
    m = t.hashed[2]
    pairs = {tuple(r) for r in rows.tolist()}
    singles = {r[0] for r in rows.tolist()}
    assert len(singles) <= m < 5000 - k
    assert len(pairs) > 0.95 * (5000 - k)


def test_pure_double_hashing_and_gradients_are_sparse(small_fields):
    t = build_table("dhash", fields=small_fields, dim=8, budget=Ratio(6), frequent_fraction=0.0)
    assert t.frequent[2] == 0 and t.hashed[2] > 0
    t(torch.tensor([[1, 2, 3000]])).sum().backward()
    g = t.hashed_weight.weight.grad.coalesce()
    assert g.indices().shape[1] <= 2 * 2  # two hashed rows for each of the two hashed fields at most


def test_bad_hparams_and_budget(small_fields):
    with pytest.raises(ValueError, match="even dim"):
        build_table("dhash", fields=small_fields, dim=7, budget=Ratio(4), combine="concat")
    with pytest.raises(ValueError, match="combine"):
        build_table("dhash", fields=small_fields, dim=8, budget=Ratio(4), combine="mul")
    with pytest.raises(ValueError, match="frequent_fraction"):
        build_table("dhash", fields=small_fields, dim=8, budget=Ratio(4), frequent_fraction=1.0)
    with pytest.raises(BudgetError, match="one row per field"):
        build_table("dhash", fields=small_fields, dim=8, budget=200)


@pytest.mark.parametrize("ratio", [10, 100])
def test_high_ratios_on_large_fields(ratio):
    fields = [Field("user", 200_000), Field("item", 50_000), Field("site", 30)]
    t = build_table("dhash", fields=fields, dim=16, budget=Ratio(ratio))
    assert t.serving_bytes() <= t.full_bytes / ratio
    assert t.frequent[2] == 30 and all(h > 0 for h in t.hashed[:2])
    assert t(torch.tensor([[199_999, 0, 29]])).shape == (1, 3, 16)
