"""Post-training row-wise int8/int16 quantization: error bound, budgets that multiply, stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.models import build_model
from embpress.tables import (
    BudgetError,
    Field,
    FullTable,
    Int8Table,
    PostTrainingQuantized,
    Ratio,
    Stage,
    build_table,
)
from embpress.tables import base as tables_base
from embpress.tables.base import state_nbytes
from embpress.tables.quant import dequantize_rows, quantize_rows
from embpress.train import TrainConfig, evaluate, train


def _fields():
    return [Field("small", 7), Field("mid", 300), Field("large", 5000)]


@pytest.mark.parametrize("bits", [8, 16])
def test_row_error_is_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=g) * torch.logspace(-4, 2, 200)[:, None]
    x[3] = 0.25                                                       # constant row: exact
    codes, scale, offset = quantize_rows(x, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    err = (x - dequantize_rows(codes, scale, offset)).abs()
    bound = scale[:, None] / 2 + 1e-6 * x.abs().amax(1, keepdim=True)  # + fp32 rounding
    assert bool((err <= bound).all())
    assert float(err[3].max()) == 0.0 and float(scale[3]) == 0.0
    assert torch.equal(offset, x.min(1).values) and (codes.max(1).values == 2**bits - 1)[scale > 0].all()


def test_int8_bytes_per_row_and_max_ratio():
    t = Int8Table(fields=_fields(), dim=16, budget=Ratio(2.5))
    # codes, a scale and an offset per row, and the metadata: "full" and "int8" (8 bytes of length and
    # the text each), the quantized parameter's name (8 + 13) and shape (2 x 8)
    # and the stored arrays' shapes (meta/shapes: codes [rows, 16], scale and offset [rows]: 4 x 8)
    assert t.serving_bytes() == 5307 * (16 + 8) + 61 + 32 == state_nbytes(t.serving_state())
    with pytest.raises(BudgetError, match=r"int8 reaches at most ratio 2.66 at dim 16"):
        Int8Table(fields=_fields(), dim=16, budget=Ratio(3))
    with pytest.raises(BudgetError, match=r"int16 reaches at most ratio 1.33 at dim 8"):
        build_table("int16", fields=_fields(), dim=8, budget=Ratio(2))


def test_quantize_writes_dequantized_weights_and_freezes():
    torch.manual_seed(0)
    t = Int8Table(fields=_fields(), dim=8, budget=Ratio(1.99))  # 2x exactly leaves no room for the metadata
    w = t.inner.weight.weight.detach().clone()
    before = t.serving_state()                        # computed on the fly
    t.quantize()
    after = t.serving_state()                         # stored codes
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert after["weight.weight.codes"].dtype == np.uint8
    assert after["weight.weight.scale"].dtype == after["weight.weight.offset"].dtype == np.float32
    deq = after["weight.weight.codes"] * after["weight.weight.scale"][:, None] + after["weight.weight.offset"][:, None]
    np.testing.assert_array_equal(t.inner.weight.weight.detach().numpy(), deq)
    assert (np.abs(w.numpy() - deq) <= after["weight.weight.scale"][:, None] / 2 + 1e-7).all()
    assert not any(p.requires_grad for p in t.parameters())
    t.codes_ = None                                   # e.g. reloaded from a checkpoint: re-quantizing
    for k, v in t.serving_state().items():            # the dequantized weights gives the same codes
        np.testing.assert_allclose(v, after[k], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(t.serving_state()["weight.weight.codes"], after["weight.weight.codes"])
    ids = torch.tensor([[0, 1, 2], [6, 299, 4999]])
    with torch.no_grad():
        np.testing.assert_array_equal(t.eval()(ids).numpy(), deq[ids.numpy() + np.array([0, 7, 307])])


@pytest.mark.parametrize("spec", ["hash+int8", "qr+int8", "unified+int8", "qr+int16", "noid+int8"])
def test_wrapped_methods_fit_and_state_matches(spec):
    t = build_table(spec, fields=_fields(), dim=16, budget=Ratio(8))
    assert t.method == spec and isinstance(t, PostTrainingQuantized)
    assert t.serving_bytes() == state_nbytes(t.serving_state()) <= t.full_bytes / 8
    inner_floats = {k for k, v in t.inner.serving_state().items() if np.issubdtype(v.dtype, np.floating)}
    assert not inner_floats & set(t.serving_state())          # every float array was replaced by codes


def test_qr_int8_ratios_multiply():
    fields = [Field("a", 50), Field("b", 20_000), Field("c", 100_000)]
    t = build_table("qr+int8", fields=fields, dim=32, budget=Ratio(30))
    inner_ratio = t.full_bytes / t.inner.serving_bytes()
    quant_gain = t.inner.serving_bytes() / t.serving_bytes()
    assert 3.0 < quant_gain < 3.3                             # 128 / (32 + 8) per row, less the moduli
    assert 9.0 < inner_ratio < 10.0                           # the inner Q-R table is only ~30 / 3.2
    assert t.full_bytes / t.serving_bytes() >= 30
    assert t.serving_bytes() > 0.9 * t.max_bytes              # the budget is used, not wasted


def test_inner_built_once_from_the_same_seed():
    torch.manual_seed(7)
    t = build_table("qr+int8", fields=_fields(), dim=8, budget=Ratio(6), operation="concat")
    torch.manual_seed(7)
    q = build_table("qr", fields=_fields(), dim=8, budget=t.inner_budget, operation="concat")
    assert t.inner.operation == "concat" and t.inner.moduli == q.moduli
    for (n, a), (_, b) in zip(t.inner.named_parameters(), q.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_stages_are_inner_stages_then_quantize(monkeypatch):
    seen = []

    class TwoStage(FullTable):
        reference = False

        def stages(self):
            return [Stage("warmup", epochs=1, before=lambda ctx: seen.append(ctx.table)), Stage("train")]

    monkeypatch.setitem(tables_base._TABLES, "twostage", TwoStage)
    t = build_table("twostage+int8", fields=_fields(), dim=8, budget=Ratio(1.99))
    stages = t.stages()
    assert [s.name for s in stages] == ["warmup", "train", "quantize"]
    assert [s.epochs for s in stages] == [1, None, 0]
    stages[0].before(tables_base.StageContext(model=None, table=t, evaluate=lambda: 0.5, train_batches=list,
                                              valid_batches=list, generator=torch.Generator()))
    assert seen == [t.inner]                                  # inner hooks see the inner table
    assert [s.name for s in build_table("qr+int8", fields=_fields(), dim=8, budget=Ratio(4)).stages()] == [
        "train", "quantize"]


def test_spec_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"suffix 'int3' not understood; use one of \['int16', 'int8'\]"):
        build_table("qr+int3", fields=_fields(), dim=8, budget=Ratio(4))
    with pytest.raises(ValueError, match="already quantized"):
        build_table("int8+int8", fields=_fields(), dim=8, budget=Ratio(2))
    with pytest.raises(ValueError, match="METHOD or METHOD"):
        build_table("qr+int8+int8", fields=_fields(), dim=8, budget=Ratio(4))
    with pytest.raises(ValueError, match="unknown table method 'nope'"):
        build_table("nope+int8", fields=_fields(), dim=8, budget=Ratio(4))
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_table("qr+int8", fields=_fields(), dim=8, budget=Ratio(4), chunks=2)
    with pytest.raises(BudgetError, match="qr\\+int8: the inner 'qr' cannot fit"):
        build_table("qr+int8", fields=_fields(), dim=8, budget=64)

    class HalfServed(FullTable):
        """Serves its weight in fp16 plus an extra float vector: not its parameters as stored."""

        def serving_arrays(self):
            return {"weight": super().serving_arrays()["weight"], "norms": np.ones(3, np.float32)}

    monkeypatch.setitem(tables_base._TABLES, "halfserved", HalfServed)
    with pytest.raises(ValueError, match="does not serve its parameters as stored.*no served lookup"):
        build_table("halfserved+int8", fields=_fields(), dim=8, budget=Ratio(1.5))


def test_training_runs_quantize_stage_last(tiny_ctr):
    torch.manual_seed(0)
    table = build_table("qr+int8", fields=tiny_ctr.fields, dim=8, budget=Ratio(8))
    model = build_model("dlrm", table=table, num_dense=tiny_ctr.num_dense, bottom=(16,), top=(32,))
    res = train(model, tiny_ctr, TrainConfig(epochs=1, batch_size=256, max_steps_per_epoch=20, progress=False))
    assert [s.name for s in res.stages] == ["train", "quantize"] and table.codes_ is not None
    assert res.test_auc == pytest.approx(evaluate(model, tiny_ctr.test)[0])
    state = table.serving_state()
    for name, p in table.inner.named_parameters():
        deq = state[f"{name}.codes"] * state[f"{name}.scale"][:, None] + state[f"{name}.offset"][:, None]
        np.testing.assert_array_equal(p.detach().numpy(), deq)
        assert not p.requires_grad
