"""Frequency-based double hashing: frequent ids keep their own rows, rare ids sum two hashed rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    INT64_BYTES,
    Budget,
    CompressedTable,
    Field,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD
from embpress.tables.hashing import hash_coefficients, rows_within_budget, universal_hash

PER_FIELD_INTS = 6
"""Per field, int64: two (a, b) hash pairs, the hashed row count and the frequent id count."""

COMBINERS = ("sum", "concat")


@register_table("dhash")
class DoubleHashTable(CompressedTable):
    """Hybrid (frequency + double) hashing (Zhang et al., RecSys 2020, arXiv:2007.14523).

    Per field, the ``k_f`` most frequent ids own a row. Ids are numbered by descending training
    frequency, so "frequent" is ``id < k_f`` and no remap table is needed. Every other id is
    hashed twice, by two independent universal hashes ``h1, h2`` into the field's ``m_f``
    hashed rows, and the two rows are combined: ``e = H[h1(x)] + H[h2(x)]`` (``combine="sum"``)
    or ``e = [H[h1(x)], H[h2(x)]]`` with rows of width ``D/2`` (``combine="concat"``). Two
    rare ids share a vector only if both hashes collide, about ``1/m_f^2`` for a pair.

    The row budget is split across fields with one common cap (as :class:`HashTable`): a
    field with fewer ids than the cap is stored whole. A hashed field spends
    ``frequent_fraction`` of its row budget on frequent rows and the rest on hashed rows.

    Args:
        frequent_fraction: share of a hashed field's row budget given to its frequent ids
            (0 gives pure double hashing).
        combine: ``"sum"`` (default) or ``"concat"`` (two half-width rows at the same bytes;
            needs an even dim): two common ways to combine the two hashed embeddings.
        hash_seed: seed of the hash coefficients.

    Shapes: ``ids [N, F] -> [N, F, D]``.

    >>> t = DoubleHashTable(fields=[Field("a", 1000), Field("b", 10)], dim=4, budget=1600)
    >>> t.frequent, t.hashed, t.serving_bytes() <= 1600
    ([39, 10], [40, 0], True)
    """

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None,
                 frequent_fraction: float = 0.5, combine: str = "sum", hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.frequent_fraction = frequent_fraction
        self.combine = combine
        self.hash_seed = hash_seed
        if not (isinstance(frequent_fraction, int | float) and 0 <= frequent_fraction < 1):
            raise ValueError(f"dhash: frequent_fraction must be in [0, 1), got {frequent_fraction!r}")
        if combine not in COMBINERS:
            raise ValueError(f"dhash: combine must be one of {COMBINERS}, got {combine!r}")
        if combine == "concat" and dim % 2:
            raise ValueError(f"dhash: combine='concat' needs an even dim (two halves), got dim={dim}")
        self.hashed_dim = dim if combine == "sum" else dim // 2
        per_row = 2 if combine == "concat" else 1  # hashed rows per D-wide row of budget
        sizes = [f.num_embeddings for f in self.fields]
        self.frequent: list[int] = []
        self.hashed: list[int] = []
        # shapes: frequent/hashed weight [rows, D], hash_a/hash_b [F, 2], num_frequent, hashed_rows [F]
        self.reserve_metadata({}, ndims=10)
        rows = rows_within_budget("dhash", sizes, row_bytes=dim * FP32_BYTES, max_bytes=self.array_budget,
                                  overhead=PER_FIELD_INTS * INT64_BYTES * self.num_fields)
        for n, r in zip(sizes, rows, strict=True):
            if r >= n:  # the whole field fits: one row per id, nothing hashed
                self.frequent.append(n)
                self.hashed.append(0)
            else:
                k = min(int(frequent_fraction * r), r - 1)
                self.frequent.append(k)
                self.hashed.append((r - k) * per_row)
        a, b = hash_coefficients(2 * self.num_fields, hash_seed)
        self.register_buffer("hash_a", a.reshape(self.num_fields, 2))
        self.register_buffer("hash_b", b.reshape(self.num_fields, 2))
        self.register_buffer("num_frequent", torch.tensor(self.frequent, dtype=torch.long))
        self.register_buffer("buckets", torch.tensor(self.hashed, dtype=torch.long).clamp(min=1))
        self.register_buffer("frequent_offsets", torch.tensor(np.cumsum([0, *self.frequent[:-1]]), dtype=torch.long))
        self.register_buffer("hashed_offsets", torch.tensor(np.cumsum([0, *self.hashed[:-1]]), dtype=torch.long))
        self.frequent_weight = nn.Embedding(max(sum(self.frequent), 1), dim, sparse=True)
        self.hashed_weight = nn.Embedding(max(sum(self.hashed), 1), self.hashed_dim, sparse=True)
        nn.init.normal_(self.frequent_weight.weight, std=INIT_STD)
        nn.init.normal_(self.hashed_weight.weight, std=INIT_STD)

    def hashed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[N, F]`` -> rows of the hashed weight ``[N, F, 2]`` (``h1``, ``h2``)."""
        h = universal_hash(ids.unsqueeze(-1), self.hash_a, self.hash_b, self.buckets.unsqueeze(-1))
        return h + self.hashed_offsets.unsqueeze(-1)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        is_frequent = ids < self.num_frequent                                    # [N, F]
        rare = ~is_frequent
        field = rare.nonzero()[:, 1]                                             # field of each rare id
        x = ids[rare].unsqueeze(-1)                                              # [R, 1]
        h = universal_hash(x, self.hash_a[field], self.hash_b[field], self.buckets[field].unsqueeze(-1))
        pair = self.hashed_weight(h + self.hashed_offsets[field].unsqueeze(-1))  # [R, 2, Dh]
        rare_vec = pair.sum(1) if self.combine == "sum" else pair.flatten(1)     # [R, D]
        frequent_vec = self.frequent_weight((ids + self.frequent_offsets)[is_frequent])
        out = rare_vec.new_zeros(*ids.shape, self.dim)
        return out.index_put((is_frequent,), frequent_vec).index_put((rare,), rare_vec)

    def array_bytes(self) -> int:
        rows = sum(self.frequent) * self.dim + sum(self.hashed) * self.hashed_dim
        return rows * FP32_BYTES + PER_FIELD_INTS * INT64_BYTES * self.num_fields

    def serving_arrays(self) -> dict[str, np.ndarray]:
        return {
            "frequent_weight": to_numpy(self.frequent_weight.weight[: sum(self.frequent)]),
            "hashed_weight": to_numpy(self.hashed_weight.weight[: sum(self.hashed)]),
            "hash_a": self.hash_a.numpy(),
            "hash_b": self.hash_b.numpy(),
            "num_frequent": self.num_frequent.numpy(),
            "hashed_rows": np.asarray(self.hashed, dtype=np.int64),
        }

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.frequent_weight.weight, self.hashed_weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frequent={self.frequent}, hashed={self.hashed}, combine={self.combine!r}"

