"""TT-Rec invariants: budget arithmetic, lookups reproduced from the exported cores, rank sizing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.base import state_nbytes
from embpress.tables.full import INIT_STD
from embpress.tables.tt import TTTable, dim_factors, id_factors


def _fields() -> list[Field]:
    return [Field("small", 7), Field("mid", 300), Field("large", 5000), Field("huge", 40_000)]


def _numpy_rows(state: dict[str, np.ndarray], name: str, ids: np.ndarray, num_cores: int) -> np.ndarray:
    """Rows of a TT field from its exported cores ``[R_{k-1}, n_k, d_k, R_k]`` alone (einsum per id)."""
    cores = [state[f"{name}.core{k}"].astype(np.float64) for k in range(num_cores)]
    shape = [c.shape[1] for c in cores]
    out = []
    for i in ids:
        digits = np.unravel_index(int(i), shape)  # i_1 most significant
        acc = np.ones((1, 1))  # [D so far, R]
        for c, dk in zip(cores, digits, strict=True):
            acc = np.einsum("ar,rds->ads", acc, c[:, dk]).reshape(-1, c.shape[3])
        out.append(acc.reshape(-1))
    return np.stack(out)


def _check_against_numpy(t: TTTable, ids: torch.Tensor) -> None:
    t.eval()
    with torch.no_grad():
        got = t(ids).double().numpy()
    state = t.serving_state()
    for j, f in enumerate(t.fields):
        if t.id_shapes[f.name] is None:
            want = state[f"{f.name}.weight"][ids[:, j].numpy()]
        else:
            want = _numpy_rows(state, f.name, ids[:, j].numpy(), t.num_cores)
        np.testing.assert_allclose(got[:, j], want, rtol=1e-4, atol=1e-7, err_msg=f.name)


def _ids(fields: list[Field], n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, f.num_embeddings, (n,), generator=g) for f in fields]
    ids = torch.stack(cols, 1)
    ids[0] = torch.tensor([f.num_embeddings - 1 for f in fields])  # the last (padded-range) ids
    ids[1] = 0
    return ids


def test_serving_bytes_arithmetic():
    torch.manual_seed(0)
    fields = _fields()
    t = TTTable(fields=fields, dim=16, budget=Ratio(8))
    R, d = t.rank, t.dim_shape
    numel = 0
    for f in fields:
        s = t.id_shapes[f.name]
        if s is None:
            numel += f.num_embeddings * 16
        else:
            numel += s[0] * d[0] * R + R * s[1] * d[1] * R + R * s[2] * d[2]
            assert math.prod(s) >= f.num_embeddings
    shapes = sum(2 if t.id_shapes[f.name] is None else 4 * 3 for f in fields)  # meta/shapes: rows, cores
    assert t.serving_bytes() == 4 * numel + 8 * shapes == state_nbytes(t.serving_state())
    assert t.serving_bytes() <= t.full_bytes / 8
    assert sum(p.numel() for p in t.parameters()) == numel
    assert f"rank={R}" in repr(t) and "dim_shape=(2, 2, 4)" in repr(t)


@pytest.mark.parametrize("dim, num_cores, batch", [(16, 3, 4), (16, 3, 3000), (8, 2, 64), (7, 3, 64), (32, 4, 512)])
def test_lookup_equals_numpy_contraction(dim, num_cores, batch):
    """Small batches contract per distinct id, large ones per digit prefix: both equal the TT formula."""
    torch.manual_seed(1)
    fields = _fields()
    t = TTTable(fields=fields, dim=dim, budget=Ratio(6), num_cores=num_cores, max_rank=9)
    assert any(s is not None for s in t.id_shapes.values())
    ids = _ids(fields, batch)
    _check_against_numpy(t, ids)
    # duplicates and the leading-dimension contract
    twice = torch.cat([ids, ids])
    assert torch.equal(t(twice)[:batch], t(twice)[batch:])
    assert t(ids[:0]).shape == (0, 4, dim)


def test_whole_table_reconstruction_path():
    """A batch holding every id contracts all cores per digit prefix (the full TT matrix)."""
    torch.manual_seed(2)
    fields = [Field("a", 1000), Field("b", 997)]
    t = TTTable(fields=fields, dim=8, max_rank=3)
    assert t.id_shapes == {"a": (10, 10, 10), "b": (10, 10, 10)}
    ids = torch.stack([torch.arange(1000), torch.arange(1000) % 997], 1)
    _check_against_numpy(t, ids)
    # the 500 most frequent ids: 50 two-digit prefixes contracted per prefix, then all their children
    _check_against_numpy(t, torch.stack([torch.arange(500), torch.arange(500)], 1))


def test_rank_grows_with_budget_and_is_the_largest_that_fits():
    fields = _fields()
    ranks = [TTTable(fields=fields, dim=16, budget=Ratio(r)).rank for r in (400, 100, 30, 10, 3)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1], ranks
    t = TTTable(fields=fields, dim=16, budget=Ratio(30))
    exact = TTTable(fields=fields, dim=16, budget=t.serving_bytes())
    assert exact.rank == t.rank
    below = TTTable(fields=fields, dim=16, budget=t.serving_bytes() - 1)
    assert below.rank == t.rank - 1
    assert TTTable(fields=fields, dim=16, max_rank=5).rank == 5  # no budget: the cap


def test_small_field_stays_plain_and_rows_are_its_own():
    torch.manual_seed(0)
    fields = _fields()
    t = TTTable(fields=fields, dim=8, budget=Ratio(4))
    assert t.id_shapes["small"] is None and t.id_shapes["huge"] is not None
    state = t.serving_state()
    assert state["small.weight"].shape == (7, 8) and "small.core0" not in state
    assert t.sparse_parameters() == [t.plain.weight]
    # a field is plain exactly when its rows are no larger than its cores at the chosen rank
    for f in fields:
        s = t.id_shapes[f.name]
        if s is not None:
            cores = sum(state[f"{f.name}.core{k}"].size for k in range(3))
            assert cores < f.num_embeddings * 8


def test_all_plain_when_rows_are_smaller_than_cores():
    t = TTTable(fields=[Field("a", 5), Field("b", 9)], dim=8)  # no budget: the rank is max_rank
    assert t.rank == 64 and t.id_shapes == {"a": None, "b": None} and len(t.cores) == 0
    assert t.serving_bytes() == (5 + 9) * 8 * 4 + 8 * 2 * 2 == state_nbytes(t.serving_state())
    assert t(torch.tensor([[4, 8]])).shape == (1, 2, 8)
    with pytest.raises(ValueError, match="not tensor-train"):
        t.core_block("a", 0)


def test_gradients_reach_every_core():
    torch.manual_seed(0)
    fields = _fields()
    for batch in (3, 2000):  # per-id and per-prefix contraction
        t = TTTable(fields=fields, dim=16, budget=Ratio(8))
        t(_ids(fields, batch, seed=batch)).square().sum().backward()
        assert len(t.cores) == 3
        for k, core in enumerate(t.cores):  # every field's block of every core
            for f in fields:
                if t.id_shapes[f.name] is not None:
                    block = t.core_block(f.name, k)
                    assert core.grad is not None and float(core.grad[:, block].abs().sum()) > 0, (f.name, k)
        assert t.plain.weight.grad is not None


def test_rank_one_must_fit():
    fields = _fields()
    t1 = TTTable(fields=fields, dim=16, max_rank=1)
    with pytest.raises(BudgetError, match=r"rank 1 .* needs [\d,]+ bytes"):
        TTTable(fields=fields, dim=16, budget=t1.serving_bytes() - 1)
    assert TTTable(fields=fields, dim=16, budget=t1.serving_bytes()).rank == 1


def test_init_matches_plain_embedding_variance():
    torch.manual_seed(0)
    fields = [Field("huge", 40_000)]
    for init in ("sampled_gaussian", "gaussian"):
        t = build_table("tt", fields=fields, dim=16, budget=Ratio(20), init=init)
        rows = t(torch.arange(0, 40_000, 7).unsqueeze(1)).detach()
        assert rows.std().item() == pytest.approx(INIT_STD, rel=0.15), init
    sampled = build_table("tt", fields=fields, dim=16, budget=Ratio(20))
    assert min(float(c.detach().abs().min()) for c in sampled.cores) > 0  # sampled tails: no entry near 0
    with pytest.raises(ValueError, match="init"):
        build_table("tt", fields=fields, dim=16, init="uniform")


def test_factorisations():
    for dim in range(1, 65):
        for k in (2, 3, 4):
            assert math.prod(dim_factors(dim, k)) == dim
    assert [dim_factors(d, 3) for d in (8, 16, 32, 64)] == [(2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 4, 4)]
    assert dim_factors(13, 3) == (1, 1, 13)  # a prime: one core carries the whole dim
    for n in (1, 2, 7, 999, 1000, 1001, 5000, 123_457):
        f = id_factors(n, 3)
        assert math.prod(f) >= n and max(f) - min(f) <= 1 + max(f) // 10
