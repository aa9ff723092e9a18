"""Criteo display-advertising logs (Kaggle 2014 ``train.txt`` and the Terabyte ``day_*`` files).

Each line is tab-separated: label (0/1), 13 integer features ``I1..I13``, 26 hashed categorical
features ``C1..C26`` (8 hex digits). Any feature may be empty, and trailing empty fields may be
absent (some copies strip trailing tabs, e.g. the pytorch-fm sample): an empty integer feature is 0
before the ``log1p(max(x, 0))`` transform, an empty categorical feature is the raw value ``""``,
the field's own "missing" value, which gets an id like any other value. ``.gz`` files are read
transparently. Several files are pooled in the order given, then split at random 8:1:1 as in
BARS Criteo_x4 (https://arxiv.org/abs/2009.05794, the split of AutoInt). Default ``min_count`` 10
(BARS Criteo_x4, AutoInt https://arxiv.org/abs/1810.11921).
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
    count_lines,
    line_error,
    parse_dense,
    parse_labels,
    read_text_blocks,
    source_files,
)

DENSE = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = ("label", *DENSE, *CATEGORICAL)
HEX_DIGITS = 8
MIN_COLUMNS = 1 + len(DENSE) + 1
"""Some copies strip trailing tabs (so trailing empty categoricals vanish): a line needs the label,
the 13 integer fields and at least one categorical field; absent trailing ones are empty."""


class CriteoSource(Source):
    """Criteo TSV files, pooled in order.

    Args:
        paths: one or more Kaggle/Terabyte TSV files (optionally ``.gz``).

    Examples:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> d = pathlib.Path(tmp.name)
        >>> row = "\\t".join(["1", "5", ""] + ["0"] * 11 + ["68fd1e64"] * 25 + [""])
        >>> _ = (d / "train.txt").write_text(row + "\\n")
        >>> src = CriteoSource(paths=[d / "train.txt"])
        >>> chunk = next(src.chunks(100))
        >>> chunk.label.tolist(), chunk.dense[0, :3].tolist(), chunk.cats[25].to_pylist()
        ([1.0], [5.0, 0.0, 0.0], [''])
        >>> tmp.cleanup()
    """

    format: ClassVar[str] = "criteo"
    default_min_count: ClassVar[int] = 10

    def __init__(self, *, paths: list[str | Path] | tuple[str | Path, ...]):
        self.paths = paths

    @classmethod
    def from_spec(cls, arg: str, *, cache_dir: Path, progress: bool) -> CriteoSource:
        return cls(paths=source_files(arg, form="criteo:PATH[,PATH...]"))

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in self.paths)

    def field_names(self) -> tuple[str, ...]:
        return CATEGORICAL

    def dense_names(self) -> tuple[str, ...]:
        return DENSE

    def count_rows(self, *, progress: bool) -> int:
        return sum(count_lines(p, progress=progress) for p in self.files)

    def chunks(self, chunk_rows: int) -> Iterator[RawChunk]:
        for path in self.files:
            for block in read_text_blocks(path, chunk_rows=chunk_rows):
                line = block.first_line
                if line == 1:
                    _check_width(block.data, path)
                cols = block.columns(delimiter="\t", min_columns=MIN_COLUMNS, max_columns=len(COLUMNS))
                cats = cols[1 + len(DENSE):]
                for name, col in zip(CATEGORICAL, cats, strict=True):
                    _check_hex(col, name, path, line)
                yield RawChunk(label=parse_labels(cols[0], path, line),
                               dense=parse_dense(cols[1:1 + len(DENSE)], DENSE, path, line),
                               cats=tuple(cats))

    def notes(self) -> dict:
        return {"missing": "empty categorical value is its own raw value ''; empty integer -> 0; "
                           "absent trailing columns are empty"}


WIDTH_SAMPLE = 1 << 20
"""Bytes at the start of each file in which at least one line must have all 40 columns."""


def _check_width(data: bytes, path: Path) -> None:
    """A file whose first lines all have fewer than 40 columns is not Criteo (or was cut column-wise):
    padding every line with empty categoricals would read it silently as something else."""
    head = data[:WIDTH_SAMPLE].split(b"\n")
    if len(head) > 1:
        head = head[:-1]  # the last piece may be a line cut by the sample
    widest = max(h.count(b"\t") for h in head) + 1
    if widest < len(COLUMNS):
        raise line_error(path, 1, f"no line among the first {len(head):,} has the {len(COLUMNS)} tab-separated "
                                  f"columns of Criteo (label, I1..I13, C1..C26); the widest has {widest}: "
                                  "not a Criteo file, or columns were cut")


def _check_hex(col: pa.Array, name: str, path: Path, first_line: int) -> None:
    """Criteo categorical values are 8 hex digits or empty; another length is a cut or corrupt line.
    (Only the length is checked: a regular expression would cost a third of the reading time.)"""
    length = pc.binary_length(col).to_numpy(zero_copy_only=False)
    ok = (length == 0) | (length == HEX_DIGITS)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise line_error(path, first_line + i, f"column {name}: {col[i].as_py()!r} is not 8 hex digits "
                                               "(truncated or corrupt line?)")
