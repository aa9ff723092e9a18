"""The stage contract the trainer runs without knowing the method: per-step hooks with the step
counts, a stop condition, and parameter groups with their own optimiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embpress.data import SyntheticConfig, make_synthetic
from embpress.models import build_model
from embpress.tables import Field, ParamGroup, Stage, StageContext, build_table
from embpress.tables.full import FullTable
from embpress.train import TrainConfig, train


@pytest.fixture(scope="module")
def data():
    return make_synthetic(SyntheticConfig(rows=3000, num_dense=1, num_fields=2, min_cardinality=20,
                                          max_cardinality=100, seed=1))


class _Scripted(FullTable):
    """A full table whose stages record what the trainer passes them (test only, not registered)."""

    def __init__(self, *, fields, dim, budget=None, stages=()):
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.scale = nn.Parameter(torch.ones(1))
        self._stages = list(stages)
        self.seen: list[tuple[str, int, int, int]] = []

    def _lookup(self, ids):
        return super()._lookup(ids) * self.scale

    def record(self, ctx: StageContext) -> None:
        self.seen.append((ctx.table.method, ctx.step, ctx.total_steps, ctx.steps_per_epoch))

    def stages(self):
        return self._stages


def _fit(data, table, **cfg):
    torch.manual_seed(0)
    model = build_model("dlrm", table=table, num_dense=1, bottom=(4,), top=(4,))
    config = TrainConfig(**{"epochs": 1, "batch_size": 256, "progress": False, "max_steps_per_epoch": 5, **cfg})
    return train(model, data, config)


def test_on_step_sees_every_step_and_the_plan(data):
    t = _Scripted(fields=data.fields, dim=4)
    t._stages = [Stage("a", epochs=2, early_stopping=False, on_step=t.record)]
    _fit(data, t)
    assert [s[1] for s in t.seen] == list(range(1, 11))
    assert {s[2:] for s in t.seen} == {(10, 5)}


def test_stop_ends_the_stage_where_it_says(data):
    t = _Scripted(fields=data.fields, dim=4)
    t._stages = [Stage("a", epochs=3, on_step=t.record, stop=lambda ctx: ctx.step == 4),
                 Stage("b", epochs=1, early_stopping=False)]
    res = _fit(data, t)
    assert [s[1] for s in t.seen] == [1, 2, 3, 4]
    assert res.stages[0].samples == 4 * 256 and res.stages[1].samples == 5 * 256
    assert any(h.get("stopped") for h in res.history)


def test_context_carries_the_training_config(data):
    got = []
    t = _Scripted(fields=data.fields, dim=4)
    t._stages = [Stage("a", epochs=1, before=lambda ctx: got.append((ctx.config.lr, ctx.batch_size, ctx.train_rows)))]
    _fit(data, t, lr=1e-2)
    assert got == [(1e-2, 256, len(data.train))]


def test_param_group_gets_its_own_optimiser(data):
    """Plain SGD at lr 0.5 on ``scale``: its change is exactly -0.5 * the sum of its gradients,
    which Adam (the default) would not give; the other parameters still train."""
    t = _Scripted(fields=data.fields, dim=4)
    grads = []
    t.scale.register_hook(lambda g: grads.append(g.clone()))
    t._stages = [Stage("a", epochs=1, early_stopping=False,
                       groups=lambda: [ParamGroup("scale", [t.scale], optimizer="sgd", lr=0.5)])]
    w0 = t.weight.weight.detach().clone()
    _fit(data, t)
    assert len(grads) == 5
    want = 1.0 - 0.5 * torch.stack(grads).sum()
    assert torch.allclose(t.scale.detach(), want.reshape(1), atol=1e-6)
    assert not torch.equal(t.weight.weight, w0)


def test_param_group_errors(data):
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ParamGroup("x", [], optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        ParamGroup("x", [], lr=-1.0)
    t = _Scripted(fields=data.fields, dim=4)
    t._stages = [Stage("a", epochs=1, groups=lambda: [ParamGroup("p", [t.scale]), ParamGroup("q", [t.scale])])]
    with pytest.raises(ValueError, match="parameter groups 'p' and 'q'"):
        _fit(data, t)


def test_quantized_wrapper_forwards_the_hooks():
    """``METHOD+int8`` runs the inner method's per-step hooks with the inner table as ``ctx.table``."""
    t = build_table("deeplight+int8", fields=[Field("a", 500), Field("b", 300)], dim=4, budget="10x")
    prune = next(s for s in t.stages() if s.name == "prune")
    assert prune.on_step is not None
