"""TT-Rec: each large field's table as a tensor train of small cores (Yin et al., MLSys 2021).

A field with ``n`` ids is viewed as a ``(n_1 * ... * n_K) x (d_1 * ... * d_K)`` matrix
(``prod n_k >= n``, padded up; ``prod d_k == D``). Its TT-matrix format stores cores
``G_k[R_{k-1}, n_k, d_k, R_k]`` with ``R_0 = R_K = 1``, and row ``i`` with mixed-radix digits
``(i_1, ..., i_K)`` is ``G_1[:, i_1] x G_2[:, i_2] x ... x G_K[:, i_K]`` contracted over the
ranks and reshaped to ``D`` (TT-Rec, arXiv:2101.11714, section 3, eq. 2). Reference code:
facebookresearch/FBTT-Embedding ``tt_embeddings_ops.py``.
"""

from __future__ import annotations

import itertools
import math
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

INITS = ("sampled_gaussian", "gaussian")
"""Core initialisations: TT-Rec's sampled Gaussian (the reference code's ``approx-normal``) or plain N(0, s^2)."""

SAMPLED_TAIL = 2.0
"""The sampled Gaussian keeps standard-normal draws with ``|z| >= 2`` (FBTT ``reset_parameters``)."""

EXPAND_FACTOR = 16.0
"""At each core, a field extends all its parent prefixes by all its digits with one GEMM while that
computes at most this many times the prefixes it needs; beyond it, each needed prefix is extended
alone in one batched matmul over all such fields. Tuned on CPU (one thread), where a batched matmul
of tiny matrices costs about a microsecond per matrix (benchmarks/tt_throughput.py)."""


def _ceil_root(n: int, k: int) -> int:
    """The smallest integer ``r >= 1`` with ``r ** k >= n``."""
    r = max(1, round(n ** (1.0 / k)))
    while r**k < n:
        r += 1
    while r > 1 and (r - 1) ** k >= n:
        r -= 1
    return r


def id_factors(n: int, cores: int) -> tuple[int, ...]:
    """Near-equal factors with product ``>= n`` (the id space padded up), largest first.

    TT-Rec's ``suggested_tt_shapes`` picks the most balanced factorisation of ``n`` rounded up;
    here each factor is the ceiling root of what is left, which pads by less than one factor's worth.

    >>> id_factors(5000, 3), id_factors(1000, 3), id_factors(7, 3)
    ((18, 17, 17), (10, 10, 10), (2, 2, 2))
    """
    out, rest = [], int(n)
    for k in range(cores, 0, -1):
        f = _ceil_root(rest, k)
        out.append(f)
        rest = -(-rest // f)
    return tuple(sorted(out, reverse=True))


def dim_factors(dim: int, cores: int) -> tuple[int, ...]:
    """Exact factors of ``dim`` into ``cores`` parts, the most balanced (least sum of squared logs).

    The smallest factors sit on the inner cores (whose size is ``R^2 n_k d_k``), the larger ones on
    the two end cores (``R n_k d_k``), the larger of those last: lookups contract left to right,
    and the first inner product costs ``R^2 d_1 d_2`` per id prefix. Dims with few prime factors
    (primes, ``2 * prime``) get factors of 1: such a core carries no output dimension, only a
    rank-to-rank map per id digit (in effect fewer dim factors, still ``num_cores`` id factors).

    >>> dim_factors(8, 3), dim_factors(16, 3), dim_factors(64, 3), dim_factors(7, 3), dim_factors(12, 2)
    ((2, 2, 2), (2, 2, 4), (4, 4, 4), (1, 1, 7), (3, 4))
    """

    def splits(m: int, k: int):
        if k == 1:
            yield (m,)
            return
        for f in range(1, m + 1):
            if m % f == 0:
                for rest in splits(m // f, k - 1):
                    yield (f, *rest)

    best = min(splits(dim, cores), key=lambda s: (sum(math.log(f) ** 2 for f in s), sorted(s, reverse=True)))
    small_first = sorted(best)
    inner, ends = small_first[: cores - 2], small_first[cores - 2:]
    return (ends[0], *inner, ends[1])


def _core_weights(dims: Sequence[int], rank: int) -> list[int]:
    """Parameters per id digit of each core: ``R_{k-1} d_k R_k`` with ``R_0 = R_K = 1``."""
    K = len(dims)
    return [(1 if k == 0 else rank) * d * (1 if k == K - 1 else rank) for k, d in enumerate(dims)]


def arrange_ids(factors: Sequence[int], dims: Sequence[int], rank: int) -> tuple[tuple[int, ...], int]:
    """Order the id factors over the cores to minimise ``sum_k n_k R_{k-1} d_k R_k``; returns (shape, numel).

    Largest ``n_k`` goes to the core with the fewest parameters per digit (rearrangement inequality).
    """
    w = _core_weights(dims, rank)
    slots = sorted(range(len(w)), key=lambda k: (w[k], k))
    shape = [0] * len(w)
    for slot, f in zip(slots, sorted(factors, reverse=True), strict=True):
        shape[slot] = f
    return tuple(shape), sum(n * wk for n, wk in zip(shape, w, strict=True))


def _sampled_gaussian(shape: Sequence[int], tail: float) -> torch.Tensor:
    """Standard-normal draws conditioned on ``|z| >= tail``, by inverse CDF (global torch RNG).

    The reference code rejection-samples ``while |z| < 2``; inverting the tail CDF draws from the
    same distribution in one pass.
    """
    upper = 0.5 * math.erfc(tail / math.sqrt(2.0))  # P(z > tail)
    q = (1.0 - torch.rand(*shape, dtype=torch.float64)) * upper  # (0, upper]
    sign = torch.randint(0, 2, tuple(shape), dtype=torch.int64).to(torch.float64) * 2 - 1
    return (-torch.special.ndtri(q) * sign).float()


def _unit_variance(init: str) -> float:
    """``E[z^2]`` of the unit sampler of ``init``: 1, or ``1 + a phi(a) / (1 - Phi(a))`` for the tails."""
    if init == "gaussian":
        return 1.0
    a = SAMPLED_TAIL
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    return 1.0 + a * phi / (0.5 * math.erfc(a / math.sqrt(2.0)))


@register_table("tt")
class TTTable(CompressedTable):
    """TT-Rec tensor-train tables, one per field, at one uniform TT rank (arXiv:2101.11714, eq. 2).

    Sizing: ``D = d_1 ... d_K`` (:func:`dim_factors`), ``n <= n_1 ... n_K`` (:func:`id_factors`).
    The rank ``R`` is the largest ``<= max_rank`` whose total fits the budget, counting each field
    at ``min(plain rows, TT cores at R)``: a field whose fp32 rows ``n * D`` are no larger than its
    cores stays plain (rows in a sparse ``nn.Embedding``). ``BudgetError`` if rank 1 does not fit.
    Serving bytes are ``4 * (numel of all cores + D * plain rows)``; the shapes are those of the
    stored arrays.

    Initialisation (TT-Rec section 4, "sampled Gaussian"): i.i.d. core entries from the standard
    normal conditioned on ``|z| >= 2`` (the reference code's ``approx-normal``), scaled so that each
    entry of a reconstructed row has the variance ``INIT_STD^2`` of a plain embedding row.

    Lookup (:meth:`_tt_rows`): only the distinct ids of a batch, and of those only the distinct
    digit prefixes, are contracted, core by core and for all TT fields at once, with GEMMs over a
    field's whole core block or one batched matmul over single prefixes (TT-Rec's batched GEMM).
    The cores of all TT fields are stored side by side, ``cores[k]`` being
    ``[R_{k-1}, sum of n_k over TT fields, d_k, R_k]`` (:meth:`core_block` gives a field's slice).

    Args:
        max_rank: the largest TT rank tried (the rank is chosen to fill the budget).
        num_cores: ``K``, the number of TT cores (3 in TT-Rec).
        init: ``"sampled_gaussian"`` (TT-Rec) or ``"gaussian"`` (plain normal cores, same variance).

    Shapes: ``ids`` ``[B, F]`` -> ``[B, F, D]``; core ``k`` of a field is exported as
    ``[R_{k-1}, n_k, d_k, R_k]``.

    >>> t = TTTable(fields=[Field("big", 5000), Field("tiny", 7)], dim=8, budget=20_000)
    >>> t.rank, t.id_shapes, t.serving_bytes()
    (11, {'big': (18, 17, 17), 'tiny': None}, 19872)
    >>> t(torch.tensor([[4999, 6]])).shape
    torch.Size([1, 2, 8])
    """

    tune_space = {"init": ("choice", "sampled_gaussian", "gaussian"), "num_cores": ("choice", 2, 3)}

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, max_rank: int = 64,
                 num_cores: int = 3, init: str = "sampled_gaussian") -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"tt: max_rank must be a positive int, got {max_rank!r}")
        if not isinstance(num_cores, int) or num_cores < 2:
            raise ValueError(f"tt: num_cores must be an int >= 2, got {num_cores!r}")
        if init not in INITS:
            raise ValueError(f"tt: init must be one of {INITS}, got {init!r}")
        self.max_rank = max_rank
        self.num_cores = num_cores
        self.init = init
        self.dim_shape = dim_factors(dim, num_cores)
        factors = [id_factors(f.num_embeddings, num_cores) for f in self.fields]

        def plan(rank: int) -> tuple[int, list[tuple[int, ...] | None]]:
            """Total parameters at ``rank`` and each field's id shape (None: plain rows)."""
            total, shapes = 0, []
            for f, fac in zip(self.fields, factors, strict=True):
                shape, numel = arrange_ids(fac, self.dim_shape, rank)
                plain = f.num_embeddings * dim
                shapes.append(shape if numel < plain else None)
                total += min(numel, plain)
            return total, shapes

        def cost(total: int, shapes: list[tuple[int, ...] | None]) -> int:
            """Serving bytes: the parameters and the arrays' shapes (a core [R, n_k, d_k, R] has 4 words,
            a plain field's rows [n, D] 2)."""
            return total * FP32_BYTES + INT64_BYTES * sum(2 if s is None else 4 * num_cores for s in shapes)

        total, shapes = plan(1)
        if self.budget is not None:  # without a budget the rank is max_rank
            self.require_fit(cost(total, shapes), "TT cores at rank 1 (plain rows for fields smaller than that)")
        rank = 1
        while rank < max_rank:
            nxt_total, nxt_shapes = plan(rank + 1)
            if self.budget is not None and not self.fits(cost(nxt_total, nxt_shapes)):
                break
            rank, total, shapes = rank + 1, nxt_total, nxt_shapes
        self.rank = rank
        self.id_shapes: dict[str, tuple[int, ...] | None] = {f.name: s for f, s in zip(self.fields, shapes, strict=True)}
        self._numel = total
        self._tt_digits = [[shapes[j][k] for j, s in enumerate(shapes) if s is not None] for k in range(num_cores)]

        tt_cols = [j for j, s in enumerate(shapes) if s is not None]
        plain_cols = [j for j, s in enumerate(shapes) if s is None]
        self._tt_cols_list, self._plain_cols_list = tt_cols, plain_cols
        self.register_buffer("_tt_cols", torch.tensor(tt_cols, dtype=torch.long), persistent=False)
        self.register_buffer("_plain_cols", torch.tensor(plain_cols, dtype=torch.long), persistent=False)
        tt_sizes = [self.fields[j].num_embeddings for j in tt_cols]
        self.register_buffer("_tt_bounds", torch.tensor([0, *itertools.accumulate(tt_sizes)], dtype=torch.long),
                             persistent=False)

        # Core k of every TT field, side by side along the id digits: [R_{k-1}, sum_t n_{t,k}, d_k, R_k]
        # (field t's block is its own core G_k). Gradients are dense: a core has few digits per
        # field (about n^(1/3)) and a batch touches nearly all of them.
        K, T = num_cores, len(tt_cols)
        tt_shapes = [shapes[j] for j in tt_cols]
        digits = torch.tensor(tt_shapes, dtype=torch.long).reshape(T, K).T  # [K, T]: n_{t,k}
        strides = torch.ones_like(digits)
        for k in range(K - 2, -1, -1):
            strides[k] = strides[k + 1] * digits[k + 1]  # i_1 is the most significant digit
        prefixes = torch.cumprod(digits, 0)  # distinct digit prefixes of length k + 1 per field

        def start(counts: torch.Tensor) -> torch.Tensor:  # exclusive cumulative sum over fields
            return torch.cumsum(counts, 1) - counts

        self.register_buffer("_digits", digits, persistent=False)
        self.register_buffer("_strides", strides, persistent=False)
        self.register_buffer("_digit_start", start(digits), persistent=False)
        self.register_buffer("_prefix_start", start(prefixes), persistent=False)
        ranks = [1] + [rank] * (num_cores - 1) + [1]
        scale = math.sqrt((INIT_STD**2 / rank ** (num_cores - 1)) ** (1.0 / num_cores) / _unit_variance(init))
        self.cores = nn.ParameterList()
        for k, d_k in enumerate(self.dim_shape if T else ()):
            shape = (ranks[k], int(digits[k].sum()), d_k, ranks[k + 1])
            unit = _sampled_gaussian(shape, SAMPLED_TAIL) if init == "sampled_gaussian" else torch.randn(shape)
            self.cores.append(nn.Parameter(unit * scale))

        plain_sizes = [self.fields[j].num_embeddings for j in plain_cols]
        self.register_buffer("_plain_offsets", torch.tensor([0, *itertools.accumulate(plain_sizes)][:-1],
                                                            dtype=torch.long), persistent=False)
        self.plain = nn.Embedding(sum(plain_sizes), dim, sparse=True) if plain_cols else None
        if self.plain is not None:
            nn.init.normal_(self.plain.weight, std=INIT_STD)

    # -- lookup -------------------------------------------------------------------------------

    def _tt_rows(self, uniq: torch.Tensor) -> torch.Tensor:
        """Rows ``[U, D]`` for sorted distinct ids ``uniq[U]`` in the id space of all TT fields.

        Contracts the cores left to right over the distinct digit prefixes only: frequency-ranked
        ids share their leading digits, so there are far fewer prefixes than ids. At core ``k``,
        a field whose parent prefixes times its ``n_k`` digits are at most ``EXPAND_FACTOR``
        times its needed prefixes extends all its parents by all digits with one GEMM against
        its core block (in place, no gather); the other fields' prefixes are extended one by one
        with a single batched matmul (TT-Rec's batched GEMM), which on CPU pays a fixed cost per
        small matrix.
        """
        K, R, T = self.num_cores, self.rank, len(self._tt_cols_list)
        if uniq.numel() == 0:
            return self.cores[0].new_zeros(0, self.dim)
        field = torch.searchsorted(self._tt_bounds[1:], uniq, right=True)
        local = uniq - self._tt_bounds[field]
        prefix = local // self._strides[0, field]
        _, row_of, counts = torch.unique_consecutive(prefix + self._prefix_start[0, field], return_inverse=True,
                                                     return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        digit = (prefix % self._digits[0, field] + self._digit_start[0, field])[first]
        width = self.dim_shape[0]
        left = self.cores[0].reshape(-1, width * R).index_select(0, digit).reshape(-1, width, R)  # [prefixes, D, R]
        left_field = field[first]
        for k in range(1, K):
            core = self.cores[k]  # [R, sum_t n_{t,k}, d_k, R_k]
            d_k, r_out = core.shape[2:]
            cols = d_k * r_out
            prefix = local // self._strides[k, field]
            if k < K - 1:  # one row per distinct prefix
                _, next_row_of, counts = torch.unique_consecutive(prefix + self._prefix_start[k, field],
                                                                  return_inverse=True, return_counts=True)
                first = torch.cumsum(counts, 0) - counts
                parent, child_field, digit = row_of[first], field[first], (prefix % self._digits[k, field])[first]
            else:  # one row per id
                next_row_of, parent, child_field, digit = None, row_of, field, prefix % self._digits[k, field]
            n_par = torch.bincount(left_field, minlength=T)
            expand = n_par * self._digits[k] <= EXPAND_FACTOR * torch.bincount(child_field, minlength=T)
            pieces, base = [], torch.zeros(T, dtype=torch.long, device=uniq.device)
            blocks = core.reshape(R, -1).split([n * cols for n in self._tt_digits[k]], dim=1)
            parents = left.split(n_par.tolist())
            offset = 0
            for t, (grow, n) in enumerate(zip(expand.tolist(), n_par.tolist(), strict=True)):
                if grow and n:
                    pieces.append((parents[t].reshape(-1, R) @ blocks[t]).reshape(-1, cols))  # rows (p, w, digit)
                    base[t] = offset
                    offset += pieces[-1].shape[0]
            w = torch.arange(width, device=uniq.device)
            grown = expand[child_field]
            first_parent = torch.cumsum(n_par, 0) - n_par
            pos = ((parent - first_parent[child_field]) * width).unsqueeze(1) + w
            pos = base[child_field].unsqueeze(1) + pos * self._digits[k, child_field].unsqueeze(1) + digit.unsqueeze(1)
            if not bool(grown.all()):
                single = (~grown).nonzero().squeeze(1)
                rows = core.index_select(1, digit[single] + self._digit_start[k, child_field[single]])
                out = torch.bmm(left.index_select(0, parent[single]), rows.transpose(0, 1).reshape(-1, R, cols))
                pieces.append(out.reshape(-1, cols))
                pos[single] = offset + (torch.arange(single.shape[0], device=uniq.device) * width).unsqueeze(1) + w
            rows = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            left = rows.index_select(0, pos.reshape(-1)).reshape(-1, width * d_k, r_out)
            width *= d_k
            row_of, left_field = next_row_of, child_field
        return left.reshape(-1, self.dim)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        N, num_fields = ids.shape
        sources, where = [], torch.empty_like(ids)  # rows, and each (row, field)'s place among them
        if self._tt_cols_list:
            gid = ids.index_select(1, self._tt_cols) + self._tt_bounds[:-1]  # one id space over TT fields
            uniq, inv = torch.unique(gid, return_inverse=True)
            sources.append(self._tt_rows(uniq))
            where[:, self._tt_cols] = inv
        if self.plain is not None:
            P = len(self._plain_cols_list)
            sources.append(self.plain(ids.index_select(1, self._plain_cols) + self._plain_offsets).reshape(N * P, self.dim))
            base = sum(s.shape[0] for s in sources[:-1])
            where[:, self._plain_cols] = torch.arange(base, base + N * P, device=ids.device).reshape(N, P)
        rows = sources[0] if len(sources) == 1 else torch.cat(sources)
        return rows.index_select(0, where.reshape(-1)).reshape(N, num_fields, self.dim)

    # -- contract -----------------------------------------------------------------------------

    def array_bytes(self) -> int:
        return self._numel * FP32_BYTES

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """Per TT field ``"{name}.core{k}"``: float32 ``[R_{k-1}, n_k, d_k, R_k]``; per plain field
        ``"{name}.weight"``: float32 ``[n, D]``."""
        state: dict[str, np.ndarray] = {}
        for j in self._tt_cols_list:
            name = self.fields[j].name
            for k, core in enumerate(self.cores):
                state[f"{name}.core{k}"] = to_numpy(core.detach()[:, self.core_block(name, k)].contiguous())
        if self.plain is not None:
            weight = to_numpy(self.plain.weight)
            for p, j in enumerate(self._plain_cols_list):
                start = int(self._plain_offsets[p])
                state[f"{self.fields[j].name}.weight"] = weight[start:start + self.fields[j].num_embeddings].copy()
        return state

    def core_block(self, name: str, k: int) -> slice:
        """The digits of field ``name`` in ``cores[k]`` (its second dimension): ``cores[k][:, block]``."""
        if self.id_shapes.get(name) is None:
            raise ValueError(f"tt: field {name!r} is not tensor-train decomposed (TT fields: "
                             f"{[n for n, s in self.id_shapes.items() if s is not None]})")
        t = [self.fields[j].name for j in self._tt_cols_list].index(name)
        start = int(self._digit_start[k, t])
        return slice(start, start + int(self._digits[k, t]))

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [] if self.plain is None else [self.plain.weight]

    def extra_repr(self) -> str:
        shapes = {name: ("plain" if s is None else s) for name, s in self.id_shapes.items()}
        return f"{super().extra_repr()}, rank={self.rank}, dim_shape={self.dim_shape}, id_shapes={shapes}"
