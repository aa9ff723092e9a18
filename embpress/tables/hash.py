"""The hashing trick: each large field's ids hashed into fewer rows (Weinberger et al., ICML 2009)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    CompressedTable,
    Field,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD
from embpress.tables.hashing import hash_coefficients, rows_within_budget, universal_hash

HASH_PARAM_BYTES = 3 * 8
"""Per field: hash coefficients a, b and the bucket count, int64 each."""


SERVING_NDIMS = 5
"""Shape words of the serving arrays: weight [rows, D], hash_a, hash_b, buckets [F]."""


@register_table("hash")
class HashTable(CompressedTable):
    """Hashing trick, per field: ``row = h_f(id) mod m_f`` (Weinberger et al. 2009, arXiv:0902.2206).

    The row budget is split with one common cap (DLRM's ``max_ind_range``): fields with fewer
    ids than the cap keep one row per id and are not hashed.

    Args:
        hash_seed: seed of the universal hash coefficients.

    >>> t = HashTable(fields=[Field("a", 1000), Field("b", 10)], dim=4, budget=1000)
    >>> t.rows, t.serving_bytes() <= 1000
    ([47, 10], True)
    """

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.hash_seed = hash_seed
        self.reserve_metadata({}, ndims=SERVING_NDIMS)
        self.rows = rows_within_budget("hash", [f.num_embeddings for f in self.fields], row_bytes=dim * FP32_BYTES,
                                       max_bytes=self.array_budget, overhead=HASH_PARAM_BYTES * self.num_fields)
        a, b = hash_coefficients(self.num_fields, hash_seed)
        rows = torch.tensor(self.rows, dtype=torch.long)
        hashed = torch.tensor([r < f.num_embeddings for r, f in zip(self.rows, self.fields, strict=True)])
        offsets = torch.zeros_like(rows)
        offsets[1:] = torch.cumsum(rows, 0)[:-1]
        self.register_buffer("hash_a", a)
        self.register_buffer("hash_b", b)
        self.register_buffer("buckets", rows)
        self.register_buffer("hashed", hashed)
        self.register_buffer("row_offsets", offsets)
        self.weight = nn.Embedding(int(rows.sum()), dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[N, F]`` -> rows of the shared weight ``[N, F]``."""
        h = universal_hash(ids, self.hash_a, self.hash_b, self.buckets)
        return torch.where(self.hashed, h, ids) + self.row_offsets

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight(self.rows_of(ids))

    def array_bytes(self) -> int:
        return sum(self.rows) * self.dim * FP32_BYTES + HASH_PARAM_BYTES * self.num_fields

    def serving_arrays(self) -> dict[str, np.ndarray]:
        return {
            "weight": to_numpy(self.weight.weight),
            "hash_a": self.hash_a.numpy(),
            "hash_b": self.hash_b.numpy(),
            "buckets": self.buckets.numpy(),
        }

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]
