"""Two-pass, chunked preprocessing of raw CTR files into field-local ids, as the CTR literature does it.

The conventions follow FuxiCTR / BARS (Zhu et al., "Open Benchmarking for Click-Through Rate
Prediction", CIKM 2021, https://arxiv.org/abs/2009.05794, and reczoo/FuxiCTR):

- rows are split at random into train/valid/test with a seed (8:1:1 unless the format says
  otherwise); the split is exact (``N * ratio`` rows, rounded down for valid and test);
- each categorical field gets a vocabulary built on the **train split only**: raw values seen at
  least ``min_count`` times keep their own id, every other value (rare in train, or never seen in
  train) maps to ONE per-field out-of-vocabulary id;
- kept values are numbered by descending training count (ties: ascending raw value), so id 0 is
  the most frequent value, and the OOV id is the last id (``num_embeddings - 1``);
- ``Field.counts[i]`` is the training count of id ``i``; the OOV entry holds the training rows
  whose value was rare (unseen values of valid/test rows count nowhere);
- dense (integer-count) features become ``log1p(max(x, 0))``; an empty field is 0.

Large files are streamed in chunks of ``chunk_rows`` rows with bounded memory: pass 0 counts the
rows (a byte scan), pass 1 counts training values per field, pass 2 maps values to ids and writes
``.npy`` arrays by appending blocks (no writable memory map). Every step is row-wise, counts are exact sums and the id order is a
total order, so the output does not depend on ``chunk_rows``.

A format plugs in as a :class:`Source` that yields :class:`RawChunk` objects and raises
``ValueError`` naming the file and line of any malformed row.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from embpress.data import cache
from embpress.progress import progress_task

PREPROCESS_VERSION = 1
"""Bump when any processing rule changes: it is part of the cache key."""

SMALL_TRAIN_ROWS = 100_000
"""Below this many training rows a format's default ``min_count`` is lowered to at most 2."""

VOCAB_ENTRY_BYTES = 12
"""Bytes per kept raw value in ``vocab_bytes``: an 8-byte key (the raw value as a 64-bit integer
or its 64-bit hash) plus a 4-byte id. The OOV id needs no entry; hash-table slack is not counted."""

SPLITS = ("train", "valid", "test")




# --------------------------------------------------------------------------------------------
# Sources: what a format provides


@dataclass(frozen=True)
class RawChunk:
    """Consecutive raw rows of a source, already validated.

    ``label: float32[n]`` in {0, 1}; ``dense: float64[n, Dd]`` raw numbers (missing already 0);
    ``cats``: one string array of length ``n`` per field (raw values; ``""`` is a value too).
    """

    label: np.ndarray
    dense: np.ndarray
    cats: tuple[pa.Array, ...]

    def __len__(self) -> int:
        return len(self.label)


class Source(abc.ABC):
    """A raw CTR data set in one file format: its files, schema, and a chunked, validating reader.

    Subclasses set the class attributes, store their constructor arguments unchanged, and read
    headers lazily in :meth:`field_names`.
    """

    format: ClassVar[str]
    default_min_count: ClassVar[int]
    split_ratios: ClassVar[tuple[float, float, float]] = (0.8, 0.1, 0.1)

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, arg: str, *, cache_dir: Path, progress: bool) -> Source:
        """Build from the part of a dataset spec after ``"<format>:"``; missing files raise
        ``FileNotFoundError``."""

    @property
    @abc.abstractmethod
    def files(self) -> tuple[Path, ...]:
        """Every input file, in a fixed order; their bytes key the cache."""

    def dataset_name(self) -> str:
        return self.format

    @abc.abstractmethod
    def field_names(self) -> tuple[str, ...]:
        """Names of the F categorical fields, in column order of ``RawChunk.cats``."""

    def dense_names(self) -> tuple[str, ...]:
        return ()

    @abc.abstractmethod
    def count_rows(self, *, progress: bool) -> int:
        """Number of data rows over all files (pass 0). An empty file raises ``ValueError``."""

    @abc.abstractmethod
    def chunks(self, chunk_rows: int) -> Iterator[RawChunk]:
        """Yield the rows in file order, at most ``chunk_rows`` per chunk."""

    def notes(self) -> dict:
        """Human-readable processing conventions of this format (stored in ``CTRDataset.info``)."""
        return {}

    def split_codes(self, n: int, seed: int) -> np.ndarray:
        """``uint8[n]`` split code per row (0 train, 1 valid, 2 test). Default: the random split of
        :func:`assign_splits`; a format may split otherwise (e.g. hold out whole items)."""
        return assign_splits(n, self.split_ratios, seed)

    def catalog(self, field: int) -> pa.Array | None:
        """Raw values of field number ``field`` known apart from the rows (an item catalog), or None.

        Catalog values that no training row holds get their own ids, with count 0, after the kept
        values (instead of the OOV id), so that a cold item keeps its identity and its content.
        """
        return None


# --------------------------------------------------------------------------------------------
# Errors and streaming text input shared by the delimited-text formats


def line_error(path: Path, line: int, message: str) -> ValueError:
    """``ValueError("path:line: message")``, the one shape of every bad-input error."""
    return ValueError(f"{path}:{line}: {message}")


def check_file(path: Path) -> Path:
    """``path`` as a Path; ``FileNotFoundError`` naming it unless it is a readable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    return path


def source_files(arg: str, *, form: str) -> list[Path]:
    """The files of a ``FORMAT:PATH[,PATH...]`` spec: each must exist, none may be empty or repeated.

    ``form`` is the spec's form for messages (``"criteo:PATH[,PATH...]"``).

    Raises:
        ValueError: no file, an empty element, or one file given twice (its rows would count twice).
        FileNotFoundError: a file that does not exist (or is a folder).
    """
    parts = [p.strip() for p in arg.split(",")]
    if not any(parts):
        raise ValueError(f"{form.split(':')[0]} spec needs a file: {form!r}")
    if not all(parts):
        raise ValueError(f"empty file name in {arg!r}: {form!r}")
    paths = [check_file(Path(p).expanduser()) for p in parts]
    seen: dict[Path, Path] = {}
    for p in paths:
        real = p.resolve()
        if real in seen:
            raise ValueError(f"{p} is given twice (as {seen[real]} too): its rows would count twice; "
                             "give each file once")
        seen[real] = p
    return paths


def _open_stream(path: Path) -> pa.NativeFile:
    return pa.input_stream(str(path), compression="detect")


def count_lines(path: Path, *, header: bool = False, progress: bool = False) -> int:
    """Number of lines of a text file (``.gz``/``.bz2`` read transparently), minus the header.

    A last line without a newline counts; an empty file, or a header and nothing else, raises
    ``ValueError``.
    """
    path = check_file(path)
    n, last = 0, b"\n"
    size = path.stat().st_size
    with progress_task(f"counting rows of {path.name}", size, enabled=progress) as advance, \
            _open_stream(path) as fh:
        while block := fh.read(16 << 20):
            n += block.count(b"\n")
            last = block[-1:]
            advance(len(block))
    n += last != b"\n"
    n -= header
    if n <= 0:
        raise ValueError(f"{path}: empty file (no data rows)")
    return n


def read_header(path: Path, delimiter: str) -> list[str]:
    """Column names from the first line of a delimited file."""
    with _open_stream(check_file(path)) as fh:
        first = io.TextIOWrapper(fh, encoding="utf-8", newline="").readline().rstrip("\r\n")
    if not first:
        raise ValueError(f"{path}: empty file (no header line)")
    names = first.split(delimiter)
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise line_error(path, 1, f"duplicate column names in the header: {dup}")
    return names


def _block_size(path: Path, chunk_rows: int) -> int:
    """Bytes to read for about ``chunk_rows`` lines, within [4 KiB, 256 MiB]."""
    with _open_stream(path) as fh:
        head = fh.read(1 << 16)
    per_line = len(head) / max(1, head.count(b"\n"))
    return int(min(max(chunk_rows * per_line, 1 << 12), 1 << 28))


@dataclass(frozen=True)
class TextBlock:
    """Consecutive whole lines of a text file: ``data`` (each line ends with ``\n``), the offsets
    ``ends: int64[n]`` of the newlines in ``data``, and the 1-based number of the first line."""

    path: Path
    first_line: int
    data: bytes
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.ends)

    def lines(self) -> pa.Array:
        """The lines as a string array, without ``\n`` or ``\r\n``; bad UTF-8 names its line."""
        offsets = np.concatenate([[0], self.ends + 1]).astype(np.int64)
        raw = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(self), [None, pa.py_buffer(offsets),
                                                                              pa.py_buffer(self.data)])
        try:
            text = raw.cast(pa.large_string())
        except pa.ArrowInvalid:
            for i, line in enumerate(raw.to_pylist()):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    raise line_error(self.path, self.first_line + i, "not UTF-8 text") from None
            raise
        return pc.utf8_rtrim(text, characters="\r\n").cast(pa.string())

    def columns(self, *, delimiter: str, min_columns: int, max_columns: int) -> list[pa.Array]:
        """Split every line into ``max_columns`` string columns (quotes are not interpreted).

        Lines with fewer columns, but at least ``min_columns``, get ``""`` for the missing
        trailing ones. Fast path: Arrow's multi-threaded CSV parser; any irregular line sends the
        block to :func:`split_columns`, which pads or raises ``ValueError`` naming the line.
        """
        names = [f"c{j}" for j in range(max_columns)]
        try:
            table = pa_csv.read_csv(
                pa.py_buffer(self.data),
                read_options=pa_csv.ReadOptions(column_names=names, use_threads=True),
                parse_options=pa_csv.ParseOptions(delimiter=delimiter, quote_char=False, double_quote=False,
                                                  ignore_empty_lines=False),
                convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                                      strings_can_be_null=False))
            if table.num_rows == len(self):
                return [table.column(j).combine_chunks() for j in range(max_columns)]
        except pa.ArrowInvalid:
            pass
        return split_columns(self.lines(), delimiter=delimiter, min_columns=min_columns,
                             max_columns=max_columns, path=self.path, first_line=self.first_line)


def read_text_blocks(path: Path, *, chunk_rows: int, skip_header: bool = False) -> Iterator[TextBlock]:
    """Stream a text file (``.gz``/``.bz2`` read transparently) as blocks of ``chunk_rows`` lines
    (the last block fewer); memory is O(block). A last line without a newline counts."""
    path = check_file(path)
    block_size = _block_size(path, chunk_rows)
    line, carry, carry_ends = 1, b"", np.empty(0, dtype=np.int64)
    with _open_stream(path) as fh:
        while True:
            block = fh.read(block_size)
            final = not block
            if final and carry and not carry.endswith(b"\n"):
                block = b"\n"
            new_ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + len(carry)
            data = carry + block if carry else block
            ends = np.concatenate([carry_ends, new_ends]) if len(carry_ends) else new_ends
            if skip_header and line == 1 and len(ends):
                cut = int(ends[0]) + 1
                data, ends, line = data[cut:], ends[1:] - cut, 2
            used = 0  # lines emitted from this data
            base = 0  # byte offset of the first line not emitted
            while len(ends) - used >= chunk_rows or (final and len(ends) > used):
                k = min(chunk_rows, len(ends) - used)
                stop = int(ends[used + k - 1]) + 1
                yield TextBlock(path, line, data[base:stop], ends[used:used + k] - base)
                line, used, base = line + k, used + k, stop
            carry, carry_ends = data[base:], ends[used:] - base
            if final:
                return


def split_columns(lines: pa.Array, *, delimiter: str, min_columns: int, max_columns: int, path: Path,
                  first_line: int) -> list[pa.Array]:
    """Split lines into ``max_columns`` string columns; a line with fewer (but at least
    ``min_columns``) columns gets ``""`` for the missing trailing ones. Quotes are not interpreted.

    Raises:
        ValueError: an empty line, or a line with too few or too many columns (``file:line``).
    """
    parts = pc.split_pattern(lines, delimiter)
    lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    bad = (lengths < min_columns) | (lengths > max_columns)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        text = lines[i].as_py()
        want = f"{max_columns}" if min_columns == max_columns else f"{min_columns} to {max_columns}"
        raise line_error(path, first_line + i, "empty line" if not text else
                         f"expected {want} {delimiter!r}-separated columns, got {lengths[i]}: {text[:100]!r}")
    offsets = parts.offsets.to_numpy()
    starts = offsets[:-1] - offsets[0]
    values = parts.flatten()
    columns = []
    for j in range(max_columns):
        has = lengths > j
        if has.all():
            columns.append(values.take(pa.array(starts + j)))
        else:
            col = values.take(pa.array(np.where(has, starts + j, 0)))
            columns.append(pc.if_else(pa.array(has), col, ""))
    return columns


# --------------------------------------------------------------------------------------------
# Column parsing shared by the delimited-text formats


def parse_labels(col: pa.Array, path: Path, first_line: int, *, name: str = "label") -> np.ndarray:
    """``"0"``/``"1"`` strings to float32; anything else raises ``ValueError`` with its line."""
    ok = pc.is_in(col, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        value = col[i].as_py()
        what = "empty line or empty label" if value == "" else f"{name} {value!r}"
        raise line_error(path, first_line + i, f"{what}: the label must be 0 or 1")
    return pc.equal(col, "1").to_numpy(zero_copy_only=False).astype(np.float32)


def parse_dense(columns: Sequence[pa.Array], names: Sequence[str], path: Path, first_line: int) -> np.ndarray:
    """String columns to ``float64[n, len(names)]``: empty -> 0; non-numeric, NaN or infinite
    values raise ``ValueError`` naming the line and column."""
    out = np.zeros((len(columns[0]) if columns else 0, len(names)), dtype=np.float64)
    for j, (name, col) in enumerate(zip(names, columns, strict=True)):
        present = pc.not_equal(col, "")
        try:
            values = pc.cast(pc.if_else(present, col, pa.scalar(None, pa.string())), pa.float64())
        except pa.ArrowInvalid:
            for i, v in enumerate(col.to_pylist()):
                try:
                    float(v or 0)
                except ValueError:
                    raise line_error(path, first_line + i, f"column {name}: {v!r} is not a number") from None
            raise
        x = values.fill_null(0.0).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise line_error(path, first_line + i, f"column {name}: {col[i].as_py()!r} is NaN or infinite; "
                                                   "dense features must be finite numbers (empty means 0)")
        out[:, j] = x
    return out


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """``log1p(max(x, 0))`` as float32: the usual squashing of Criteo's heavy-tailed counts.

    Examples:
        >>> transform_dense(np.array([[0.0, -3.0, np.e - 1]])).round(3).tolist()
        [[0.0, 0.0, 1.0]]
    """
    return np.log1p(np.maximum(raw, 0.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Split, vocabulary


def split_sizes(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """Rows per split: valid and test get ``floor(n * ratio)``, train the rest (so >= 1 when n >= 1)."""
    n_valid, n_test = int(n * ratios[1]), int(n * ratios[2])
    return n - n_valid - n_test, n_valid, n_test


def assign_splits(n: int, ratios: Sequence[float], seed: int) -> np.ndarray:
    """``uint8[n]`` split code per row (0 train, 1 valid, 2 test): exact sizes, random placement.

    Uses one byte per row, so chunks of any size look up their rows' splits by position.

    Examples:
        >>> codes = assign_splits(10, (0.8, 0.1, 0.1), seed=0)
        >>> np.bincount(codes).tolist()
        [8, 1, 1]
    """
    codes = np.repeat(np.arange(3, dtype=np.uint8), split_sizes(n, ratios))
    np.random.default_rng(seed).shuffle(codes)
    return codes


def resolve_min_count(min_count: int | None, default: int, n_train: int) -> int:
    """The threshold in use: ``min_count`` if given, else the format ``default``, lowered to at
    most 2 when there are fewer than ``SMALL_TRAIN_ROWS`` training rows (a sample file, where a
    threshold meant for tens of millions of rows would send nearly every value to OOV)."""
    if min_count is not None:
        if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        return int(min_count)
    return default if n_train >= SMALL_TRAIN_ROWS else min(default, 2)


@dataclass(frozen=True)
class Vocabulary:
    """Raw value -> id of one field. ``values[i]`` is the raw value of id ``i``; the OOV id is
    ``len(values)``. ``counts: int64[len(values) + 1]`` training counts by id (last: rare values).

    Examples:
        >>> c = ValueCounter()
        >>> c.add(pa.array(["a", "b", "b", "c", "b", "a"]))
        >>> v = c.vocabulary(min_count=2)
        >>> v.values.to_pylist(), v.counts.tolist()
        (['b', 'a'], [3, 2, 1])
        >>> v.lookup(pa.array(["a", "zzz", "b"])).tolist()
        [1, 2, 0]
    """

    values: pa.Array
    counts: np.ndarray

    @property
    def oov_id(self) -> int:
        return len(self.values)

    @property
    def num_embeddings(self) -> int:
        return len(self.values) + 1

    @property
    def nbytes(self) -> int:
        """Bytes of the raw-value -> id map, ``VOCAB_ENTRY_BYTES`` per kept value."""
        return VOCAB_ENTRY_BYTES * len(self.values)

    def lookup(self, raw: pa.Array) -> np.ndarray:
        """``int32`` ids of raw string values; values not in the vocabulary get the OOV id."""
        idx = pc.index_in(raw, value_set=self.values)
        return idx.fill_null(self.oov_id).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


class ValueCounter:
    """Exact counts of the raw values of one field, accumulated chunk by chunk.

    Per-chunk counts are merged with an Arrow group-by once the pending counts outgrow the merged
    table, so the total merge work stays linear-ish and memory is O(distinct values).
    """

    def __init__(self) -> None:
        self._merged: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, values: pa.Array) -> None:
        if len(values) == 0:
            return
        vc = pc.value_counts(values)
        self._pending.append(pa.table({"value": vc.field("values"), "count": vc.field("counts")}))
        self._pending_rows += len(vc)
        merged_rows = 0 if self._merged is None else self._merged.num_rows
        if self._pending_rows >= max(merged_rows, 1 << 20):
            self._merge()

    def _merge(self) -> None:
        tables = ([] if self._merged is None else [self._merged]) + self._pending
        if tables:
            grouped = pa.concat_tables(tables).group_by("value").aggregate([("count", "sum")])
            self._merged = pa.table({"value": grouped["value"], "count": grouped["count_sum"]})
        self._pending, self._pending_rows = [], 0

    def vocabulary(self, min_count: int, catalog: pa.Array | None = None) -> Vocabulary:
        """Values with count >= ``min_count``, by descending count then ascending value; then the
        ``catalog`` values never counted (count 0, ascending), if a catalog is given."""
        self._merge()
        table = self._merged if self._merged is not None else pa.table(
            {"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        counts = table["count"].to_numpy().astype(np.int64)
        kept = int(np.count_nonzero(counts >= min_count))
        values = table["value"].slice(0, kept).combine_chunks()
        own = counts[:kept]
        if catalog is not None and len(catalog):
            catalog = catalog.cast(pa.string())
            seen = table["value"].combine_chunks() if table.num_rows else pa.array([], pa.string())
            unseen = pc.unique(catalog.filter(pc.invert(pc.is_in(catalog, value_set=seen))))
            unseen = unseen.take(pc.sort_indices(unseen))
            values = pa.concat_arrays([values, unseen])
            own = np.concatenate([own, np.zeros(len(unseen), dtype=np.int64)])
        return Vocabulary(values=values, counts=np.append(own, counts[kept:].sum()))


# --------------------------------------------------------------------------------------------
# The two passes


def preprocess(source: Source, folder: Path, *, min_count: int | None, seed: int, chunk_rows: int,
               progress: bool) -> dict:
    """Run passes 0-2 of ``source`` and write the arrays, counts and vocabulary into ``folder``
    (the cache layout of :mod:`embpress.data.cache`). Returns the metadata to store beside them.

    Args:
        source: the raw data set.
        folder: an empty folder (the caller renames it into the cache when this returns).
        min_count: vocabulary threshold, or None for the format default (:func:`resolve_min_count`).
        seed: seed of the random train/valid/test split.
        chunk_rows: rows per chunk; memory is O(chunk_rows + distinct training values).
        progress: show rich progress bars.
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    if min_count is not None:
        resolve_min_count(min_count, 1, 0)  # validate before the long passes
    names, dense_names = source.field_names(), source.dense_names()
    n = source.count_rows(progress=progress)
    codes = source.split_codes(n, seed)
    if not isinstance(codes, np.ndarray) or codes.shape != (n,) or codes.dtype != np.uint8 or codes.max() > 2:
        raise RuntimeError(f"{type(source).__name__}.split_codes must return uint8[{n}] codes in 0..2")
    sizes = tuple(int(c) for c in np.bincount(codes, minlength=3))

    counters = [ValueCounter() for _ in names]
    start = 0
    with progress_task(f"pass 1/2: counting {source.dataset_name()} values", n, enabled=progress) as advance:
        for chunk in source.chunks(chunk_rows):
            k = _check_chunk(chunk, start, n, len(names), len(dense_names), source)
            train = pa.array(codes[start:start + k] == 0)
            for counter, col in zip(counters, chunk.cats, strict=True):
                counter.add(col.filter(train))
            start += k
            advance(k)
    if start != n:
        raise ValueError(f"{source.format}: counted {n} rows but read {start}; did a file change? "
                         f"{[str(f) for f in source.files]}")

    threshold = resolve_min_count(min_count, source.default_min_count, sizes[0])
    vocabs = [c.vocabulary(threshold, source.catalog(f)) for f, c in enumerate(counters)]
    del counters

    outs = [cache.SplitWriter(folder, split, rows, len(dense_names), len(names))
            for split, rows in zip(SPLITS, sizes, strict=True)]
    cursors = [0, 0, 0]
    start = 0
    with progress_task(f"pass 2/2: writing {source.dataset_name()} ids", n, enabled=progress) as advance:
        for chunk in source.chunks(chunk_rows):
            k = _check_chunk(chunk, start, n, len(names), len(dense_names), source)
            ids = np.empty((k, len(names)), dtype=np.int32)
            for f, (vocab, col) in enumerate(zip(vocabs, chunk.cats, strict=True)):
                ids[:, f] = vocab.lookup(col)
            dense = transform_dense(chunk.dense)
            chunk_codes = codes[start:start + k]
            for s, out in enumerate(outs):
                rows = np.flatnonzero(chunk_codes == s)
                out.append(dense[rows], ids[rows], chunk.label[rows])
                cursors[s] += len(rows)
            start += k
            advance(k)
    if start != n or cursors != list(sizes):
        raise ValueError(f"{source.format}: the second pass read {start} rows, the first {n}; did a file "
                         f"change? {[str(f) for f in source.files]}")
    for out in outs:
        out.close()
    del outs

    cache.write_counts(folder, [v.counts for v in vocabs])
    cache.write_vocab(folder, [v.values for v in vocabs])
    return {
        "name": source.dataset_name(),
        "format": source.format,
        "fields": [{"name": name, "num_embeddings": v.num_embeddings, "oov_id": v.oov_id}
                   for name, v in zip(names, vocabs, strict=True)],
        "dense_names": list(dense_names),
        "rows": dict(zip(SPLITS, sizes, strict=True)),
        "vocab_bytes": sum(v.nbytes for v in vocabs),
        "min_count": threshold,
        "seed": seed,
        "split": list(source.split_ratios),
        "preprocess_version": PREPROCESS_VERSION,
        "notes": {
            "split": "random, exact sizes, seeded; rows keep file order within a split",
            "vocabulary": "built on train; ids by descending train count (ties: ascending raw value); "
                          "values with count < min_count and unseen values share the last id (OOV)",
            "vocab_bytes": f"{VOCAB_ENTRY_BYTES} bytes per kept value (8-byte key + 4-byte id); "
                           "OOV and hash-table slack not counted",
            "dense": "log1p(max(x, 0)); empty -> 0" if dense_names else "none",
            **source.notes(),
        },
    }


def _check_chunk(chunk: RawChunk, start: int, n: int, num_fields: int, num_dense: int, source: Source) -> int:
    k = len(chunk)
    if start + k > n:
        raise ValueError(f"{source.format}: read more than the {n} rows counted; did a file change? "
                         f"{[str(f) for f in source.files]}")
    if len(chunk.cats) != num_fields or chunk.dense.shape != (k, num_dense):
        raise RuntimeError(f"{type(source).__name__} yielded {len(chunk.cats)} fields and dense "
                           f"{chunk.dense.shape} for {num_fields} fields and {num_dense} dense")
    return k
