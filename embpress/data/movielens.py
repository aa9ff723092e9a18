"""MovieLens 100K and 1M ratings as a CTR task, and their download from GroupLens.

One row per rating; label = rating >= 4. Seven categorical fields: ``user``, ``item``, ``age``,
``gender``, ``occupation``, ``zip`` (the first 3 characters, the US ZIP3 area) and ``genre`` (the
movie's first listed genre). 100K ages are bucketed into the 1M age groups (1, 18, 25, 35, 45,
50, 56), so both variants share the encoding. Split random 8:1:1; default ``min_count`` 1.

Layouts (Harper & Konstan, "The MovieLens Datasets", TiiS 2015):

- 100K: ``u.data`` (tab: user item rating timestamp), ``u.user`` (``|``: id|age|gender|occupation|zip),
  ``u.item`` (``|``, latin-1: id|title|release|video release|url| 19 genre flags).
- 1M: ``ratings.dat`` (``::``: user::item::rating::timestamp), ``users.dat``
  (user::gender::age::occupation::zip), ``movies.dat`` (latin-1: id::title::Genre1|Genre2).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from embpress.data.preprocess import RawChunk, Source, check_file, count_lines, line_error, progress_task

FIELDS = ("user", "item", "age", "gender", "occupation", "zip", "genre")
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
               "Thriller", "War", "Western")
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
_LAYOUTS = {
    "100k": {"ratings": ("u.data", "\t"), "users": ("u.user", "|"), "items": ("u.item", "|")},
    "1m": {"ratings": ("ratings.dat", "::"), "users": ("users.dat", "::"), "items": ("movies.dat", "::")},
}

MOVIELENS_DOWNLOADS = {
    "100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    "1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
}
"""variant -> (official GroupLens URL, md5 of the zip as published beside it in ``<zip>.md5``)."""


def _age_group(age: int) -> int:
    return max(g for g in AGE_GROUPS if g <= max(age, 1))


class MovieLensSource(Source):
    """A MovieLens 100K or 1M folder (the variant is read from the file names present).

    Args:
        path: the folder holding ``u.data``/``u.user``/``u.item`` or ``ratings.dat``/``users.dat``/``movies.dat``.

    Examples:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> d = pathlib.Path(tmp.name)
        >>> _ = (d / "ratings.dat").write_text("1::10::5::978300760\\n")
        >>> _ = (d / "users.dat").write_text("1::F::1::10::48067\\n")
        >>> _ = (d / "movies.dat").write_text("10::Toy Story (1995)::Animation|Comedy\\n")
        >>> src = MovieLensSource(path=d)
        >>> chunk = next(src.chunks(10))
        >>> src.variant(), chunk.label.tolist(), [c.to_pylist()[0] for c in chunk.cats]
        ('1m', [1.0], ['1', '10', '1', 'F', '10', '480', 'Animation'])
        >>> tmp.cleanup()
    """

    format: ClassVar[str] = "movielens"
    default_min_count: ClassVar[int] = 1

    def __init__(self, *, path: str | Path):
        self.path = path

    @classmethod
    def from_spec(cls, arg: str, *, cache_dir: Path, progress: bool) -> MovieLensSource:
        """``movielens:FOLDER``; ``movielens:100k`` or ``movielens:1m`` (when no such folder exists)
        downloads the variant into ``cache_dir/downloads`` first."""
        if not arg:
            raise ValueError("movielens spec needs a folder: 'movielens:FOLDER' (or 'movielens:100k', "
                             "'movielens:1m' to download)")
        path = Path(arg).expanduser()
        if not path.exists() and arg.lower() in MOVIELENS_DOWNLOADS:
            path = download_movielens(arg.lower(), cache_dir / "downloads", progress=progress)
        source = cls(path=path)
        for f in source.files:
            check_file(f)
        return source

    def variant(self) -> str:
        folder = Path(self.path)
        for variant, layout in _LAYOUTS.items():
            if (folder / layout["ratings"][0]).is_file():
                return variant
        if not folder.is_dir():
            raise FileNotFoundError(f"MovieLens folder not found: {folder}")
        raise FileNotFoundError(f"{folder}: no MovieLens ratings file (u.data for 100K, ratings.dat for 1M)")

    def _file(self, role: str) -> tuple[Path, str]:
        name, sep = _LAYOUTS[self.variant()][role]
        return Path(self.path) / name, sep

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self._file(role)[0] for role in ("ratings", "users", "items"))

    def dataset_name(self) -> str:
        return f"movielens-{self.variant()}"

    def field_names(self) -> tuple[str, ...]:
        return FIELDS

    def count_rows(self, *, progress: bool) -> int:
        return count_lines(self._file("ratings")[0], progress=progress)

    def chunks(self, chunk_rows: int) -> Iterator[RawChunk]:
        users, items = self._users(), self._items()
        path, sep = self._file("ratings")
        with open(check_file(path), encoding="latin-1") as fh:
            lineno = 1
            while lines := list(itertools.islice(fh, chunk_rows)):
                label = np.empty(len(lines), dtype=np.float32)
                cols: list[list[str]] = [[] for _ in FIELDS]
                for i, line in enumerate(lines):
                    parts = line.rstrip("\r\n").split(sep)
                    if len(parts) != 4:
                        raise line_error(path, lineno + i, f"expected 4 {sep!r}-separated columns "
                                                           f"(user, item, rating, timestamp), got {len(parts)}")
                    user, item, rating = parts[0], parts[1], parts[2]
                    try:
                        label[i] = float(rating) >= 4
                    except ValueError:
                        raise line_error(path, lineno + i, f"rating {rating!r} is not a number") from None
                    if user not in users:
                        raise line_error(path, lineno + i, f"user {user!r} is not in {self._file('users')[0].name}")
                    if item not in items:
                        raise line_error(path, lineno + i, f"item {item!r} is not in {self._file('items')[0].name}")
                    for col, value in zip(cols, (user, item, *users[user], items[item]), strict=True):
                        col.append(value)
                yield RawChunk(label=label, dense=np.zeros((len(lines), 0)),
                               cats=tuple(pa.array(c, type=pa.string()) for c in cols))
                lineno += len(lines)

    def _lines(self, role: str) -> Iterator[tuple[int, list[str]]]:
        path, sep = self._file(role)
        with open(check_file(path), encoding="latin-1") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield lineno, line.rstrip("\r\n").split(sep)

    def _users(self) -> dict[str, tuple[str, str, str, str]]:
        """user id -> (age group, gender, occupation, zip3)."""
        path, variant = self._file("users")[0], self.variant()
        users = {}
        for lineno, parts in self._lines("users"):
            if len(parts) != 5:
                raise line_error(path, lineno, f"expected 5 columns (user, age, gender, occupation, zip), "
                                               f"got {len(parts)}")
            if variant == "100k":
                uid, age, gender, occupation, zipcode = parts
                if not age.isdigit():
                    raise line_error(path, lineno, f"age {age!r} is not an integer")
                age = str(_age_group(int(age)))
            else:
                uid, gender, age, occupation, zipcode = parts
            users[uid] = (age, gender, occupation, zipcode[:3])
        return users

    def _items(self) -> dict[str, str]:
        """item id -> first genre ('' when none is listed)."""
        path, variant = self._file("items")[0], self.variant()
        items = {}
        for lineno, parts in self._lines("items"):
            if variant == "100k":
                flags = parts[-len(GENRES_100K):]
                if len(parts) < 5 + len(GENRES_100K) or any(f not in ("0", "1") for f in flags):
                    raise line_error(path, lineno, f"expected id|title|release|video release|url and "
                                                   f"{len(GENRES_100K)} 0/1 genre flags")
                items[parts[0]] = GENRES_100K[flags.index("1")] if "1" in flags else ""
            else:
                if len(parts) != 3:
                    raise line_error(path, lineno, f"expected 3 columns (id, title, genres), got {len(parts)}")
                items[parts[0]] = parts[2].split("|")[0]
        return items

    def notes(self) -> dict:
        return {"label": "rating >= 4", "zip": "first 3 characters", "genre": "first listed genre",
                "age": "1M age groups (100K ages bucketed)"}


def _fetch(url: str, dest: Path, *, progress: bool) -> None:
    """Download ``url`` to ``dest`` (replaced in tests: there is no network there)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress_task(f"downloading {url.rsplit('/', 1)[-1]}", total, enabled=progress) as advance:
            while block := response.read(1 << 20):
                out.write(block)
                advance(len(block))


def download_movielens(variant: str = "100k", dest: str | Path | None = None, *, progress: bool = True) -> Path:
    """Download and extract MovieLens ``variant`` ("100k" or "1m") into ``dest/ml-<variant>``.

    The zip's md5 is checked against the value GroupLens publishes; the zip is extracted into a
    temporary folder that is renamed into place only when complete, so ``dest/ml-<variant>``
    exists only whole. An existing folder is returned without downloading.

    Args:
        variant: "100k" or "1m".
        dest: parent folder; default ``<default cache dir>/downloads``.
        progress: show a download progress bar.

    Returns:
        The folder to pass to ``load_dataset("movielens:<folder>")``.

    Raises:
        ValueError: unknown variant, checksum mismatch, or a zip without the expected folder.
        ConnectionError: the download failed (no network): the message says to pass a local folder.
    """
    from embpress.data.cache import default_cache_dir

    if variant not in MOVIELENS_DOWNLOADS:
        raise ValueError(f"MovieLens variant {variant!r} not in {sorted(MOVIELENS_DOWNLOADS)}")
    url, md5 = MOVIELENS_DOWNLOADS[variant]
    dest = Path(dest) if dest is not None else default_cache_dir() / "downloads"
    folder = dest / f"ml-{variant}"
    if folder.is_dir():
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".ml-{variant}.tmp-", dir=dest))
    try:
        archive = tmp / f"ml-{variant}.zip"
        try:
            _fetch(url, archive, progress=progress)
        except OSError as e:  # URLError, timeouts, refused or reset connections
            why = getattr(e, "reason", None) or e
            raise ConnectionError(f"could not download {url} ({why}); without network, download and unzip it "
                                  f"elsewhere and pass the folder: 'movielens:/path/to/ml-{variant}'") from None
        digest = hashlib.md5(usedforsecurity=False)
        with open(archive, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != md5:
            raise ValueError(f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; "
                             "the download is corrupt or truncated, try again")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp / "x")  # extractall drops absolute paths and '..' components
        inner = tmp / "x" / f"ml-{variant}"
        if not inner.is_dir():
            raise ValueError(f"{url}: the archive has no ml-{variant}/ folder")
        try:
            os.rename(inner, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
