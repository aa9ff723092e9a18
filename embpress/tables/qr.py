"""Quotient-remainder compositional embeddings (Shi et al., KDD 2020, arXiv:1909.02107).

Each large field's id ``x`` is split into the complementary partition ``(x // m, x mod m)``: a
quotient table of ``ceil(n / m)`` rows and a remainder table of ``m`` rows, whose two vectors are
combined by an element-wise product (``mult``), a sum (``add``) or a concatenation (``concat``).
No two ids of a field share both rows, so every id keeps a unique vector.

When even the smallest two-partition tables (about ``2 sqrt(n)`` rows per field) exceed the
budget, the largest fields move to ``k`` complementary partitions (the paper's "complementary
partitions": a generalized quotient-remainder, i.e. a mixed radix
``(m_1, ..., m_k)`` with ``x = sum_j i_j prod_{l>j} m_l``), one table per digit, about
``k n^(1/k)`` rows per field. The digit tuple ``(i_1, ..., i_k)`` is unique per id, so ids
still never share all their rows.
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


def _part_dims(dim: int, k: int, operation: str) -> list[int]:
    """Vector width per digit, remainder (last digit) first: ``D`` each, or ``D`` split ``k`` ways for ``concat``.

    For ``k = 2`` this is :func:`_half_dims` (the remainder gets the odd column).
    """
    if operation != "concat":
        return [dim] * k
    return [dim // k + (p < dim % k) for p in range(k)]


def _iroot_ceil(n: int, k: int) -> int:
    """The smallest ``r >= 1`` with ``r**k >= n``."""
    r = max(1, round(n ** (1.0 / k)))
    while r**k < n:
        r += 1
    while r > 1 and (r - 1) ** k >= n:
        r -= 1
    return r


def mixed_radix(n: int, k: int, last: int) -> tuple[int, ...]:
    """Radices ``(m_1, ..., m_k)`` (leading digit first) for ``n`` ids with ``m_k = last``.

    The other digits split ``ceil(n / last)`` near-equally (ceiling roots); the leading radix is
    ``ceil(n / prod_{l>1} m_l)``, the rows its digit ``x // prod_{l>1} m_l`` can reach.
    """
    rev, rest = [last], -(-n // last)
    for p in range(k - 1, 1, -1):
        r = _iroot_ceil(rest, p)
        rev.append(r)
        rest = -(-rest // r)
    rev.append(rest)
    return tuple(reversed(rev))


def plan_ndims(radices: Sequence[tuple[int, ...]]) -> int:
    """Shape words of a plan's serving arrays: weight_r and weight_q (two-partition fields),
    weight_full (whole fields), one table per digit of each k-partition plan, and moduli [F] or
    radices [F, k]."""
    parts = {len(r) for r in radices}
    return (4 if 2 in parts else 0) + (2 if 0 in parts else 0) + sum(2 * k for k in parts if k > 2) \
        + (2 if max(parts) > 2 else 1)


def plan_partitions(sizes: Sequence[int], dim: int, operation: str, max_bytes: int,
                    max_partitions: int) -> list[tuple[int, ...]]:
    """Mixed radix per field (``()``: uncompressed) when two partitions per field do not fit.

    Fields move, largest first, from ``k - 1`` to ``k`` partitions (``k = 3 .. max_partitions``)
    until the smallest tables fit; each field's last radix then follows one common cap as in
    :func:`plan_moduli` (at least ``ceil(n^(1/k))``), the largest cap that fits. Metadata is one
    int64 radix per field and digit slot (``F * K`` with ``K`` the most partitions used).

    Raises:
        BudgetError: when every field at ``max_partitions`` near-equal partitions still exceeds ``max_bytes``.
    """
    n = np.asarray(sizes, dtype=np.int64)
    top = min(max_partitions, dim) if operation == "concat" else max_partitions
    full_bytes = [int(s) * dim * FP32_BYTES for s in n]
    dr, dq = _half_dims(dim, operation)

    def best(s: int, k: int) -> int:
        return _smallest_modulus(s, dr, dq) if k == 2 else _iroot_ceil(s, k)

    def field_plan(f: int, k: int, cap: int) -> tuple[int, tuple[int, ...]]:
        s = int(n[f])
        last = min(max(cap, best(s, k)), s)
        rad = mixed_radix(s, k, last) if k > 2 else (-(-s // last), last)
        qr = sum(r * w for r, w in zip(reversed(rad), _part_dims(dim, k, operation), strict=True)) * FP32_BYTES
        return (full_bytes[f], ()) if last == s or full_bytes[f] <= qr else (qr, rad)

    def plan(levels: list[int], cap: int) -> tuple[int, list[tuple[int, ...]]]:
        parts = [field_plan(f, k, cap) for f, k in enumerate(levels)]
        kmax = max([len(r) for _, r in parts], default=0)
        meta = MODULUS_BYTES * len(levels) * (kmax if kmax > 2 else 1)
        return sum(b for b, _ in parts) + meta, [r for _, r in parts]

    def lowest(levels: list[int]) -> int:
        return min(best(int(s), k) for s, k in zip(n, levels, strict=True))

    levels = [2] * len(n)
    order = np.argsort(-n, kind="stable")
    found = False
    for k in range(3, top + 1):
        for f in order:
            if field_plan(f, k, 1)[0] >= field_plan(f, levels[f], 1)[0]:
                continue  # k partitions would not make this field smaller
            levels[f] = k
            if plan(levels, lowest(levels))[0] <= max_bytes:
                found = True
                break
        if found:
            break
    if not found:
        need = plan(levels, lowest(levels))[0]
        raise BudgetError(
            f"qr: the smallest tables with up to {top} complementary partitions per field need "
            f"{need:,} bytes but the budget allows {max_bytes:,}"
        )
    lo, hi = lowest(levels), int(n.max())
    if plan(levels, hi)[0] <= max_bytes:
        lo = hi
    while hi - lo > 1:  # plan(lo) fits, plan(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan(levels, mid)[0] <= max_bytes else (lo, mid)
    return plan(levels, lo)[1]


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

    When even the smallest Q-R pairs exceed the budget, :func:`plan_partitions` moves fields,
    largest first, to ``k = 3 .. max_partitions`` complementary partitions (the paper's
    generalized quotient-remainder: mixed radix ``(m_1, ..., m_k)``, digits
    ``i_k = x mod m_k``, ``i_j = (x // prod_{l>j} m_l) mod m_j``, ``i_1 = x // prod_{l>1} m_l``),
    near-equal radices of about ``n^(1/k)``, one table per digit, combined by the same operation
    (``concat`` splits ``D`` across the ``k`` digits, remainder first). Digits other than the last
    start at 1 + N(0, 0.01^2) for ``mult``, like the quotient. The fewest partitions that fit win:
    two-partition plans are exactly those of :func:`plan_moduli`.

    Args:
        operation: ``"mult"`` (default, the paper's best), ``"add"`` or ``"concat"``.
        max_partitions: most complementary partitions per field (``>= 2``; 2 is plain Q-R).

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``. Serving state: ``weight_r [sum m, Dr]``,
    ``weight_q [sum ceil(n/m), Dq]`` for two-partition fields, ``weight_full [sum n of uncompressed
    fields, D]``, ``weight_p{k}_{j} [sum m_j, D_j]`` for digit ``j`` (0: leading) of the
    ``k``-partition fields (fp32, each present only when non-empty), and ``moduli [F]`` int64 (0:
    uncompressed field; ``self.moduli`` holds each field's last radix ``m_k``) when no field needs more than two partitions, else ``radices [F, K]``
    int64: each field's ``(m_1, ..., m_k)`` right-aligned and zero-padded (all zeros: uncompressed).

    >>> t = QRTable(fields=[Field("a", 10_000), Field("b", 3)], dim=4, budget=4_000)
    >>> t.moduli, t.collisions, t.serving_bytes() <= 4_000
    ([187, 0], [54, 1], True)
    >>> QRTable(fields=[Field("a", 10_000)], dim=4, budget=2_000).radices
    [(10, 11, 97)]
    """

    tune_space = {"operation": ("choice", "mult", "add", "concat")}

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None,
                 operation: str = "mult", max_partitions: int = 4) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if operation not in OPERATIONS:
            raise ValueError(f"qr: operation must be one of {list(OPERATIONS)}, got {operation!r}")
        if operation == "concat" and dim < 2:
            raise ValueError(f"qr: operation 'concat' splits the dim in two halves and needs dim >= 2, got {dim}")
        if isinstance(max_partitions, bool) or not isinstance(max_partitions, int) or max_partitions < 2:
            raise ValueError(f"qr: max_partitions must be an int >= 2, got {max_partitions!r}")
        self.operation = operation
        self.max_partitions = max_partitions
        sizes = [f.num_embeddings for f in self.fields]
        # The arrays' shapes depend on the plan (which tables it needs): plan with the least, then
        # again with what the plan needs until it fits its own shapes (more shapes only shrink a plan).
        ndims = 4 + 1  # weight_r, weight_q [rows, d] and moduli [F]
        while True:
            self.reserve_metadata({"operation": operation}, ndims=ndims)
            try:
                self.moduli = plan_moduli(sizes, dim, operation, self.array_budget)
                self.radices = [(-(-n // m), m) if m else () for n, m in zip(sizes, self.moduli, strict=True)]
            except BudgetError:
                if max_partitions == 2:
                    raise
                self.radices = plan_partitions(sizes, dim, operation, self.array_budget, max_partitions)
                self.moduli = [r[-1] if r else 0 for r in self.radices]
            need = plan_ndims(self.radices)
            if need <= ndims:
                break
            ndims = need
        self.partitions = [len(r) for r in self.radices]
        self.dr, self.dq = _half_dims(dim, operation)

        comp = [i for i, k in enumerate(self.partitions) if k == 2]
        full = [i for i, k in enumerate(self.partitions) if k == 0]
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

        self.weight_r = self.weight_q = self.weight_full = None
        if comp:
            self.weight_r = nn.Embedding(sum(self.r_rows), self.dr, sparse=True)
            self.weight_q = nn.Embedding(sum(self.q_rows), self.dq, sparse=True)
            nn.init.normal_(self.weight_r.weight, std=INIT_STD)
            nn.init.normal_(self.weight_q.weight, mean=1.0 if operation == "mult" else 0.0, std=INIT_STD)
        if full:
            self.weight_full = nn.Embedding(sum(self.full_rows), dim, sparse=True)
            nn.init.normal_(self.weight_full.weight, std=INIT_STD)

        # k >= 3 partitions: per k, the fields, their radices, digit strides and one table per digit
        self.multi_ks = sorted({k for k in self.partitions if k > 2})
        self.weight_multi = nn.ModuleDict()
        multi = []
        for k in self.multi_ks:
            fk = [i for i, p in enumerate(self.partitions) if p == k]
            multi += fk
            rad = torch.tensor([self.radices[i] for i in fk], dtype=torch.long)          # [Fk, k]
            strides = torch.ones_like(rad)
            strides[:, :-1] = torch.flip(torch.cumprod(torch.flip(rad[:, 1:], [1]), 1), [1])
            self.register_buffer(f"fields_p{k}", torch.tensor(fk, dtype=torch.long), persistent=False)
            self.register_buffer(f"radix_p{k}", rad, persistent=False)
            self.register_buffer(f"stride_p{k}", strides, persistent=False)
            widths = _part_dims(dim, k, operation)[::-1]                                  # leading first
            for j in range(k):
                rows = rad[:, j].tolist()
                self.register_buffer(f"offset_p{k}_{j}", offsets(rows), persistent=False)
                emb = nn.Embedding(sum(rows), widths[j], sparse=True)
                nn.init.normal_(emb.weight, mean=1.0 if operation == "mult" and j < k - 1 else 0.0,
                                std=INIT_STD)
                self.weight_multi[f"p{k}_{j}"] = emb
        # output position of each field after concatenating [2-partition, full, k-partition fields]
        self.register_buffer("_order", torch.argsort(torch.tensor(comp + full + multi, dtype=torch.long)),
                             persistent=False)

    @property
    def collisions(self) -> list[int]:
        """Ids sharing each remainder (last-digit) row, per field (``ceil(n / m_k)``; 1 when uncompressed)."""
        return [-(-f.num_embeddings // r[-1]) if r else 1 for f, r in zip(self.fields, self.radices, strict=True)]

    def _combine(self, vecs: list[torch.Tensor]) -> torch.Tensor:
        """Join digit vectors given remainder first."""
        if self.operation == "concat":
            return torch.cat(vecs, dim=-1)
        out = vecs[0]
        for v in vecs[1:]:
            out = out * v if self.operation == "mult" else out + v
        return out

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.weight_r is not None:
            x = ids.index_select(1, self.comp_fields)                         # [N, Fc]
            er = self.weight_r(torch.remainder(x, self.modulus) + self.r_offsets)
            eq = self.weight_q(torch.div(x, self.modulus, rounding_mode="floor") + self.q_offsets)
            parts.append(self._combine([er, eq]))
        if self.weight_full is not None:
            parts.append(self.weight_full(ids.index_select(1, self.full_fields) + self.full_offsets))
        for k in self.multi_ks:
            x = ids.index_select(1, getattr(self, f"fields_p{k}")).unsqueeze(-1)   # [N, Fk, 1]
            digits = torch.div(x, getattr(self, f"stride_p{k}"), rounding_mode="floor")
            digits[..., 1:] = torch.remainder(digits[..., 1:], getattr(self, f"radix_p{k}")[:, 1:])
            vecs = [self.weight_multi[f"p{k}_{j}"](digits[..., j] + getattr(self, f"offset_p{k}_{j}"))
                    for j in range(k)]
            parts.append(self._combine(vecs[::-1]))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.index_select(1, self._order)

    def _meta_bytes(self) -> int:
        kmax = max(self.partitions)
        return MODULUS_BYTES * self.num_fields * (kmax if kmax > 2 else 1)

    def array_bytes(self) -> int:
        rows = sum(self.r_rows) * self.dr + sum(self.q_rows) * self.dq + sum(self.full_rows) * self.dim
        rows += sum(e.weight.numel() for e in self.weight_multi.values())
        return rows * FP32_BYTES + self._meta_bytes()

    def serving_arrays(self) -> dict[str, np.ndarray]:
        state = {}
        if self.weight_r is not None:
            state["weight_r"] = to_numpy(self.weight_r.weight)
            state["weight_q"] = to_numpy(self.weight_q.weight)
        if self.weight_full is not None:
            state["weight_full"] = to_numpy(self.weight_full.weight)
        for name, emb in self.weight_multi.items():
            state[f"weight_{name}"] = to_numpy(emb.weight)
        kmax = max(self.partitions)
        if kmax > 2:
            radices = np.zeros((self.num_fields, kmax), dtype=np.int64)
            for f, r in enumerate(self.radices):
                if r:
                    radices[f, kmax - len(r):] = r
            state["radices"] = radices
        else:
            state["moduli"] = np.asarray(self.moduli, dtype=np.int64)
        return state

    def serving_spec(self) -> dict[str, str]:
        return {"operation": self.operation}

    def sparse_parameters(self) -> list[nn.Parameter]:
        tables = [self.weight_r, self.weight_q, self.weight_full, *self.weight_multi.values()]
        return [e.weight for e in tables if e is not None]

    def extra_repr(self) -> str:
        rep = f"{super().extra_repr()}, operation={self.operation!r}, moduli={self.moduli}"
        if self.multi_ks:
            rep += f", radices={self.radices}"
        return rep
