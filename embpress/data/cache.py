"""The on-disk cache of processed CTR datasets: layout, content-hash keys, atomic builds, checks.

One processed dataset is one folder ``<cache_dir>/<name>-<key>`` holding::

    meta.json                     fields, dense names, rows, vocab_bytes, options, file sizes
    {train,valid,test}.dense.npy  float32[N, Dd]   log-transformed dense features
    {train,valid,test}.sparse.npy int32[N, F]      field-local ids
    {train,valid,test}.label.npy  float32[N]       0/1
    counts.npy                    int64[sum of num_embeddings]  per-field training counts, concatenated
    vocab.arrow                   Arrow IPC table (field int32, value string): kept raw values in id order

``key`` is a sha256 over the sha256 of every source file's bytes and every option that changes
the output (format, min_count, seed, split, processing version). A folder is built under a
temporary name in the cache folder and renamed into place when complete, so an interrupted
build leaves no folder under the final name. Arrays are written through :class:`SplitWriter`
(plain appends, no writable memory map), so a build's resident memory does not grow with the
rows written. :func:`read_dataset` checks that every file exists with the size and the CRC-32
recorded in ``meta.json`` (about 3 GB/s) and raises :class:`CacheError` naming the file otherwise;
the loaders then rebuild the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embpress.atomic import atomic_open, atomic_write_text
from embpress.data.schema import ArrayFile, CTRDataset, Split
from embpress.tables.base import Field

LAYOUT_VERSION = 2
"""Bump when the folder layout changes: it is part of the cache key."""

_SPLITS = ("train", "valid", "test")
_KINDS = {"dense": (np.float32, 2), "sparse": (np.int32, 2), "label": (np.float32, 1)}
_META = "meta.json"
_META_CRC = "meta.json.crc32"  # CRC-32 of meta.json's bytes: a damaged meta.json is caught too
_HASH_MEMO = "file-hashes.json"
_CRC_BLOCK = 64 << 20


class CacheError(ValueError):
    """A cached dataset folder is incomplete or inconsistent (the loader rebuilds it)."""


def default_cache_dir() -> Path:
    """``$EMBPRESS_CACHE`` if set, else ``~/.cache/embpress/data``."""
    env = os.environ.get("EMBPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "embpress" / "data"


# --------------------------------------------------------------------------------------------
# Keys


def file_sha256(path: str | os.PathLike, *, memo_dir: Path | None = None,
                advance: Callable[[int], None] | None = None) -> str:
    """sha256 hex digest of a file's bytes, read in 8 MiB blocks.

    With ``memo_dir``, the digest is remembered in ``memo_dir/file-hashes.json`` under the file's
    real path together with its size, inode, mtime and ctime (in ns), and reused while all four
    are unchanged, so a 10 GB source is hashed once, not at every load.
    """
    path = Path(path)
    st = path.stat()
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    real = str(path.resolve())
    memo_path = memo_dir / _HASH_MEMO if memo_dir is not None else None
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(memo_path.read_text())
        entry = memo.get(real) if isinstance(memo, dict) else None
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
            if advance is not None:
                advance(len(block))
    hexdigest = digest.hexdigest()
    if memo_path is not None:
        memo = memo if isinstance(memo, dict) else {}
        memo[real] = {"stamp": stamp, "sha256": hexdigest}
        with contextlib.suppress(OSError):
            atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    return hexdigest


def cache_key(parts: dict) -> str:
    """sha256 hex digest of ``parts`` as canonical JSON (sorted keys) plus ``LAYOUT_VERSION``."""
    text = json.dumps({"layout": LAYOUT_VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Atomic build


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_build(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on clean exit rename it to ``final``.

    On an exception the temporary folder is deleted. Leftovers of builds whose process died
    (``.<name>.tmp-<pid>-*`` with a dead pid) are removed first. If another process completed
    ``final`` meanwhile, its folder is kept and ours discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    for stale in final.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        for path in tmp.iterdir():  # mkstemp/mkdtemp make owner-only files; a cache is readable
            path.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard(folder: Path) -> None:
    """Delete a (corrupt) cache folder: rename it away first so no reader sees it half-deleted."""
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Writing


def _release_pages(a: np.ndarray) -> None:
    """Drop a read-only map's resident pages (they are re-read from the file when used again)."""
    mm = getattr(a, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def array_path(folder: Path, split: str, kind: str) -> Path:
    return Path(folder) / f"{split}.{kind}.npy"


class _ArrayWriter:
    """An ``.npy`` file of a known shape, filled by appending rows with plain writes."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), shape
        self.fh = open(self.path, "wb")  # noqa: SIM115  (closed by close())
        np.lib.format.write_array_header_1_0(
            self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        self.data_offset = self.fh.tell()
        self.rows = 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: cannot append rows of shape {rows.shape} at row {self.rows} "
                             f"of an array of shape {self.shape}")
        self.fh.write(rows.data)
        self.rows += len(rows)

    def close(self) -> None:
        self.fh.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")


class SplitWriter:
    """The three ``.npy`` files of a split (shapes in the module docstring), written by appending
    row blocks in order: memory stays at one block however many rows are written."""

    def __init__(self, folder: Path, split: str, rows: int, num_dense: int, num_fields: int) -> None:
        shapes = {"dense": (rows, num_dense), "sparse": (rows, num_fields), "label": (rows,)}
        self.writers = {kind: _ArrayWriter(array_path(folder, split, kind), _KINDS[kind][0], shape)
                        for kind, shape in shapes.items()}

    def append(self, dense: np.ndarray, sparse: np.ndarray, label: np.ndarray) -> None:
        for kind, rows in (("dense", dense), ("sparse", sparse), ("label", label)):
            self.writers[kind].append(rows)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def map_ids_in_place(path: Path, maps: Sequence[np.ndarray], *, block_rows: int = 1 << 20) -> None:
    """Replace every id ``x`` of column ``f`` of an ``int32[N, F]`` ``.npy`` file by ``maps[f][x]``,
    block by block with plain reads and writes (no memory map)."""
    with open(path, "r+b") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        if dtype != np.int32 or len(shape) != 2 or shape[1] != len(maps):
            raise ValueError(f"{path}: expected int32[N, {len(maps)}], got {dtype}{shape}")
        offset, width = fh.tell(), shape[1] * 4
        for start in range(0, shape[0], block_rows):
            k = min(block_rows, shape[0] - start)
            fh.seek(offset + start * width)
            block = np.frombuffer(fh.read(k * width), dtype=np.int32).reshape(k, shape[1]).copy()
            for f, m in enumerate(maps):
                block[:, f] = m[block[:, f]]
            fh.seek(offset + start * width)
            fh.write(block.data)


def write_counts(folder: Path, counts: Sequence[np.ndarray]) -> None:
    with atomic_open(Path(folder) / "counts.npy") as fh:
        np.save(fh, np.concatenate([np.asarray(c, dtype=np.int64) for c in counts]))


def write_vocab(folder: Path, values: Sequence[pa.Array]) -> None:
    """Kept raw values of every field, in id order, as one Arrow IPC table (field, value)."""
    field = np.concatenate([np.full(len(v), f, dtype=np.int32) for f, v in enumerate(values)])
    table = pa.table({"field": field,
                      "value": pa.concat_arrays([v.cast(pa.string()) for v in values])})
    with atomic_open(Path(folder) / "vocab.arrow") as fh, pa.ipc.new_file(fh, table.schema) as writer:
        writer.write_table(table)


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 64 MiB blocks."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def write_meta(folder: Path, meta: dict) -> None:
    """Write ``meta.json`` last, recording the size and CRC-32 of every other file of the folder."""
    folder = Path(folder)
    files = [p for p in sorted(folder.iterdir()) if p.name not in (_META, _META_CRC)]
    sizes = {p.name: p.stat().st_size for p in files}
    crcs = {p.name: file_crc32(p) for p in files}
    text = json.dumps({"layout_version": LAYOUT_VERSION, **meta, "file_sizes": sizes, "file_crc32": crcs}, indent=1)
    atomic_write_text(folder / _META, text)
    atomic_write_text(folder / _META_CRC, f"{zlib.crc32(text.encode()):08x}\n")


# --------------------------------------------------------------------------------------------
# Reading


def read_vocab(folder: Path, field: int) -> pa.Array:
    """Kept raw values of field number ``field`` of a cached dataset, in id order."""
    with pa.memory_map(str(Path(folder) / "vocab.arrow")) as src:
        table = pa.ipc.open_file(src).read_all()
    mask = np.asarray(table["field"]) == field
    return table["value"].filter(pa.array(mask)).combine_chunks()


def read_dataset(folder: Path) -> CTRDataset:
    """Open a cached dataset: arrays memory-mapped copy-on-write (the files are never written),
    counts and metadata in memory.

    Raises:
        CacheError: ``meta.json`` missing or unreadable, a file missing, of the wrong size or
            failing its CRC-32, an array of the wrong shape or dtype; the message names the file.
    """
    folder = Path(folder)
    try:
        raw = (folder / _META).read_bytes()
        if (folder / _META_CRC).read_text().strip() != f"{zlib.crc32(raw):08x}":
            raise CacheError(f"{folder / _META}: damaged (its CRC-32 differs from {_META_CRC})")
        meta = json.loads(raw)
        sizes = meta["file_sizes"]
        crcs = meta["file_crc32"]
        if meta["layout_version"] != LAYOUT_VERSION:
            raise CacheError(f"{folder}: layout version {meta['layout_version']}, expected {LAYOUT_VERSION}")
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{folder}: unreadable {_META} ({e})") from None
    expected = {array_path(folder, s, k).name for s in _SPLITS for k in _KINDS} | {"counts.npy", "vocab.arrow"}
    for name in sorted(expected | set(sizes)):
        path = folder / name
        if not path.is_file():
            raise CacheError(f"{folder}: missing {name}")
        if name not in sizes or path.stat().st_size != sizes[name]:
            raise CacheError(f"{path}: {path.stat().st_size} bytes, {_META} says {sizes.get(name)}")
        if file_crc32(path) != crcs.get(name):
            raise CacheError(f"{path}: damaged (its CRC-32 differs from the one {_META} recorded)")
    try:
        fields_meta, dense_names = meta["fields"], tuple(meta["dense_names"])
        # mapped, not read: 270 MB at the Criteo vocabulary, which only frequency-aware methods read
        counts = np.load(folder / "counts.npy", mmap_mode="r")
        bounds = np.cumsum([0] + [f["num_embeddings"] for f in fields_meta])
        if counts.shape != (bounds[-1],):
            raise CacheError(f"{folder}: counts.npy has shape {counts.shape}, expected ({bounds[-1]},)")
        fields = []
        for f, lo, hi in zip(fields_meta, bounds[:-1], bounds[1:], strict=True):
            fields.append(Field(f["name"], int(f["num_embeddings"]), counts[lo:hi]))
            _release_pages(counts)  # Field's checks read the field's counts: give the pages back
        fields = tuple(fields)
        splits = {}
        for s in _SPLITS:
            arrays = {}
            for kind, (dtype, ndim) in _KINDS.items():
                path = array_path(folder, s, kind)
                # copy-on-write maps: writable for torch.from_numpy, but writes never reach the file
                a = np.load(path, mmap_mode="c") if path.stat().st_size > 4096 else np.load(path)
                width = {"dense": len(dense_names), "sparse": len(fields)}.get(kind)
                want = (meta["rows"][s],) + ((width,) if ndim == 2 else ())
                if a.dtype != dtype or a.shape != want:
                    raise CacheError(f"{folder}: {path.name} is {a.dtype}{a.shape}, expected "
                                     f"{np.dtype(dtype)}{want}")
                arrays[kind] = a
            # unsliced maps of C-ordered .npy files: the rows start at the map's own offset
            files = {k: ArrayFile(array_path(folder, s, k), int(a.offset)) for k, a in arrays.items()
                     if isinstance(a, np.memmap) and a.flags.c_contiguous}
            splits[s] = Split(**arrays, files=files if len(files) == len(arrays) else None)
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CacheError(f"{folder}: inconsistent cache ({type(e).__name__}: {e})") from None
    info = {k: meta[k] for k in ("format", "spec", "min_count", "seed", "split", "sources", "notes")
            if k in meta}
    info["cache"] = str(folder)
    return CTRDataset(name=meta["name"], fields=fields, dense_names=dense_names, train=splits["train"],
                      valid=splits["valid"], test=splits["test"], vocab_bytes=int(meta["vocab_bytes"]),
                      info=info)
