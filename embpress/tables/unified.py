"""Unified Embedding: one table multiplexed across all fields (Coleman et al., NeurIPS 2023, arXiv:2305.12102).

Every field's vector is the concatenation of ``chunks`` sub-vectors of width ``D / chunks``, each
looked up in the same shared table of ``B`` rows with its own salted hash of (field, chunk, id).
Fields share rows, and a full collision of two ids needs every chunk to collide at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD
from embpress.tables.hashing import PRIME, hash_coefficients, universal_hash

SALT_BYTES = 2 * 8
"""Per (field, chunk): the salted hash's coefficients a and b, int64 each."""
BUCKET_BYTES = 8
"""Once: the shared table's row count ``B`` (int64), the modulus of every hash."""


def default_chunks(dim: int) -> int:
    """Chunks of width 4 when ``dim`` is a multiple of 4, otherwise one chunk of width ``dim``."""
    return dim // 4 if dim % 4 == 0 else 1


@register_table("unified")
class UnifiedTable(CompressedTable):
    """Feature multiplexing with multi-probe chunks (arXiv:2305.12102, "Unified Embedding", Fig. 1).

    ``e_f(x) = [W[h_{f,1}(x)], ..., W[h_{f,c}(x)]]`` with one shared ``W`` of ``B x D/c`` and a
    universal hash ``h_{f,j}(x) = ((a_{f,j} x + b_{f,j}) mod p) mod B`` salted per (field, chunk),
    as TensorFlow Recommenders' ``UnifiedEmbeddingConfig`` salts each (feature, chunk) lookup.
    ``B`` is the largest row count whose bytes plus the salts fit the budget. ``W`` is a sparse
    ``nn.Embedding`` (SparseAdam), initialised N(0, 0.01^2).

    Args:
        chunks: sub-vectors per field (lookups per id); must divide ``dim``. None (default) gives
            chunks of width 4 (``dim // 4``) when 4 divides ``dim``, else a single chunk.
        hash_seed: seed of the per-(field, chunk) hash coefficients.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``. Serving state: ``weight [B, D/c]`` fp32,
    ``hash_a``, ``hash_b [F, c]`` int64 and ``buckets [1]`` int64.

    >>> t = UnifiedTable(fields=[Field("a", 1000), Field("b", 10)], dim=8, budget=2000)
    >>> t.chunks, t.buckets, t.serving_bytes() <= 2000
    (2, 117, True)
    """

    tune_space = {"chunks": ("choice", 1, 2, 4)}

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None,
                 chunks: int | None = None, hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.chunks = default_chunks(dim) if chunks is None else chunks
        if not isinstance(self.chunks, int) or self.chunks < 1 or dim % self.chunks:
            raise ValueError(f"unified: chunks must be a positive divisor of dim={dim}, got {chunks!r}")
        self.hash_seed = hash_seed
        self.chunk_dim = dim // self.chunks
        overhead = SALT_BYTES * self.num_fields * self.chunks + BUCKET_BYTES
        self.reserve_metadata({}, ndims=7)  # shapes: weight [B, D/c], hash_a/hash_b [F, c], buckets [1]
        row_bytes = self.chunk_dim * FP32_BYTES
        buckets = (self.array_budget - overhead) // row_bytes
        if buckets < 1:
            raise BudgetError(
                f"unified: one shared row plus {self.num_fields * self.chunks} hash salts need "
                f"{row_bytes + overhead + self.metadata_reserve:,} bytes with their metadata but the budget "
                f"allows {self.max_bytes:,}"
            )
        self.buckets = int(min(buckets, PRIME - 1))
        a, b = hash_coefficients(self.num_fields * self.chunks, hash_seed)
        self.register_buffer("hash_a", a.reshape(self.num_fields, self.chunks))
        self.register_buffer("hash_b", b.reshape(self.num_fields, self.chunks))
        self.weight = nn.Embedding(self.buckets, self.chunk_dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[N, F]`` -> rows of the shared table ``[N, F, chunks]``."""
        return universal_hash(ids.unsqueeze(-1), self.hash_a, self.hash_b, self.buckets)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight(self.rows_of(ids)).flatten(-2)

    def array_bytes(self) -> int:
        return (self.buckets * self.chunk_dim * FP32_BYTES
                + SALT_BYTES * self.num_fields * self.chunks + BUCKET_BYTES)

    def serving_arrays(self) -> dict[str, np.ndarray]:
        return {
            "weight": to_numpy(self.weight.weight),
            "hash_a": self.hash_a.numpy(),
            "hash_b": self.hash_b.numpy(),
            "buckets": np.array([self.buckets], dtype=np.int64),
        }

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, buckets={self.buckets}, chunks={self.chunks}"
