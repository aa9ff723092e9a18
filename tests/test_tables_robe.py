"""ROBE: one shared circular array, each vector read as Z blocks at hashed offsets with hashed signs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.hashing import PRIME


def _uhash(a: int, b: int, x: int, m: int) -> int:
    return ((int(a) * (int(x) % PRIME) + int(b)) % PRIME) % m


def _numpy_lookup(state: dict[str, np.ndarray], ids: np.ndarray, dim: int) -> np.ndarray:
    """Serve lookups from the exported arrays alone."""
    array, m = state["array"], len(state["array"])
    blocks = state["offset_a"].shape[1]
    length = dim // blocks
    out = np.zeros((*ids.shape, dim), np.float32)
    for n, row in enumerate(ids):
        for f, x in enumerate(row):
            for j in range(blocks):
                start = _uhash(state["offset_a"][f, j], state["offset_b"][f, j], x, m)
                out[n, f, j * length:(j + 1) * length] = array[(start + np.arange(length)) % m]
            if "sign_a" in state:
                words = [_uhash(state["sign_a"][f, w], state["sign_b"][f, w], x, PRIME) for w in range(-(-dim // 16))]
                out[n, f] *= [2 * ((words[i // 16] >> (i % 16)) & 1) - 1 for i in range(dim)]
    return out


@pytest.mark.parametrize("blocks, signs", [(1, True), (2, True), (4, False)])
def test_serving_state_reproduces_forward(small_fields, blocks, signs):
    torch.manual_seed(0)
    t = build_table("robe", fields=small_fields, dim=8, budget=Ratio(4), blocks=blocks, signs=signs)
    ids = torch.tensor([[0, 0, 0], [6, 299, 4999], [3, 17, 1234]])
    np.testing.assert_array_equal(t(ids).detach().numpy(), _numpy_lookup(t.serving_state(), ids.numpy(), 8))


def test_budget_arithmetic(small_fields):
    t = build_table("robe", fields=small_fields, dim=8, budget=Ratio(4))
    coeffs = 2 * 8 * len(small_fields) * (1 + 1)          # (a, b) per (field, block) and per (field, 16 signs)
    shapes = 8 * 9  # meta/shapes: array [S] and four [F, n] coefficient arrays
    assert t.array_size == (t.full_bytes // 4 - coeffs - shapes) // 4 // 8 * 8  # whole chunks of L = 8 floats
    assert t.serving_bytes() == t.array_size * 4 + coeffs + shapes <= t.full_bytes // 4
    no_signs = build_table("robe", fields=small_fields, dim=8, budget=Ratio(4), signs=False)
    assert no_signs.array_size == (t.full_bytes // 4 - 2 * 8 * len(small_fields) - 8 * 5) // 4 // 8 * 8
    z4 = build_table("robe", fields=small_fields, dim=8, budget=Ratio(4), blocks=4)  # chunks of L = 2 floats
    assert z4.array_size == (t.full_bytes // 4 - 2 * 8 * len(small_fields) * (4 + 1) - shapes) // 4 // 2 * 2


def test_blocks_wrap_around_the_end_of_the_array(small_fields):
    t = build_table("robe", fields=small_fields, dim=8, budget=Ratio(4), signs=False)
    m = t.array_size
    with torch.no_grad():
        t.offset_a.zero_()
        t.offset_b.fill_(m - 3)                              # every block starts 3 elements before the end
    expect = t.weight.weight.reshape(-1)[torch.tensor([m - 3, m - 2, m - 1, 0, 1, 2, 3, 4])]
    assert torch.equal(t(torch.tensor([[1, 2, 3]]))[0, 0], expect)


def test_blocks_are_contiguous_and_independently_placed(small_fields):
    t = build_table("robe", fields=small_fields, dim=8, budget=Ratio(4), blocks=2)
    pos = t.positions(torch.stack([torch.zeros(300, dtype=torch.long), torch.arange(300),
                                   torch.arange(300)], 1))
    step = (pos[..., 1:4] - pos[..., 0:3]) % t.array_size
    assert (step == 1).all() and ((pos[..., 5:8] - pos[..., 4:7]) % t.array_size == 1).all()
    starts = pos[:, 1, [0, 4]]
    assert (starts[:, 0] != starts[:, 1]).float().mean() > 0.95


def test_signs_are_balanced_and_gradients_touch_only_read_positions(small_fields):
    t = build_table("robe", fields=small_fields, dim=8, budget=Ratio(4))
    s = t.sign_of(torch.arange(5000).reshape(-1, 1).expand(-1, 3).clamp(max=torch.tensor([6, 299, 4999])))[:, 2]
    assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.05
    ids = torch.tensor([[1, 2, 3]])
    t(ids).sum().backward()
    grad = t.weight.weight.grad.coalesce().to_dense().reshape(-1)
    read = set(t.positions(ids).flatten().tolist())
    assert set(grad.nonzero().flatten().tolist()) <= read    # only the floats read get a gradient
    assert len(t.weight.weight.grad.coalesce().indices()[0]) <= 2 * 3  # two chunk rows per (id, block)


def test_bad_hparams_and_budget(small_fields):
    with pytest.raises(ValueError, match="divisor"):
        build_table("robe", fields=small_fields, dim=8, budget=Ratio(4), blocks=3)
    with pytest.raises(BudgetError, match="robe"):
        build_table("robe", fields=small_fields, dim=8, budget=100)


@pytest.mark.parametrize("ratio", [10, 100])
def test_high_ratios_on_large_fields(ratio):
    fields = [Field("user", 200_000), Field("item", 50_000), Field("site", 30)]
    t = build_table("robe", fields=fields, dim=16, budget=Ratio(ratio))
    assert t.serving_bytes() <= t.full_bytes / ratio
    assert t.array_size > 0.99 * t.full_bytes / ratio / 4
    assert t(torch.tensor([[199_999, 0, 29]])).shape == (1, 3, 16)
