"""Deep Hash Embedding: the paper's per-field form (`dhe`) and the shared-network variant (`dhe-shared`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio, build_table
from embpress.tables.hashing import PRIME


def _mish(x: np.ndarray) -> np.ndarray:
    return x * np.tanh(np.log1p(np.exp(x)))


def _numpy_lookup(state: dict[str, np.ndarray], ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """Serve lookups from the exported arrays alone (uniform encoding, batch norm folded)."""
    g = (ids + state["field_offsets"]).astype(np.int64)[..., None]
    h = ((state["hash_a"] * (g % PRIME) + state["hash_b"]) % PRIME) % num_buckets
    x = (2 * h / (num_buckets - 1) - 1).reshape(-1, len(state["hash_a"]))
    n = sum(k.startswith("weight") for k in state)
    for i in range(n):
        x = x @ state[f"weight{i}"].astype(np.float64).T + state[f"bias{i}"]
        if i < n - 1:
            x = _mish(x)
    return x.reshape(*ids.shape, -1)


def test_budget_arithmetic_and_largest_network(small_fields):
    t = build_table("dhe-shared", fields=small_fields, dim=8, budget=Ratio(4), layers=3)
    k, h = t.num_inputs, t.hidden
    weights = (k + 1) * h + 2 * (h + 1) * h + (h + 1) * 8
    meta = 8 + 8 + len("uniform")  # the spec: num_buckets, and the distribution's length and text
    meta += 8 * (3 + 3 * 4)  # meta/shapes: hash_a, hash_b, field_offsets; four Linear weights [out, in], biases
    assert t.serving_bytes() == weights * 4 + (2 * k + 3) * 8 + meta <= t.full_bytes // 4
    assert k == h  # below k = 1024 the encoding is as wide as the hidden layers
    assert t._bytes_for(h + 1) > t.array_budget == t.max_bytes - meta
    assert t.flops_per_lookup() == k * h + 2 * h * h + h * 8


def test_encoding_is_capped_at_num_hash_and_unique_per_field_and_id():
    fields = [Field("user", 20_000), Field("item", 20_000)]
    t = build_table("dhe-shared", fields=fields, dim=16, budget=Ratio(2), num_hash=64)
    assert t.num_inputs == 64 and t.hidden > 64
    ids = torch.stack([torch.arange(20_000), torch.arange(20_000)], 1)
    enc = t.encode(ids)
    assert enc.shape == (20_000, 2, 64) and enc.min() >= -1 and enc.max() <= 1
    flat = enc.reshape(-1, 64)
    assert torch.unique(flat, dim=0).shape[0] == 40_000   # same id in two fields encodes differently
    assert torch.equal(enc, t.encode(ids))                 # deterministic, nothing stored


def test_gaussian_encoding_is_standard_normal():
    t = build_table("dhe-shared", fields=[Field("user", 50_000)], dim=8, budget=Ratio(2), num_hash=64,
                    distribution="gaussian")
    z = t.encode(torch.arange(50_000).reshape(-1, 1))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_folded_serving_state_reproduces_eval_forward(small_fields):
    torch.manual_seed(0)
    t = build_table("dhe-shared", fields=small_fields, dim=8, budget=Ratio(4), layers=2)
    opt = torch.optim.Adam(t.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # move the batch-norm statistics and weights away from their initial values
        ids = torch.stack([torch.randint(0, f.num_embeddings, (64,), generator=gen) for f in small_fields], 1)
        opt.zero_grad()
        t(ids).square().mean().backward()
        opt.step()
    t.eval()
    ids = torch.tensor([[0, 0, 0], [6, 299, 4999], [3, 17, 1234]])
    expect = _numpy_lookup(t.serving_state(), ids.numpy(), t.num_buckets)
    np.testing.assert_allclose(t(ids).detach().numpy(), expect, rtol=1e-4, atol=1e-5)


def test_without_batch_norm_and_single_id_in_training(small_fields):
    t = build_table("dhe-shared", fields=small_fields, dim=8, budget=Ratio(4), batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in t.modules())
    with_bn = build_table("dhe-shared", fields=small_fields, dim=8, budget=Ratio(4))
    assert with_bn.training and with_bn(torch.tensor([[1, 2, 3]])).shape == (1, 3, 8)
    assert build_table("dhe-shared", fields=[Field("a", 100)], dim=8, budget=Ratio(1))(torch.tensor([[5]])).shape == (1, 1, 8)


def test_bad_hparams_and_budget(small_fields):
    with pytest.raises(ValueError, match="distribution"):
        build_table("dhe-shared", fields=small_fields, dim=8, budget=Ratio(4), distribution="cauchy")
    with pytest.raises(ValueError, match="layers"):
        build_table("dhe-shared", fields=small_fields, dim=8, budget=Ratio(4), layers=0)
    with pytest.raises(BudgetError, match="smallest network"):
        build_table("dhe-shared", fields=small_fields, dim=8, budget=64)


@pytest.mark.parametrize("ratio", [10, 100])
def test_high_ratios_on_large_fields(ratio):
    fields = [Field("user", 200_000), Field("item", 50_000), Field("site", 30)]
    t = build_table("dhe-shared", fields=fields, dim=16, budget=Ratio(ratio))
    assert t.serving_bytes() <= t.full_bytes / ratio
    assert t.hidden >= 64
    assert t(torch.tensor([[199_999, 0, 29], [5, 6, 7]])).shape == (2, 3, 16)


def test_lookup_of_distinct_ids_matches_the_plain_decoder_in_training(small_fields):
    """Encoding and first Linear run once per distinct id; BatchNorm still sees every occurrence."""
    import copy

    torch.manual_seed(0)
    t = build_table("dhe-shared", fields=small_fields, dim=4, budget=Ratio(2), num_hash=32, layers=2)
    ref = copy.deepcopy(t)
    ids = torch.tensor([[0, 1, 2], [0, 1, 2], [3, 1, 0], [0, 2, 2]])  # repeated ids
    t.train(), ref.train()
    got = t(ids)
    want = ref.mlp(ref.encode(ids).reshape(-1, ref.num_inputs)).reshape(*ids.shape, 4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(t.mlp[1].running_mean, ref.mlp[1].running_mean)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(t.mlp[0].weight.grad, ref.mlp[0].weight.grad)


def test_eval_lookup_runs_the_decoder_once_per_distinct_id(small_fields):
    torch.manual_seed(0)
    t = build_table("dhe-shared", fields=small_fields, dim=4, budget=Ratio(2), num_hash=32, layers=2)
    t.train()
    t(torch.tensor([[0, 1, 2], [5, 7, 9], [3, 1, 0]]))  # move the BatchNorm running statistics
    t.eval()
    ids = torch.tensor([[0, 1, 2], [0, 1, 2], [3, 1, 0], [0, 2, 2]])
    with torch.no_grad():
        want = t.mlp(t.encode(ids).reshape(-1, t.num_inputs)).reshape(*ids.shape, 4)
        torch.testing.assert_close(t(ids), want)


# ----------------------------------------------------------------------------- dhe: the paper's form


def test_encoding_matches_a_hand_computed_case():
    """h_i(x) = ((a_i x + b_i) mod p) mod m, then 2 h / (m - 1) - 1; Box-Muller on pairs for gaussian."""
    t = build_table("dhe", fields=[Field("a", 50_000)], dim=4, budget=Ratio(2), num_hash=4, num_buckets=10)
    t.hash_a.copy_(torch.tensor([3, 5, PRIME - 1, 1], dtype=torch.int32))
    t.hash_b.copy_(torch.tensor([7, 11, 0, 0], dtype=torch.int32))
    # x = 4: (12 + 7) mod 10 = 9 -> 1; (20 + 11) mod 10 = 1 -> -7/9; ((p - 1) * 4 mod p) = p - 4 = 2147483643 -> 3
    # -> -1/3; 4 mod 10 = 4 -> -1/9
    want = torch.tensor([1.0, 2 / 9 - 1, 6 / 9 - 1, 8 / 9 - 1])
    torch.testing.assert_close(t.encode(torch.tensor([4])), want.unsqueeze(0))
    g = build_table("dhe", fields=[Field("a", 50_000)], dim=4, budget=Ratio(2), num_hash=2, num_buckets=10,
                    distribution="gaussian")
    g.hash_a.copy_(torch.tensor([3, 5], dtype=torch.int32))
    g.hash_b.copy_(torch.tensor([7, 11], dtype=torch.int32))
    u1, u2 = 3 / 9, 1 / 9   # x = 2: (6 + 7) mod 10 = 3, (10 + 11) mod 10 = 1
    r = math.sqrt(-2 * math.log(u1))
    torch.testing.assert_close(g.encode(torch.tensor([2])),
                               torch.tensor([[r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]]))


def test_paper_encoding_network_per_large_field_and_small_fields_as_rows():
    fields = [Field("user", 100_000), Field("item", 30_000), Field("site", 30), Field("mid", 900)]
    t = build_table("dhe", fields=fields, dim=16, budget=Ratio(10))
    assert t.num_hash == 1024 and t.num_buckets == 1_000_000 and t.distribution == "uniform"
    assert t.network_fields == (0, 1) and t.plain_fields == (2, 3)
    assert [m.in_features for m in (net[0] for net in t.nets)] == [1024, 1024]
    # the budget arithmetic: int32 (a, b) pairs, two folded networks, the small fields' rows
    k, h = 1024, t.hidden
    net = ((k + 1) * h + 4 * (h + 1) * h + (h + 1) * 16) * 4
    meta = 8 + 8 + len("uniform")  # the spec: num_buckets, and the distribution's length and text
    meta += 8 * (2 + 2 + 2 * 3 * 6)  # meta/shapes: hash_a, hash_b, rows [n, D]; per network 6 weights, biases
    assert t.serving_bytes() == 2 * k * 4 + 2 * net + (30 + 900) * 16 * 4 + meta <= t.max_bytes
    assert t._cost(h + 1) > t.array_budget  # only the MLP width shrank to fit
    state = t.serving_state()
    assert state["hash_a"].dtype == np.int32 and state["hash_a"].shape == (1024,)
    assert sum(v.nbytes for v in state.values()) == t.serving_bytes()
    # threshold: fields with at most that many ids stay rows whatever the network size
    assert build_table("dhe", fields=fields, dim=16, budget=Ratio(2), threshold=40_000).network_fields == (0,)


def test_dhe_learns_and_serves_its_artifact(tmp_path):
    from embpress import serving

    torch.manual_seed(0)
    fields = [Field("user", 3_000), Field("site", 5)]
    t = build_table("dhe", fields=fields, dim=4, budget=Ratio(4), num_hash=64, layers=2)
    assert t.network_fields == (0,) and t.plain_fields == (1,)
    before = [p.detach().clone() for p in t.nets[0].parameters()]
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3_000, 4, generator=gen)
    opt = torch.optim.Adam(t.nets.parameters(), lr=1e-2)
    ids = torch.stack([torch.arange(3_000), torch.arange(3_000) % 5], 1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (t(ids)[:, 0] - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, t.nets[0].parameters(), strict=False))
    t.eval()
    t.save_serving(tmp_path / "dhe.safetensors")
    served = serving.load(tmp_path / "dhe.safetensors")
    probe = torch.tensor([[0, 0], [2_999, 4], [17, 3], [17, 3]])
    torch.testing.assert_close(served(probe), t(probe), rtol=1e-5, atol=1e-6)


def test_dhe_budget_below_hash_coefficients_raises():
    with pytest.raises(BudgetError, match="1024 hashes"):
        build_table("dhe", fields=[Field("user", 10_000)], dim=8, budget=Ratio(100))
    with pytest.raises(ValueError, match="even"):
        build_table("dhe", fields=[Field("user", 10_000)], dim=8, budget=Ratio(2), num_hash=3, distribution="gaussian")
