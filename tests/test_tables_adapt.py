"""AdaptEmb: promoted ids own rows, the rest share a hashed table; the remap is stored and counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.hashing import PRIME


def _numpy_lookup(state: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Serve lookups from the exported arrays alone: binary search of the sorted promoted ids."""
    promoted, shared = state["num_promoted"], state["shared_rows"]
    ex_off = np.concatenate([[0], np.cumsum(promoted)[:-1]])
    sh_off = np.concatenate([[0], np.cumsum(shared)[:-1]])
    hashed_promoted = np.where(shared > 0, promoted, 0)
    id_off = np.concatenate([[0], np.cumsum(hashed_promoted)[:-1]])
    out = []
    for row in ids:
        vecs = []
        for f, x in enumerate(row):
            if shared[f] == 0:                                   # field stored whole
                vecs.append(state["exclusive_weight"][ex_off[f] + x])
                continue
            keys = state["promoted_ids"][id_off[f]:id_off[f] + promoted[f]]
            pos = np.searchsorted(keys, x)
            if pos < len(keys) and keys[pos] == x:
                vecs.append(state["exclusive_weight"][ex_off[f] + pos])
            else:
                h = ((int(state["hash_a"][f]) * (int(x) % PRIME) + int(state["hash_b"][f])) % PRIME) % shared[f]
                vecs.append(state["shared_weight"][sh_off[f] + h])
        out.append(np.stack(vecs))
    return np.stack(out)


def _shuffled_counts_fields() -> list[Field]:
    """Counts NOT sorted by id: the remap must come from the counts, not from the id order."""
    rng = np.random.default_rng(0)
    counts = rng.permutation((1e4 / np.arange(1, 3001) ** 1.1).astype(np.int64) + 1)
    return [Field("small", 5), Field("large", 3000, counts)]


def test_static_promotes_the_most_frequent_ids_by_counts():
    fields = _shuffled_counts_fields()
    torch.manual_seed(0)
    t = build_table("adapt", fields=fields, dim=8, budget=Ratio(6))
    k = t.capacity[1]
    top = np.sort(np.argsort(-fields[1].counts, kind="stable")[:k])
    state = t.serving_state()
    assert np.array_equal(state["promoted_ids"], top)
    assert state["promoted_ids"].dtype == np.int32
    ids = torch.stack([torch.zeros(3000, dtype=torch.long), torch.arange(3000)], 1)
    vec = t.eval()(ids)[:, 1].detach()
    # promoted ids have distinct rows; the others collide in the shared rows
    assert torch.unique(vec[top], dim=0).shape[0] == k
    rest = np.setdiff1d(np.arange(3000), top)
    assert torch.unique(vec[rest], dim=0).shape[0] <= t.shared_rows[1]
    np.testing.assert_array_equal(_numpy_lookup(state, ids.numpy()), t(ids).detach().numpy())


def test_budget_counts_the_remap(small_fields):
    t = build_table("adapt", fields=small_fields, dim=8, budget=Ratio(6))
    hashed_promoted = sum(k for k, m in zip(t.capacity, t.shared_rows, strict=True) if m > 0)
    rows = sum(t.capacity) + sum(t.shared_rows)
    shapes = 8 * 9  # meta/shapes: weights [rows, D] x 2, promoted_ids and four per-field arrays
    assert t.serving_bytes() == rows * 32 + hashed_promoted * 4 + 4 * 8 * 3 + shapes <= t.full_bytes // 6
    assert (t.capacity[0], t.shared_rows[0]) == (7, 0)          # the small field is stored whole
    # frequent_fraction of a hashed field's bytes buys exclusive rows at 4 * D + 4 bytes each
    field_bytes = (t.capacity[2] * 36 + t.shared_rows[2] * 32)
    assert abs(t.capacity[2] * 36 - 0.5 * field_bytes) <= 36 + 32


def test_dynamic_promotion_during_training(small_fields):
    torch.manual_seed(0)
    t = build_table("adapt", fields=small_fields, dim=8, budget=Ratio(20), promote_after=3)
    assert int(t.num_promoted[2]) == 0 and int(t.num_promoted[0]) == 7
    bytes_before = t.serving_bytes()
    ids = torch.tensor([[0, 5, 42]])
    before = t(ids).detach()                                  # seen once
    t.eval()
    for _ in range(3):
        t(ids)                                                 # eval lookups do not count
    t.train()
    t(ids)                                                     # seen twice
    assert int(t.num_promoted[2]) == 0
    after = t(ids).detach()                                    # third sighting: promoted, value migrated
    assert int(t.num_promoted[1]) == 1 and int(t.num_promoted[2]) == 1
    assert torch.equal(before, after)
    assert int(t.remap[t._offsets[2] + 42]) == int(t.exclusive_offsets[2])
    assert t.serving_bytes() == bytes_before + 2 * (8 * 4 + 4) <= t.full_bytes // 20
    state = t.serving_state()
    assert state["promoted_ids"].tolist() == [5, 42]
    np.testing.assert_array_equal(_numpy_lookup(state, np.array([[0, 5, 42], [1, 6, 43]])),
                                  t.eval()(torch.tensor([[0, 5, 42], [1, 6, 43]])).detach().numpy())


def test_dynamic_promotion_stops_at_capacity(small_fields):
    t = build_table("adapt", fields=small_fields, dim=8, budget=Ratio(20), promote_after=1)
    ids = torch.stack([torch.zeros(5000, dtype=torch.long), torch.arange(5000) % 300, torch.arange(5000)], 1)
    t(ids)
    assert int(t.num_promoted[2]) == t.capacity[2]
    assert t.serving_bytes() <= t.full_bytes // 20
    promoted = t.serving_state()["promoted_ids"]
    assert len(promoted) == t.capacity[1] + t.capacity[2]
    # all seen once: the tie is broken toward the lowest ids
    assert promoted[t.capacity[1]:].tolist() == list(range(t.capacity[2]))


def test_bad_hparams_and_budget(small_fields):
    with pytest.raises(ValueError, match="promote_after"):
        build_table("adapt", fields=small_fields, dim=8, budget=Ratio(4), promote_after=0)
    with pytest.raises(ValueError, match="frequent_fraction"):
        build_table("adapt", fields=small_fields, dim=8, budget=Ratio(4), frequent_fraction=-0.1)
    with pytest.raises(BudgetError, match="one row per field"):
        build_table("adapt", fields=small_fields, dim=8, budget=100)


@pytest.mark.parametrize("ratio", [10, 100])
def test_high_ratios_on_large_fields(ratio):
    fields = [Field("user", 200_000), Field("item", 50_000), Field("site", 30)]
    t = build_table("adapt", fields=fields, dim=16, budget=Ratio(ratio))
    assert t.serving_bytes() <= t.full_bytes / ratio
    assert all(k > 0 for k in t.capacity) and all(m > 0 for m in t.shared_rows[:2])
    assert t(torch.tensor([[199_999, 0, 29]])).shape == (1, 3, 16)
