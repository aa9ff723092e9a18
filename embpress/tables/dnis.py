"""DNIS: soft selection weights per (frequency block, dimension), searched on validation loss, then
pruned to the budget and fine-tuned (Cheng et al. 2020, arXiv:2006.04466)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    CompressedTable,
    Field,
    Stage,
    StageContext,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD

BLOCK_END_BYTES = 4
"""One int32 per block: the exclusive end of the block in the concatenated id space."""


def equal_blocks(n: int, blocks: int) -> np.ndarray:
    """``min(blocks, n)`` blocks of (nearly) equal size over ids ``0 .. n-1``: their boundaries.

    Ids are numbered by descending frequency, so block 0 holds the most frequent ids (the study's
    AutoSrh grouping cuts the id space into groups of equal size by frequency).

    >>> equal_blocks(10, 4).tolist(), equal_blocks(2, 4).tolist()
    ([0, 2, 5, 8, 10], [0, 1, 2])
    """
    k = min(blocks, n)
    return np.rint(np.linspace(0, n, k + 1)).astype(np.int64)


def select_entries(alpha: np.ndarray, rows: np.ndarray, capacity: int,
                   required_blocks: Sequence[int] = ()) -> np.ndarray:
    """Keep (block, dim) entries by descending weight while their rows fit ``capacity`` bytes.

    ``alpha [B, D]`` selection weights, ``rows [B]`` rows per block; entry ``(b, j)`` stores
    ``rows[b]`` fp32 values. The best entry of each block in ``required_blocks`` is taken first (so
    no field loses its most frequent ids altogether), then entries from the largest weight down;
    one that no longer fits is skipped and smaller ones may still fill the rest. Ties go to the
    lower block, then lower dim.

    >>> select_entries(np.array([[0.9, 0.1], [0.5, 0.8]]), np.array([1, 3]), 20).astype(int).tolist()
    [[1, 1], [0, 1]]
    >>> select_entries(np.array([[0.9, 0.8], [0.1, 0.0]]), np.array([2, 2]), 16, [1]).astype(int).tolist()
    [[1, 0], [1, 0]]
    """
    b, d = alpha.shape
    flat = alpha.reshape(-1)
    first = [int(blk) * d + int(np.argmax(alpha[blk])) for blk in required_blocks]
    order = [*first, *np.argsort(-flat, kind="stable").tolist()]
    cost = np.repeat(rows.astype(np.int64) * FP32_BYTES, d)
    keep = np.zeros(b * d, dtype=bool)
    left = int(capacity)
    for e in order:
        if not keep[e] and cost[e] <= left:
            keep[e] = True
            left -= int(cost[e])
    return keep.reshape(b, d)


@register_table("dnis")
class DNISTable(CompressedTable):
    """Differentiable Neural Input Search (Cheng et al. 2020, arXiv:2006.04466; the VLDB
    2024 study implements its successor as ``AutoSrhEmbedding``).

    The ids of each field (numbered by descending frequency) are cut into ``blocks`` equal blocks
    (:func:`equal_blocks`). A full ``[N, D]`` table is trained with a soft selection layer: the row of
    an id in block ``b`` is multiplied elementwise by ``alpha_b in [0, 1]^D`` (the soft selection layer), initialised
    to 1. Stage ``search`` (bilevel) updates ``alpha`` on validation batches (first-order DARTS);
    ``alpha`` is projected back to ``[0, 1]`` after each step (the stage's ``on_step``; the reference clips), and
    ``l1 * sum |alpha|`` is added to the loss (sparsity, as the reference). Then the weights are pruned
    to the budget (:func:`select_entries` on :meth:`salience`, ``alpha`` times the block's mean
    ``|w|`` per dim: one column of each field's most frequent block first, then the most salient
    entries globally while their ``rows_b`` values fit; ranking by ``alpha`` alone, whose values
    clip at 1 and tie after a short search, dropped whole fields at 10x), the kept weights are
    folded into the rows (``E <- E * alpha``) and stage ``finetune`` trains the kept entries with ``alpha`` frozen to the 0/1 mask.

    Until pruning, :meth:`serving_bytes` / :meth:`serving_state` describe the table pruned with the
    current weights.

    Args:
        blocks: frequency blocks per field (at most the field's size).
        l1: weight of the L1 penalty on ``alpha`` during the search.
        search_epochs: epochs of the search stage (None: the trainer's default).
        finetune_epochs: epochs of the fine-tuning stage (None: the trainer's default; 0 skips it).

    Serving state: ``values`` fp32, each block's kept columns, row-major (``rows_b x k_b``), blocks
    in order; ``kept`` the ``[B, D]`` keep mask as packed bits (uint8); ``block_end`` int32 ``[B]``.
    Serving bytes: ``4 * sum_b rows_b k_b + ceil(B D / 8) + 4 B``.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``; ``alpha [B, D]`` with ``B = sum_f min(blocks, n_f)``.

    >>> from embpress.tables import Ratio
    >>> t = DNISTable(fields=[Field("a", 10), Field("b", 1000)], dim=8, budget=Ratio(4))
    >>> t.num_blocks, t.serving_bytes() <= t.full_bytes / 4
    (8, True)
    >>> t.prune_()
    >>> int(t.mask.sum()), t(torch.tensor([[3, 999]])).shape
    (39, torch.Size([1, 2, 8]))
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, blocks: int = 4,
                 l1: float = 1e-5, search_epochs: int | None = 1, finetune_epochs: int | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.blocks = blocks
        self.l1 = l1
        self.search_epochs = search_epochs
        self.finetune_epochs = finetune_epochs
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"dnis: blocks must be a positive int, got {blocks!r}")
        if not (isinstance(l1, int | float) and l1 >= 0):
            raise ValueError(f"dnis: l1 must be a number >= 0, got {l1!r}")
        for name in ("search_epochs", "finetune_epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"dnis: {name} must be an int >= 0 or None, got {v!r}")

        ends, firsts, start = [], [], 0
        for f in self.fields:
            b = equal_blocks(f.num_embeddings, blocks)
            firsts.append(len(ends))
            ends.extend((start + b[1:]).tolist())
            start += f.num_embeddings
        self.num_blocks = len(ends)
        self._first_blocks = firsts  # each field's most frequent block
        block_end = np.array(ends, dtype=np.int64)
        self._rows = np.diff(np.concatenate([[0], block_end]))
        self._overhead = -(-self.num_blocks * dim // 8) + BLOCK_END_BYTES * self.num_blocks
        self.reserve_metadata({}, ndims=3)  # shapes: values, kept, block_end
        self.require_fit(self._overhead + int(self._rows[firsts].sum()) * FP32_BYTES,
                         f"the keep mask and bounds of {self.num_blocks} blocks plus one column of each "
                         f"field's most frequent block")

        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.alpha = nn.Parameter(torch.ones(self.num_blocks, dim))
        self.register_buffer("block_end", torch.from_numpy(block_end))
        self.register_buffer("mask", torch.zeros(self.num_blocks, dim, dtype=torch.bool))
        self.register_buffer("pruned", torch.tensor(False))

    # -- search and pruning -------------------------------------------------------------------

    def block_of(self, g: torch.Tensor) -> torch.Tensor:
        """Global ids (any shape) -> their block index."""
        return torch.bucketize(g, self.block_end, right=True)

    def plan(self) -> np.ndarray:
        """The keep mask ``[B, D]`` the budget allows under the current selection weights."""
        if bool(self.pruned):
            return self.mask.numpy()
        return select_entries(self.salience().numpy().astype(np.float64), self._rows,
                              self.array_budget - self._overhead, self._first_blocks)

    @torch.no_grad()
    def salience(self) -> torch.Tensor:
        """``[B, D]``: the selection weight times the block's mean ``|w|`` on that dim, the magnitude
        the column serves. Weights clipped at 1 tie in short searches; the magnitude separates
        trained frequent columns from rare ones that barely moved from their initialisation."""
        w = self.weight.weight.abs()
        sums = torch.zeros(self.num_blocks, self.dim).index_add_(0, self.block_of(torch.arange(self.total_ids)), w)
        rows = torch.as_tensor(self._rows, dtype=w.dtype).clamp(min=1).unsqueeze(1)
        return self.alpha.clamp(0, 1) * sums / rows

    @torch.no_grad()
    def prune_(self) -> None:
        """Keep the largest weights that fit, fold them into the rows and freeze them (no-op if done)."""
        if bool(self.pruned):
            return
        keep = torch.from_numpy(self.plan())
        blk = self.block_of(torch.arange(self.total_ids))
        factor = self.alpha.clamp(0, 1) * keep
        self.weight.weight.mul_(factor[blk])
        self.mask.copy_(keep)
        self.alpha.copy_(keep.float())
        self.alpha.requires_grad_(False)
        self.pruned.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.alpha.requires_grad_(not bool(self.pruned))

    # -- lookups ------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.global_ids(ids)
        sel = self.alpha.clamp(0, 1) if self.alpha.requires_grad else self.mask.to(self.weight.weight.dtype)
        return self.weight(g) * sel[self.block_of(g)]

    # -- stages -------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        stages = [Stage("search", epochs=self.search_epochs, bilevel=True, after=self._prune_hook,
                        on_step=self._clip_alpha)]
        if self.finetune_epochs != 0:
            stages.append(Stage("finetune", epochs=self.finetune_epochs))
        return stages

    @torch.no_grad()
    def _clip_alpha(self, ctx: StageContext) -> None:
        """Projected gradient step: alpha back into [0, 1] after each update, as the reference's clip."""
        self.alpha.clamp_(0, 1)

    def _prune_hook(self, ctx: StageContext) -> None:
        self.prune_()
        per_block = self.mask.sum(1).tolist()
        ctx.log(f"dnis: kept dims per block {per_block}, {self.serving_bytes():,} serving bytes")

    def regularizer(self) -> torch.Tensor | None:
        if not self.alpha.requires_grad or self.l1 == 0:
            return None
        return self.l1 * self.alpha.abs().sum()

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha] if self.alpha.requires_grad else []

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    # -- contract -----------------------------------------------------------------------------

    def array_bytes(self) -> int:
        keep = self.plan()
        return int((self._rows * keep.sum(1)).sum()) * FP32_BYTES + self._overhead

    def serving_arrays(self) -> dict[str, np.ndarray]:
        keep = self.plan()
        w = to_numpy(self.weight.weight)
        if not bool(self.pruned):
            w = w * np.repeat(self.alpha.detach().clamp(0, 1).numpy(), self._rows, axis=0)
        parts, start = [], 0
        for b, r in enumerate(self._rows):
            parts.append(w[start:start + r][:, keep[b]].reshape(-1))
            start += r
        return {
            "values": np.concatenate(parts).astype(np.float32),
            "kept": np.packbits(keep.reshape(-1)),
            "block_end": self.block_end.numpy().astype(np.int32),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.blocks}, num_blocks={self.num_blocks}"
