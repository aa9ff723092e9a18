"""libFM-format CTR files with one one-hot feature per field (Frappe, MovieLens-tag of NFM).

Each line is ``label idx:1 idx:1 ...``: the label is -1/1 or 0/1 (-1 becomes 0), then exactly
one ``index:value`` token per field, the field being the token's position (Frappe: 10 fields).
The raw value of a field is the feature index; the value must be 1 (these are one-hot files).
Rows of all files are pooled and re-split at random 7:2:1 with the seed, as BARS does for
Frappe_x1 (https://arxiv.org/abs/2009.05794). Default ``min_count`` 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embpress.data.preprocess import (
    RawChunk,
    Source,
    check_file,
    count_lines,
    line_error,
    read_text_blocks,
    source_files,
)

_LABELS = {"1": 1.0, "+1": 1.0, "-1": 0.0, "0": 0.0}
_FEATURE = r"^(?P<index>\d+):(?P<value>.+)$"


class LibFMSource(Source):
    """libFM files, pooled in order; the field count is set by the first line of the first file.

    Args:
        paths: one or more libFM text files.

    Examples:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> d = pathlib.Path(tmp.name)
        >>> _ = (d / "x.libfm").write_text("-1 3:1 17:1\\n1 4:1 17:1\\n")
        >>> src = LibFMSource(paths=[d / "x.libfm"])
        >>> chunk = next(src.chunks(10))
        >>> src.field_names(), chunk.label.tolist(), chunk.cats[0].to_pylist()
        (('f1', 'f2'), [0.0, 1.0], ['3', '4'])
        >>> tmp.cleanup()
    """

    format: ClassVar[str] = "libfm"
    default_min_count: ClassVar[int] = 1
    split_ratios: ClassVar[tuple[float, float, float]] = (0.7, 0.2, 0.1)

    def __init__(self, *, paths: list[str | Path] | tuple[str | Path, ...]):
        self.paths = paths

    @classmethod
    def from_spec(cls, arg: str, *, cache_dir: Path, progress: bool) -> LibFMSource:
        return cls(paths=source_files(arg, form="libfm:PATH[,PATH...]"))

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in self.paths)

    def dataset_name(self) -> str:
        """The first file's name up to its first dot (``frappe.validation.libfm`` -> ``frappe``)."""
        return self.files[0].name.split(".", 1)[0] or self.format

    def field_names(self) -> tuple[str, ...]:
        path = check_file(self.files[0])
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
        if not first.strip():
            raise ValueError(f"{path}: empty file" if not first else f"{path}:1: empty line")
        return tuple(f"f{i}" for i in range(1, len(first.split())))

    def count_rows(self, *, progress: bool) -> int:
        return sum(count_lines(p, progress=progress) for p in self.files)

    def chunks(self, chunk_rows: int) -> Iterator[RawChunk]:
        num_fields = len(self.field_names())
        for path in self.files:
            for block in read_text_blocks(path, chunk_rows=chunk_rows):
                yield _parse(block.lines(), num_fields, path, block.first_line)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _parse(lines: pa.Array, num_fields: int, path: Path, first_line: int) -> RawChunk:
    """Vectorised parse of one chunk of lines; the first bad line raises ``ValueError``."""
    parts = pc.utf8_split_whitespace(lines)
    lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    bad = lengths != num_fields + 1
    if bad.any():
        i = _first(bad)
        raise line_error(path, first_line + i, "empty line" if not lines[i].as_py().strip() else
                         f"expected {num_fields} features (one per field, as on the first line), "
                         f"got {lengths[i] - 1}")
    tokens = parts.flatten()
    row_start = np.arange(len(lines)) * (num_fields + 1)

    raw_labels = tokens.take(pa.array(row_start))
    label = np.empty(len(lines), dtype=np.float32)
    for value in pc.unique(raw_labels).to_pylist():
        y = _LABELS.get(value)
        if y is None:
            try:
                y = {1.0: 1.0, -1.0: 0.0, 0.0: 0.0}[float(value)]
            except (ValueError, KeyError):
                i = _first(pc.equal(raw_labels, value).to_numpy(zero_copy_only=False))
                raise line_error(path, first_line + i, f"label {value!r} is not one of -1, 0, 1") from None
        label[pc.equal(raw_labels, value).to_numpy(zero_copy_only=False)] = y

    cats = []
    for f in range(num_fields):
        token = tokens.take(pa.array(row_start + 1 + f))
        match = pc.extract_regex(token, _FEATURE)
        bad = match.is_null().to_numpy(zero_copy_only=False)
        if bad.any():
            i = _first(bad)
            raise line_error(path, first_line + i, f"bad feature {token[i].as_py()!r}: expected index:value, "
                                                   "e.g. 266:1")
        value = match.field("value")
        for v in pc.unique(value.filter(pc.not_equal(value, "1"))).to_pylist():
            try:
                one = float(v) == 1.0
            except ValueError:
                one = None
            if not one:
                i = _first(pc.equal(value, v).to_numpy(zero_copy_only=False))
                why = "value is not a number" if one is None else "only one-hot libFM files (every value 1) " \
                                                                   "are supported"
                raise line_error(path, first_line + i, f"bad feature {token[i].as_py()!r}: {why}")
        cats.append(match.field("index"))
    return RawChunk(label=label, dense=np.zeros((len(lines), 0)), cats=tuple(cats))
