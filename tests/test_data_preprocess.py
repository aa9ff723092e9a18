"""Preprocessing building blocks: split, vocabulary, chunked text reading, and chunk invariance."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embpress.data.criteo import CriteoSource
from embpress.data.preprocess import (
    SMALL_TRAIN_ROWS,
    ValueCounter,
    assign_splits,
    count_lines,
    preprocess,
    read_text_blocks,
    resolve_min_count,
    split_sizes,
    transform_dense,
)


def write_criteo(path: Path, rows: int, seed: int = 0) -> Path:
    """A Criteo-format file with Zipf-like categorical values, empty fields, negative integers."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 500))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.zipf(1.5)) % 40 * 2654435761 % 2**32:08x}"
                for _ in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.3)), *ints, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- split


def test_split_sizes_floor_valid_test_and_train_gets_the_rest():
    assert split_sizes(86_582, (0.7, 0.2, 0.1)) == (60_608, 17_316, 8_658)
    assert split_sizes(1, (0.8, 0.1, 0.1)) == (1, 0, 0)


def test_assign_splits_is_exact_seeded_and_random():
    a = assign_splits(1000, (0.8, 0.1, 0.1), seed=3)
    assert a.dtype == np.uint8 and np.bincount(a).tolist() == [800, 100, 100]
    np.testing.assert_array_equal(a, assign_splits(1000, (0.8, 0.1, 0.1), seed=3))
    assert (a != assign_splits(1000, (0.8, 0.1, 0.1), seed=4)).any()
    assert (a[:800] != 0).any()  # not sequential


# ------------------------------------------------------------------------------------------ vocabulary


def test_value_counter_orders_by_count_then_value_and_pools_rare_values_in_oov():
    c = ValueCounter()
    c.add(pa.array(["b", "a", "c", "b", "d", "a", "e", "b"]))
    v = c.vocabulary(min_count=2)
    assert v.values.to_pylist() == ["b", "a"]
    assert v.counts.tolist() == [3, 2, 3]  # c, d, e are rare: the OOV row counts them
    assert v.oov_id == 2 and v.num_embeddings == 3 and v.nbytes == 24
    assert v.lookup(pa.array(["a", "b", "c", "never"])).tolist() == [1, 0, 2, 2]
    ties = ValueCounter()
    ties.add(pa.array(["z", "y", "x"]))
    assert ties.vocabulary(1).values.to_pylist() == ["x", "y", "z"]


def test_value_counter_merge_is_independent_of_chunking():
    values = [str(v) for v in np.random.default_rng(0).zipf(1.3, 5000) % 300]
    one = ValueCounter()
    one.add(pa.array(values))
    many = ValueCounter()
    for i in range(0, len(values), 37):
        many.add(pa.array(values[i:i + 37]))
    many._merge()  # exercise a merge before more data arrives
    many.add(pa.array([], pa.string()))
    a, b = one.vocabulary(3), many.vocabulary(3)
    assert a.values.to_pylist() == b.values.to_pylist()
    np.testing.assert_array_equal(a.counts, b.counts)
    expected = Counter(values)
    assert dict(zip(a.values.to_pylist(), a.counts[:-1].tolist(), strict=True)) == {
        k: n for k, n in expected.items() if n >= 3}


def test_empty_vocabulary_maps_everything_to_oov():
    v = ValueCounter().vocabulary(1)
    assert v.num_embeddings == 1 and v.counts.tolist() == [0]
    assert v.lookup(pa.array(["a", ""])).tolist() == [0, 0]


def test_resolve_min_count():
    assert resolve_min_count(None, 10, SMALL_TRAIN_ROWS) == 10
    assert resolve_min_count(None, 10, SMALL_TRAIN_ROWS - 1) == 2
    assert resolve_min_count(None, 1, 10) == 1
    assert resolve_min_count(7, 10, 10) == 7
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="min_count"):
            resolve_min_count(bad, 10, 10)


def test_transform_dense_clips_negatives_and_logs():
    out = transform_dense(np.array([[0.0, -5.0, 9.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.0, np.log(10.0)]], rtol=1e-6)


# ------------------------------------------------------------------------------------- text reading


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_read_text_blocks_numbers_lines_and_covers_the_file(tmp_path, chunk_rows, trailing_newline):
    lines = [f"row{i}\t{'x' * (i % 5)}" for i in range(23)]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    got, first = [], []
    for block in read_text_blocks(path, chunk_rows=chunk_rows):
        assert 1 <= len(block) <= chunk_rows
        first.append(block.first_line)
        got += block.lines().to_pylist()
    assert got == lines
    assert first == list(range(1, 24, chunk_rows))
    assert count_lines(path) == 23


def test_read_text_blocks_header_crlf_and_gzip(tmp_path):
    text = "a,b\r\n1,x\r\n2,y\r\n3,\r\n"
    plain = tmp_path / "t.csv"
    plain.write_bytes(text.encode())
    packed = tmp_path / "t.csv.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for path in (plain, packed):
        blocks = list(read_text_blocks(path, chunk_rows=2, skip_header=True))
        assert [b.first_line for b in blocks] == [2, 4]
        assert [line for b in blocks for line in b.lines().to_pylist()] == ["1,x", "2,y", "3,"]
        cols = blocks[1].columns(delimiter=",", min_columns=2, max_columns=2)
        assert [c.to_pylist() for c in cols] == [["3"], [""]]
        assert count_lines(path, header=True) == 3


def test_columns_pads_short_lines_and_names_bad_lines(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("1\t2\t3\n4\t5\n6\t7\t8\n")
    block = next(read_text_blocks(path, chunk_rows=10))
    cols = block.columns(delimiter="\t", min_columns=2, max_columns=3)
    assert [c.to_pylist() for c in cols] == [["1", "4", "6"], ["2", "5", "7"], ["3", "", "8"]]
    with pytest.raises(ValueError, match=r"t\.tsv:2: expected 3 '\\t'-separated columns, got 2"):
        block.columns(delimiter="\t", min_columns=3, max_columns=3)
    path.write_text("1\t2\n\n3\t4\t5\t6\n")
    block = next(read_text_blocks(path, chunk_rows=10))
    with pytest.raises(ValueError, match=r"t\.tsv:2: empty line"):
        block.columns(delimiter="\t", min_columns=2, max_columns=3)


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\nok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"t\.txt:3: not UTF-8"):
        next(read_text_blocks(path, chunk_rows=10)).lines()


def test_count_lines_rejects_empty_files(tmp_path):
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "h.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="e.txt: empty file"):
        count_lines(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="h.csv: empty file"):
        count_lines(tmp_path / "h.csv", header=True)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        count_lines(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------- the two passes


def _run(source, folder: Path, chunk_rows: int, **kw) -> tuple[dict, dict]:
    folder.mkdir()
    meta = preprocess(source, folder, min_count=kw.get("min_count"), seed=kw.get("seed", 0),
                      chunk_rows=chunk_rows, progress=False)
    return meta, {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_preprocess_output_is_independent_of_chunk_rows(tmp_path):
    src = CriteoSource(paths=[write_criteo(tmp_path / "c.txt", 300)])
    meta_one, files_one = _run(src, tmp_path / "one", 10**6)
    meta_small, files_small = _run(src, tmp_path / "small", 7)
    assert meta_one == meta_small
    assert files_one == files_small  # every array, the counts and the vocabulary, byte for byte


def test_preprocess_matches_a_plain_python_reference(tmp_path):
    """Ids, counts and dense values against an independent Counter-based implementation."""
    path = write_criteo(tmp_path / "c.txt", 400, seed=1)
    meta, _ = _run(CriteoSource(paths=[path]), tmp_path / "out", 64, min_count=3, seed=5)
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    codes = assign_splits(len(rows), (0.8, 0.1, 0.1), seed=5)
    assert meta["rows"] == {"train": 320, "valid": 40, "test": 40} and meta["min_count"] == 3
    sparse = {s: np.load(tmp_path / "out" / f"{s}.sparse.npy") for s in ("train", "valid", "test")}
    dense = np.load(tmp_path / "out" / "train.dense.npy")
    label = np.load(tmp_path / "out" / "test.label.npy")
    counts = np.load(tmp_path / "out" / "counts.npy")
    offset = 0
    for f in range(26):
        train_values = [r[14 + f] for r, c in zip(rows, codes, strict=True) if c == 0]
        counter = Counter(train_values)
        kept = sorted((v for v, n in counter.items() if n >= 3), key=lambda v: (-counter[v], v))
        ids = {v: i for i, v in enumerate(kept)}
        oov = len(kept)
        assert meta["fields"][f] == {"name": f"C{f + 1}", "num_embeddings": oov + 1, "oov_id": oov}
        expected_counts = [counter[v] for v in kept] + [sum(n for n in counter.values() if n < 3)]
        assert counts[offset:offset + oov + 1].tolist() == expected_counts
        offset += oov + 1
        for s, split in enumerate(("train", "valid", "test")):
            expected = [ids.get(r[14 + f], oov) for r, c in zip(rows, codes, strict=True) if c == s]
            assert sparse[split][:, f].tolist() == expected
    train_rows = [r for r, c in zip(rows, codes, strict=True) if c == 0]
    expected_dense = [[np.log1p(max(float(x or 0), 0.0)) for x in r[1:14]] for r in train_rows]
    np.testing.assert_allclose(dense, expected_dense, rtol=1e-6)
    assert label.tolist() == [float(r[0]) for r, c in zip(rows, codes, strict=True) if c == 2]
    assert meta["vocab_bytes"] == 12 * sum(f["num_embeddings"] - 1 for f in meta["fields"])


def test_preprocess_rejects_bad_chunk_rows(tmp_path):
    src = CriteoSource(paths=[write_criteo(tmp_path / "c.txt", 5)])
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            preprocess(src, tmp_path, min_count=None, seed=0, chunk_rows=bad, progress=False)
