"""AutoSrh: per-frequency-block dimension search with L1-sparse salience weights (Kong et al., TKDE 2022).

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
    Stage,
    StageContext,
    register_table,
)
from embpress.tables.full import INIT_STD
from embpress.tables.sparse_storage import FP32_BYTES, block_columns_bytes, block_columns_encode, col_dtype


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


@register_table("autosrh")
class AutoSrhTable(CompressedTable):
    """AutoSrh dimension search per frequency block (Kong et al., TKDE 2022); see the module docstring.

    Args:
        nsplit: number of frequency blocks (study: 6).
        l1: weight of the L1 penalty ``l1 * sum |alpha|`` in the search stage (study: 1e-5).
        warmup_epochs, search_epochs, retrain_epochs: epochs per stage (None: the trainer's default).

    Pruning picks (block, dim) pairs by decreasing :meth:`salience` (``alpha`` times the block's mean
    ``|w|`` on that dim; frequent blocks first on ties), skipping a pair that would exceed the budget. Serving bytes: ``4 * sum_b rows_b k_b``
    values, one column index per kept pair, ``nsplit + 1`` column pointers, ``F * (nsplit + 1)``
    id bounds. Shapes: ids ``[N, F]`` -> ``[N, F, D]``; ``alpha [nsplit, D]``.

    >>> from embpress.tables import Ratio
    >>> t = AutoSrhTable(fields=[Field("a", 6000)], dim=8, budget=Ratio(4))
    >>> t.block_rows_.tolist(), int(t.kept_.sum()), t.serving_bytes() <= 6000 * 8
    ([1000, 1000, 1000, 1000, 1000, 1000], 11, True)
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, nsplit: int = 6, l1: float = 1e-5,
                 warmup_epochs: int | None = 1, search_epochs: int | None = 1,
                 retrain_epochs: int | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if not (isinstance(nsplit, int) and nsplit >= 1):
            raise ValueError(f"autosrh: nsplit must be an int >= 1, got {nsplit!r}")
        if not l1 >= 0:
            raise ValueError(f"autosrh: l1 must be >= 0, got {l1!r}")
        self.nsplit, self.l1 = nsplit, l1
        self.warmup_epochs, self.search_epochs, self.retrain_epochs = warmup_epochs, search_epochs, retrain_epochs
        self.bounds_ = frequency_blocks(self.fields, nsplit)
        self.block_rows_ = (self.bounds_[:, 1:] - self.bounds_[:, :-1]).sum(0)  # [nsplit]
        self._max_id = max(f.num_embeddings for f in self.fields)
        empty = self._bytes(np.zeros((nsplit, dim), dtype=bool))
        first = int(np.flatnonzero(self.block_rows_)[0])  # the most frequent non-empty block
        one_col = np.zeros((nsplit, dim), dtype=bool)
        one_col[first, 0] = True
        if self._bytes(one_col) > self.max_bytes:
            # Without one column for the most frequent ids every id but a few rare ties is a zero vector:
            # the table would "meet" the budget by serving nothing, so the budget is out of reach.
            raise BudgetError(
                f"autosrh: the block layout ({nsplit} blocks) needs {empty:,} bytes before any column, and one "
                f"column of the most frequent block ({int(self.block_rows_[first]):,} rows) "
                f"{self._bytes(one_col) - empty:,} more, but the budget allows {self.max_bytes:,} "
                f"(full table {self.full_bytes:,} bytes, budget {self.budget})"
            )
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.alpha = nn.Parameter(torch.ones(nsplit, dim), requires_grad=False)  # trained in the search only
        block = np.zeros(self.total_ids, dtype=np.int64)
        for i, off in enumerate(self._offsets.tolist()):
            for b in range(nsplit):
                block[off + self.bounds_[i, b]: off + self.bounds_[i, b + 1]] = b
        self.register_buffer("_block", torch.from_numpy(block), persistent=False)
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
            if used + int(self.block_rows_[b]) * FP32_BYTES + col_bytes > self.max_bytes:
                continue
            kept[b, d] = True
            exact = self._bytes(kept)
            if exact > self.max_bytes:
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
        ctx.log(f"autosrh: kept columns per block {self.kept.sum(1).tolist()} ({self.serving_bytes():,} bytes)")

    def stages(self) -> list[Stage]:
        return [Stage("warmup", epochs=self.warmup_epochs),
                Stage("search", epochs=self.search_epochs, bilevel=True, before=self._start_search,
                      after=self._prune_hook, on_step=self._clip_alpha),
                Stage("retrain", epochs=self.retrain_epochs)]

    @torch.no_grad()
    def _clip_alpha(self, ctx: StageContext) -> None:
        """Projected gradient step: alpha back into [0, 1] after each update (the study clips)."""
        self.alpha.clamp_(0.0, 1.0)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def regularizer(self) -> torch.Tensor | None:
        if int(self.phase) != 1 or not self.l1:
            return None
        return self.l1 * self.alpha.abs().sum()

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

    def serving_bytes(self) -> int:
        return self._bytes(self._served_kept().numpy())

    def serving_state(self) -> dict[str, np.ndarray]:
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
