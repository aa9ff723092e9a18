"""ROBE: every embedding is read from one shared circular array at hashed offsets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    INT64_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD
from embpress.tables.hashing import PRIME, hash_coefficients, universal_hash

SIGNS_PER_HASH = 16
"""Sign bits taken from one hash value (its low 16 bits)."""


@register_table("robe")
class RobeTable(CompressedTable):
    """Random Offset Block Embedding, ROBE-Z (Desai, Chou, Shrivastava, MLSys 2022, arXiv:2108.02191, Sec. 3).

    All fields share one fp32 array ``M`` of size ``|M|`` (the whole budget). The vector of id
    ``x`` of field ``f`` is ``Z`` blocks of length ``L = D / Z``; element ``i`` of block ``j`` is
    ``g(f, x, jL + i) * M[(h(f, x, j) + i) mod |M|]``: block ``j`` starts at a hashed offset and wraps
    around the end of the array. ``g`` is a hashed sign in {-1, +1}, as in the study's code
    (Hetu ``robe_sign``). The VLDB 2024 study uses ``Z = 1``: one block of length ``D`` at one offset.

    Hashes are universal ``((a x + b) mod p) mod m``, all coefficients stored (int64) and counted:
    one ``(a, b)`` pair per (field, block) for offsets, and per (field, 16 elements) for signs,
    whose bits ``0..15`` are the signs of 16 elements (``p = 2^31 - 1``, so the low bits of a
    hash are uniform to within ``2^-15``); one hash per id instead of one per element.

    The array is stored as ``|M| / L`` chunks of ``L`` floats (``|M|`` rounded down to a
    multiple of ``L``). A block starting at offset ``o`` lies in chunks ``o // L`` and the next
    one (circularly), so a lookup gathers two chunk rows and slices ``L`` floats from them:
    the same values as a per-float gather, but the sparse gradient has ``2 Z`` rows of ``L``
    floats per id instead of ``D`` rows of one float, which keeps SparseAdam about as fast as
    for a hashed table. Rows are updated lazily per chunk: the unread floats of a touched
    chunk get a zero gradient (their Adam moments decay), as in any row-sparse table.

    Args:
        blocks: ``Z``, blocks per vector (must divide ``dim``).
        signs: multiply each element by its hashed sign ``g``.
        hash_seed: seed of the hash coefficients.

    Shapes: ``ids [N, F] -> [N, F, D]``.

    >>> t = RobeTable(fields=[Field("a", 1000), Field("b", 10)], dim=8, budget=3232)
    >>> t.array_size, t.serving_bytes() <= 3232
    (768, True)
    """

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, blocks: int = 1,
                 signs: bool = True, hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.blocks = blocks
        self.signs = signs
        self.hash_seed = hash_seed
        if not isinstance(blocks, int) or blocks < 1 or dim % blocks:
            raise ValueError(f"robe: blocks must be a positive divisor of dim={dim}, got {blocks!r}")
        self.block_len = dim // blocks
        num_sign = -(-dim // SIGNS_PER_HASH) if signs else 0
        hash_bytes = 2 * INT64_BYTES * self.num_fields * (blocks + num_sign)
        # shapes: array [S], offset_a/offset_b [F, blocks], sign_a/sign_b [F, signs]
        self.reserve_metadata({}, ndims=5 + (4 if signs else 0))
        self.num_chunks = (self.array_budget - hash_bytes) // (FP32_BYTES * self.block_len)
        self.array_size = self.num_chunks * self.block_len
        if self.array_size < dim:
            raise BudgetError(
                f"robe: budget {self.max_bytes:,} bytes is below an array of one vector plus the hash "
                f"coefficients ({dim * FP32_BYTES + hash_bytes + self.metadata_reserve:,} bytes with their "
                f"metadata)"
            )
        a, b = hash_coefficients(self.num_fields * (blocks + num_sign), hash_seed)
        a, b = a.reshape(self.num_fields, -1), b.reshape(self.num_fields, -1)
        self.register_buffer("offset_a", a[:, :blocks].contiguous())
        self.register_buffer("offset_b", b[:, :blocks].contiguous())
        self.register_buffer("sign_a", a[:, blocks:].contiguous())
        self.register_buffer("sign_b", b[:, blocks:].contiguous())
        self.register_buffer("_within", torch.arange(self.block_len), persistent=False)
        byte_signs = 2.0 * ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) - 1  # [256, 8]: bit i -> sign
        self.register_buffer("_byte_signs", byte_signs, persistent=False)
        self.weight = nn.Embedding(self.num_chunks, self.block_len, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)

    def starts(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[N, F]`` -> offset of each block in the array ``[N, F, Z]``."""
        return universal_hash(ids.unsqueeze(-1), self.offset_a, self.offset_b, self.array_size)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[N, F]`` -> positions in the flat array ``[N, F, D]`` (block-major)."""
        return ((self.starts(ids).unsqueeze(-1) + self._within) % self.array_size).flatten(-2)

    def sign_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[N, F]`` -> signs ``[N, F, D]`` in {-1, +1} (float32)."""
        words = universal_hash(ids.unsqueeze(-1), self.sign_a, self.sign_b, PRIME)  # [N, F, ceil(D / 16)]
        low_bytes = torch.stack([words & 255, (words >> 8) & 255], -1)               # bits 0-7, 8-15
        return nn.functional.embedding(low_bytes, self._byte_signs).flatten(-3)[..., : self.dim]

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        start = self.starts(ids)                                                          # [N, F, Z]
        chunk = torch.div(start, self.block_len, rounding_mode="floor")
        rows = torch.stack([chunk, (chunk + 1) % self.num_chunks], -1)                    # [N, F, Z, 2]
        pair = self.weight(rows).flatten(-2)                                              # [N, F, Z, 2L]
        take = (start - chunk * self.block_len).unsqueeze(-1) + self._within              # [N, F, Z, L]
        out = pair.gather(-1, take).flatten(-2)                                           # [N, F, D]
        return out * self.sign_of(ids) if self.signs else out

    def array_bytes(self) -> int:
        coeffs = self.offset_a.numel() + self.offset_b.numel() + self.sign_a.numel() + self.sign_b.numel()
        return self.array_size * FP32_BYTES + coeffs * INT64_BYTES

    def serving_arrays(self) -> dict[str, np.ndarray]:
        state = {
            "array": to_numpy(self.weight.weight).reshape(-1),
            "offset_a": self.offset_a.numpy(),
            "offset_b": self.offset_b.numpy(),
        }
        if self.signs:
            state.update(sign_a=self.sign_a.numpy(), sign_b=self.sign_b.numpy())
        return state

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, array_size={self.array_size}, blocks={self.blocks}, signs={self.signs}"
