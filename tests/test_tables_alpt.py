"""ALPT invariants: low-precision storage (no fp32 rows), budget-driven bit width, unbiased
stochastic rounding, the in-table row update with LSQ step-size gradients, exact exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.models import build_model
from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.alpt import ALPTTable, stochastic_round
from embpress.tables.base import state_nbytes
from embpress.tables.mgqe import unpack_codes
from embpress.train import TrainConfig, train


def _fields() -> list[Field]:
    return [Field("a", 40), Field("b", 500)]


@pytest.mark.parametrize("ratio, bits", [(2.0, 8), (2.7, 7), (3.97, 4), (3.98, 3), (5.29, 2)])
def test_budget_picks_bits(ratio, bits):
    t = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(ratio))
    assert t.bits_ == bits
    n = 540
    # codes, step sizes, the bit width and the two arrays' lengths (24 bytes of metadata: at ratio 4.0
    # the 4-bit codes no longer fit)
    assert t.serving_bytes() == (n * 8 * bits + 7) // 8 + 4 * n + 8 + 16 == state_nbytes(t.serving_state())
    assert t.serving_bytes() <= t.max_bytes


def test_budget_errors_name_the_max_ratio():
    with pytest.raises(BudgetError, match=r"at most ratio 5\.29 at dim 8 with 2-bit"):
        build_table("alpt", fields=_fields(), dim=8, budget=Ratio(6))
    with pytest.raises(BudgetError, match="8-bit codes"):
        build_table("alpt", fields=_fields(), dim=8, budget=Ratio(4), bits=8)
    with pytest.raises(ValueError, match="bits"):
        build_table("alpt", fields=_fields(), dim=8, budget=Ratio(2), bits=1)


def test_stored_at_low_precision():
    t = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(4))
    assert t.codes.dtype == torch.int8 and t.codes.shape == (540, 8)
    assert int(t.codes.min()) >= -8 and int(t.codes.max()) <= 7
    params = dict(t.named_parameters())
    assert list(params) == ["log_step.weight"] and params["log_step.weight"].shape == (540, 1)
    t16 = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(1.5), bits=12)
    assert t16.codes.dtype == torch.int16


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 2.3)
    r = stochastic_round(x, g)
    assert set(r.unique().tolist()) == {2.0, 3.0}
    assert r.mean().item() == pytest.approx(2.3, abs=0.005)


def test_lookups_from_serving_state():
    torch.manual_seed(0)
    t = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(4))
    _one_step(t, torch.tensor([[1, 2], [3, 499]]))
    ids = torch.tensor([[0, 0], [1, 2], [39, 499], [3, 7]])
    t.eval()
    with torch.no_grad():
        got = t(ids).numpy()
    s = t.serving_state()
    codes = unpack_codes(s["codes"], t.bits_, 540 * 8).reshape(540, 8) - 2 ** (t.bits_ - 1)
    rows = ids.numpy() + np.array([0, 40])
    np.testing.assert_allclose(got, codes[rows] * s["step"][rows][..., None], rtol=1e-6)


def _one_step(t: ALPTTable, ids: torch.Tensor) -> torch.Tensor:
    t.train()
    out = t(ids)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grad = t.log_step.weight.grad
    t.log_step.weight.grad = None
    return grad


def test_row_update_touches_only_the_batch_rows():
    torch.manual_seed(0)
    t = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(2), lr=0.05)
    before = t.codes.clone()
    grad = _one_step(t, torch.tensor([[1, 2], [3, 2]]))
    touched = sorted(grad.coalesce().indices()[0].tolist())
    assert touched == [1, 3, 42]  # global rows: field b starts at 40
    t.flush()
    changed = (t.codes != before).any(1).nonzero().reshape(-1).tolist()
    assert changed and set(changed) <= {1, 3, 42}


def test_update_waits_for_the_step_size_then_uses_it():
    torch.manual_seed(0)
    t = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(2), lr=0.01, optimizer="sgd")
    t.train()
    ids = torch.tensor([[5, 7]])
    w = t(ids).detach().clone()
    (t(ids) * 1.0).sum().backward()  # grad 1 everywhere: w' = w - lr
    assert t._pending is not None
    with torch.no_grad():
        t.log_step.weight[5] = np.log(0.001)  # what the trainer's step-size update would do
    t.flush()
    t.eval()
    got = t(ids)[0, 0]
    assert torch.allclose(got, (w[0, 0] - 0.01).clamp(-0.128, 0.127), atol=0.001 + 1e-6)


def test_lsq_gradient_grows_the_range_when_clipped():
    torch.manual_seed(0)
    t = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(2), lr=0.01, optimizer="sgd")
    with torch.no_grad():
        t.codes[0] = t.q_p  # row 0 at the top of its range
    t.train()
    (-t(torch.tensor([[0, 0]]))[0, 0]).sum().backward()  # the loss wants row 0 larger still
    g = t.log_step.weight.grad.coalesce().to_dense()
    assert g[0].item() < 0 and g[40].item() == 0  # descent increases row 0's step size only


def test_state_dict_holds_the_update_and_load_drops_pending():
    torch.manual_seed(0)
    t = build_table("alpt", fields=_fields(), dim=8, budget=Ratio(2), lr=0.05)
    before = t.codes.clone()
    _one_step(t, torch.tensor([[1, 2]]))
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    assert t._pending is None and not torch.equal(sd["codes"], before)
    _one_step(t, torch.tensor([[3, 4]]))
    t.load_state_dict(sd)
    assert t._pending is None and torch.equal(t.codes, sd["codes"])


def test_trains_in_the_trainer():
    from embpress.data import SyntheticConfig, make_synthetic

    data = make_synthetic(SyntheticConfig(rows=2000, num_dense=1, num_fields=2, min_cardinality=20,
                                          max_cardinality=200, seed=3))
    torch.manual_seed(0)
    t = build_table("alpt", fields=data.fields, dim=8, budget=Ratio(4))
    start_codes, start_steps = t.codes.clone(), t.step_sizes().clone()
    model = build_model("dlrm", table=t, num_dense=1, bottom=(8,), top=(8,))
    train(model, data, TrainConfig(epochs=1, batch_size=128, progress=False, max_steps_per_epoch=6))
    assert not torch.equal(t.codes, start_codes) and not torch.equal(t.step_sizes(), start_steps)
    assert t.codes.dtype == torch.int8
