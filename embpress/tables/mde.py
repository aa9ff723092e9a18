"""Mixed-dimension embeddings: frequent ids get wide rows, rare ids narrow rows projected to ``D``
(Ginart et al., ISIT 2021, arXiv:1909.11810)."""

from __future__ import annotations

import math
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

BOUND_BYTES = 4
"""One int32 per inner block boundary of a field (none when a field is a single block)."""

ALPHA_MAX = 1.0
"""Largest temperature searched (the study searches alpha in [0, 1])."""

_BISECT_STEPS = 40


def block_bounds(n: int, blocks: int) -> np.ndarray:
    """Geometric frequency blocks of a field with ``n`` ids (numbered by descending frequency).

    Returns the ``blocks + 1`` field-local boundaries ``0 = b_0 <= b_1 <= ... <= b_K = n``, with
    ``b_k = round(n ** (k / K))``: block sizes grow geometrically, so the few head ids form the first
    blocks and the long tail the last. Blocks may be empty when ``n`` is small.

    >>> block_bounds(1000, 3).tolist()
    [0, 10, 100, 1000]
    """
    k = np.arange(blocks + 1) / blocks
    b = np.rint(float(n) ** k).astype(np.int64)
    b[0], b[-1] = 0, n
    return np.maximum.accumulate(np.minimum(b, n))


def block_popularity(counts: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Mean query probability of one row of each block: ``(block's share of the field's queries) / rows``.

    Each field is queried once per sample, so with a single block this is ``1 / n`` (the rule of the
    reference code, ``d ∝ n^-alpha``). Empty blocks get 0. A field without counts is uniform.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    rows = np.diff(bounds)
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    mass = cum[bounds[1:]] - cum[bounds[:-1]]
    if total <= 0:
        mass = rows.astype(np.float64)
        total = float(max(rows.sum(), 1))
    return np.where(rows > 0, mass / total / np.maximum(rows, 1), 0.0)


def alpha_power_dims(pop: np.ndarray, alpha: float, base_dim: int, dim: int, round_dim: bool) -> np.ndarray:
    """The alpha-power rule ``d_i = base_dim * (p_i / p_max) ** alpha`` (arXiv:1909.11810; dlrm ``alpha_power_rule``).

    Dims are rounded (to the nearest power of two with ``round_dim``) and clipped to ``[1, dim]``.
    """
    rel = pop / pop.max() if pop.max() > 0 else np.ones_like(pop)
    with np.errstate(divide="ignore"):
        d = base_dim * np.power(rel, alpha)
    d = np.clip(np.rint(d), 1, dim)
    if round_dim:
        d = np.clip(2.0 ** np.rint(np.log2(d)), 1, dim)
    return d.astype(np.int64)


@register_table("mde")
class MDETable(CompressedTable):
    """Mixed-dimension embeddings (Ginart et al., ISIT 2021, arXiv:1909.11810; reference:
    facebookresearch/dlrm ``tricks/md_embedding_bag.py`` and the VLDB 2024 study's ``MDETrainer``).

    Each field's ids (numbered by descending frequency) are cut into ``blocks_per_field`` geometric
    frequency blocks (:func:`block_bounds`; 1 = one block per field, as in both reference codes).
    Block ``i`` stores ``rows_i x d_i`` fp32 and, when ``d_i < D``, a learned projection
    ``P_i [d_i, D]``; a lookup is ``E_i[id] @ P_i``. Dims follow the alpha-power rule
    ``d_i = d0 * (p_i / p_max) ** alpha`` on the mean row popularity ``p_i``
    (:func:`block_popularity`), rounded to powers of two with ``round_dim``. A block whose projection
    would cost more than it saves (``rows_i d_i + d_i D >= rows_i D``) is kept at ``D`` unprojected.

    Sizing: with ``alpha=None`` the base dim is ``d0 = D`` and alpha is the smallest value in
    ``[0, 1]`` that fits the budget (bisection, as the study's code; bytes fall monotonically in
    alpha). When even ``alpha = 1`` does not fit, or when ``alpha`` is given, the base dim ``d0`` is
    lowered to the largest value that fits. Projections and block boundaries count.

    Args:
        blocks_per_field: frequency blocks per field (1: blocks are fields).
        alpha: temperature of the power rule; None solves it from the budget.
        round_dim: round dims to the nearest power of two (the reference default).

    Serving bytes: ``4 * sum_i (rows_i d_i + [d_i < D] d_i D)`` plus ``4 * F * (K - 1)`` int32 bounds.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``; block ``i``: rows ``[rows_i, d_i]``, projection ``[d_i, D]``.

    >>> from embpress.tables import Ratio
    >>> t = MDETable(fields=[Field("a", 10), Field("b", 1000)], dim=8, budget=Ratio(4))
    >>> t.dims_, t.alpha_, t.serving_bytes() <= t.full_bytes / 4
    ([8, 1], 0.3635, True)
    >>> t(torch.tensor([[3, 999]])).shape
    torch.Size([1, 2, 8])
    """

    tune_space = {"blocks_per_field": ("choice", 1, 2, 4)}

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, blocks_per_field: int = 1,
                 alpha: float | None = None, round_dim: bool = True) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.blocks_per_field = blocks_per_field
        self.alpha = alpha
        self.round_dim = round_dim
        if not isinstance(blocks_per_field, int) or blocks_per_field < 1:
            raise ValueError(f"mde: blocks_per_field must be a positive int, got {blocks_per_field!r}")
        if alpha is not None and not (isinstance(alpha, int | float) and alpha >= 0 and np.isfinite(alpha)):
            raise ValueError(f"mde: alpha must be a finite number >= 0 or None, got {alpha!r}")

        k = blocks_per_field
        self.bounds_ = [block_bounds(f.num_embeddings, k) for f in self.fields]
        pops, rows, owner = [], [], []
        for j, (f, b) in enumerate(zip(self.fields, self.bounds_, strict=True)):
            pop = block_popularity(f.frequencies(), b)
            for i in range(k):
                if b[i + 1] > b[i]:
                    pops.append(pop[i])
                    rows.append(int(b[i + 1] - b[i]))
                    owner.append((j, i))
        self._pop = np.array(pops)
        self._rows = np.array(rows, dtype=np.int64)
        self._bound_bytes = self.num_fields * (k - 1) * BOUND_BYTES
        self.alpha_, self.base_dim_, dims = self._solve()
        self.dims_ = [int(d) for d in dims]

        # Parameters: one sparse row table per (non-empty) block, one projection where d < D.
        self.block_of = {fb: i for i, fb in enumerate(owner)}
        self.rows = nn.ModuleList()
        self.proj = nn.ParameterList()
        self._proj_of: list[int] = []
        for r, d in zip(self._rows, self.dims_, strict=True):
            emb = nn.Embedding(int(r), d, sparse=True)
            nn.init.normal_(emb.weight, std=INIT_STD)
            self.rows.append(emb)
            if d < dim:
                p = torch.empty(d, dim)
                nn.init.xavier_uniform_(p)  # as PrEmbeddingBag's nn.Linear init
                self._proj_of.append(len(self.proj))
                self.proj.append(nn.Parameter(p))
            else:
                self._proj_of.append(-1)
        starts = torch.tensor(np.stack([b[1:-1] for b in self.bounds_]), dtype=torch.long)  # [F, K-1]
        self.register_buffer("inner_bounds", starts, persistent=False)

    # -- sizing -------------------------------------------------------------------------------

    def _effective(self, dims: np.ndarray) -> np.ndarray:
        """Blocks whose projection would not pay for itself are kept at ``D`` unprojected."""
        r, d, full = self._rows, dims, self.dim
        return np.where(r * d + d * full >= r * full, full, d)

    def _bytes(self, dims: np.ndarray) -> int:
        d = dims
        return int(FP32_BYTES * (self._rows * d + np.where(d < self.dim, d * self.dim, 0)).sum()) + self._bound_bytes

    def _cost(self, dims: np.ndarray) -> int:
        """Serving bytes of ``dims``: the arrays and their shapes (inner_bounds [F, k-1]; per block
        weight [rows, d] and, when projected, proj [d, D])."""
        ndims = 2 + int((2 + 2 * (dims < self.dim)).sum())
        return self._bytes(dims) + INT64_BYTES * ndims

    def _dims(self, alpha: float, base: int) -> np.ndarray:
        return self._effective(alpha_power_dims(self._pop, alpha, base, self.dim, self.round_dim))

    def _solve(self) -> tuple[float, int, np.ndarray]:
        """``(alpha, base_dim, dims)``: the least skewed power rule whose table fits the budget."""
        if self.alpha is None:
            if self.fits(self._cost(self._dims(0.0, self.dim))):
                return 0.0, self.dim, self._dims(0.0, self.dim)
            if self.fits(self._cost(self._dims(ALPHA_MAX, self.dim))):
                lo, hi = 0.0, ALPHA_MAX  # lo does not fit, hi fits
                for _ in range(_BISECT_STEPS):
                    mid = (lo + hi) / 2
                    if self.fits(self._cost(self._dims(mid, self.dim))):
                        hi = mid
                    else:
                        lo = mid
                alpha = math.ceil(hi * 1e6) / 1e6  # a readable value; larger alphas fit too
                return alpha, self.dim, self._dims(alpha, self.dim)
            alpha = ALPHA_MAX
        else:
            alpha = float(self.alpha)
        for base in range(self.dim, 0, -1):
            dims = self._dims(alpha, base)
            if self.fits(self._cost(dims)):
                return alpha, base, dims
        raise BudgetError(
            f"mde: dimension 1 for every block (plus projections to D={self.dim} and block bounds) needs "
            f"{self._cost(self._dims(alpha, 1)):,} bytes but the budget allows {self.max_bytes:,} "
            f"(full table {self.full_bytes:,} bytes, budget {self.budget})"
        )

    # -- lookups ------------------------------------------------------------------------------

    def _block(self, i: int, local: torch.Tensor) -> torch.Tensor:
        x = self.rows[i](local)
        p = self._proj_of[i]
        return x if p < 0 else x @ self.proj[p]

    def _field(self, j: int, x: torch.Tensor) -> torch.Tensor:
        k = self.blocks_per_field
        if k == 1:
            return self._block(self.block_of[(j, 0)], x)
        blk = torch.bucketize(x, self.inner_bounds[j], right=True)
        order = torch.argsort(blk, stable=True)
        sizes = torch.bincount(blk, minlength=k).tolist()
        xs = x[order].split(sizes)
        parts = [self._block(self.block_of[(j, i)], xi - int(self.bounds_[j][i]))
                 for i, xi in enumerate(xs) if xi.numel()]
        out = torch.cat(parts)
        return out.index_select(0, torch.argsort(order))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._field(j, ids[:, j].contiguous()) for j in range(self.num_fields)], dim=1)

    # -- contract -----------------------------------------------------------------------------

    def array_bytes(self) -> int:
        return self._bytes(np.array(self.dims_, dtype=np.int64))

    def serving_arrays(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {
            "inner_bounds": np.stack([b[1:-1] for b in self.bounds_]).astype(np.int32)}
        for (j, k), i in self.block_of.items():
            name = f"{self.fields[j].name}.block{k}"
            state[f"{name}.weight"] = to_numpy(self.rows[i].weight)
            if self._proj_of[i] >= 0:
                state[f"{name}.proj"] = to_numpy(self.proj[self._proj_of[i]])
        return state

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [e.weight for e in self.rows]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, blocks_per_field={self.blocks_per_field}, alpha={self.alpha_}, "
                f"base_dim={self.base_dim_}, dims={self.dims_}")
