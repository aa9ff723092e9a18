"""A processed CTR dataset: per-field metadata and three splits of (dense, sparse ids, label) arrays."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from embpress.tables.base import Field


@dataclass(frozen=True)
class Split:
    """One split. ``dense: float32[N, Dd]``, ``sparse: int32|int64[N, F]`` field-local ids,
    ``label: float32[N]`` in {0, 1}. Arrays may be memory-mapped."""

    dense: np.ndarray
    sparse: np.ndarray
    label: np.ndarray

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

        Shuffled batches gather rows by a permutation drawn from ``generator``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
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
