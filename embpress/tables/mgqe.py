"""MGQE: differentiable product quantization with fewer centroids for rare ids (Kang et al., WWW 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    Stage,
    StageContext,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD

_PACK_CHUNK = 1 << 20
"""Codes packed per chunk (a multiple of 8, so every chunk ends on a byte boundary)."""

_ENCODE_CHUNK = 65536
"""Ids encoded at once by :meth:`MGQETable.encode_`."""

_SCORE_ELEMENTS = 1 << 24
"""Distance-matrix elements computed at once when assigning codes (bounds peak memory)."""


def code_bits(choices: int) -> int:
    """Bits of one code that selects among ``choices`` centroids: ``ceil(log2(choices))``."""
    return max(1, math.ceil(math.log2(choices)))


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits each, packed back to back."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer codes (each ``< 2**bits``) into a little-endian uint8 bit stream.

    >>> packed = pack_codes(np.array([5, 63, 0, 17]), 6)
    >>> packed.nbytes, unpack_codes(packed, 6, 4).tolist()
    (3, [5, 63, 0, 17])
    """
    flat = np.asarray(codes).reshape(-1).astype(np.uint32)
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    shifts = np.arange(bits, dtype=np.uint32)
    chunks = [
        np.packbits(((flat[s:s + _PACK_CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1),
                    bitorder="little")
        for s in range(0, flat.size, _PACK_CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as int64."""
    if packed.nbytes != packed_bytes(count, bits):
        raise ValueError(f"{count} codes of {bits} bits need {packed_bytes(count, bits)} bytes, got {packed.nbytes}")
    bitmat = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (bitmat.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)


@dataclass(frozen=True)
class _Plan:
    """One sizing: ``parts`` sub-spaces, centroid counts, and which fields are quantized."""

    parts: int
    high_choices: int
    low_choices: int
    quantized: tuple[bool, ...]
    nbytes: int
    """Bytes of the serving arrays."""
    ndims: int
    """Their shape words (``meta/shapes``)."""


@register_table("mgqe")
class MGQETable(CompressedTable):
    """Multi-granular quantized embeddings (Kang et al., WWW 2020 companion, arXiv:2002.08530).

    Each id of a quantized field has a query vector ``q`` (training only), cut into ``P`` parts of
    ``D / P`` dims. Part ``p`` is replaced by its nearest centroid in the field's codebook
    ``C_p`` (Euclidean argmin). Frequent ids (the top ``top_percent`` of a field by training
    counts) choose among ``high_choices`` centroids, rare ids only among the first
    ``low_choices`` of them, so rare ids need fewer bits. Training passes gradients straight
    through the argmin to ``q`` (``q + sg(c - q)``) and moves the centroids with
    :meth:`regularizer` ``= mean((c - sg(q))^2) + commitment * mean((q - sg(c))^2)`` (the VQ
    variant of DPQ, Chen et al., ICML 2020, arXiv:1908.09756; its code and the study's use
    ``commitment = 0``). Unlike DPQ, codes are the plain argmin (no batch norm on the distances).

    Serving stores, per quantized field, the codebook (fp32, ``high_choices * D`` floats) and the
    codes bit-packed at ``ceil(log2(choices))`` bits (8 for 256, 6 for 64), plus a 1-bit
    frequent-id mask only when the frequent ids are not the id prefix ``0 .. n_high - 1``
    (preprocessing numbers ids by frequency, so normally no mask). The query table is NOT served:
    training holds a full-size fp32 query table, so training memory exceeds ``full_bytes``.
    A field whose MGQE form would not be smaller than its fp32 rows (a small field next to a
    256-centroid codebook) keeps its rows, as in the study's code.

    Sizing: the first plan that fits the budget, trying ``parts`` from the largest divisor of D
    down to 1 (or only the given ``parts``), then halving both centroid counts.

    Args:
        parts: number of sub-spaces P (must divide D); None picks the largest that fits.
            The study uses 4 at D=16.
        high_choices: centroids per part for frequent ids (study: 256).
        low_choices: centroids per part for rare ids, a prefix of the same codebook (study: 64).
        top_percent: fraction of each field's ids treated as frequent (study: 0.1).
        commitment: weight of the commitment term pulling queries toward their centroids.

    Speed: training scores ``P * high_choices`` centroids per distinct id of a batch (one-dim parts
    use a binary search instead); eval lookups after :meth:`encode_` (run after the train stage)
    are two gathers.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``; codebook ``[F_q, P, high_choices, D / P]``.

    >>> from embpress.tables import Ratio
    >>> t = MGQETable(fields=[Field("item", 20_000)], dim=16, budget=Ratio(16))
    >>> t.parts_, t.high_choices_, t.low_choices_, t.serving_bytes() <= t.full_bytes // 16
    (4, 256, 64, True)
    >>> t(torch.tensor([[0], [19_999]])).shape
    torch.Size([2, 1, 16])
    """

    tune_space = {"top_percent": ("uniform", 0.05, 0.3), "commitment": ("uniform", 0.0, 0.5)}

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, parts: int | None = None,
                 high_choices: int = 256, low_choices: int = 64, top_percent: float = 0.1,
                 commitment: float = 0.0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.parts = parts
        self.high_choices = high_choices
        self.low_choices = low_choices
        self.top_percent = top_percent
        self.commitment = commitment
        if parts is not None and (not isinstance(parts, int) or parts < 1 or dim % parts):
            raise ValueError(f"mgqe: parts must be a positive divisor of dim={dim}, got {parts!r}")
        if not (isinstance(high_choices, int) and isinstance(low_choices, int) and 2 <= low_choices <= high_choices):
            raise ValueError(
                f"mgqe: need ints 2 <= low_choices <= high_choices, got low={low_choices!r}, high={high_choices!r}"
            )
        if not 0.0 <= top_percent <= 1.0:
            raise ValueError(f"mgqe: top_percent must be in [0, 1], got {top_percent!r}")
        if not commitment >= 0:
            raise ValueError(f"mgqe: commitment must be >= 0, got {commitment!r}")

        # Frequent ids of each field: the top ``top_percent`` by training counts (stable on ties).
        self._high_masks: list[np.ndarray] = []
        for f in self.fields:
            n_high = math.ceil(top_percent * f.num_embeddings)
            top = np.argsort(-f.frequencies(), kind="stable")[:n_high]
            mask = np.zeros(f.num_embeddings, dtype=bool)
            mask[top] = True
            self._high_masks.append(mask)
        self._prefix = [bool(m[: int(m.sum())].all()) for m in self._high_masks]

        # the spec's num_high holds one count per quantized field: reserve for every field
        self.reserve_metadata({"high_bits": 0, "low_bits": 0, "parts": 0, "num_high": {f.name: 0 for f in self.fields}})
        plan = self._size()
        self.parts_, self.high_choices_, self.low_choices_ = plan.parts, plan.high_choices, plan.low_choices
        self.quantized_ = tuple(f.name for f, q in zip(self.fields, plan.quantized, strict=True) if q)
        self._nbytes = plan.nbytes
        self._q_fields = [i for i, q in enumerate(plan.quantized) if q]
        self._f_fields = [i for i, q in enumerate(plan.quantized) if not q]
        order = self._q_fields + self._f_fields
        self.register_buffer("_inv_order", torch.argsort(torch.tensor(order)), persistent=False)
        self.register_buffer("_q_index", torch.tensor(self._q_fields, dtype=torch.long), persistent=False)
        self.register_buffer("_f_index", torch.tensor(self._f_fields, dtype=torch.long), persistent=False)
        self._identity_order = order == sorted(order)

        fm, p, k = len(self._q_fields), self.parts_, self.high_choices_
        if fm:
            q_sizes = [self.fields[i].num_embeddings for i in self._q_fields]
            self.register_buffer("_q_offsets", _offsets(q_sizes), persistent=False)
            self.query = nn.Embedding(sum(q_sizes), dim, sparse=True)
            nn.init.normal_(self.query.weight, std=INIT_STD)
            self.codebook = nn.Parameter(torch.randn(fm, p, k, dim // p) * INIT_STD)
            high = np.concatenate([self._high_masks[i] for i in self._q_fields])
            self.register_buffer("_high", torch.from_numpy(high), persistent=False)
            base = (torch.arange(fm * p, dtype=torch.int32) * k).reshape(fm, p)
            self.register_buffer("_code_base", base, persistent=False)
        if self._f_fields:
            f_sizes = [self.fields[i].num_embeddings for i in self._f_fields]
            self.register_buffer("_f_offsets", _offsets(f_sizes), persistent=False)
            self.rows = nn.Embedding(sum(f_sizes), dim, sparse=True)
            nn.init.normal_(self.rows.weight, std=INIT_STD)
        self._reg: torch.Tensor | None = None
        self._codes_cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    # -- sizing -------------------------------------------------------------------------------

    def _field_bytes(self, i: int, parts: int, high: int, low: int) -> int:
        """Serving bytes of field ``i`` in MGQE form."""
        n = self.fields[i].num_embeddings
        n_high = int(self._high_masks[i].sum())
        nbytes = high * self.dim * FP32_BYTES  # P codebooks of `high` centroids of D/P floats
        nbytes += packed_bytes(n_high * parts, code_bits(high))
        nbytes += packed_bytes((n - n_high) * parts, code_bits(low))
        if not self._prefix[i]:  # the frequent-id bitmap (uint64 words) and its rank index (int32 per word)
            nbytes += -(-n // 64) * (8 + 4)
        return nbytes

    def _field_ndims(self, i: int) -> int:
        """Shape words of field ``i`` in MGQE form: codebook [P, K, D/P], codes_high, codes_low and,
        for a non-prefix frequent set, high_mask and high_rank."""
        return 5 if self._prefix[i] else 7

    def _plan(self, parts: int, high: int, low: int) -> _Plan:
        quantized, total, ndims = [], 0, 0
        for i, f in enumerate(self.fields):
            mgqe, full = self._field_bytes(i, parts, high, low), f.num_embeddings * self.dim * FP32_BYTES
            q = mgqe + INT64_BYTES * self._field_ndims(i) < full + INT64_BYTES * 2  # rows [n, D]: 2 words
            quantized.append(q)
            total += mgqe if q else full
            ndims += self._field_ndims(i) if q else 2
        return _Plan(parts, high, low, tuple(quantized), total, ndims)

    def _size(self) -> _Plan:
        if self.parts is None:
            part_options = [p for p in range(self.dim, 0, -1) if self.dim % p == 0]
        else:
            part_options = [self.parts]
        high, low, plan = self.high_choices, self.low_choices, None
        while True:
            for p in part_options:
                plan = self._plan(p, high, low)
                if self.fits(plan.nbytes + INT64_BYTES * plan.ndims):
                    return plan
            if high == 2:
                break
            high, low = max(2, high // 2), max(2, low // 2)
        raise BudgetError(
            f"mgqe: the smallest configuration ({plan.parts} part(s), 2 centroids, 1-bit codes; "
            f"small fields as fp32 rows) needs {plan.nbytes + INT64_BYTES * plan.ndims:,} bytes with their "
            f"shapes but the budget allows "
            f"{self.max_bytes:,} (full table {self.full_bytes:,} bytes, budget {self.budget})"
        )

    # -- lookups ------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        outs = []
        if self._q_fields:
            outs.append(self._quantized(ids.index_select(1, self._q_index) + self._q_offsets))
        if self._f_fields:
            outs.append(self.rows(ids.index_select(1, self._f_index) + self._f_offsets))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out if self._identity_order else out.index_select(1, self._inv_order)

    def _quantized(self, qids: torch.Tensor) -> torch.Tensor:
        """Query-table ids ``[N, F_q]`` -> quantized vectors ``[N, F_q, D]``."""
        training = self.training and torch.is_grad_enabled()
        if not training and self._cache_fresh():
            return self._centroids(self._codes_cache[qids])
        codes = self._assign(qids)
        if not training:
            return self._centroids(codes)
        with torch.no_grad():
            c = self._centroids(codes)
        q = self.query(qids)
        reg = self._codebook_loss(codes, q.detach())
        if self.commitment:
            reg = reg + self.commitment * (q - c).square().mean()
        self._reg = reg
        return q + (c - q).detach()  # straight-through: the value of c, the gradient of q

    def _codebook_loss(self, codes: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``mean((c - sg(q))^2)`` over the batch, differentiable in the codebook.

        Computed from per-centroid sums (assignment counts ``n_k`` and query sums ``s_k``:
        ``sum_k n_k |C_k|^2 - 2 C_k . s_k + sum |q|^2``) in float64, which gives the same value and
        gradient as gathering a centroid per item but with bincounts instead of a slow scatter
        through ``index_select``'s backward.
        """
        fm, p, k, pd = self.codebook.shape
        total = fm * p * k
        flat = codes.to(torch.int64, copy=True).add_(self._code_base).reshape(-1)  # [N F_q P]
        qv = q.reshape(-1, pd).double()  # [N F_q P, pd]
        counts = torch.bincount(flat, minlength=total).double()
        sums = torch.stack([torch.bincount(flat, weights=qv[:, d], minlength=total) for d in range(pd)], 1)
        cb = self.codebook.reshape(total, pd).double()
        reg = (counts @ cb.square().sum(1) - 2.0 * (cb * sums).sum() + qv.square().sum()) / max(1, qv.numel())
        return reg.float()

    def _assign(self, qids: torch.Tensor) -> torch.Tensor:
        """Nearest allowed centroid per part of each id: query-table ids ``[N, F_q]`` -> codes ``[N, F_q, P]``.

        Each distinct id of a batch is assigned once (frequent ids repeat a lot in CTR batches).
        """
        w, cb = self.query.weight.detach(), self.codebook.detach()
        codes = torch.empty(*qids.shape, self.parts_, dtype=torch.long, device=qids.device)
        for j in range(qids.shape[1]):
            u, inv = torch.unique(qids[:, j], return_inverse=True)
            codes[:, j] = _assign_codes(cb[j], w[u], self._high[u], self.low_choices_)[inv]
        return codes

    def _centroids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, F_q, P]`` (any integer dtype) -> concatenated centroids ``[N, F_q, D]``."""
        fm, p, k, pd = self.codebook.shape
        flat = codes.to(torch.int32, copy=True).add_(self._code_base).reshape(-1)  # rows of the codebooks
        return self.codebook.reshape(fm * p * k, pd).index_select(0, flat).reshape(codes.shape[0], fm, self.dim)

    # -- codes of every id ------------------------------------------------------------------

    def _key(self) -> tuple:
        w, cb = self.query.weight, self.codebook
        return (w._version, w.data_ptr(), w.device, cb._version, cb.data_ptr())

    def _cache_fresh(self) -> bool:
        return self._codes_cache is not None and self._cache_key == self._key()

    def encode_(self) -> torch.Tensor:
        """Codes ``[total quantized ids, P]`` of every id from the current weights, cached for lookups.

        Eval-mode lookups use the cache while the query table and codebook are unchanged (tracked
        by their in-place version counters), so inference is a gather, not a nearest-centroid search.
        """
        if not self._q_fields:
            return torch.zeros(0, 0, dtype=torch.uint8)
        if not self._cache_fresh():
            w = self.query.weight.detach()
            dtype = torch.uint8 if self.high_choices_ <= 256 else torch.int32
            codes = torch.empty(w.shape[0], self.parts_, dtype=dtype, device=w.device)
            cb = self.codebook.detach()
            for j, i in enumerate(self._q_fields):
                lo = int(self._q_offsets[j])
                hi = lo + self.fields[i].num_embeddings
                for s in range(lo, hi, _ENCODE_CHUNK):
                    e = min(hi, s + _ENCODE_CHUNK)
                    codes[s:e] = _assign_codes(cb[j], w[s:e], self._high[s:e], self.low_choices_).to(dtype)
            self._codes_cache, self._cache_key = codes, self._key()
        return self._codes_cache

    # -- contract -----------------------------------------------------------------------------

    def regularizer(self) -> torch.Tensor | None:
        reg, self._reg = self._reg, None
        return reg

    def stages(self) -> list[Stage]:
        return [Stage("train", after=self._encode_hook)]

    def _encode_hook(self, ctx: StageContext) -> None:
        self.encode_()

    def sparse_parameters(self) -> list[nn.Parameter]:
        params = []
        if self._q_fields:
            params.append(self.query.weight)
        if self._f_fields:
            params.append(self.rows.weight)
        return params

    def array_bytes(self) -> int:
        return self._nbytes

    def array_ndims(self) -> int:  # analytic: building the arrays encodes every id
        return sum(self._field_ndims(i) for i in self._q_fields) + 2 * len(self._f_fields)

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """Per quantized field ``<name>/codebook`` (fp32 ``[P, K, D/P]``), ``<name>/codes_high`` and
        ``<name>/codes_low`` (bit-packed codes in id order, ``P`` per id), only for a non-prefix frequent
        set ``<name>/high_mask`` (uint64 words, bit ``i % 64`` of word ``i // 64`` set for a frequent
        id) and ``<name>/high_rank`` (int32, frequent ids before each word: an id's code row is found
        with one popcount); per other field ``<name>/rows`` (fp32 ``[n, D]``)."""
        state: dict[str, np.ndarray] = {}
        codes = self.encode_().cpu().numpy().astype(np.int64) if self._q_fields else None
        hb, lb = code_bits(self.high_choices_), code_bits(self.low_choices_)
        for j, i in enumerate(self._q_fields):
            f, mask = self.fields[i], self._high_masks[i]
            off = int(self._q_offsets[j])
            fc = codes[off:off + f.num_embeddings]
            state[f"{f.name}/codebook"] = to_numpy(self.codebook[j])
            state[f"{f.name}/codes_high"] = pack_codes(fc[mask], hb)
            state[f"{f.name}/codes_low"] = pack_codes(fc[~mask], lb)
            if not self._prefix[i]:
                words = -(-f.num_embeddings // 64)
                bits = np.zeros(words * 64, dtype=bool)
                bits[: f.num_embeddings] = mask
                state[f"{f.name}/high_mask"] = np.packbits(bits, bitorder="little").view("<u8")
                per_word = bits.reshape(words, 64).sum(1)
                state[f"{f.name}/high_rank"] = (np.cumsum(per_word) - per_word).astype(np.int32)
        for j, i in enumerate(self._f_fields):
            f = self.fields[i]
            off = int(self._f_offsets[j])
            state[f"{f.name}/rows"] = to_numpy(self.rows.weight[off:off + f.num_embeddings])
        return state

    def serving_spec(self) -> dict:
        return {"high_bits": code_bits(self.high_choices_), "low_bits": code_bits(self.low_choices_),
                "parts": self.parts_,
                "num_high": {self.fields[i].name: int(self._high_masks[i].sum()) for i in self._q_fields}}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, parts={self.parts_}, choices=({self.high_choices_}, {self.low_choices_}), "
                f"quantized={len(self._q_fields)}/{self.num_fields} fields")


def _assign_codes(codebook: torch.Tensor, q: torch.Tensor, high: torch.Tensor, low: int) -> torch.Tensor:
    """Euclidean argmin per part, rare ids restricted to the first ``low`` centroids.

    ``codebook [P, K, pd]``, ``q [n, P * pd]``, ``high [n]`` bool -> codes ``[n, P]`` (int64).
    One-dimensional parts use a binary search among the sorted centroids; wider parts score
    ``||c||^2 - 2 q.c`` (``||q||^2`` does not change the argmin) with one batched matmul per chunk.
    """
    p, k, pd = codebook.shape
    n = q.shape[0]
    with torch.no_grad():
        if pd == 1:
            qt = q.t().contiguous()  # [P, n]
            codes = _nearest_scalar(codebook[:, :, 0], qt)
            if low < k:
                codes = torch.where(high, codes, _nearest_scalar(codebook[:, :low, 0], qt))
            return codes.t()
        cb_t = codebook.transpose(1, 2)  # [P, pd, K]
        c2 = codebook.square().sum(-1).unsqueeze(1)  # [P, 1, K]
        qp = q.reshape(n, p, pd).transpose(0, 1)  # [P, n, pd]
        step = max(1, _SCORE_ELEMENTS // (p * k))
        codes = torch.empty(p, n, dtype=torch.long, device=q.device)
        for s in range(0, n, step):
            scores = torch.baddbmm(c2, qp[:, s:s + step], cb_t, alpha=-2.0)  # [P, n_s, K]
            if low < k:
                scores[:, :, low:].masked_fill_(~high[None, s:s + step, None], math.inf)
            codes[:, s:s + step] = scores.argmin(-1)
    return codes.t()


def _nearest_scalar(centroids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ``centroids [P, K]`` for each value of ``x [P, n]``, by binary search."""
    k = centroids.shape[1]
    values, perm = centroids.sort(-1)
    hi = torch.searchsorted(values, x).clamp_(max=k - 1)
    lo = (hi - 1).clamp_(min=0)
    take_lo = (x - values.gather(1, lo)).abs() <= (values.gather(1, hi) - x).abs()
    return perm.gather(1, torch.where(take_lo, lo, hi))


def _offsets(sizes: Sequence[int]) -> torch.Tensor:
    off = torch.zeros(len(sizes), dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.long), 0)[:-1]
    return off
