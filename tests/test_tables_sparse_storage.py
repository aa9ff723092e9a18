"""The shared sparse serving layouts: exact byte counts, capacity at the budget, round trips."""

from __future__ import annotations

import numpy as np
import torch

from embpress.tables.base import state_nbytes
from embpress.tables.sparse_storage import (
    ROW_GROUP,
    block_columns_bytes,
    block_columns_decode,
    block_columns_encode,
    csr_bytes,
    csr_capacity,
    csr_decode,
    csr_encode,
    keep_top,
)


def test_csr_round_trip_and_bytes():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((300, 16)).astype(np.float32)
    mask = rng.random((300, 16)) < 0.2
    state = csr_encode(values, mask)
    assert state_nbytes(state) == csr_bytes(300, 16, int(mask.sum()))
    assert state["indices"].dtype == np.uint8 and state["row_len"].dtype == np.uint8
    assert state["group_ptr"].dtype == np.uint16 and state["group_ptr"].shape == (-(-300 // ROW_GROUP) + 1,)
    rows = np.arange(300)  # every row: first, last and middle of each group, and the short last group
    np.testing.assert_array_equal(csr_decode(state, rows, 16), np.where(mask, values, 0)[rows])
    wide = csr_encode(np.ones((3, 300), np.float32), np.ones((3, 300), bool))
    assert wide["indices"].dtype == np.uint16 and wide["row_len"].dtype == np.uint16
    assert wide["group_ptr"].dtype == np.uint16 and wide["group_ptr"].tolist() == [0, 900]
    empty = csr_encode(np.ones((130, 4), np.float32), np.zeros((130, 4), bool))
    assert state_nbytes(empty) == csr_bytes(130, 4, 0)
    np.testing.assert_array_equal(csr_decode(empty, np.array([0, 129]), 4), np.zeros((2, 4), np.float32))


def test_csr_capacity_is_the_most_that_fits():
    for rows, dim, budget in [(100, 16, 1702), (5000, 8, 40_000), (70_000, 4, 600_000), (10, 4, 11), (10, 4, 300)]:
        n = csr_capacity(rows, dim, budget)
        if n is None:
            assert csr_bytes(rows, dim, 0) > budget
            continue
        assert csr_bytes(rows, dim, n) <= budget
        assert n == rows * dim or csr_bytes(rows, dim, n + 1) > budget
    assert csr_capacity(10, 4, 300) == 40  # everything fits


def test_keep_top_exact_count():
    score = torch.tensor([[3.0, -1.0, 2.0], [5.0, 0.0, 2.0]])
    assert keep_top(score, 2).tolist() == [[True, False, False], [True, False, False]]
    assert keep_top(score, 0).sum() == 0 and keep_top(score, 99).all()
    assert int(keep_top(torch.zeros(50, 4), 17).sum()) == 17  # ties still give exactly k


def test_block_columns_round_trip_and_bytes():
    rng = np.random.default_rng(1)
    sizes = [5, 12]
    weight = rng.standard_normal((17, 8)).astype(np.float32)
    bounds = np.array([[0, 2, 5, 5], [0, 3, 9, 12]])
    kept = np.zeros((3, 8), bool)
    kept[0] = True
    kept[1, [1, 6]] = True
    state = block_columns_encode(weight, [0, sizes[0]], bounds, kept)
    rows_per_block = (bounds[:, 1:] - bounds[:, :-1]).sum(0)
    assert state_nbytes(state) == block_columns_bytes(rows_per_block.tolist(), kept.sum(1).tolist(), 2, 12, 8)
    for f, off in enumerate([0, 5]):
        ids = np.arange(sizes[f])
        block = np.searchsorted(bounds[f], ids, side="right") - 1
        want = np.where(kept[block], weight[off + ids], 0)
        np.testing.assert_array_equal(block_columns_decode(state, f, ids, 8), want)
