"""RowSparseAdam: torch's SparseAdam update, computed on the touched rows only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.optim import RowSparseAdam


@pytest.mark.parametrize("dim", [1, 4, 16])
def test_matches_torch_sparse_adam(dim):
    torch.manual_seed(0)
    ours, ref = torch.nn.Embedding(500, dim, sparse=True), torch.nn.Embedding(500, dim, sparse=True)
    ref.load_state_dict(ours.state_dict())
    opt, ref_opt = RowSparseAdam(ours.parameters(), lr=0.01), torch.optim.SparseAdam(ref.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids = torch.randint(0, 60, (256,), generator=gen) * torch.randint(1, 9, (256,), generator=gen)  # < 480, repeats
        target = torch.randn(256, dim, generator=gen)
        for emb, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            (emb(ids) - target).square().sum().backward()
            o.step()
    # the same arithmetic; only the order in which a batch's duplicate rows are summed may differ
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[ours.weight][key], ref_opt.state[ref.weight][key], rtol=1e-4, atol=1e-6)
    untouched = torch.ones(500, dtype=torch.bool)
    untouched[:480] = False
    assert (opt.state[ours.weight]["exp_avg"][untouched] == 0).all()


def test_rejects_dense_gradients_and_bad_settings():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="sparse gradients"):
        RowSparseAdam([w]).step()
    with pytest.raises(ValueError, match="lr > 0"):
        RowSparseAdam([w], lr=0)


def test_counting_and_sorting_find_the_same_rows(monkeypatch):
    from embpress import optim

    index = torch.tensor([7, 3, 3, 0, 9, 7, 7])
    counted = optim._unique_rows(index, 10)
    monkeypatch.setattr(optim, "COUNT_FACTOR", 0)
    sorted_ = optim._unique_rows(index, 10)
    for a, b in zip(counted, sorted_, strict=True):
        assert torch.equal(a, b)
    assert counted[0].tolist() == [0, 3, 7, 9] and counted[1].tolist() == [2, 1, 1, 0, 3, 2, 2]


def _torch_path_only(opt):
    opt._compiled_step = lambda *args: False
    return opt


@pytest.mark.parametrize("dim", [1, 4, 16])
def test_compiled_step_equals_the_torch_path(dim):
    """Batch sizes that grow and shrink (the kernel's scratch is reused and regrown); rows repeat."""
    torch.manual_seed(0)
    ours, ref = torch.nn.Embedding(3000, dim, sparse=True), torch.nn.Embedding(3000, dim, sparse=True)
    ref.load_state_dict(ours.state_dict())
    opt, ref_opt = RowSparseAdam(ours.parameters(), lr=0.01), _torch_path_only(RowSparseAdam(ref.parameters(), lr=0.01))
    gen = torch.Generator().manual_seed(1)
    for size in (7, 300, 4000, 1, 900, 4000, 20):
        ids = torch.randint(0, 400, (size,), generator=gen) * torch.randint(1, 7, (size,), generator=gen)
        target = torch.randn(size, dim, generator=gen)
        for emb, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            (emb(ids) - target).square().sum().backward()
            o.step()
    assert opt._scratch._by_param, "the compiled step ran"
    assert not torch.equal(ours.weight, ref.weight.detach().clone().zero_())
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[ours.weight][key], ref_opt.state[ref.weight][key], rtol=1e-5, atol=1e-8)
    table = next(iter(opt._scratch._by_param.values()))[0]
    assert (table == -1).all(), "the hash set is empty between steps"


def test_compiled_step_rejects_rows_outside_the_parameter():
    w = torch.nn.Parameter(torch.zeros(5, 2))
    w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.ones(2, 2), (5, 2), check_invariants=False)
    with pytest.raises(IndexError, match="outside the parameter"):
        RowSparseAdam([w]).step()


def test_compiled_step_bumps_version_counters_so_caches_see_new_weights():
    """The compiled kernel writes through numpy views; the step must still bump the version
    counters that caches key on (dpq's codes were served stale from before training otherwise)."""
    w = torch.nn.Embedding(50, 4, sparse=True)
    opt = RowSparseAdam(w.parameters(), lr=0.1)
    w(torch.tensor([1, 2, 2])).sum().backward()
    before = w.weight._version
    opt.step()
    assert w.weight._version > before
    state = opt.state[w.weight]
    assert state["exp_avg"]._version > 0 and state["exp_avg_sq"]._version > 0


def test_dpq_codes_follow_training_after_an_early_serving_state():
    """Reading the serving state before training (as ``+int8`` sizing does) must not freeze dpq's codes."""
    from embpress.tables import Field, build_table

    torch.manual_seed(0)
    t = build_table("dpq", fields=[Field("a", 200)], dim=8, budget="4x")
    codes_before = t.serving_arrays()["codes"].copy()
    opt = RowSparseAdam(t.sparse_parameters(), lr=0.5)
    t.train()
    for _ in range(3):
        t(torch.arange(200).unsqueeze(1)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    t.eval()
    fresh = t.codes_of(torch.arange(200))
    assert torch.equal(t.encode_(), fresh)  # the cache agrees with codes computed now
    assert not np.array_equal(t.serving_arrays()["codes"], codes_before)  # and the codes did change


def _dense_rowwise_adagrad(weight, grad, state_sum, lr, eps):
    """Row-wise AdaGrad on a dense gradient (TorchRec's RowWiseAdagrad): a row with no gradient keeps
    its accumulator (mean of zeros) and its weight (zero step)."""
    state_sum += grad.pow(2).mean(1)
    weight -= lr * grad / (state_sum.sqrt() + eps)[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the compiled kernel, the torch path
@pytest.mark.parametrize("dim", [1, 4, 16])
def test_rowwise_adagrad_matches_the_dense_update(dim, dtype):
    from embpress.optim import RowSparseRowwiseAdagrad

    torch.manual_seed(0)
    ours = torch.nn.Embedding(500, dim, sparse=True, dtype=dtype)
    ref_w = ours.weight.detach().clone()
    ref_sum = torch.zeros(500, dtype=dtype)
    opt = RowSparseRowwiseAdagrad(ours.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids = torch.randint(0, 60, (256,), generator=gen) * torch.randint(1, 9, (256,), generator=gen)
        target = torch.randn(256, dim, generator=gen, dtype=dtype)
        opt.zero_grad()
        (ours(ids) - target).square().sum().backward()
        opt.step()
        ref = ref_w.clone().requires_grad_(True)
        (torch.nn.functional.embedding(ids, ref) - target).square().sum().backward()
        _dense_rowwise_adagrad(ref_w, ref.grad, ref_sum, 0.05, 1e-8)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(ours.weight.detach(), ref_w, **tol)
    state = opt.state[ours.weight]["sum"]
    assert state.shape == (500,) and state.dtype == dtype  # one accumulator a row
    torch.testing.assert_close(state, ref_sum, **tol)
    assert (state[480:] == 0).all() and (state[:480:7] > 0).any()
    assert bool(opt._scratch._by_param) == (dtype == torch.float32), "float32 runs the compiled kernel"


def test_rowwise_adagrad_rejects_bad_input():
    from embpress.optim import RowSparseRowwiseAdagrad

    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="sparse gradients"):
        RowSparseRowwiseAdagrad([w]).step()
    with pytest.raises(ValueError, match="lr > 0"):
        RowSparseRowwiseAdagrad([w], lr=0)
    v = torch.nn.Parameter(torch.zeros(5, 2))
    v.grad = torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.ones(2, 2), (5, 2), check_invariants=False)
    with pytest.raises(IndexError, match="outside the parameter"):
        RowSparseRowwiseAdagrad([v]).step()


def test_trainer_uses_the_chosen_sparse_optimizer_and_counts_its_state(tiny_ctr, monkeypatch):
    """``sparse_optimizer="rowwise_adagrad"`` trains the rows with one accumulator each: the model
    learns the per-id task, the accumulators move, and train_state_bytes counts 4 bytes a row."""
    from embpress.models import build_model
    from embpress.optim import RowSparseRowwiseAdagrad
    from embpress.tables import build_table
    from embpress.train import TrainConfig, Trainer

    with pytest.raises(ValueError, match="sparse_optimizer must be one of"):
        TrainConfig(sparse_optimizer="sgd")
    steps = {"adam": 0, "rowwise_adagrad": 0}
    for cls, key in ((RowSparseAdam, "adam"), (RowSparseRowwiseAdagrad, "rowwise_adagrad")):
        def counted(self, closure=None, _step=cls.step, _key=key):
            steps[_key] += 1
            return _step(self, closure)
        monkeypatch.setattr(cls, "step", counted)
    aucs, states = {}, {}
    for name, lr in (("adam", 3e-3), ("rowwise_adagrad", 0.05)):
        seen = dict(steps)
        torch.manual_seed(0)
        table = build_table("full", fields=tiny_ctr.fields, dim=8)
        model = build_model("dlrm", table=table, num_dense=tiny_ctr.num_dense, bottom=(16,), top=(32,))
        trainer = Trainer(model, tiny_ctr, TrainConfig(epochs=2, batch_size=256, sparse_lr=lr, progress=False,
                                                       sparse_optimizer=name))
        before = table.weight.weight.detach().clone()
        res = trainer.fit()
        aucs[name], states[name] = res.test_auc, res.train_state_bytes
        assert not torch.equal(before, table.weight.weight.detach())
        other = "adam" if name == "rowwise_adagrad" else "rowwise_adagrad"
        assert steps[name] > seen[name] and steps[other] == seen[other], steps  # only the chosen one stepped
    rows = sum(f.num_embeddings for f in tiny_ctr.fields)
    # Adam keeps two (rows, 8) moments, row-wise AdaGrad one float a row
    assert states["adam"] - states["rowwise_adagrad"] == rows * 8 * 4 * 2 - rows * 4
    assert aucs["rowwise_adagrad"] > 0.7 and aucs["adam"] > 0.7, aucs


def test_scale_benchmark_point_trains_with_the_chosen_optimizer(tmp_path):
    """``benchmarks/ctr_scale.py --point`` (one process per point) passes the optimizer through and
    records it; a hash table at 10x counts one accumulator a row instead of two moment rows."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ctr_scale.py"
    recs = {}
    for opt in ("adam", "rowwise_adagrad"):
        out = subprocess.run([sys.executable, str(script), "--point", "hash", "--ratio", "10", "--scale", "0.0003",
                              "--steps", "3", "--sparse-opt", opt, "--sparse-lr", "0.02", "--artifact-dir",
                              str(tmp_path)], capture_output=True, text=True, check=True)
        recs[opt] = json.loads(out.stdout.strip().splitlines()[-1])
    assert recs["rowwise_adagrad"]["sparse_optimizer"] == "rowwise_adagrad" and recs["adam"]["sparse_lr"] == 0.02
    from embpress.data.synthetic import PRESETS
    from embpress.tables import Field, Ratio, build_table

    fields = [Field(f"C{i}", max(1, round(c * 0.0003))) for i, c in enumerate(PRESETS["criteo"])]
    rows = sum(build_table("hash", fields=fields, dim=16, budget=Ratio(10)).rows)  # the point's table
    saved = recs["adam"]["train_state_bytes"] - recs["rowwise_adagrad"]["train_state_bytes"]
    assert saved == rows * (2 * 16 * 4 - 4)
    assert recs["rowwise_adagrad"]["artifact_equal"] is True
