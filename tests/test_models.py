"""Every registered CTR head: shapes, gradients, input checks, and learning the tiny task."""

from __future__ import annotations

import pytest
import torch

from embpress.models import build_model, registered_models
from embpress.tables import Field, build_table
from embpress.train import TrainConfig, train

HEADS = registered_models()

# Small towers keep the learning test fast (a head not listed runs with its defaults); the
# defaults are exercised by the shape, gradient and input tests.
SMALL = {
    "dlrm": {"bottom": (16,), "top": (32,)},
    "dcn": {"cross_layers": 2, "deep": (32,)},
    "wdl": {"deep": (32,)},
    "deepfm": {"deep": (32,)},
}

FIELDS = [Field("a", 10), Field("b", 50), Field("c", 7)]


def _model(head, fields=FIELDS, dim=8, num_dense=3, method="full", **hparams):
    torch.manual_seed(0)
    table = build_table(method, fields=fields, dim=dim)
    return build_model(head, table=table, num_dense=num_dense, **hparams)


def _batch(b=5, num_dense=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, f.num_embeddings, (b,), generator=g) for f in FIELDS], 1)
    return torch.randn(b, num_dense, generator=g), ids


def test_all_heads_are_covered():
    assert set(HEADS) >= {"dlrm", "dcn", "wdl", "deepfm"}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("num_dense", [0, 3])
def test_logit_shape(head, num_dense):
    model = _model(head, num_dense=num_dense)
    dense, ids = _batch(num_dense=num_dense)
    out = model(dense, ids)
    assert out.shape == (5,) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("head", HEADS)
def test_gradients_reach_table_and_head(head):
    model = _model(head)
    dense, ids = _batch()
    model(dense, ids).sum().backward()
    g = model.table.weight.weight.grad
    assert g is not None and g.coalesce().values().abs().sum() > 0
    head_grads = [p.grad for p in model.head_parameters()]
    assert head_grads and all(gr is not None for gr in head_grads)
    assert any(float(gr.abs().sum()) > 0 for gr in head_grads)


@pytest.mark.parametrize("head", HEADS)
def test_bad_dense_shape_raises(head):
    model = _model(head)
    _, ids = _batch()
    with pytest.raises(ValueError, match=r"dense must have shape \[B, 3\]"):
        model(torch.zeros(5, 4), ids)
    with pytest.raises(ValueError, match="dense must have shape"):
        model(torch.zeros(5), ids)


def test_unknown_head_hparam():
    table = build_table("full", fields=FIELDS, dim=8)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_model("wdl", table=table, num_dense=0, bogus=1)


def test_deepfm_needs_two_dims():
    with pytest.raises(ValueError, match="dim >= 2"):
        _model("deepfm", dim=1)


def test_deepfm_first_order_and_pairwise_terms():
    """With the deep tower zeroed, DeepFM is exactly an FM over (e[..., 0], e[..., 1:])."""
    model = _model("deepfm", num_dense=0)
    last = model.deep[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    dense, ids = _batch(num_dense=0)
    e = model.table(ids)
    v = e[:, :, 1:]
    pairwise = sum((v[:, i] * v[:, j]).sum(1) for i in range(3) for j in range(i + 1, 3))
    assert torch.allclose(model(dense, ids), e[:, :, 0].sum(1) + pairwise, atol=1e-7)


def test_heads_hold_no_per_id_parameters():
    """Memory accounting: every parameter whose size grows with the vocabulary is in the table."""
    big = [Field("a", 10), Field("b", 5000), Field("c", 7)]
    for head in HEADS:
        small, large = _model(head, **SMALL.get(head, {})), _model(head, fields=big, **SMALL.get(head, {}))
        assert sum(p.numel() for p in small.head_parameters()) == sum(p.numel() for p in large.head_parameters())


@pytest.mark.parametrize("head", HEADS)
def test_learns_tiny_ctr_task(head, tiny_ctr):
    """With the full table, each head beats the same head on the no-id floor by 0.03 test AUC."""
    aucs = {}
    for method in ("noid", "full"):
        torch.manual_seed(0)
        table = build_table(method, fields=tiny_ctr.fields, dim=8)
        model = build_model(head, table=table, num_dense=tiny_ctr.num_dense, **SMALL.get(head, {}))
        res = train(model, tiny_ctr, TrainConfig(epochs=2, batch_size=512, lr=3e-3, sparse_lr=1e-2,
                                                 progress=False, patience=1))
        aucs[method] = res.test_auc
    assert aucs["full"] > aucs["noid"] + 0.03, aucs
