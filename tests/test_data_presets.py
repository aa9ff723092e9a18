"""Production-size synthetic presets, streamed into the cache, and a Criteo TSV made from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embpress.data import load_dataset
from embpress.data import registry as registry_mod
from embpress.data.synthetic import PRESETS, SyntheticConfig, preset_memory_bound, write_criteo_tsv


def test_preset_vocabularies_are_the_studys():
    assert len(PRESETS["criteo"]) == 26 and sum(PRESETS["criteo"]) == 33_762_577
    assert sum(PRESETS["avazu"]) == 9_449_205
    assert SyntheticConfig(preset="criteo").exponent == 0.8 and SyntheticConfig().exponent == 1.2
    scaled = SyntheticConfig(preset="criteo", scale=0.01).cardinalities()
    assert scaled[2] == 101_312 and min(scaled) == 1


def test_preset_memory_bound_does_not_grow_with_rows():
    small, big = SyntheticConfig(preset="criteo", rows=1000), SyntheticConfig(preset="criteo", rows=45_000_000)
    assert preset_memory_bound(small) == preset_memory_bound(big) < 4 << 30


@pytest.mark.parametrize("bad, msg", [("preset=nope", "preset must be one of"), ("scale=0.5", "presets only"),
                                      ("preset=criteo,scale=2", "scale must be in")])
def test_bad_preset_options(bad, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        load_dataset(f"synthetic:{bad}", cache_dir=tmp_path, progress=False)


def test_preset_streams_into_the_cache(tmp_path, monkeypatch):
    spec = "synthetic:preset=criteo,scale=0.002,rows=6000"
    ds = load_dataset(spec, cache_dir=tmp_path, progress=False)
    cards = SyntheticConfig(preset="criteo", scale=0.002).cardinalities()
    assert [f.num_embeddings for f in ds.fields] == cards
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (4800, 600, 600)
    assert isinstance(ds.train.sparse, np.memmap) and Path(ds.info["cache"]).parent == tmp_path
    for f, split in ((f, s) for f in range(26) for s in (ds.train, ds.valid, ds.test)):
        assert 0 <= split.sparse[:, f].min() and split.sparse[:, f].max() < cards[f]
    for f, field in enumerate(ds.fields):
        c = field.counts
        assert c.sum() == 4800 and (np.diff(c) <= 0).all()          # ids by descending training count
        np.testing.assert_array_equal(np.bincount(ds.train.sparse[:, f], minlength=cards[f]), c)
    assert 0.15 < ds.train.label.mean() < 0.35

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(registry_mod, "write_synthetic", boom)
    again = load_dataset(spec, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.test.sparse, ds.test.sparse)


def test_preset_is_deterministic(tmp_path):
    spec = "synthetic:preset=avazu,scale=0.001,rows=3000,num_dense=2"
    a = load_dataset(spec, cache_dir=tmp_path / "a", progress=False)
    b = load_dataset(spec, cache_dir=tmp_path / "b", progress=False)
    np.testing.assert_array_equal(a.train.sparse, b.train.sparse)
    np.testing.assert_array_equal(a.test.label, b.test.label)
    c = load_dataset(spec, cache_dir=tmp_path / "c", seed=1, progress=False)
    assert not np.array_equal(a.train.sparse, c.train.sparse)


def test_criteo_loader_reads_a_generated_tsv(tmp_path):
    cfg = SyntheticConfig(preset="criteo", scale=0.001, rows=3000)
    path = write_criteo_tsv(cfg, tmp_path / "train.txt", block_rows=1000)
    lines = path.read_text().splitlines()
    assert len(lines) == 3000 and len(lines[0].split("\t")) == 40
    ds = load_dataset(f"criteo:{path}", cache_dir=tmp_path / "cache", min_count=1, chunk_rows=700, progress=False)
    assert len(ds.train) + len(ds.valid) + len(ds.test) == 3000
    # min_count=1 keeps every training value: each field has its distinct training values plus OOV
    for f, field in enumerate(ds.fields):
        assert field.counts[:-1].min() >= 1 and field.counts.sum() == len(ds.train)
        assert field.num_embeddings <= cfg.cardinalities()[f] + 1
    same = load_dataset(f"criteo:{path}", cache_dir=tmp_path / "cache2", min_count=1, chunk_rows=3000,
                        progress=False)
    np.testing.assert_array_equal(same.train.sparse, ds.train.sparse)

