"""Q-R compositional embeddings: budget arithmetic, complementary partitions, serving state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, QRTable, Ratio
from embpress.tables.base import state_nbytes
from embpress.tables.qr import plan_moduli


def _fields():
    return [Field("tiny", 3), Field("mid", 300), Field("large", 5000)]


def _numpy_lookup(state: dict[str, np.ndarray], sizes: list[int], ids: np.ndarray, operation: str) -> np.ndarray:
    """Lookups from the serving state alone: what a server would compute."""
    moduli = state["moduli"]
    r_off = q_off = full_off = 0
    out = []
    for f, (n, m) in enumerate(zip(sizes, moduli, strict=True)):
        x = ids[:, f]
        if m == 0:
            out.append(state["weight_full"][full_off + x])
            full_off += n
            continue
        er = state["weight_r"][r_off + x % m]
        eq = state["weight_q"][q_off + x // m]
        r_off += m
        q_off += -(-n // m)
        if operation == "concat":
            out.append(np.concatenate([er, eq], -1))
        else:
            out.append(er * eq if operation == "mult" else er + eq)
    return np.stack(out, 1)


def test_budget_arithmetic_is_exact():
    t = QRTable(fields=[Field("a", 3), Field("b", 10_000)], dim=4, budget=4_068)
    # field a stays full (3 rows); field b: 194 remainder rows + ceil(10000/194) = 52 quotient rows
    assert t.moduli == [0, 194] and t.q_rows == [52]
    meta = 8 + len("mult")  # the operation: its length and text
    meta += 8 * (2 + 2 + 2 + 1)  # meta/shapes: weight_r, weight_q, weight_full [rows, 4] and moduli [2]
    assert t.serving_bytes() == (3 + 194 + 52) * 4 * 4 + 2 * 8 + meta == 4_068
    # one more remainder row (195 + 52) no longer fits
    assert (3 + 195 + 52) * 16 + 16 + meta > 4_068
    assert state_nbytes(t.serving_state()) == t.serving_bytes()


@pytest.mark.parametrize("ratio", [2, 4, 10, 20])
@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_fits_budget_and_state_matches(ratio, operation):
    t = QRTable(fields=_fields(), dim=8, budget=Ratio(ratio), operation=operation)
    assert t.serving_bytes() == state_nbytes(t.serving_state()) <= t.full_bytes / ratio


def test_more_budget_never_more_collisions():
    prev = None
    for ratio in (25, 20, 10, 5, 2):
        t = QRTable(fields=_fields(), dim=8, budget=Ratio(ratio))
        if prev is not None:
            assert all(c <= p for c, p in zip(t.collisions, prev, strict=True))
        prev = t.collisions
    assert prev[0] == 1  # the tiny field is never compressed


def test_small_fields_stay_uncompressed():
    t = QRTable(fields=_fields(), dim=8, budget=Ratio(10))
    assert t.moduli[0] == 0 and t.moduli[2] > 0
    ids = torch.tensor([[0, 0, 0], [1, 5, 7], [2, 9, 4999]])
    full_rows = t.weight_full.weight[ids[:, 0]]
    assert torch.equal(t(ids)[:, 0], full_rows)


def test_smallest_tables_near_sqrt_n():
    floor = (100 + 100) * 8 * 4 + 8  # m = 100 remainder rows + 100 quotient rows + the modulus
    assert plan_moduli([10_000], 8, "mult", floor) == [100]
    with pytest.raises(BudgetError, match="qr: the smallest Q-R tables"):
        plan_moduli([10_000], 8, "mult", floor - 1)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_every_id_keeps_a_unique_vector(operation):
    torch.manual_seed(0)
    t = QRTable(fields=[Field("a", 2000)], dim=4, budget=Ratio(20), operation=operation).eval()
    assert t.collisions[0] > 1
    with torch.no_grad():
        out = t(torch.arange(2000).unsqueeze(1))[:, 0]
    assert torch.unique(out, dim=0).shape[0] == 2000


def test_complementary_partition_rows():
    """Ids ``x`` and ``x + m`` share the remainder row; the ``m`` most frequent ids own theirs."""
    t = QRTable(fields=[Field("a", 2000)], dim=4, budget=Ratio(20), operation="add").eval()
    (m,) = t.moduli
    with torch.no_grad():
        t.weight_q.weight.zero_()
        out = t(torch.arange(2000).unsqueeze(1))[:, 0]
    assert torch.equal(out[:m], t.weight_r.weight)          # ids 0..m-1: one remainder row each
    assert torch.equal(out[5], out[5 + m]) and torch.equal(out[7], out[7 + 2 * m])


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
@pytest.mark.parametrize("dim", [5, 8])
def test_serving_state_reconstructs_lookups(operation, dim):
    torch.manual_seed(1)
    t = QRTable(fields=_fields(), dim=dim, budget=Ratio(8), operation=operation).eval()
    assert 0 in t.moduli and any(t.moduli)
    ids = np.stack([np.random.default_rng(f).integers(0, f_.num_embeddings, 64) for f, f_ in enumerate(t.fields)], 1)
    with torch.no_grad():
        expected = t(torch.from_numpy(ids)).numpy()
    got = _numpy_lookup(t.serving_state(), [f.num_embeddings for f in t.fields], ids, operation)
    np.testing.assert_array_equal(got, expected)
    assert got.shape == (64, 3, dim)


def test_mult_starts_as_remainder_rows():
    torch.manual_seed(0)
    t = QRTable(fields=[Field("a", 5000)], dim=8, budget=Ratio(10))
    assert float(t.weight_q.weight.detach().mean()) == pytest.approx(1.0, abs=0.01)
    assert float(t.weight_r.weight.detach().std()) == pytest.approx(0.01, rel=0.2)


def test_sparse_gradients_reach_both_tables():
    t = QRTable(fields=_fields(), dim=8, budget=Ratio(10))
    t(torch.tensor([[0, 1, 2], [1, 2, 4000]])).sum().backward()
    assert len(t.sparse_parameters()) == 3
    for p in t.sparse_parameters():
        assert p.grad is not None and p.grad.is_sparse


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="operation must be one of"):
        QRTable(fields=_fields(), dim=8, budget=Ratio(4), operation="max")
    with pytest.raises(ValueError, match="needs dim >= 2"):
        QRTable(fields=_fields(), dim=1, budget=Ratio(2), operation="concat")
    with pytest.raises(BudgetError, match="budget allows 48"):  # 100 less the metadata (spec, 5 shape words)
        QRTable(fields=_fields(), dim=8, budget=100)


# ----------------------------------------------------------------------------- k >= 3 partitions


def _numpy_lookup_radices(state: dict[str, np.ndarray], sizes: list[int], ids: np.ndarray,
                          operation: str) -> np.ndarray:
    """Lookups from a ``radices`` serving state alone (fields with any number of partitions)."""
    radices = state["radices"]
    off: dict[str, int] = {}
    out = []
    for f, row in enumerate(radices):
        x = ids[:, f]
        rad = [int(r) for r in row if r]
        k = len(rad)
        if k == 0:
            out.append(state["weight_full"][off.get("full", 0) + x])
            off["full"] = off.get("full", 0) + sizes[f]
            continue
        names = ["weight_q", "weight_r"] if k == 2 else [f"weight_p{k}_{j}" for j in range(k)]
        strides = [int(np.prod(rad[j + 1:])) for j in range(k)]
        vecs = []
        for j, name in enumerate(names):
            digit = x // strides[j] if j == 0 else (x // strides[j]) % rad[j]
            vecs.append(state[name][off.get(name, 0) + digit])
            off[name] = off.get(name, 0) + rad[j]
        vecs = vecs[::-1]  # remainder first
        if operation == "concat":
            out.append(np.concatenate(vecs, -1))
        else:
            acc = vecs[0]
            for v in vecs[1:]:
                acc = acc * v if operation == "mult" else acc + v
            out.append(acc)
    return np.stack(out, 1)


def _digits(radices: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    strides = [int(np.prod(radices[j + 1:])) for j in range(len(radices))]
    return np.stack([x // s if j == 0 else (x // s) % r for j, (s, r) in enumerate(zip(strides, radices, strict=True))], 1)


def _three_part_fields():
    return [Field("tiny", 3), Field("a", 5000), Field("b", 11_000)]


def test_three_partitions_meet_a_budget_two_cannot():
    fields = [Field("a", 5000), Field("b", 11_000)]
    with pytest.raises(BudgetError):
        QRTable(fields=fields, dim=16, budget=Ratio(100), max_partitions=2)
    t = QRTable(fields=fields, dim=16, budget=Ratio(100))
    assert t.partitions == [3, 3]
    assert all(np.prod(r) >= f.num_embeddings for r, f in zip(t.radices, fields, strict=True))
    assert t.serving_bytes() == state_nbytes(t.serving_state()) <= t.full_bytes / 100
    assert t.serving_state()["radices"].dtype == np.int64


def test_fewest_partitions_largest_first():
    # a budget between "all two-partition" and "all three-partition": only the largest field moves
    fields = [Field("a", 5000), Field("b", 11_000)]
    t = QRTable(fields=fields, dim=16, budget=16_000)
    assert t.partitions == [2, 3]
    state = t.serving_state()
    assert set(state) == {"weight_r", "weight_q", "weight_p3_0", "weight_p3_1", "weight_p3_2", "radices",
                          "meta/ints", "meta/text", "meta/shapes"}
    assert state["radices"][0, 0] == 0 and state["radices"][0, 2] == t.moduli[0]
    assert t.serving_bytes() == state_nbytes(state) <= 16_000
    # the two-partition case keeps its state layout
    assert set(QRTable(fields=fields, dim=16, budget=Ratio(10)).serving_arrays()) == {"weight_r", "weight_q", "moduli"}


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
@pytest.mark.parametrize("dim", [7, 16])
def test_three_partition_state_reconstructs_lookups(operation, dim):
    torch.manual_seed(2)
    fields = _three_part_fields()
    t = QRTable(fields=fields, dim=dim, budget=Ratio(100), operation=operation).eval()
    assert 3 in t.partitions and 0 in t.partitions
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, f.num_embeddings, 128) for f in fields], 1)
    ids[0] = [f.num_embeddings - 1 for f in fields]
    with torch.no_grad():
        expected = t(torch.from_numpy(ids)).numpy()
    state = t.serving_state()
    assert t.serving_bytes() == state_nbytes(state)
    got = _numpy_lookup_radices(state, [f.num_embeddings for f in fields], ids, operation)
    np.testing.assert_array_equal(got, expected)
    assert got.shape == (128, 3, dim)


@pytest.mark.parametrize("k", [3, 4])
def test_partitions_are_complementary(k):
    fields = [Field("a", 11_000)]
    # at 1/3 of the smallest three-partition bytes, four partitions are needed
    budget = 2_000 if k == 3 else 1_000
    t = QRTable(fields=fields, dim=4, budget=budget, max_partitions=4)
    assert t.partitions == [k]
    x = np.arange(11_000)
    digits = _digits(t.radices[0], x)
    assert (digits < np.asarray(t.radices[0])).all()
    assert np.unique(digits, axis=0).shape[0] == 11_000
    # the most frequent ids each own a row of the last (remainder) digit
    assert np.unique(digits[: t.radices[0][-1], -1]).shape[0] == t.radices[0][-1]
    torch.manual_seed(0)
    with torch.no_grad():
        out = t.eval()(torch.from_numpy(x).unsqueeze(1))[:, 0]
    assert torch.unique(out, dim=0).shape[0] == 11_000


def test_mult_extra_partitions_start_like_quotient():
    torch.manual_seed(0)
    t = QRTable(fields=[Field("a", 11_000)], dim=16, budget=Ratio(100))
    w = {name: e.weight.detach() for name, e in t.weight_multi.items()}
    assert float(w["p3_0"].mean()) == pytest.approx(1.0, abs=0.01)
    assert float(w["p3_1"].mean()) == pytest.approx(1.0, abs=0.01)
    assert float(w["p3_2"].mean()) == pytest.approx(0.0, abs=0.01)
    assert len(t.sparse_parameters()) == 3


def test_budget_error_at_max_partitions():
    fields = [Field("a", 5000), Field("b", 11_000)]
    with pytest.raises(BudgetError, match="up to 3 complementary partitions"):
        QRTable(fields=fields, dim=16, budget=Ratio(200), max_partitions=3)
    t = QRTable(fields=fields, dim=16, budget=Ratio(200))  # default: up to 4
    assert max(t.partitions) > 3 and t.serving_bytes() <= t.full_bytes / 200
    with pytest.raises(ValueError, match="max_partitions"):
        QRTable(fields=fields, dim=16, budget=Ratio(10), max_partitions=1)
