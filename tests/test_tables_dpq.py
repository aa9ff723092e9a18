"""DPQ invariants: code/codebook byte arithmetic, sizing by the budget, straight-through training
(vq and sx), and lookups reproduced from the packed codes and codebook alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.base import state_nbytes
from embpress.tables.mgqe import unpack_codes


def _fields() -> list[Field]:
    return [Field("a", 30), Field("b", 3000)]


def test_study_configuration_bytes():
    t = build_table("dpq", fields=_fields(), dim=16, budget=Ratio(4), parts=8, choices=32)
    n = 3030
    assert (t.parts_, t.choices_) == (8, 32)
    shapes = 8 * 4  # meta/shapes: codes [bytes], codebook [8, 32, 2]
    assert t.serving_bytes() == (n * 8 * 5 + 7) // 8 + 32 * 16 * 4 + shapes == state_nbytes(t.serving_state())
    state = t.serving_state()
    assert state["codes"].dtype == np.uint8 and state["codebook"].shape == (8, 32, 2)


def test_sizing_maximizes_code_bits_within_budget():
    for ratio in (2, 4, 8, 16, 32):
        t = build_table("dpq", fields=_fields(), dim=16, budget=Ratio(ratio))
        assert t.serving_bytes() <= t.max_bytes
        bits = t.parts_ * int(np.log2(t.choices_))
        for p in (1, 2, 4, 8):  # no other configuration with more bits fits
            for k in (2**b for b in range(1, 9)):
                if p * int(np.log2(k)) > bits:
                    assert t._bytes(p, k) > t.max_bytes
    with pytest.raises(BudgetError, match="smallest configuration"):
        build_table("dpq", fields=_fields(), dim=16, budget=Ratio(500))
    with pytest.raises(BudgetError):
        build_table("dpq", fields=_fields(), dim=16, budget=Ratio(6), parts=8, choices=256)
    with pytest.raises(ValueError, match="divisor"):
        build_table("dpq", fields=_fields(), dim=16, budget=Ratio(4), parts=3)


@pytest.mark.parametrize("mode", ["vq", "sx"])
def test_lookups_from_serving_state(mode):
    torch.manual_seed(0)
    t = build_table("dpq", fields=_fields(), dim=8, budget=Ratio(4), mode=mode)
    ids = torch.tensor([[0, 0], [29, 2999], [5, 17], [5, 17]])
    for _ in range(3):  # a few training lookups move the batch-norm statistics
        t.train()
        t(torch.randint(0, 30, (64, 2))).sum().backward()
    t.eval()
    with torch.no_grad():
        got = t(ids).numpy()
    s = t.serving_state()
    p, k, pd = s["codebook"].shape
    codes = unpack_codes(s["codes"], int(np.log2(k)), t.total_ids * p).reshape(t.total_ids, p)
    rows = ids.numpy() + np.array([0, 30])
    want = s["codebook"][np.arange(p), codes[rows]].reshape(*rows.shape, p * pd)
    np.testing.assert_array_equal(got, want)


def test_vq_forward_is_the_nearest_centroid_with_straight_through_gradient():
    torch.manual_seed(0)
    t = build_table("dpq", fields=_fields(), dim=8, budget=Ratio(4), parts=4, choices=16, batch_norm=False)
    ids = torch.tensor([[1, 2], [3, 4], [1, 9]])
    out = t(ids)
    rows = t.global_ids(ids).reshape(-1)
    q = t.query.weight.detach()[rows].reshape(-1, 4, 1, 2)
    nearest = (q - t.keys.detach().unsqueeze(0)).square().sum(-1).argmin(-1)  # [6, P]
    centroids = t.keys.detach()[torch.arange(4), nearest].reshape(out.shape)
    assert torch.allclose(out, centroids)
    loss = out.sum() + t.regularizer()
    loss.backward()
    g = t.query.weight.grad.coalesce().to_dense()
    assert torch.all(g[rows] != 0)  # straight-through to the queries
    assert t.keys.grad is not None and t.keys.grad.abs().sum() > 0  # the regularizer moves the centroids
    assert t.regularizer() is None  # consumed once per step


def test_sx_gradient_reaches_keys_values_and_queries():
    torch.manual_seed(0)
    t = build_table("dpq", fields=_fields(), dim=8, budget=Ratio(4), mode="sx")
    assert t.values is not t.keys
    t(torch.tensor([[1, 2], [3, 4], [5, 6]])).square().sum().backward()
    assert t.keys.grad.abs().sum() > 0 and t.values.grad.abs().sum() > 0
    assert t.query.weight.grad.coalesce().values().abs().sum() > 0


def test_eval_codes_follow_the_weights():
    torch.manual_seed(0)
    t = build_table("dpq", fields=_fields(), dim=8, budget=Ratio(4), batch_norm=False)
    t.eval()
    ids = torch.tensor([[3, 3]])
    with torch.no_grad():
        before = t(ids).clone()
        t.query.weight[3] = t.keys[:, 5].reshape(-1)  # query 3 sits on centroid 5 of every part
        after = t(ids)
    assert torch.allclose(after[0, 0], t.keys[:, 5].reshape(-1)) and not torch.equal(before, after)
