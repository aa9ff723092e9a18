"""MGQE invariants: budget arithmetic, frequency-aware code widths, STE training, serving from the codes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embpress.tables import BudgetError, Field, Ratio
from embpress.tables.base import FP32_BYTES, state_nbytes
from embpress.tables.mgqe import MGQETable, code_bits, pack_codes, packed_bytes, unpack_codes


def _table(fields, dim=8, budget=Ratio(4), seed=0, **hp):
    torch.manual_seed(seed)
    return MGQETable(fields=fields, dim=dim, budget=budget, **hp)


def _decode(state: dict[str, np.ndarray], fields, dim: int, high_bits: int, low_bits: int) -> np.ndarray:
    """Rebuild every id's vector from the serving state alone: ``[total ids, D]``."""
    out = []
    for f in fields:
        if f"{f.name}/rows" in state:
            out.append(state[f"{f.name}/rows"])
            continue
        cb = state[f"{f.name}/codebook"]  # [P, K, pd]
        p = cb.shape[0]
        if f"{f.name}/high_mask" in state:
            high = np.unpackbits(state[f"{f.name}/high_mask"].view(np.uint8), count=f.num_embeddings,
                                 bitorder="little").astype(bool)
        else:
            high = np.zeros(f.num_embeddings, dtype=bool)
            high[: math.ceil(0.1 * f.num_embeddings)] = True
        codes = np.empty((f.num_embeddings, p), dtype=np.int64)
        codes[high] = unpack_codes(state[f"{f.name}/codes_high"], high_bits, int(high.sum()) * p).reshape(-1, p)
        codes[~high] = unpack_codes(state[f"{f.name}/codes_low"], low_bits, int((~high).sum()) * p).reshape(-1, p)
        out.append(cb[np.arange(p), codes].reshape(f.num_embeddings, dim))
    return np.concatenate(out)


def test_pack_roundtrip_and_sizes():
    rng = np.random.default_rng(0)
    for bits in (1, 3, 6, 8, 9):
        codes = rng.integers(0, 1 << bits, 1001)
        packed = pack_codes(codes, bits)
        assert packed.dtype == np.uint8 and packed.nbytes == packed_bytes(1001, bits) == math.ceil(1001 * bits / 8)
        assert np.array_equal(unpack_codes(packed, bits, 1001), codes)
    assert code_bits(256) == 8 and code_bits(64) == 6 and code_bits(2) == 1 and code_bits(100) == 7
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(np.array([64]), 6)


def test_bytes_arithmetic(small_fields):
    t = _table(small_fields, parts=4)
    assert (t.parts_, t.high_choices_, t.low_choices_) == (4, 256, 64)
    assert t.quantized_ == ("mid", "large")  # 7 rows are cheaper than a 256-centroid codebook
    expect = 7 * 8 * FP32_BYTES
    for n in (300, 5000):
        n_high = math.ceil(0.1 * n)
        expect += 256 * 8 * FP32_BYTES + math.ceil(n_high * 4 * 8 / 8) + math.ceil((n - n_high) * 4 * 6 / 8)
    expect += 8 * (3 + 2)  # metadata: the two bit widths, the parts and each quantized field's frequent count
    expect += 8 * (2 + 5 + 5)  # meta/shapes: the small field's rows [7, 8]; per quantized field codebook, two codes
    assert t.serving_bytes() == expect == state_nbytes(t.serving_state())
    assert t.serving_bytes() <= t.max_bytes


def test_sizing_picks_largest_parts_then_fewer_choices():
    fields = [Field("x", 20_000)]
    # 16 dims: 8 parts fit at 8x (6.2 bits/part/id on average), 16 do not.
    t = _table(fields, dim=16, budget=Ratio(8))
    assert t.parts_ == 8 and t.serving_bytes() <= t.max_bytes
    assert t._plan(16, 256, 64).nbytes > t.max_bytes
    # A fixed number of parts that does not fit lowers the centroid counts instead.
    t = _table(fields, dim=16, budget=Ratio(16), parts=8)
    assert t.parts_ == 8 and (t.high_choices_, t.low_choices_) < (256, 64)
    assert t.serving_bytes() <= t.max_bytes < t._plan(8, 2 * t.high_choices_, 2 * t.low_choices_).nbytes
    with pytest.raises(BudgetError, match="mgqe: the smallest configuration"):
        _table(fields, dim=16, budget=2_000)


def test_bad_hparams(small_fields):
    with pytest.raises(ValueError, match="divisor"):
        _table(small_fields, parts=3)
    with pytest.raises(ValueError, match="low_choices"):
        _table(small_fields, high_choices=16, low_choices=32)
    with pytest.raises(ValueError, match="top_percent"):
        _table(small_fields, top_percent=1.5)


@pytest.mark.parametrize("parts", [4, 8])
def test_rare_ids_use_only_low_centroids(small_fields, parts):
    t = _table(small_fields, budget=Ratio(2), parts=parts)
    assert (t.high_choices_, t.low_choices_) == (256, 64)
    # Put every query exactly on a centroid beyond the rare range: frequent ids keep it, rare ids cannot.
    with torch.no_grad():
        cb = t.codebook  # [F_q, P, K, pd]
        target = cb[:, :, 200].reshape(len(t.quantized_), -1)  # [F_q, D]
        for j, i in enumerate(t._q_fields):
            lo = int(t._q_offsets[j])
            t.query.weight[lo:lo + t.fields[i].num_embeddings] = target[j]
    codes = t.encode_().long()
    high = t._high
    assert (codes[high] == 200).all()
    assert (codes[~high] < t.low_choices_).all()


@pytest.mark.parametrize("parts", [2, 8])
def test_serving_state_reconstructs_forward(small_fields, parts):
    fields = small_fields
    t = _table(fields, budget=Ratio(2), parts=parts)
    ids = torch.stack([torch.arange(5000) % f.num_embeddings for f in fields], 1)
    t.eval()
    with torch.no_grad():
        out = t(ids)
    table = _decode(t.serving_state(), fields, 8, code_bits(t.high_choices_), code_bits(t.low_choices_))
    offsets = np.cumsum([0] + [f.num_embeddings for f in fields])[:-1]
    expect = table[ids.numpy() + offsets]
    np.testing.assert_array_equal(out.numpy(), expect)


def test_non_prefix_frequent_ids_store_a_mask():
    counts = np.array([1, 9, 2, 8, 3, 7, 4, 6, 5, 10] * 400)  # frequent ids scattered
    fields = [Field("x", 4000, counts)]
    t = _table(fields, budget=Ratio(4), parts=4)
    state = t.serving_state()
    assert "x/high_mask" in state and state["x/high_mask"].nbytes == 63 * 8  # 4000 bits in uint64 words
    assert state["x/high_rank"].dtype == np.int32 and state["x/high_rank"].nbytes == 63 * 4  # counted rank index
    assert t.serving_bytes() == state_nbytes(state)
    high = np.unpackbits(state["x/high_mask"].view(np.uint8), count=4000, bitorder="little").astype(bool)
    np.testing.assert_array_equal(state["x/high_rank"], np.concatenate([[0], np.cumsum(
        np.add.reduceat(np.pad(high, (0, 32)), np.arange(0, 4032, 64)))[:-1]]))
    assert high.sum() == 400 and (counts[high] == 10).all()
    t.eval()
    with torch.no_grad():
        out = t(torch.arange(4000)[:, None])[:, 0]
    p, hb, lb = t.parts_, code_bits(t.high_choices_), code_bits(t.low_choices_)
    codes = np.empty((4000, p), dtype=np.int64)
    codes[high] = unpack_codes(state["x/codes_high"], hb, 400 * p).reshape(-1, p)
    codes[~high] = unpack_codes(state["x/codes_low"], lb, 3600 * p).reshape(-1, p)
    cb = state["x/codebook"]
    np.testing.assert_array_equal(out.numpy(), cb[np.arange(p), codes].reshape(4000, 8))


def test_straight_through_gradients_and_regularizer(small_fields):
    t = _table(small_fields, parts=4)
    ids = torch.tensor([[1, 2, 3], [4, 250, 4000]])
    out = t(ids)
    reg = t.regularizer()
    assert reg is not None and reg.item() > 0
    assert t.regularizer() is None  # consumed once per step
    (out.sum() + reg).backward()
    g = t.query.weight.grad.coalesce()
    # The task gradient reaches exactly the queried rows of the quantized fields (STE) ...
    assert set(g.indices()[0].tolist()) == {2, 250, 300 + 3, 300 + 4000}  # 'mid' rows, then 'large'
    # ... and the codebook moves only through the regularizer.
    assert t.codebook.grad is not None and t.codebook.grad.abs().sum() > 0
    # The forward value is the centroid, as served.
    t.eval()
    with torch.no_grad():
        torch.testing.assert_close(t(ids), out.detach(), rtol=0, atol=1e-7)


def test_eval_cache_follows_weight_updates(small_fields):
    t = _table(small_fields, parts=4)
    ids = torch.tensor([[1, 2, 3], [4, 250, 4000]])
    t.encode_()
    assert t._cache_fresh()
    with torch.no_grad():
        t.query.weight[250] += 1.0  # as an optimizer step does, in place
    assert not t._cache_fresh()
    t.eval()
    with torch.no_grad():
        fresh = t(ids)
        t.encode_()
        cached = t(ids)
    assert torch.equal(fresh, cached)


def test_stage_encodes_after_training(small_fields):
    t = _table(small_fields)
    (stage,) = t.stages()
    assert stage.name == "train" and stage.after is not None
    stage.after(None)
    assert t._cache_fresh()


@pytest.mark.parametrize("pd", [1, 2, 3])
def test_assignment_is_the_nearest_allowed_centroid(pd):
    """Both search paths (binary search for 1-dim parts, matmul otherwise) give a Euclidean argmin."""
    from embpress.tables.mgqe import _assign_codes

    g = torch.Generator().manual_seed(0)
    cb, q = torch.randn(4, 32, pd, generator=g), torch.randn(500, 4 * pd, generator=g)
    high = torch.rand(500, generator=g) < 0.3
    codes = _assign_codes(cb, q, high, low=8)
    assert (codes[~high] < 8).all()
    dist = ((q.reshape(500, 4, 1, pd) - cb[None]) ** 2).sum(-1)  # [n, P, K]
    dist[~high, :, 8:] = float("inf")
    chosen = dist.gather(2, codes[:, :, None])[..., 0]
    torch.testing.assert_close(chosen, dist.min(-1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parts", [2, 8])
def test_codebook_loss_equals_direct_mean(parts):
    t = _table([Field("a", 3000), Field("b", 700)], budget=Ratio(3), parts=parts)
    ids = torch.randint(0, 700, (300, 2), generator=torch.Generator().manual_seed(0))
    t(ids)
    reg = t.regularizer()
    qids = ids + t._q_offsets
    q = t.query(qids).detach()
    direct = (t._centroids(t._assign(qids)) - q).square().mean()
    torch.testing.assert_close(reg, direct, rtol=1e-5, atol=1e-10)
    g_reg, g_direct = (torch.autograd.grad(x, t.codebook)[0] for x in (reg, direct))
    torch.testing.assert_close(g_reg, g_direct, rtol=1e-4, atol=1e-9)


def test_non_prefix_mask_is_served_from_the_bitmap_and_rank_index(tmp_path):
    from embpress import serving

    counts = np.array([1, 9, 2, 8, 3, 7, 4, 6, 5, 10] * 400)
    torch.manual_seed(0)
    t = _table([Field("x", 4000, counts), Field("y", 300)], budget=Ratio(4), parts=4).eval()
    t.save_serving(tmp_path / "m.safetensors")
    served = serving.load(tmp_path / "m.safetensors")
    ids = torch.stack([torch.arange(4000), torch.arange(4000) % 300], 1)
    with torch.no_grad():
        assert torch.equal(served(ids), t(ids))
    assert served.serving_bytes() == t.serving_bytes()
