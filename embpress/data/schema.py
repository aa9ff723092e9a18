"""A processed CTR dataset: per-field metadata and three splits of (dense, sparse ids, label) arrays."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embpress.tables.base import Field

BLOCK_ROWS = 4096
"""Rows per block of a windowed read (see :meth:`Split.batches`)."""
WINDOW_BLOCKS = 32
"""Blocks per shuffle window: 131,072 rows, about 21 MB for a Criteo row (13 dense + 26 ids + label)."""


@dataclass(frozen=True)
class ArrayFile:
    """Where a C-ordered array's rows lie in a file: ``path``, byte ``offset`` of row 0."""

    path: Path
    offset: int


@dataclass(frozen=True)
class Split:
    """One split. ``dense: float32[N, Dd]``, ``sparse: int32|int64[N, F]`` field-local ids,
    ``label: float32[N]`` in {0, 1}. Arrays may be memory-mapped.

    ``files`` (optional, set by the dataset cache) says where each array's rows lie on disk; a split
    with files and more rows than one window is read with ``pread`` instead of through its maps
    (see :meth:`batches`), so a pass over a 10M-row split does not leave its pages in the process's
    memory.
    """

    dense: np.ndarray
    sparse: np.ndarray
    label: np.ndarray
    files: dict[str, ArrayFile] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = len(self.label)
        if self.dense.ndim != 2 or self.sparse.ndim != 2 or self.label.ndim != 1:
            raise ValueError(
                f"Split arrays must be dense[N, Dd], sparse[N, F], label[N]; got shapes "
                f"{self.dense.shape}, {self.sparse.shape}, {self.label.shape}"
            )
        if len(self.dense) != n or len(self.sparse) != n:
            raise ValueError(
                f"Split arrays disagree on N: dense {len(self.dense)}, sparse {len(self.sparse)}, label {n}"
            )

    def __len__(self) -> int:
        return len(self.label)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(dense float32[B, Dd], ids int64[B, F], label float32[B])`` tensors.

        Shuffled batches gather rows by a permutation drawn from ``generator``. A split read from
        files (``files`` set) with more than ``BLOCK_ROWS * WINDOW_BLOCKS`` rows is read a window
        at a time with ``pread``: unshuffled, windows in order; shuffled, a window is
        ``WINDOW_BLOCKS`` blocks of ``BLOCK_ROWS`` consecutive rows drawn without replacement,
        and its rows are permuted (block shuffle, as large-scale CTR loaders do). Every row is
        yielded once per pass either way; memory stays one window, whatever the split's size.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if self.files is not None and n > BLOCK_ROWS * WINDOW_BLOCKS:
            yield from self._windowed_batches(batch_size, shuffle, generator)
            return
        order = torch.randperm(n, generator=generator).numpy() if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                sl = slice(start, min(start + batch_size, n))
                d, s, y = self.dense[sl], self.sparse[sl], self.label[sl]
            else:
                idx = np.sort(order[start:start + batch_size])  # sorted rows read memmaps faster
                d, s, y = self.dense[idx], self.sparse[idx], self.label[idx]
            yield (torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)),
                   torch.from_numpy(np.ascontiguousarray(s, dtype=np.int64)),
                   torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)))


    def _windowed_batches(self, batch_size: int, shuffle: bool, generator: torch.Generator | None):
        n = len(self)
        num_blocks = -(-n // BLOCK_ROWS)
        blocks = torch.randperm(num_blocks, generator=generator).numpy() if shuffle else np.arange(num_blocks)
        # in order, a window only needs to be large enough for long reads: an eighth of one
        per_window = WINDOW_BLOCKS if shuffle else max(1, WINDOW_BLOCKS // 8)
        arrays = {"dense": self.dense, "sparse": self.sparse, "label": self.label}
        # one set of buffers for the whole pass (fresh buffers per window fragment the heap: the
        # process's memory grew to 1.6 GB over an epoch); room for a window after the rows carried
        # over from the last one (fewer than a batch)
        capacity = per_window * BLOCK_ROWS + batch_size
        bufs = {k: np.empty((capacity, *a.shape[1:]), dtype=a.dtype) for k, a in arrays.items()}
        fds = {k: os.open(self.files[k].path, os.O_RDONLY) for k in arrays}
        try:
            carried = 0  # rows at the front of the buffers, already in the order they are yielded
            for w in range(0, num_blocks, per_window):
                chosen = np.sort(blocks[w:w + per_window]) if shuffle else blocks[w:w + per_window]
                spans = [(int(b) * BLOCK_ROWS, min(n, (int(b) + 1) * BLOCK_ROWS)) for b in chosen]
                read = sum(e - s for s, e in spans)
                for kind, a in arrays.items():
                    row_bytes = a.itemsize * (a.shape[1] if a.ndim == 2 else 1)
                    at = carried
                    for s, e in spans:
                        _pread_into(fds[kind], bufs[kind][at:at + e - s], self.files[kind], s * row_bytes)
                        at += e - s
                # the rows in the order they are yielded: a permutation, not a second copy
                perm = torch.randperm(read, generator=generator).numpy() if shuffle else np.arange(read)
                order = np.concatenate([np.arange(carried), perm + carried])
                rows = carried + read
                end = rows if w + per_window >= num_blocks else rows - rows % batch_size
                for start in range(0, end, batch_size):
                    idx = order[start:min(start + batch_size, end)]
                    yield (torch.from_numpy(np.ascontiguousarray(bufs["dense"][idx], dtype=np.float32)),
                           torch.from_numpy(np.ascontiguousarray(bufs["sparse"][idx], dtype=np.int64)),
                           torch.from_numpy(np.ascontiguousarray(bufs["label"][idx], dtype=np.float32)))
                carried = rows - end
                for buf in bufs.values():
                    buf[:carried] = buf[order[end:rows]]
        finally:
            for fd in fds.values():
                os.close(fd)


def _pread_into(fd: int, out: np.ndarray, source: ArrayFile, start: int) -> None:
    """Fill ``out`` (C-contiguous) with the bytes at ``source.offset + start``; a short file raises."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], source.offset + start + done)
        if got == 0:
            raise OSError(f"{source.path}: file ends at byte {source.offset + start + done:,}, "
                          f"but the split needs {len(view) - done:,} more bytes there (truncated?)")
        done += got


@dataclass(frozen=True)
class CTRDataset:
    """A processed CTR dataset.

    ``fields`` carry cardinalities and training counts (ids numbered by descending training
    frequency). ``vocab_bytes`` is the size of the raw-value-to-id vocabulary, which is the
    same for every method and reported apart from the embedding table.
    """

    name: str
    fields: tuple[Field, ...]
    dense_names: tuple[str, ...]
    train: Split
    valid: Split
    test: Split
    vocab_bytes: int = 0
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for split_name in ("train", "valid", "test"):
            split = getattr(self, split_name)
            if split.sparse.shape[1] != len(self.fields):
                raise ValueError(
                    f"{self.name}: {split_name} has {split.sparse.shape[1]} sparse columns for "
                    f"{len(self.fields)} fields"
                )
            if split.dense.shape[1] != len(self.dense_names):
                raise ValueError(
                    f"{self.name}: {split_name} has {split.dense.shape[1]} dense columns for "
                    f"{len(self.dense_names)} dense names"
                )

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    def summary(self) -> str:
        sizes = [f.num_embeddings for f in self.fields]
        return (
            f"{self.name}: {len(self.train):,} train / {len(self.valid):,} valid / {len(self.test):,} test rows, "
            f"{self.num_dense} dense + {len(self.fields)} categorical fields, "
            f"{sum(sizes):,} ids (largest field {max(sizes):,}), "
            f"positive rate {float(np.mean(self.train.label)):.3f}"
        )


def frequency_order(ids: np.ndarray, num_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """Renumber ids of one field by descending count. Returns ``(new_id_of_old, counts_by_new_id)``.

    Ties keep their old order (stable sort), so the result is deterministic.
    """
    counts = np.bincount(ids, minlength=num_embeddings).astype(np.int64)
    order = np.argsort(-counts, kind="stable")
    remap = np.empty(num_embeddings, dtype=np.int64)
    remap[order] = np.arange(num_embeddings)
    return remap, counts[order]
