"""AdaptEmb: frequent ids own exclusive rows, the rest share a small hashed table; the remap is counted."""

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

INT32_BYTES = 4
PER_FIELD_INTS = 4
"""Per field, int64: hash a, hash b, shared row count, promoted id count."""

INT32_MAX = np.iinfo(np.int32).max


@register_table("adapt")
class AdaptiveEmbedding(CompressedTable):
    """Adaptive embedding (DeepRec "Adaptive Embedding"; AdaptEmb of the VLDB 2024 study, arXiv:2311.15578).

    Per field, up to ``K_f`` promoted ids own an exclusive row; every other id shares a row of
    a small hashed table, ``row = h_f(id) mod m_f`` with a universal hash (the study's code
    takes the id's rank among the non-promoted ids mod ``m_f``, which changes whenever an id
    is promoted; a hash of the id does not). The remap from id to exclusive row is real
    serving memory: a server stores the sorted promoted ids of each field (int32, 4 bytes per
    exclusive row; the exclusive rows are exported in the same order, so a binary search
    gives the row) and counts them. This holds the same information as the study's int32
    array over all ids at ``4 * K_f`` instead of ``4 * n_f`` bytes, which would cap the
    ratio at ``D`` by itself.

    Which ids are promoted:

    - ``promote_after=None`` (the study's version, Hetu ``AdaptEmbTrainer``): before training,
      the ``K_f`` ids with the highest training counts (``Field.frequencies()``; ties by id).
    - ``promote_after=t`` (DeepRec's dynamic version): ids start in the shared table; during
      training an id is promoted once it has been seen ``t`` times, while capacity remains,
      and its exclusive row starts as a copy of its shared row (DeepRec migrates the learned
      value). The id counters are training-time state and not serving memory.

    Sizing: the budget (less the per-field ints) is split into D-wide rows with one common
    cap (as :class:`HashTable`); a field with fewer ids than the cap is stored whole (row =
    id, no remap, no hashing). A hashed field gives ``frequent_fraction`` of its bytes to
    exclusive rows at ``4 D + 4`` bytes each (row and remap entry) and the rest to ``m_f >= 1``
    shared rows. The study takes the top 10% of ids and gives the rest of ``n_f / ratio``
    rows to the shared table; a fraction of the budget works at every ratio.

    Args:
        frequent_fraction: share of a hashed field's bytes spent on exclusive rows.
        promote_after: None for the study's static split from training counts, or the number
            of sightings in training batches after which an id is promoted.
        hash_seed: seed of the hash coefficients of the shared table.

    Shapes: ``ids [N, F] -> [N, F, D]``.

    >>> t = AdaptiveEmbedding(fields=[Field("a", 1000), Field("b", 10)], dim=4, budget=1600)
    >>> t.capacity, t.shared_rows, t.serving_bytes() <= 1600
    ([32, 10], [41, 0], True)
    """

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None,
                 frequent_fraction: float = 0.5, promote_after: int | None = None, hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.frequent_fraction = frequent_fraction
        self.promote_after = promote_after
        self.hash_seed = hash_seed
        if not (isinstance(frequent_fraction, int | float) and 0 <= frequent_fraction < 1):
            raise ValueError(f"adapt: frequent_fraction must be in [0, 1), got {frequent_fraction!r}")
        if promote_after is not None and (not isinstance(promote_after, int) or promote_after < 1):
            raise ValueError(f"adapt: promote_after must be None or a positive int, got {promote_after!r}")
        big = [f.name for f in self.fields if f.num_embeddings > INT32_MAX]
        if big:
            raise ValueError(f"adapt: fields {big} have more ids than int32 remap entries can hold")
        row_bytes = dim * FP32_BYTES
        sizes = [f.num_embeddings for f in self.fields]
        self.capacity: list[int] = []
        self.shared_rows: list[int] = []
        # shapes: exclusive/shared weight [rows, D], promoted_ids, num_promoted, shared_rows, hash_a, hash_b
        self.reserve_metadata({}, ndims=9)
        rows = rows_within_budget("adapt", sizes, row_bytes=row_bytes, max_bytes=self.array_budget,
                                  overhead=PER_FIELD_INTS * INT64_BYTES * self.num_fields)
        for n, r in zip(sizes, rows, strict=True):
            if r >= n:
                self.capacity.append(n)
                self.shared_rows.append(0)
                continue
            exclusive_bytes = row_bytes + INT32_BYTES
            k = min(int(frequent_fraction * r * row_bytes) // exclusive_bytes,
                    (r - 1) * row_bytes // exclusive_bytes)
            self.capacity.append(k)
            self.shared_rows.append((r * row_bytes - k * exclusive_bytes) // row_bytes)
        a, b = hash_coefficients(self.num_fields, hash_seed)
        self.register_buffer("hash_a", a)
        self.register_buffer("hash_b", b)
        self.register_buffer("buckets", torch.tensor(self.shared_rows, dtype=torch.long).clamp(min=1))
        self.register_buffer("hashed", torch.tensor([m > 0 for m in self.shared_rows]))
        self.register_buffer("exclusive_offsets", torch.tensor(np.cumsum([0, *self.capacity[:-1]]), dtype=torch.long))
        self.register_buffer("shared_offsets", torch.tensor(np.cumsum([0, *self.shared_rows[:-1]]), dtype=torch.long))
        # Training-time remap over every id (global id -> exclusive row or -1) and the counters.
        remap = torch.full((self.total_ids,), -1, dtype=torch.int32)
        promoted = torch.zeros(self.num_fields, dtype=torch.long)
        for f, (field, k, m) in enumerate(zip(self.fields, self.capacity, self.shared_rows, strict=True)):
            start = int(self._offsets[f])
            if m == 0:
                chosen = torch.arange(field.num_embeddings)
            elif promote_after is None:
                order = np.argsort(-field.frequencies(), kind="stable")[:k]
                chosen = torch.from_numpy(np.sort(order))
            else:
                continue
            remap[start + chosen] = (int(self.exclusive_offsets[f]) + torch.arange(len(chosen))).int()
            promoted[f] = len(chosen)
        self.register_buffer("remap", remap)
        self.register_buffer("num_promoted", promoted)
        dynamic = promote_after is not None
        self.register_buffer("seen", torch.zeros(self.total_ids if dynamic else 0, dtype=torch.int32))
        self.exclusive_weight = nn.Embedding(max(sum(self.capacity), 1), dim, sparse=True)
        self.shared_weight = nn.Embedding(max(sum(self.shared_rows), 1), dim, sparse=True)
        nn.init.normal_(self.exclusive_weight.weight, std=INIT_STD)
        nn.init.normal_(self.shared_weight.weight, std=INIT_STD)

    # -- lookup -------------------------------------------------------------------------------

    def shared_rows_of(self, ids: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """Local ids ``[R]`` of fields ``[R]`` -> rows of the shared weight ``[R]``."""
        h = universal_hash(ids, self.hash_a[field], self.hash_b[field], self.buckets[field])
        return h + self.shared_offsets[field]

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training and self.promote_after is not None:
            self._promote(ids)
        rows = self.remap[self.global_ids(ids)].long()                          # [N, F]
        exclusive = rows >= 0
        shared = ~exclusive
        field = shared.nonzero()[:, 1]
        shared_vec = self.shared_weight(self.shared_rows_of(ids[shared], field))
        exclusive_vec = self.exclusive_weight(rows[exclusive])
        out = shared_vec.new_zeros(*ids.shape, self.dim)
        return out.index_put((exclusive,), exclusive_vec).index_put((shared,), shared_vec)

    @torch.no_grad()
    def _promote(self, ids: torch.Tensor) -> None:
        """Count the batch's ids of hashed fields; promote those seen ``promote_after`` times."""
        g = self.global_ids(ids)[:, self.hashed]
        if g.numel() == 0:
            return
        uniq, counts = torch.unique(g, return_counts=True)
        self.seen.index_add_(0, uniq, counts.int())
        ready = uniq[(self.seen[uniq] >= self.promote_after) & (self.remap[uniq] < 0)]
        if ready.numel() == 0:
            return
        field = torch.searchsorted(self._offsets, ready, right=True) - 1
        for f in torch.unique(field).tolist():
            free = self.capacity[f] - int(self.num_promoted[f])
            if free <= 0:
                continue
            cand = ready[field == f]
            order = torch.argsort(self.seen[cand].long() * (self.total_ids + 1) - cand, descending=True)
            cand = cand[order[:free]]                                          # most seen first, then lower id
            rows = self.exclusive_offsets[f] + self.num_promoted[f] + torch.arange(len(cand))
            local = cand - self._offsets[f]
            src = self.shared_rows_of(local, torch.full_like(local, f))
            self.exclusive_weight.weight[rows] = self.shared_weight.weight[src]
            self.remap[cand] = rows.int()
            self.num_promoted[f] += len(cand)

    # -- serving ------------------------------------------------------------------------------

    def array_bytes(self) -> int:
        promoted = [int(p) for p in self.num_promoted]
        remap = sum(p for p, m in zip(promoted, self.shared_rows, strict=True) if m > 0)
        rows = sum(promoted) + sum(self.shared_rows)
        return rows * self.dim * FP32_BYTES + remap * INT32_BYTES + PER_FIELD_INTS * INT64_BYTES * self.num_fields

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """Per field, exclusive rows in promoted-id order, the sorted promoted ids and the shared rows."""
        weight = self.exclusive_weight.weight.detach()
        rows, promoted_ids = [], []
        for f, field in enumerate(self.fields):
            start, n = int(self._offsets[f]), field.num_embeddings
            local_remap = self.remap[start:start + n].long()
            ids = (local_remap >= 0).nonzero().squeeze(1)                       # sorted local ids
            rows.append(weight[local_remap[ids]])
            if self.shared_rows[f] > 0:
                promoted_ids.append(ids)
        return {
            "exclusive_weight": to_numpy(torch.cat(rows)) if rows else np.zeros((0, self.dim), np.float32),
            "promoted_ids": to_numpy(torch.cat(promoted_ids), np.int32) if promoted_ids else np.zeros(0, np.int32),
            "shared_weight": to_numpy(self.shared_weight.weight[: sum(self.shared_rows)]),
            "num_promoted": self.num_promoted.numpy().copy(),
            "shared_rows": np.asarray(self.shared_rows, dtype=np.int64),
            "hash_a": self.hash_a.numpy(),
            "hash_b": self.hash_b.numpy(),
        }

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.exclusive_weight.weight, self.shared_weight.weight]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, capacity={self.capacity}, shared_rows={self.shared_rows}, "
                f"promote_after={self.promote_after}")

