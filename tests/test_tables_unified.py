"""Unified Embedding: one shared table, salted (field, chunk) hashes, exact budget arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, UnifiedTable
from embpress.tables.base import state_nbytes
from embpress.tables.hashing import PRIME
from embpress.tables.unified import default_chunks


def _fields():
    return [Field("small", 7), Field("mid", 300), Field("large", 5000)]


def test_budget_arithmetic_is_exact():
    t = UnifiedTable(fields=_fields(), dim=8, budget=10_000)
    overhead = 3 * 2 * 16 + 8 + 8 * 7              # (a, b) per (field, chunk) + the bucket count + 7 shape words
    assert t.chunks == 2 and t.chunk_dim == 4
    assert t.buckets == (10_000 - overhead) // 16
    assert t.serving_bytes() == t.buckets * 16 + overhead <= 10_000 < (t.buckets + 1) * 16 + overhead
    state = t.serving_state()
    assert state_nbytes(state) == t.serving_bytes()
    assert state["hash_a"].shape == state["hash_b"].shape == (3, 2)
    assert state["weight"].shape == (t.buckets, 4)


@pytest.mark.parametrize("ratio", [1, 4, 30, 200])
def test_fits_ratio(ratio):
    t = UnifiedTable(fields=_fields(), dim=16, budget=Ratio(ratio))
    assert t.serving_bytes() == state_nbytes(t.serving_state()) <= t.full_bytes / ratio


def test_default_and_bad_chunks():
    assert [default_chunks(d) for d in (4, 8, 16, 32, 6, 7)] == [1, 2, 4, 8, 1, 1]
    assert UnifiedTable(fields=_fields(), dim=8, budget=Ratio(4), chunks=8).chunk_dim == 1
    for bad in (0, 3, -2):
        with pytest.raises(ValueError, match="positive divisor of dim=8"):
            UnifiedTable(fields=_fields(), dim=8, budget=Ratio(4), chunks=bad)
    with pytest.raises(BudgetError, match="unified: one shared row"):
        UnifiedTable(fields=_fields(), dim=8, budget=100)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_serving_state_reconstructs_lookups(chunks):
    torch.manual_seed(0)
    t = UnifiedTable(fields=_fields(), dim=8, budget=Ratio(8), chunks=chunks).eval()
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, f.num_embeddings, 100) for f in t.fields], 1)
    with torch.no_grad():
        expected = t(torch.from_numpy(ids)).numpy()
    s = t.serving_state()
    rows = ((s["hash_a"] * (ids[:, :, None] % PRIME) + s["hash_b"]) % PRIME) % s["buckets"][0]  # [N, F, c]
    got = s["weight"][rows].reshape(100, 3, 8)                                                  # chunks concatenated
    np.testing.assert_array_equal(got, expected)


def test_one_table_shared_by_every_field_and_chunk():
    t = UnifiedTable(fields=_fields(), dim=8, budget=Ratio(8))
    assert [n for n, _ in t.named_parameters()] == ["weight.weight"]
    ids = torch.stack([torch.arange(7) % f.num_embeddings for f in t.fields], 1)
    rows = t.rows_of(ids)                                      # [7, F, chunks]
    # the salts differ: the same id lands on different rows in different fields and chunks
    assert (rows[:, 0, 0] != rows[:, 1, 0]).float().mean() > 0.8
    assert (rows[:, 2, 0] != rows[:, 2, 1]).float().mean() > 0.8
    pairs = {(int(a), int(b)) for a, b in zip(t.hash_a.flatten(), t.hash_b.flatten(), strict=True)}
    assert len(pairs) == 3 * t.chunks


def test_multiplexed_fields_receive_gradient_on_the_same_row():
    t = UnifiedTable(fields=_fields(), dim=8, budget=2_000)      # few rows: fields must share them
    rows = t.rows_of(torch.stack([torch.arange(5000) % f.num_embeddings for f in t.fields], 1))
    shared = set(rows[:, 0].flatten().tolist()) & set(rows[:, 2].flatten().tolist())
    assert shared, "with B rows << ids, the small and large field share rows"
    r = shared.pop()
    x_small = int((rows[:, 0] == r).any(1).nonzero()[0])
    x_large = int((rows[:, 2] == r).any(1).nonzero()[0])
    for f, x in ((0, x_small), (2, x_large)):
        t.zero_grad()
        ids = torch.zeros(1, 3, dtype=torch.long)
        ids[0, f] = x
        t(ids)[0, f].sum().backward()
        assert float(t.weight.weight.grad.to_dense()[r].abs().sum()) > 0


def test_rows_spread_like_random_hashing():
    t = UnifiedTable(fields=[Field("a", 20_000)], dim=4, budget=Ratio(20), chunks=1)
    used = torch.unique(t.rows_of(torch.arange(20_000).unsqueeze(1))).numel()
    expected = t.buckets * (1 - np.exp(-20_000 / t.buckets))    # balls into bins
    assert abs(used - expected) < 0.02 * t.buckets


def test_hash_seed_changes_rows_and_is_deterministic():
    ids = torch.tensor([[1, 2, 3], [6, 200, 4000]])
    a = UnifiedTable(fields=_fields(), dim=8, budget=Ratio(4), hash_seed=0).rows_of(ids)
    b = UnifiedTable(fields=_fields(), dim=8, budget=Ratio(4), hash_seed=0).rows_of(ids)
    c = UnifiedTable(fields=_fields(), dim=8, budget=Ratio(4), hash_seed=1).rows_of(ids)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_compiled_universal_hash_equals_the_formula():
    """The numba pass (Mersenne reduction) against torch's five operations, with broadcasting,
    negative ids and ids past the prime."""
    from embpress.tables.hashing import PRIME, universal_hash

    gen = torch.Generator().manual_seed(0)
    cases = [((100, 26, 1), (26, 4), 1000), ((100, 26), (26,), (26,)), ((7,), (7,), 5), ((3, 4, 5), (4, 5), (4, 1))]
    for x_shape, ab_shape, m in cases:
        x = torch.randint(-2**40, 2**40, x_shape, generator=gen)
        a = torch.randint(1, PRIME, ab_shape, generator=gen)
        b = torch.randint(0, PRIME, ab_shape, generator=gen)
        m = torch.randint(1, 10**6, m, generator=gen) if isinstance(m, tuple) else m
        assert torch.equal(universal_hash(x, a, b, m), ((a * (x % PRIME) + b) % PRIME) % m)
    x = torch.tensor([0, PRIME - 1, PRIME, 2**62, -1])
    a = b = torch.tensor(PRIME - 1)
    assert torch.equal(universal_hash(x, a, b, PRIME), ((a * (x % PRIME) + b) % PRIME) % PRIME)
