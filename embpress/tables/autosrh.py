"""AutoSrh: per-frequency-block salience weights searched with an L1 penalty (Kong et al., TKDE 2022).

Two tables. ``autosrh`` follows the VLDB 2024 study's code (Hsword/Hetu ``EmbeddingMemoryCompression``
``scheduler/autosrh.py``): warm-up, a search in which only the embeddings (on training batches) and
``alpha`` (on validation batches) train, a retrain with ``alpha`` frozen, then ``w * alpha`` pruned
unstructured to the budget's number of nonzeros and stored as CSR. ``autosrh-cols`` is an earlier
variant that prunes whole (block, dim) columns before the retrain; the rest of this docstring is its.

The ids of all fields are split by training frequency into ``nsplit`` blocks of about equal size
(ties stay together; Hsword/Hetu ``get_whole_frequency_grouping``). Each (block, dim) pair has a
salience weight ``alpha`` in ``[0, 1]`` that multiplies that column of the block's embeddings.
After a dense ``warmup``, the ``search`` stage learns ``alpha`` on validation batches (bilevel,
as the study's code updates it on validation data) with an L1 penalty that drives unneeded
(block, dim) pairs toward 0; then the pairs with the smallest salience are pruned until the rest
fits the budget, and the ``retrain`` stage trains the kept columns with ``alpha`` frozen
(the study's Hetu ``scheduler/autosrh.py``: warmup, search, retrain; parameters inherited).

Salience is ``alpha[b, d]`` times the mean ``|w|`` of block ``b``'s rows on dim ``d``: the
magnitude that column serves. Ranking by ``alpha`` alone prunes the most frequent block first
in short searches (its weights get the most gradient steps, so its ``alpha`` moves off the
initial 1 first, while rare blocks' stay at 1); the study's code also prunes by the magnitude
of ``w * alpha`` (unstructured, after retraining), of which this is the per-column form.

Serving keeps, per block, only its kept columns (``values/<b> [rows_b, k_b]`` fp32, with ``alpha``
folded in) and their column indices (:mod:`embpress.tables.sparse_storage`, block columns).
Preprocessing numbers ids by descending frequency, so a block is a range of ids in every field
and a server needs only the ``F * (nsplit + 1)`` bounds to find an id's block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    ParamGroup,
    Stage,
    StageContext,
    register_table,
)
from embpress.tables.full import INIT_STD
from embpress.tables.sparse_storage import (
    CSR_NDIMS,
    FP32_BYTES,
    block_columns_bytes,
    block_columns_encode,
    col_dtype,
    csr_bytes,
    csr_encode,
    csr_nonzeros_at_budget,
    keep_top,
)


def frequency_blocks(fields: Sequence[Field], nsplit: int) -> np.ndarray:
    """Per-field id bounds ``int64[F, nsplit + 1]`` of ``nsplit`` frequency blocks, block 0 the most frequent.

    All ids are ranked by training count (every field together) and cut into ``nsplit`` groups
    of about equal size; ids of equal count stay in one group, so a group may be empty.
    Raises ValueError when a field's counts are not non-increasing in the id (the blocks would
    not be id ranges).

    >>> frequency_blocks([Field("a", 4, np.array([9, 5, 5, 1])), Field("b", 2, np.array([7, 1]))], 2).tolist()
    [[0, 3, 4], [0, 1, 2]]
    """
    counts = [f.frequencies() for f in fields]
    for f, c in zip(fields, counts, strict=True):
        # the last id is the field's OOV id, which pools every rare value: its count may be larger
        if c.size > 2 and (np.diff(c[:-1]) > 0).any():
            raise ValueError(
                f"autosrh: field {f.name!r} has counts that rise with the id; ids must be numbered by "
                f"descending training frequency (embpress preprocessing does this)"
            )
    ranked = np.sort(np.concatenate(counts))[::-1]
    total = ranked.size
    cuts = []  # count thresholds: block b holds counts in (cut_b, cut_{b-1}]
    for b in range(1, nsplit):
        pos = min(total, round(b * total / nsplit))
        cuts.append(ranked[pos - 1] if pos > 0 else np.inf)
    bounds = np.zeros((len(fields), nsplit + 1), dtype=np.int64)
    for i, c in enumerate(counts):
        # ids with count >= the lowest count of block b's group lie before bound b + 1
        for b, cut in enumerate(cuts, start=1):
            bounds[i, b] = int(np.searchsorted(-c, -cut, side="right"))
        bounds[i, nsplit] = c.size
        bounds[i] = np.maximum.accumulate(bounds[i])
    return bounds



def block_of_rows(offsets: torch.Tensor, bounds: np.ndarray, total: int, dtype: type) -> torch.Tensor:
    """The frequency block of every global row: ``bounds[f, b]:bounds[f, b + 1]`` of field ``f``
    (its ids in frequency order, from ``offsets[f]``) is block ``b``."""
    block = np.zeros(total, dtype=dtype)
    for i, off in enumerate(offsets.tolist()):
        for b in range(bounds.shape[1] - 1):
            block[off + bounds[i, b]: off + bounds[i, b + 1]] = b
    return torch.from_numpy(block)

class _AlphaSearch(CompressedTable):
    """What both AutoSrh tables share: the salience ``alpha`` [blocks, D], searched in phase 1 with an
    L1 penalty ``l1`` and clipped back into [0, 1] after each update (the study clips)."""

    alpha: nn.Parameter
    phase: torch.Tensor
    l1: float

    @torch.no_grad()
    def _clip_alpha(self, ctx: StageContext) -> None:
        """Projected gradient step: alpha back into [0, 1] after each update."""
        self.alpha.clamp_(0.0, 1.0)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def regularizer(self) -> torch.Tensor | None:
        if int(self.phase) != 1 or not self.l1:
            return None
        return self.l1 * self.alpha.abs().sum()


@register_table("autosrh-cols")
class AutoSrhColumnsTable(_AlphaSearch):
    """AutoSrh with column pruning (a variant of Kong et al., TKDE 2022): whole (block, dim) columns
    pruned by salience before the retrain; see the module docstring.

    Args:
        nsplit: number of frequency blocks (study: 6).
        l1: weight of the L1 penalty ``l1 * sum |alpha|`` in the search stage (study: 1e-5).
        warmup_epochs, search_epochs, retrain_epochs: epochs per stage (None: the trainer's default).

    Pruning picks (block, dim) pairs by decreasing :meth:`salience` (``alpha`` times the block's mean
    ``|w|`` on that dim; frequent blocks first on ties), skipping a pair that would exceed the budget. Serving bytes: ``4 * sum_b rows_b k_b``
    values, one column index per kept pair, ``nsplit + 1`` column pointers, ``F * (nsplit + 1)``
    id bounds. Shapes: ids ``[N, F]`` -> ``[N, F, D]``; ``alpha [nsplit, D]``.

    >>> from embpress.tables import Ratio
    >>> t = AutoSrhColumnsTable(fields=[Field("a", 6000)], dim=8, budget=Ratio(4))
    >>> t.block_rows_.tolist(), int(t.kept_.sum()), t.serving_bytes() <= 6000 * 8
    ([1000, 1000, 1000, 1000, 1000, 1000], 11, True)
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, nsplit: int = 6, l1: float = 1e-5,
                 warmup_epochs: int | None = 1, search_epochs: int | None = 1,
                 retrain_epochs: int | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if not (isinstance(nsplit, int) and nsplit >= 1):
            raise ValueError(f"{self.method}: nsplit must be an int >= 1, got {nsplit!r}")
        if not l1 >= 0:
            raise ValueError(f"{self.method}: l1 must be >= 0, got {l1!r}")
        self.nsplit, self.l1 = nsplit, l1
        self.warmup_epochs, self.search_epochs, self.retrain_epochs = warmup_epochs, search_epochs, retrain_epochs
        self.bounds_ = frequency_blocks(self.fields, nsplit)
        self.block_rows_ = (self.bounds_[:, 1:] - self.bounds_[:, :-1]).sum(0)  # [nsplit]
        self._max_id = max(f.num_embeddings for f in self.fields)
        self.reserve_metadata({}, ndims=4 + 2 * nsplit)  # shapes: bounds [F, B+1], col_ptr, cols, values/<b>
        empty = self._bytes(np.zeros((nsplit, dim), dtype=bool))
        first = int(np.flatnonzero(self.block_rows_)[0])  # the most frequent non-empty block
        one_col = np.zeros((nsplit, dim), dtype=bool)
        one_col[first, 0] = True
        if self._bytes(one_col) > self.array_budget:
            # Without one column for the most frequent ids every id but a few rare ties is a zero vector:
            # the table would "meet" the budget by serving nothing, so the budget is out of reach.
            raise BudgetError(
                f"{self.method}: the block layout ({nsplit} blocks) needs {empty:,} bytes before any column, and one "
                f"column of the most frequent block ({int(self.block_rows_[first]):,} rows) "
                f"{self._bytes(one_col) - empty:,} more, but the budget allows {self.array_budget:,} besides "
                f"{self.metadata_reserve} bytes of metadata "
                f"(full table {self.full_bytes:,} bytes, budget {self.budget})"
            )
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.alpha = nn.Parameter(torch.ones(nsplit, dim), requires_grad=False)  # trained in the search only
        self.register_buffer("_block", block_of_rows(self._offsets, self.bounds_, self.total_ids, np.int64),
                             persistent=False)
        self.register_buffer("kept", self._select(self.salience()))
        self.register_buffer("phase", torch.tensor(0))  # 0 warmup, 1 search, 2 pruned

    @property
    def kept_(self) -> np.ndarray:
        """``bool[nsplit, D]``: the (block, dim) pairs served (after the prune; a preview before it)."""
        return self._served_kept().numpy()

    # -- sizing ---------------------------------------------------------------------------------

    def _bytes(self, kept: np.ndarray) -> int:
        return block_columns_bytes(self.block_rows_.tolist(), kept.sum(1).tolist(), self.num_fields,
                                   self._max_id, self.dim)

    def _select(self, salience: torch.Tensor) -> torch.Tensor:
        """Greedy by decreasing salience (frequent blocks, then low dims, first on ties): ``bool[nsplit, D]``."""
        sal = salience.detach().abs().numpy()
        kept = np.zeros((self.nsplit, self.dim), dtype=bool)
        order = sorted((-sal[b, d], b, d) for b in range(self.nsplit) for d in range(self.dim))
        used = self._bytes(kept)
        col_bytes = col_dtype(self.dim).itemsize
        for _, b, d in order:
            if self.block_rows_[b] == 0:
                continue
            # a column costs its values and its index (pointer dtypes may widen: recheck exactly)
            if used + int(self.block_rows_[b]) * FP32_BYTES + col_bytes > self.array_budget:
                continue
            kept[b, d] = True
            exact = self._bytes(kept)
            if exact > self.array_budget:
                kept[b, d] = False
                continue
            used = exact
        return torch.from_numpy(kept)

    # -- stages ---------------------------------------------------------------------------------

    def _start_search(self, ctx: StageContext) -> None:
        self.phase.fill_(1)
        self.alpha.requires_grad_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.alpha.requires_grad_(int(self.phase) == 1)

    def salience(self) -> torch.Tensor:
        """``float32[nsplit, D]``: ``alpha[b, d]`` times the mean ``|w[:, d]|`` over block ``b``'s rows,
        the average magnitude a kept column would serve."""
        with torch.no_grad():
            w = self.weight.weight.abs()
            sums = torch.zeros(self.nsplit, self.dim).index_add_(0, self._block, w)
            rows = torch.as_tensor(self.block_rows_, dtype=w.dtype).clamp(min=1).unsqueeze(1)
            return self.alpha.clamp(0.0, 1.0) * sums / rows

    @torch.no_grad()
    def prune_(self) -> None:
        """Keep the most salient (block, dim) pairs that fit the budget, freeze ``alpha``."""
        self.alpha.clamp_(0.0, 1.0)
        self.kept.copy_(self._select(self.salience()))
        self.alpha.requires_grad_(False)
        self.phase.fill_(2)

    def _prune_hook(self, ctx: StageContext) -> None:
        self.prune_()
        ctx.log(f"{self.method}: kept columns per block {self.kept.sum(1).tolist()} ({self.serving_bytes():,} bytes)")

    def stages(self) -> list[Stage]:
        return [Stage("warmup", epochs=self.warmup_epochs),
                Stage("search", epochs=self.search_epochs, bilevel=True, before=self._start_search,
                      after=self._prune_hook, on_step=self._clip_alpha),
                Stage("retrain", epochs=self.retrain_epochs)]


    # -- contract -------------------------------------------------------------------------------

    def _scale(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Per-entry multiplier of global ``rows [...]``: ``[..., D]`` (None in warmup)."""
        phase = int(self.phase)
        if phase == 0:
            return None
        if phase == 1:
            return self.alpha[self._block[rows]]
        return (self.alpha * self.kept)[self._block[rows]]

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        w = self.weight(gid)
        scale = self._scale(gid)
        return w if scale is None else w * scale

    def _served_kept(self) -> torch.Tensor:
        """The pairs a server would store now: the pruned set, or before the prune the current selection."""
        return self.kept if int(self.phase) == 2 else self._select(self.salience())

    def array_bytes(self) -> int:
        return self._bytes(self._served_kept().numpy())

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """``bounds [F, nsplit + 1]``, ``col_ptr [nsplit + 1]``, ``cols`` (uint8 for D <= 256) and
        ``values/<b> float32[rows_b, k_b]`` with ``alpha`` folded in."""
        with torch.no_grad():
            rows = torch.arange(self.total_ids)
            scale = self._scale(rows)
            w = self.weight.weight if scale is None else self.weight.weight * scale
        return block_columns_encode(w.detach().numpy(), self._offsets.tolist(), self.bounds_, self._served_kept().numpy())

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nsplit={self.nsplit}, kept={self.kept.sum(1).tolist()}"


GRAD_EPS = 1e-8
"""Added to the mean |gradient| of a block's alpha row before dividing by it (the study's 1e-8)."""


def normalize_alpha_grad(grad: torch.Tensor) -> torch.Tensor:
    """Each block's alpha gradient divided by its mean magnitude over the dims, as the study's
    search does before its SGD step: the step size no longer depends on the block's frequency."""
    return grad / (grad.abs().mean(-1, keepdim=True) + GRAD_EPS)


@register_table("autosrh")
class AutoSrhTable(_AlphaSearch):
    """AutoSrh as the VLDB 2024 study runs it (Kong et al., TKDE 2022; Hsword/Hetu
    ``EmbeddingMemoryCompression`` ``scheduler/autosrh.py``, ``layers/autosrh.py``).

    The ids of all fields are cut by training frequency into ``nsplit`` blocks
    (:func:`frequency_blocks`); a salience weight ``alpha[b, d]`` in ``[0, 1]`` (initially 1)
    multiplies dim ``d`` of every row in block ``b``. Stages:

    1. ``warmup``: plain training of the table and the model.
    2. ``search`` (bilevel): the embeddings train on training batches and ``alpha`` on validation
       batches; the model head stays fixed. The loss carries ``l1 * sum |alpha|``; alpha's gradient
       is divided by its block's mean magnitude (:func:`normalize_alpha_grad`), stepped by plain
       SGD at ``alpha_lr`` and clipped to ``[0, 1]`` after each step.
    3. ``retrain``: everything trains with ``alpha`` frozen; then the entries of ``w * alpha`` with
       the largest magnitude are kept, ``nnz_`` of them (the most the budget's CSR holds), the rest
       set to zero; nothing trains after the prune (as in the study).

    Serving: CSR of ``w * alpha`` (:mod:`embpress.tables.sparse_storage`: fp32 values, a column
    index per value, a length per row and a pointer per 64 rows at their stored widths); the blocks
    and ``alpha`` are folded into the values and not stored. Before the prune the state is the CSR
    the prune would keep now.

    Args:
        nsplit: number of frequency blocks (study: 6).
        l1: weight of the L1 penalty on ``alpha`` in the search (study: 1e-5).
        alpha_lr: SGD learning rate of ``alpha`` (study: 1e-3).
        warmup_epochs, search_epochs, retrain_epochs: epochs per stage (None: the trainer's default).

    >>> t = AutoSrhTable(fields=[Field("a", 6000)], dim=8, budget="4x")
    >>> t.nnz_, t.serving_bytes() <= t.max_bytes
    (8355, True)
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, nsplit: int = 6, l1: float = 1e-5,
                 alpha_lr: float = 1e-3, warmup_epochs: int | None = 1, search_epochs: int | None = 1,
                 retrain_epochs: int | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if not (isinstance(nsplit, int) and 1 <= nsplit <= 2**15 - 1):
            raise ValueError(f"autosrh: nsplit must be an int in 1..32767, got {nsplit!r}")
        if not (isinstance(l1, int | float) and l1 >= 0):
            raise ValueError(f"autosrh: l1 must be a number >= 0, got {l1!r}")
        if not (isinstance(alpha_lr, int | float) and alpha_lr > 0):
            raise ValueError(f"autosrh: alpha_lr must be a number > 0, got {alpha_lr!r}")
        for name, v in (("warmup_epochs", warmup_epochs), ("search_epochs", search_epochs),
                        ("retrain_epochs", retrain_epochs)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"autosrh: {name} must be an int >= 0 or None, got {v!r}")
        self.nsplit, self.l1, self.alpha_lr = nsplit, l1, alpha_lr
        self.warmup_epochs, self.search_epochs, self.retrain_epochs = warmup_epochs, search_epochs, retrain_epochs
        self.reserve_metadata({}, ndims=CSR_NDIMS)
        self.nnz_ = csr_nonzeros_at_budget("autosrh", self.total_ids, dim, self.array_budget)
        self.bounds_ = frequency_blocks(self.fields, nsplit)
        self.block_rows_ = (self.bounds_[:, 1:] - self.bounds_[:, :-1]).sum(0)  # [nsplit]
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.alpha = nn.Parameter(torch.ones(nsplit, dim), requires_grad=False)  # trained in the search only
        self.register_buffer("_block", block_of_rows(self._offsets, self.bounds_, self.total_ids, np.int16),
                             persistent=False)
        self.register_buffer("mask", torch.ones(self.total_ids, dim, dtype=torch.bool))
        self.register_buffer("phase", torch.tensor(0))  # 0 warmup, 1 search, 2 retrain, 3 pruned
        self._grad_hook = None

    # -- stages ---------------------------------------------------------------------------------

    def _start_search(self, ctx: StageContext) -> None:
        self.phase.fill_(1)
        self.alpha.requires_grad_(True)
        if self._grad_hook is None:
            self._grad_hook = self.alpha.register_hook(normalize_alpha_grad)

    def _end_search(self, ctx: StageContext) -> None:
        self.phase.fill_(2)
        self.alpha.requires_grad_(False)
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        ctx.log(f"autosrh: alpha per block after the search (mean over dims) "
                f"{[round(v, 3) for v in self.alpha.mean(1).tolist()]}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.alpha.requires_grad_(int(self.phase) == 1)


    def _alpha_group(self) -> list[ParamGroup]:
        return [ParamGroup("alpha", [self.alpha], optimizer="sgd", lr=self.alpha_lr, bilevel=True)]

    def scaled_weight(self) -> torch.Tensor:
        """``float32[total_ids, D]``: ``w * alpha`` of every row (its block's alpha)."""
        return self.weight.weight * self.alpha[self._block.long()]

    @torch.no_grad()
    def prune_(self) -> None:
        """Keep the ``nnz_`` entries of ``w * alpha`` with the largest magnitude; nothing trains after."""
        self.mask.copy_(keep_top(self.scaled_weight().abs(), self.nnz_))
        self.phase.fill_(3)

    def _prune_hook(self, ctx: StageContext) -> None:
        self.prune_()
        ctx.log(f"autosrh: kept {int(self.mask.sum()):,} of {self.total_ids * self.dim:,} entries of w * alpha "
                f"({self.serving_bytes():,} serving bytes)")

    def stages(self) -> list[Stage]:
        return [Stage("warmup", epochs=self.warmup_epochs),
                Stage("search", epochs=self.search_epochs, bilevel=True, train_head=False,
                      before=self._start_search, after=self._end_search, on_step=self._clip_alpha,
                      groups=self._alpha_group),
                Stage("retrain", epochs=self.retrain_epochs, after=self._prune_hook)]


    # -- contract -------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        out = self.weight(gid) * self.alpha[self._block[gid].long()]
        return out * self.mask[gid] if int(self.phase) == 3 else out

    def array_bytes(self) -> int:
        return csr_bytes(self.total_ids, self.dim, self.nnz_)

    def array_ndims(self) -> int:  # analytic: the CSR arrays are 1-D (building them encodes the table)
        return CSR_NDIMS

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """CSR ``values`` (fp32 ``w * alpha``), ``indices``, ``row_len``, ``group_ptr`` (``sparse_storage``)."""
        with torch.no_grad():
            values = self.scaled_weight()
            mask = self.mask if int(self.phase) == 3 else keep_top(values.abs(), self.nnz_)
        return csr_encode(values.numpy(), mask.numpy())

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nsplit={self.nsplit}, nnz={self.nnz_}"
