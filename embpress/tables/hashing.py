"""Universal hashing of ids into buckets, and splitting a row budget across fields.

``h(x) = ((a * x + b) mod p) mod m`` with ``p = 2**31 - 1`` and random ``1 <= a < p``, ``0 <= b < p``
(Carter-Wegman). Products stay below 2**62, so int64 arithmetic is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PRIME = 2**31 - 1


def hash_coefficients(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` independent (a, b) pairs of a universal hash family, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, PRIME, size=count, dtype=np.int64)
    b = rng.integers(0, PRIME, size=count, dtype=np.int64)
    return torch.from_numpy(a), torch.from_numpy(b)


def universal_hash(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buckets: torch.Tensor | int) -> torch.Tensor:
    """Hash int64 ``x`` (any shape broadcasting with ``a``, ``b``, ``buckets``) into ``[0, buckets)``."""
    return ((a * (x % PRIME) + b) % PRIME) % buckets


def rows_within_budget(method: str, sizes: Sequence[int], *, row_bytes: int, max_bytes: int,
                       overhead: int) -> list[int]:
    """Rows per field for a budget of ``max_bytes``: ``overhead`` bytes first, then rows of ``row_bytes``
    split by :func:`allocate_rows`. Raises ``BudgetError`` below one row per field.
    """
    from embpress.tables.base import BudgetError

    units = (max_bytes - overhead) // row_bytes
    if units < len(sizes):
        raise BudgetError(
            f"{method}: budget {max_bytes:,} bytes is below one row per field "
            f"({len(sizes) * row_bytes + overhead:,} bytes with the hash coefficients)"
        )
    return allocate_rows(sizes, int(units))


def allocate_rows(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` rows across fields with one common cap: ``rows_i = min(size_i, cap)``.

    This is DLRM's ``max_ind_range`` rule: small fields keep one row per id (no collisions),
    and the large fields, where hashing is needed, share the rest equally. ``cap`` is the
    largest value whose total fits. Every field gets at least one row.
    """
    sizes = [int(s) for s in sizes]
    if total < len(sizes):
        raise ValueError(f"{total} rows cannot give each of {len(sizes)} fields one row")
    if sum(sizes) <= total:
        return sizes
    lo, hi = 1, max(sizes)  # sum(min(s, lo)) <= total < sum(min(s, hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(min(s, mid) for s in sizes) <= total:
            lo = mid
        else:
            hi = mid
    return [min(s, lo) for s in sizes]
