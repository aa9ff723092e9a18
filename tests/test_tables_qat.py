"""INT8/INT16 quantization-aware training: byte arithmetic, the ratio ceiling, straight-through
gradients, and lookups reproduced from the exported codes alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.base import state_nbytes


def _fields() -> list[Field]:
    return [Field("a", 50), Field("b", 300), Field("c", 1000)]


def _ids(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.num_embeddings, (n,), generator=g) for f in _fields()], 1)


@pytest.mark.parametrize("method, code_bytes", [("int8-qat", 1), ("int16-qat", 2)])
def test_byte_arithmetic(method, code_bytes):
    n, d = 1350, 16
    t = build_table(method, fields=_fields(), dim=d, budget=Ratio(1.5))
    # codes and three per-field scales, plus meta/shapes: codes [n, d] and scale [3]
    assert t.serving_bytes() == n * d * code_bytes + 3 * 4 + 8 * 3 == state_nbytes(t.serving_state())
    r = build_table(method, fields=_fields(), dim=d, budget=Ratio(1.2), granularity="row")
    assert r.serving_bytes() == n * (d * code_bytes + 8) + 8 * 4 == state_nbytes(r.serving_state())
    assert t.serving_state()["codes"].dtype == (np.int8 if code_bytes == 1 else np.int16)


@pytest.mark.parametrize("method, ceiling", [("int8-qat", 4.0), ("int16-qat", 2.0)])
def test_ratio_ceiling_names_the_max(method, ceiling):
    t = build_table(method, fields=_fields(), dim=16, budget=Ratio(ceiling * 0.99))
    best = t.full_bytes / t.serving_bytes()
    assert ceiling * 0.99 < best < ceiling
    with pytest.raises(BudgetError, match=f"at most ratio {best:.3f}"):
        build_table(method, fields=_fields(), dim=16, budget=Ratio(ceiling * 1.01))
    with pytest.raises(BudgetError, match="granularity='row'"):
        build_table(method, fields=_fields(), dim=8, budget=Ratio(ceiling * 0.99), granularity="row")


@pytest.mark.parametrize("method", ["int8-qat", "int16-qat"])
@pytest.mark.parametrize("granularity", ["table", "row"])
def test_lookups_from_serving_state(method, granularity):
    torch.manual_seed(0)
    t = build_table(method, fields=_fields(), dim=8, budget=Ratio(1.3), granularity=granularity)
    with torch.no_grad():
        t.weight.weight.mul_(torch.linspace(0.5, 20, t.total_ids).unsqueeze(1))  # rows of very different ranges
    ids = _ids()
    t.eval()
    with torch.no_grad():
        got = t(ids).numpy()
    s = t.serving_state()
    offsets = np.cumsum([0] + [f.num_embeddings for f in _fields()])[:-1]
    rows = ids.numpy() + offsets
    codes = s["codes"].astype(np.float64)
    if granularity == "table":
        want = codes[rows] * s["scale"][np.arange(3)][None, :, None]
    else:
        want = codes[rows] * s["scale"][rows][..., None] + s["offset"][rows][..., None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_values_lie_on_the_grid_and_int16_is_finer():
    torch.manual_seed(0)
    errs = {}
    for method, qmax in (("int8-qat", 127), ("int16-qat", 32767)):
        torch.manual_seed(0)
        t = build_table(method, fields=_fields(), dim=8, budget=Ratio(1.5))
        ids = _ids()
        out = t(ids).detach()
        scale = t.field_scales()
        steps = out / scale[None, :, None]
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= qmax
        errs[method] = (out - t.weight(t.global_ids(ids)).detach()).abs().max().item()
    assert 0 < errs["int16-qat"] < errs["int8-qat"] / 100


def test_straight_through_gradient():
    torch.manual_seed(0)
    t = build_table("int8-qat", fields=_fields(), dim=8, budget=Ratio(3))
    ids = torch.tensor([[1, 2, 3], [1, 5, 3]])
    t(ids).sum().backward()
    g = t.weight.weight.grad.coalesce().to_dense()
    want = torch.zeros_like(g)
    for row in t.global_ids(ids).reshape(-1):
        want[row] += 1.0  # d sum / d w = 1 through the rounding
    assert torch.equal(g, want)


def test_scales_follow_updates():
    torch.manual_seed(0)
    t = build_table("int8-qat", fields=_fields(), dim=8, budget=Ratio(3))
    before = t.field_scales().clone()
    with torch.no_grad():
        t.weight.weight[0, 0] = 5.0  # field "a"
    after = t.field_scales()
    assert after[0] == pytest.approx(5.0 / 127) and torch.equal(after[1:], before[1:])


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity"):
        build_table("int8-qat", fields=_fields(), dim=8, budget=Ratio(2), granularity="block")
