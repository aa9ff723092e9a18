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


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
