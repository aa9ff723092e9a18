"""Quotient-remainder compositional embeddings (Shi et al., KDD 2020, arXiv:1909.02107).

Each large field's id ``x`` is split into the complementary partition ``(x // m, x mod m)``: a
quotient table of ``ceil(n / m)`` rows and a remainder table of ``m`` rows, whose two vectors are
combined by an element-wise product (``mult``), a sum (``add``) or a concatenation (``concat``).
No two ids of a field share both rows, so every id keeps a unique vector.
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

OPERATIONS = ("mult", "add", "concat")
MODULUS_BYTES = 8
"""Per field: its modulus ``m`` (int64; 0 marks an uncompressed field)."""


def _half_dims(dim: int, operation: str) -> tuple[int, int]:
    """Widths of the remainder and quotient vectors: ``D`` each, or ``D/2`` each for ``concat``."""
    if operation == "concat":
        return (dim + 1) // 2, dim // 2
    return dim, dim


def _smallest_modulus(n: int, dr: int, dq: int) -> int:
    """The ``m`` in ``1..n`` with the fewest Q-R bytes ``m dr + ceil(n/m) dq``, about ``sqrt(n dq / dr)``.

    Ties go to the larger ``m`` (fewer ids per remainder row).
    """
    centre = math.sqrt(n * dq / dr)
    ms = np.arange(max(1, int(centre) - 2), min(n, int(centre) + 3) + 1, dtype=np.int64)
    cost = ms * dr + -(-n // ms) * dq
    return int(ms[np.flatnonzero(cost == cost.min())[-1]])


def plan_moduli(sizes: Sequence[int], dim: int, operation: str, max_bytes: int) -> list[int]:
    """Modulus ``m`` per field (0: uncompressed) that fits ``max_bytes`` with the fewest collisions.

    One common cap on remainder rows (DLRM's ``max_ind_range``, as in ``hash``) gives
    ``m_f = min(n_f, cap)``, kept at least at ``m*_f ~ sqrt(n_f)``, the modulus of the field's
    smallest Q-R pair (``m*_f + ceil(n_f / m*_f)`` rows). The largest cap that fits is chosen, so
    small fields keep their full table (no collisions) and large ones share the rest.

    Raises:
        BudgetError: when even every field at its smallest Q-R pair exceeds ``max_bytes``.
    """
    dr, dq = _half_dims(dim, operation)
    n = np.asarray(sizes, dtype=np.int64)
    m_best = np.array([_smallest_modulus(int(s), dr, dq) for s in n], dtype=np.int64)
    full_bytes = n * dim * FP32_BYTES

    def plan(cap: int) -> tuple[int, np.ndarray, np.ndarray]:
        m = np.clip(cap, m_best, n)
        qr_bytes = (m * dr + -(-n // m) * dq) * FP32_BYTES
        full = (m == n) | (full_bytes <= qr_bytes)
        return int(np.where(full, full_bytes, qr_bytes).sum()) + MODULUS_BYTES * len(sizes), m, full

    lo, hi = int(m_best.min()), int(n.max())
    if plan(lo)[0] > max_bytes:
        raise BudgetError(
            f"qr: the smallest Q-R tables (about 2 sqrt(n) rows per field) need {plan(lo)[0]:,} "
            f"bytes but the budget allows {max_bytes:,}"
        )
    if plan(hi)[0] <= max_bytes:
        lo = hi
    while hi - lo > 1:  # plan(lo) fits, plan(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan(mid)[0] <= max_bytes else (lo, mid)
    _, m, full = plan(lo)
    return [0 if full[f] else int(m[f]) for f in range(len(sizes))]


@register_table("qr")
class QRTable(CompressedTable):
    """Q-R trick: ``e(x) = W_q[x // m] op W_r[x mod m]`` per field (arXiv:1909.02107, Sec. 3, Alg. 1).

    ``m`` is chosen per field by :func:`plan_moduli`: one common cap on remainder rows, as large as
    the budget allows, so small fields stay uncompressed and large ones share the rest. The remainder
    table is the large one (``m >= sqrt(n)``): embpress numbers ids by descending frequency, so the
    ``m`` most frequent ids each own a remainder row, and the small quotient table holds one vector
    per frequency band of ``m`` ids. ``concat`` joins a ``ceil(D/2)``-wide remainder vector and a
    ``floor(D/2)``-wide quotient vector (the paper's concatenation, output width kept at ``D``).
    Rows live in sparse ``nn.Embedding`` weights (SparseAdam) and start as N(0, 0.01^2), except
    the quotient rows of ``mult``, which start at 1 + N(0, 0.01^2): the product then starts as
    the hashing trick ``W_r[x mod m]`` rather than a 1e-4-sized product of two small vectors.

    Args:
        operation: ``"mult"`` (default, the paper's best), ``"add"`` or ``"concat"``.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``. Serving state: ``weight_r [sum m, Dr]``,
    ``weight_q [sum ceil(n/m), Dq]``, ``weight_full [sum n of uncompressed fields, D]`` (fp32,
    each present only when non-empty) and ``moduli [F]`` int64 (0: uncompressed field).

    >>> t = QRTable(fields=[Field("a", 10_000), Field("b", 3)], dim=4, budget=4_000)
    >>> t.moduli, t.collisions, t.serving_bytes() <= 4_000
    ([194, 0], [52, 1], True)
    """

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None,
                 operation: str = "mult") -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if operation not in OPERATIONS:
            raise ValueError(f"qr: operation must be one of {list(OPERATIONS)}, got {operation!r}")
        if operation == "concat" and dim < 2:
            raise ValueError(f"qr: operation 'concat' splits the dim in two halves and needs dim >= 2, got {dim}")
        self.operation = operation
        sizes = [f.num_embeddings for f in self.fields]
        self.moduli = plan_moduli(sizes, dim, operation, self.max_bytes)
        self.dr, self.dq = _half_dims(dim, operation)

        comp = [i for i, m in enumerate(self.moduli) if m]
        full = [i for i, m in enumerate(self.moduli) if not m]
        self.r_rows = [self.moduli[i] for i in comp]
        self.q_rows = [-(-sizes[i] // self.moduli[i]) for i in comp]
        self.full_rows = [sizes[i] for i in full]

        def offsets(rows: list[int]) -> torch.Tensor:
            return torch.tensor([0, *np.cumsum(rows)[:-1].tolist()] if rows else [], dtype=torch.long)

        self.register_buffer("comp_fields", torch.tensor(comp, dtype=torch.long), persistent=False)
        self.register_buffer("full_fields", torch.tensor(full, dtype=torch.long), persistent=False)
        self.register_buffer("modulus", torch.tensor(self.r_rows, dtype=torch.long), persistent=False)
        self.register_buffer("r_offsets", offsets(self.r_rows), persistent=False)
        self.register_buffer("q_offsets", offsets(self.q_rows), persistent=False)
        self.register_buffer("full_offsets", offsets(self.full_rows), persistent=False)
        # output position of each field after concatenating [compressed fields, full fields]
        self.register_buffer("_order", torch.argsort(torch.tensor(comp + full, dtype=torch.long)),
                             persistent=False)

        self.weight_r = self.weight_q = self.weight_full = None
        if comp:
            self.weight_r = nn.Embedding(sum(self.r_rows), self.dr, sparse=True)
            self.weight_q = nn.Embedding(sum(self.q_rows), self.dq, sparse=True)
            nn.init.normal_(self.weight_r.weight, std=INIT_STD)
            nn.init.normal_(self.weight_q.weight, mean=1.0 if operation == "mult" else 0.0, std=INIT_STD)
        if full:
            self.weight_full = nn.Embedding(sum(self.full_rows), dim, sparse=True)
            nn.init.normal_(self.weight_full.weight, std=INIT_STD)

    @property
    def collisions(self) -> list[int]:
        """Ids sharing each remainder row, per field (``ceil(n / m)``; 1 for uncompressed fields)."""
        return [-(-f.num_embeddings // m) if m else 1 for f, m in zip(self.fields, self.moduli, strict=True)]

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.weight_r is not None:
            x = ids.index_select(1, self.comp_fields)                         # [N, Fc]
            er = self.weight_r(torch.remainder(x, self.modulus) + self.r_offsets)
            eq = self.weight_q(torch.div(x, self.modulus, rounding_mode="floor") + self.q_offsets)
            if self.operation == "mult":
                parts.append(er * eq)
            elif self.operation == "add":
                parts.append(er + eq)
            else:
                parts.append(torch.cat([er, eq], dim=-1))
        if self.weight_full is not None:
            parts.append(self.weight_full(ids.index_select(1, self.full_fields) + self.full_offsets))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.index_select(1, self._order)

    def serving_bytes(self) -> int:
        rows = sum(self.r_rows) * self.dr + sum(self.q_rows) * self.dq + sum(self.full_rows) * self.dim
        return rows * FP32_BYTES + MODULUS_BYTES * self.num_fields

    def serving_state(self) -> dict[str, np.ndarray]:
        state = {}
        if self.weight_r is not None:
            state["weight_r"] = to_numpy(self.weight_r.weight)
            state["weight_q"] = to_numpy(self.weight_q.weight)
        if self.weight_full is not None:
            state["weight_full"] = to_numpy(self.weight_full.weight)
        state["moduli"] = np.asarray(self.moduli, dtype=np.int64)
        return state

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [e.weight for e in (self.weight_r, self.weight_q, self.weight_full) if e is not None]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, operation={self.operation!r}, moduli={self.moduli}"
