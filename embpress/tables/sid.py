"""Semantic-ID tables: an item's rows are shared by meaning (codes of its content), not by hash collision.

Singh et al., "Better Generalization with Semantic IDs: A Case Study in Ranking for
Recommendations" (RecSys 2024, arXiv:2306.08121, Sec. 3-4): each item's frozen content embedding
is tokenized into ``L`` codes of ``K`` values (RQ-VAE, :mod:`embpress.tables.sid_tokenize`); the
item's vector is the sum of embeddings looked up by its code n-grams: unigrams (``sid``: one
table of ``K`` rows per level, ``L * K`` rows) or bigrams of consecutive levels (``sid-ngram``:
``K^2`` rows per level pair). ``sid-hash`` adds, H2Rec-style (a semantic branch beside a hashed ID
branch, combined per item), a small hashed ID table for the same field, mixed with the semantic
vector by a learned per-lookup gate ``g = sigmoid(w . [s; h] + b)``: ``g * s + (1 - g) * h``.

Only fields that carry content (``Field.content``) get semantic IDs (at least one must); every
other field is hashed exactly as the ``hash`` table does (Weinberger et al.; small fields keep one row per id). Codes are
computed once, when the table is built, from the content vectors (the tokenizer is not trained
with the CTR model, as in the paper). An id that has no training rows (a cold item) still has
content, hence codes, hence a trained vector.

Sizing: the rows of every field share one cap (as in ``hash``); a content field asks for its
semantic rows (plus, for ``sid-hash``, ``id_rows`` hashed ID rows per semantic row). The table
takes the largest ``K <= max_codes`` for which the semantic rows fit under that cap after the
per-id code tuples (``L`` codes of ``ceil(log2 K)`` bits each, packed) are paid for.

Serving bytes: the hashed fields' rows and hash coefficients, and per content field its packed
code tuples, its n-gram rows (and the ID rows and gate of ``sid-hash``).

>>> import numpy as np
>>> from embpress.tables import Field, Ratio, build_table
>>> content = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
>>> fields = [Field("user", 500), Field("item", 1000, content=content)]
>>> t = build_table("sid", fields=fields, dim=8, budget=Ratio(4))
>>> t(torch.tensor([[3, 999]])).shape, t.serving_bytes() <= t.full_bytes / 4
(torch.Size([1, 2, 8]), True)
"""

from __future__ import annotations

import math
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
from embpress.tables.hashing import allocate_rows, hash_coefficients, universal_hash
from embpress.tables.mgqe import code_bits, pack_codes, packed_bytes
from embpress.tables.sid_tokenize import TOKENIZERS, build_tokenizer

HASH_PARAM_BYTES = 3 * 8
"""Per field: hash coefficients a, b and the bucket count (ID rows for content fields), int64 each."""

__all__ = ["SemanticIdTable", "SemanticNgramTable", "SemanticHashTable"]


class SemanticIdTable(CompressedTable):
    """Semantic-ID rows for fields with content, hashed rows for the others (see the module docstring).

    Args:
        levels: code tuple length ``L`` (TIGER / Singh et al. start from 3).
        max_codes: the largest ``K`` (codes per level) the budget may give; 256 = one byte per code.
        ngram: 1 sums per-level embeddings (``L * K`` rows); 2 sums bigram embeddings of
            consecutive levels (``(L - 1) * K^2`` rows).
        id_rows: hashed ID rows per semantic row of a content field, gated with the semantic vector
            (0: no ID branch).
        tokenizer: ``rq-kmeans`` or ``rq-vae``.
        seed: tokenizer seed.
        hash_seed: seed of the universal hash coefficients.
    """

    family = "inter"
    default_ngram = 1
    default_id_rows = 0.0

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, levels: int = 3,
                 max_codes: int = 256, ngram: int | None = None, id_rows: float | None = None,
                 tokenizer: str = "rq-kmeans", seed: int = 0, hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.levels, self.max_codes, self.tokenizer, self.seed, self.hash_seed = (
            levels, max_codes, tokenizer, seed, hash_seed)
        self.ngram = self.default_ngram if ngram is None else ngram
        self.id_rows = self.default_id_rows if id_rows is None else id_rows
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"{self.method}: levels must be an int >= 1, got {levels!r}")
        if not isinstance(max_codes, int) or max_codes < 2:
            raise ValueError(f"{self.method}: max_codes must be an int >= 2, got {max_codes!r}")
        if not isinstance(self.ngram, int) or not 1 <= self.ngram <= levels:
            raise ValueError(f"{self.method}: ngram must be an int in 1..levels={levels}, got {self.ngram!r}")
        if not (isinstance(self.id_rows, int | float) and 0 <= self.id_rows <= 16):
            raise ValueError(f"{self.method}: id_rows must be a number in [0, 16], got {self.id_rows!r}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"{self.method}: unknown tokenizer {tokenizer!r}; available: {sorted(TOKENIZERS)}")
        self.content_fields = [j for j, f in enumerate(self.fields) if f.content is not None]
        if not self.content_fields:
            raise ValueError(f"{self.method}: no field carries content vectors, so there is nothing to build "
                             f"semantic IDs from; give the item field Field(content=float32[num_embeddings, C]) "
                             f"(e.g. embpress.data.recbole.with_content) or use 'hash'")
        # shapes, at most: weight [R, D], hash_a/hash_b/buckets [F]; per content field codes, book [K, D],
        # ids [R, D] and gate
        self.reserve_metadata({"levels": 0, "codes": 0, "ngram": 0,
                               "content_fields": [self.fields[j].name for j in self.content_fields]},
                              ndims=5 + 6 * len(self.content_fields))
        self.codes_, rows, self.id_rows_ = self._size()
        self.rows = rows
        f_count = self.num_fields
        a, b = hash_coefficients(f_count, hash_seed)
        hashed_rows = [0 if j in self.content_fields else r for j, r in enumerate(rows)]
        buckets = [self.id_rows_.get(j, 0) if j in self.content_fields else r for j, r in enumerate(rows)]
        self.register_buffer("hash_a", a)
        self.register_buffer("hash_b", b)
        self.register_buffer("buckets", torch.tensor(buckets, dtype=torch.long))
        self.register_buffer("hashed", torch.tensor([r < f.num_embeddings for r, f in
                                                     zip(hashed_rows, self.fields, strict=True)]))
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(hashed_rows)[:-1]]), dtype=torch.long)
        self.register_buffer("row_offsets", offsets)
        self.weight = nn.Embedding(int(sum(hashed_rows)), dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.books = nn.ModuleDict()
        self.id_tables = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        self.tokenizers_: dict[str, object] = {}
        k = self.codes_
        for j in self.content_fields:
            f = self.fields[j]
            tok = build_tokenizer(tokenizer, levels=levels, codes=k, seed=seed)
            content = np.asarray(f.content, dtype=np.float32)
            codes = tok.fit(content).encode(content)
            self.tokenizers_[f.name] = tok
            self.register_buffer(f"codes_{j}", torch.from_numpy(codes))
            book = nn.Embedding(self._semantic_rows(k), dim, sparse=True)
            nn.init.normal_(book.weight, std=INIT_STD)
            self.books[str(j)] = book
            if self.id_rows_.get(j):
                ids = nn.Embedding(self.id_rows_[j], dim, sparse=True)
                nn.init.normal_(ids.weight, std=INIT_STD)
                self.id_tables[str(j)] = ids
                self.gates[str(j)] = nn.Linear(2 * dim, 1)
                nn.init.zeros_(self.gates[str(j)].weight)
                nn.init.zeros_(self.gates[str(j)].bias)
        self.register_buffer("ngram_base", torch.tensor([k ** i for i in range(self.ngram)], dtype=torch.long))

    # -- sizing -----------------------------------------------------------------------------

    def _semantic_rows(self, k: int) -> int:
        return (self.levels - self.ngram + 1) * k ** self.ngram

    def _content_bytes(self, k: int, id_rows: dict[int, int]) -> int:
        """Bytes of the content fields besides their rows: packed codes and gates."""
        total = 0
        for j in self.content_fields:
            total += packed_bytes(self.fields[j].num_embeddings * self.levels, code_bits(k))
            if id_rows.get(j):
                total += (2 * self.dim + 1) * FP32_BYTES
        return total

    def _size(self) -> tuple[int, list[int], dict[int, int]]:
        """``(K, rows per field, ID rows per content field)``: the largest ``K`` that fits."""
        sizes = [f.num_embeddings for f in self.fields]
        row_bytes = self.dim * FP32_BYTES
        overhead = HASH_PARAM_BYTES * self.num_fields
        smallest = min(sizes[j] for j in self.content_fields)
        for k in range(min(self.max_codes, smallest), 1, -1):
            semantic = self._semantic_rows(k)
            id_rows = {j: min(sizes[j], math.ceil(self.id_rows * semantic)) for j in self.content_fields}
            units = (self.array_budget - overhead - self._content_bytes(k, id_rows)) // row_bytes
            want = [semantic + id_rows[j] if j in self.content_fields else s for j, s in enumerate(sizes)]
            if units < len(sizes):
                continue
            rows = allocate_rows(want, int(units))
            if all(rows[j] == want[j] for j in self.content_fields):
                return k, rows, id_rows
        raise BudgetError(
            f"{self.method}: budget {self.max_bytes:,} bytes is below the smallest configuration "
            f"(K=2 codes at {self.levels} levels, {self.ngram}-grams, the per-id codes and one row per "
            f"other field; full table {self.full_bytes:,} bytes)")

    # -- lookups ----------------------------------------------------------------------------

    def semantic_rows_of(self, j: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, L - n + 1]`` of the n-gram table of content field ``j`` for its ids ``[N]``."""
        codes = getattr(self, f"codes_{j}")[ids]                                  # [N, L]
        windows = codes.unfold(1, self.ngram, 1)                                  # [N, L - n + 1, n]
        position = torch.arange(windows.shape[1]) * self.codes_ ** self.ngram
        return (windows * self.ngram_base).sum(-1) + position

    def _content_lookup(self, j: int, ids: torch.Tensor) -> torch.Tensor:
        sem = self.books[str(j)](self.semantic_rows_of(j, ids)).sum(1)
        if str(j) not in self.id_tables:
            return sem
        h = universal_hash(ids, self.hash_a[j], self.hash_b[j], self.buckets[j])
        hid = self.id_tables[str(j)](h)
        g = torch.sigmoid(self.gates[str(j)](torch.cat([sem, hid], -1)))
        return g * sem + (1 - g) * hid

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        h = universal_hash(ids, self.hash_a, self.hash_b, self.buckets.clamp(min=1))
        rows = torch.where(self.hashed, h, ids) + self.row_offsets
        return torch.stack([self._content_lookup(j, ids[:, j]) if j in self.content_fields
                            else self.weight(rows[:, j]) for j in range(self.num_fields)], 1)

    # -- memory -----------------------------------------------------------------------------

    def array_bytes(self) -> int:
        hashed = sum(0 if j in self.content_fields else r for j, r in enumerate(self.rows))
        total = hashed * self.dim * FP32_BYTES + HASH_PARAM_BYTES * self.num_fields
        total += self._content_bytes(self.codes_, self.id_rows_)
        for j in self.content_fields:
            total += (self._semantic_rows(self.codes_) + self.id_rows_.get(j, 0)) * self.dim * FP32_BYTES
        return total

    def serving_arrays(self) -> dict[str, np.ndarray]:
        state = {"weight": to_numpy(self.weight.weight), "hash_a": self.hash_a.numpy(),
                 "hash_b": self.hash_b.numpy(), "buckets": self.buckets.numpy()}
        for j in self.content_fields:
            name = self.fields[j].name
            codes = getattr(self, f"codes_{j}").numpy()
            state[f"{name}/codes"] = pack_codes(codes.reshape(-1), code_bits(self.codes_))
            state[f"{name}/book"] = to_numpy(self.books[str(j)].weight)
            if str(j) in self.id_tables:
                state[f"{name}/ids"] = to_numpy(self.id_tables[str(j)].weight)
                gate = self.gates[str(j)]
                state[f"{name}/gate"] = np.concatenate([to_numpy(gate.weight).reshape(-1), to_numpy(gate.bias)])
        return state

    def serving_spec(self) -> dict:
        return {"levels": self.levels, "codes": self.codes_, "ngram": self.ngram,
                "content_fields": [self.fields[j].name for j in self.content_fields]}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight, *(b.weight for b in self.books.values()),
                *(t.weight for t in self.id_tables.values())]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, levels={self.levels}, codes={self.codes_}, ngram={self.ngram}, "
                f"id_rows={self.id_rows_}, tokenizer={self.tokenizer!r}")


register_table("sid")(SemanticIdTable)


@register_table("sid-ngram")
class SemanticNgramTable(SemanticIdTable):
    """``sid`` with bigram tables: one ``K^2``-row table per pair of consecutive levels (Singh et al., SID-Bigram)."""

    default_ngram = 2


@register_table("sid-hash")
class SemanticHashTable(SemanticIdTable):
    """``sid`` plus a hashed ID table per content field (as many rows as the semantic branch), gated per lookup.

    Registered as ``sid-hash``: ``+`` in a table spec means post-training quantization (``sid+int8``).
    """

    default_id_rows = 1.0

