"""Avazu mobile-ad click logs (Kaggle 2014 ``train`` CSV).

The header names the columns: ``id,click,hour,C1,banner_pos,site_id,...,C21``. ``id`` (unique per
row) is dropped, ``click`` is the label, and every other column is categorical. ``hour``
(``YYMMDDHH``) becomes three fields as in FuxiCTR's Avazu_x4 preprocessing
(reczoo/FuxiCTR ``fuxictr/datasets/avazu.py``): ``hour`` (hour of day ``0..23``, in place of the
raw column), and ``weekday`` (``0`` = Monday .. ``6`` = Sunday) and ``weekend`` (``0``/``1``)
appended after the last column; the raw timestamp would give every hour of the 10 days its own
id that never recurs in a random split's future. Standard file: 24 fields. Split random 8:1:1
(BARS Avazu_x4, https://arxiv.org/abs/2009.05794). Default ``min_count`` 5 (AutoInt,
https://arxiv.org/abs/1810.11921, data preparation).
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
    parse_labels,
    read_header,
    read_text_blocks,
    source_files,
)

LABEL, TIME, DROPPED = "click", "hour", ("id",)
DERIVED = ("weekday", "weekend")


class AvazuSource(Source):
    """Avazu CSV files with a header line, pooled in order (every header must be the same).

    Args:
        paths: one or more CSV files (optionally ``.gz``).

    Examples:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> d = pathlib.Path(tmp.name)
        >>> _ = (d / "a.csv").write_text("id,click,hour,C1,site_id\\n7,1,14102123,1005,1fbe01fe\\n")
        >>> src = AvazuSource(paths=[d / "a.csv"])
        >>> src.field_names()
        ('hour', 'C1', 'site_id', 'weekday', 'weekend')
        >>> [c.to_pylist()[0] for c in next(src.chunks(10)).cats]
        ['23', '1005', '1fbe01fe', '1', '0']
        >>> tmp.cleanup()
    """

    format: ClassVar[str] = "avazu"
    default_min_count: ClassVar[int] = 5

    def __init__(self, *, paths: list[str | Path] | tuple[str | Path, ...]):
        self.paths = paths

    @classmethod
    def from_spec(cls, arg: str, *, cache_dir: Path, progress: bool) -> AvazuSource:
        return cls(paths=source_files(arg, form="avazu:PATH[,PATH...]"))

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in self.paths)

    def _header(self) -> list[str]:
        headers = [read_header(p, ",") for p in self.files]
        for path, header in zip(self.files, headers, strict=True):
            if header != headers[0]:
                raise line_error(path, 1, f"header differs from the header of {self.files[0]}")
        missing = [c for c in (LABEL, TIME) if c not in headers[0]]
        if missing:
            raise line_error(self.files[0], 1, f"avazu header lacks column(s) {missing}; got {headers[0]}")
        return headers[0]

    def field_names(self) -> tuple[str, ...]:
        return tuple(c for c in self._header() if c != LABEL and c not in DROPPED) + DERIVED

    def count_rows(self, *, progress: bool) -> int:
        return sum(count_lines(p, header=True, progress=progress) for p in self.files)

    def chunks(self, chunk_rows: int) -> Iterator[RawChunk]:
        header = self._header()
        keep = [c for c in header if c != LABEL and c not in DROPPED]
        for path in self.files:
            for block in read_text_blocks(path, chunk_rows=chunk_rows, skip_header=True):
                line = block.first_line
                cols = dict(zip(header, block.columns(delimiter=",", min_columns=len(header),
                                                      max_columns=len(header)), strict=True))
                label = parse_labels(cols[LABEL], path, line, name=LABEL)
                hour, weekday, weekend = _split_hour(cols[TIME], path, line)
                cats = [hour if c == TIME else cols[c] for c in keep]
                yield RawChunk(label=label, dense=np.zeros((len(label), 0)), cats=(*cats, weekday, weekend))

    def notes(self) -> dict:
        return {"hour": "YYMMDDHH -> hour of day (in place), weekday 0=Mon..6=Sun and weekend 0/1 "
                        "(appended); 'id' dropped"}


def _split_hour(col: pa.Array, path: Path, first_line: int) -> tuple[pa.Array, pa.Array, pa.Array]:
    """``YYMMDDHH`` strings to (hour of day, weekday, weekend) string arrays."""
    well_formed = pc.match_substring_regex(col, r"^\d{8}$")
    ts = pc.strptime(pc.if_else(well_formed, col, pa.scalar(None, pa.string())), format="%y%m%d%H",
                     unit="s", error_is_null=True)
    bad = ts.is_null().to_numpy(zero_copy_only=False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise line_error(path, first_line + i, f"hour {col[i].as_py()!r} is not a YYMMDDHH time")
    weekday = pc.day_of_week(ts)
    return (pc.hour(ts).cast(pa.string()), weekday.cast(pa.string()),
            pc.greater_equal(weekday, 5).cast(pa.int8()).cast(pa.string()))
