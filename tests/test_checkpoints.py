"""Checkpoints: a checksum over every byte, JSON meta checked at save time, and a byte-flip drill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.models import build_model
from embpress.tables import Field, build_table
from embpress.train import CheckpointError, load_checkpoint, save_checkpoint

FLIPS = 200


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    table = build_table("hash", fields=[Field("a", 50), Field("b", 7)], dim=4, budget=400)
    return build_model("dlrm", table=table, num_dense=2)


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_keeps_state_and_meta(tmp_path):
    model, other = small_model(0), small_model(1)
    meta = {"epoch": 3, "auc": 0.75, "note": "ok", "sizes": [1, 2], "nested": {"a": None}}
    save_checkpoint(tmp_path / "m.ckpt", model, **meta)
    assert not same_state(model, other)
    assert load_checkpoint(tmp_path / "m.ckpt", other) == meta
    assert same_state(model, other)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("value", [np.float32(1.5), torch.tensor(1.0), float("nan"), {1, 2}, object(), b"x"])
def test_meta_that_json_cannot_hold_fails_at_save(tmp_path, value):
    with pytest.raises(ValueError, match="key 'bad' is not"):
        save_checkpoint(tmp_path / "m.ckpt", small_model(), ok=1, bad=value)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_leftover_temporary_files_are_removed_by_the_next_save(tmp_path):
    (tmp_path / ".m.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "m.ckpt", small_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def test_byte_flip_drill_detects_every_flip(tmp_path):
    """Flip one random byte (random position, random non-zero XOR) FLIPS times: every load must raise
    CheckpointError and leave the model untouched."""
    model = small_model(0)
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, epoch=1)
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    target = small_model(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    detected = 0
    positions = rng.integers(0, len(good), FLIPS)
    positions[:3] = [0, len(good) // 2, len(good) - 1]  # the header, the middle and the last byte
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError):
            load_checkpoint(path, target)
        detected += 1
    assert detected == FLIPS
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("cut", [0, 10, 95, -1, -100])
def test_truncated_or_foreign_files_are_refused(tmp_path, cut):
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, small_model())
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(CheckpointError, match="m.ckpt"):
        load_checkpoint(path, small_model())


def test_a_plain_torch_file_is_not_a_checkpoint(tmp_path):
    torch.save(small_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an embpress checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", small_model())
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt", small_model())
