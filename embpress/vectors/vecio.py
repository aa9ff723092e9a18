"""Vector files: raw float32 (``.f32``), numpy ``.npy`` and FAISS ``.fvecs``, with memmap openers.

Named pairs (STYLE §8): ``write_f32`` / ``open_f32`` / ``append_f32`` for the raw row-major
float32 files the index keeps its re-ranking originals in, and :func:`read_vectors` for whatever a
user hands the CLI. Writers are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from embpress.atomic import atomic_open


def write_f32(path: str | os.PathLike, x: np.ndarray) -> None:
    """Write (N, D) vectors as raw little-endian float32 rows, atomically."""
    x = np.ascontiguousarray(x, dtype="<f4")
    if x.ndim != 2:
        raise ValueError(f"write_f32 expects a 2-D array (N, D), got shape {x.shape}")
    with atomic_open(path, "wb") as fh:
        fh.write(memoryview(x).cast("B"))


def append_f32(path: str | os.PathLike, x: np.ndarray) -> None:
    """Append (N, D) float32 rows to a raw ``.f32`` file (created when missing), then fsync."""
    x = np.ascontiguousarray(x, dtype="<f4")
    with open(path, "ab") as fh:
        fh.write(memoryview(x).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())


def open_f32(path: str | os.PathLike, d: int, *, n: int | None = None) -> np.ndarray:
    """Read-only memmap (N, d) of a raw ``.f32`` file; ``n`` checks the row count when given.

    Raises ValueError when the file size is not a whole number of rows (a truncated file) or
    does not hold ``n`` rows.
    """
    path = Path(path)
    size = path.stat().st_size
    row = 4 * d
    if d < 1 or size % row:
        raise ValueError(f"{path}: {size} bytes is not a whole number of float32 rows of d={d} "
                         "(truncated or not a .f32 file of that dimension)")
    rows = size // row
    if n is not None and rows != n:
        raise ValueError(f"{path}: holds {rows} rows of d={d}, expected {n} (truncated or extended)")
    if rows == 0:
        return np.zeros((0, d), dtype=np.float32)
    return np.memmap(path, dtype="<f4", mode="r", shape=(rows, d))


def read_fvecs(path: str | os.PathLike) -> np.ndarray:
    """Read a FAISS/TEXMEX ``.fvecs`` file (each row: int32 d, then d float32) into (N, d) float32."""
    path = Path(path)
    raw = np.fromfile(path, dtype="<i4")
    if raw.size == 0:
        return np.zeros((0, 0), dtype=np.float32)
    d = int(raw[0])
    if d < 1 or raw.size % (d + 1):
        raise ValueError(f"{path}: not a valid .fvecs file (first dimension {d}, {raw.size * 4} bytes)")
    rows = raw.reshape(-1, d + 1)
    if not (rows[:, 0] == d).all():
        bad = int(np.flatnonzero(rows[:, 0] != d)[0])
        raise ValueError(f"{path}: row {bad} declares d={rows[bad, 0]}, expected {d}")
    return np.ascontiguousarray(rows[:, 1:]).view("<f4").astype(np.float32)


def read_vectors(path: str | os.PathLike, *, d: int | None = None, mmap: bool = True) -> np.ndarray:
    """Load (N, D) vectors from ``.npy`` (memmapped when ``mmap``), ``.fvecs``, or ``.f32`` (needs ``d``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vector file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as e:  # a damaged header raises ValueError, SyntaxError, EOFError or TokenError
            raise ValueError(f"{path}: unreadable .npy file ({type(e).__name__}: {e})") from None
    elif suffix == ".fvecs":
        x = read_fvecs(path)
    elif suffix == ".f32":
        if d is None:
            raise ValueError(f"{path}: a raw .f32 file needs its dimension: pass d")
        x = open_f32(path, d)
    else:
        raise ValueError(f"{path}: unknown vector file type {suffix!r}; use .npy, .fvecs or .f32")
    if x.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array (N, D), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{path}: no vectors (shape {x.shape}); give a file with at least one vector")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: expected real numbers, got dtype {x.dtype}")
    return x


class VectorFile:
    """Row blocks of a ``.npy`` or raw ``.f32`` vector file, read with ``pread`` (never mapped whole).

    Streaming through a memory map would count every page read as resident memory; reading blocks
    into fresh arrays keeps the peak at one block however large the file.

    Attributes: ``n`` rows, ``d`` columns, ``dtype`` as stored.
    """

    def __init__(self, path: str | os.PathLike, *, d: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"vector file {self.path} not found")
        suffix = self.path.suffix.lower()
        size = self.path.stat().st_size
        if suffix == ".npy":
            with open(self.path, "rb") as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read(fh)
                except ValueError as e:
                    raise ValueError(f"{self.path}: unreadable .npy header ({e})") from None
                self.offset = fh.tell()
            if len(shape) != 2 or fortran:
                raise ValueError(f"{self.path}: expected a C-ordered 2-D array (N, D), got shape {shape}"
                                 f"{' in Fortran order' if fortran else ''}")
            self.n, self.d = int(shape[0]), int(shape[1])
            self.dtype = np.dtype(dtype)
        elif suffix == ".f32":
            if d is None:
                raise ValueError(f"{self.path}: a raw .f32 file needs its dimension: pass d")
            self.offset, self.dtype, self.d = 0, np.dtype("<f4"), int(d)
            if self.d < 1 or size % (4 * self.d):
                raise ValueError(f"{self.path}: {size} bytes is not a whole number of float32 rows of d={d}")
            self.n = size // (4 * self.d)
        else:
            raise ValueError(f"{self.path}: cannot stream {suffix!r} files; use .npy or .f32 "
                             "(convert .fvecs with read_vectors + np.save)")
        if self.dtype.kind not in "fiu":
            raise ValueError(f"{self.path}: expected real numbers, got dtype {self.dtype}")
        expect = self.offset + self.n * self.d * self.dtype.itemsize
        if size != expect:
            raise ValueError(f"{self.path}: {size} bytes, but its header promises {expect} "
                             f"({self.n} x {self.d} {self.dtype}); the file is truncated or extended")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new (stop-start, d) float32 array."""
        start, stop = max(0, start), min(self.n, stop)
        row = self.d * self.dtype.itemsize
        nbytes = (stop - start) * row
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = bytearray(nbytes)
            view, got = memoryview(buf), 0
            while got < nbytes:
                chunk = os.preadv(fd, [view[got:]], self.offset + start * row + got)
                if chunk == 0:
                    raise ValueError(f"{self.path}: file ended at row {start + got // row} while reading "
                                     f"rows {start}:{stop}; it changed while being read")
                got += chunk
        finally:
            os.close(fd)
        rows = np.frombuffer(buf, dtype=self.dtype).reshape(stop - start, self.d)
        return rows if self.dtype == np.float32 else rows.astype(np.float32)  # no second copy for float32


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
