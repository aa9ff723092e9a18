"""Splits read from the cache's files by ``pread`` a window at a time (large splits): the same rows
as the in-memory path, every row once per shuffled pass, a clear error on a truncated file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress.data import load_dataset, schema
from embpress.data.schema import ArrayFile, Split


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(schema, "BLOCK_ROWS", 7)
    monkeypatch.setattr(schema, "WINDOW_BLOCKS", 3)  # windows of 21 rows


def _file_split(tmp_path, n=100):
    rng = np.random.default_rng(0)
    arrays = {"dense": rng.random((n, 2), dtype=np.float32),
              "sparse": np.arange(n * 3, dtype=np.int32).reshape(n, 3),
              "label": (np.arange(n) % 2).astype(np.float32)}
    maps = {}
    for kind, a in arrays.items():
        np.save(tmp_path / f"{kind}.npy", a)
        maps[kind] = np.load(tmp_path / f"{kind}.npy", mmap_mode="c")
    files = {k: ArrayFile(tmp_path / f"{k}.npy", int(m.offset)) for k, m in maps.items()}
    return Split(**arrays), Split(**maps, files=files)


def _rows(batches):
    return [tuple(t.tolist() for t in b) for b in batches]


@pytest.mark.parametrize("batch_size", [8, 10, 21, 64, 500])
def test_in_order_batches_equal_the_in_memory_ones(tmp_path, small_windows, batch_size):
    in_memory, from_files = _file_split(tmp_path)
    assert _rows(from_files.batches(batch_size)) == _rows(in_memory.batches(batch_size))


@pytest.mark.parametrize("batch_size", [8, 21, 64])
def test_shuffled_pass_yields_every_row_once_in_full_batches(tmp_path, small_windows, batch_size):
    _, split = _file_split(tmp_path)
    batches = list(split.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)))
    rows = torch.cat([ids[:, 0] for _, ids, _ in batches]) // 3
    assert sorted(rows.tolist()) == list(range(100))
    assert [len(y) for *_, y in batches] == [batch_size] * (100 // batch_size) + ([100 % batch_size] if 100 % batch_size else [])
    labels = torch.cat([y for *_, y in batches])
    assert torch.equal(labels, (rows % 2).float()), "a row's label and ids stay together"
    assert rows.tolist() != sorted(rows.tolist()), "shuffled"
    again = list(split.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert _rows(again) == _rows(batches), "the same generator gives the same order"
    other = list(split.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert _rows(other) != _rows(batches)


def test_truncated_file_names_the_file(tmp_path, small_windows):
    _, split = _file_split(tmp_path)
    path = split.files["sparse"].path
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 40)
    with pytest.raises(OSError, match=r"sparse\.npy: file ends at byte"):
        list(split.batches(16))


def test_small_splits_keep_the_exact_permutation(tmp_path):
    in_memory, from_files = _file_split(tmp_path)  # 100 rows < one window: read through the maps
    a = _rows(in_memory.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3)))
    b = _rows(from_files.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert a == b


def test_cached_splits_know_their_files(tmp_path, small_windows):
    ds = load_dataset("synthetic:preset=criteo,rows=3000,scale=0.0001", cache_dir=tmp_path,
                      progress=False)
    split = ds.train
    assert split.files is not None and set(split.files) == {"dense", "sparse", "label"}
    memory = Split(np.array(split.dense), np.array(split.sparse), np.array(split.label))
    assert _rows(split.batches(100)) == _rows(memory.batches(100))
