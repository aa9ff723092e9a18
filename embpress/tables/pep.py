"""PEP: plug-in embedding pruning with learnable soft thresholds (Liu et al., ICLR 2021).

Search: every entry is soft-thresholded, ``v' = sign(v) * relu(|v| - g(s))`` with ``g = sigmoid``
and learnable thresholds ``s`` (arXiv:2101.07577, eq. 5-7; reference code
ssui-liu/learnable-embed-sizes-for-RecSys ``models/pep_embedding.py``), so the task loss itself
decides how far each threshold rises. Prune: the entries that clear their threshold by the
widest margin ``|v| - g(s)`` are kept, exactly as many as the budget's CSR layout holds (the
reference saves the mask when the sparsity first reaches the target; ranking by margin gives that
mask whether the search over- or undershot). Retrain: the kept entries restart from their
ORIGINAL initial values (lottery ticket, Sec. 3.3; ``re_init=False`` in the reference) with the
head reset, and train under the fixed mask.

Stages: ``search`` -> (after: prune to the budget) -> ``retrain`` (reset_head, before: rewind).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    Budget,
    CompressedTable,
    Field,
    Stage,
    StageContext,
    register_table,
)
from embpress.tables.full import INIT_STD
from embpress.tables.sparse_storage import csr_bytes, csr_encode, csr_nonzeros_at_budget, keep_top

GRANULARITIES = ("global", "dim", "field", "field_dim", "feature", "feature_dim")
"""Threshold shapes of the reference code: one, per dim, per field, per (field, dim), per id, per (id, dim)."""


@register_table("pep")
class PEPTable(CompressedTable):
    """Plug-in embedding pruning (Liu et al. 2021, arXiv:2101.07577); see the module docstring.

    Args:
        granularity: threshold shape, one of ``GRANULARITIES``; ``feature_dim`` (one threshold per
            entry) is the reference default and the study's ``feature_dimension``.
        threshold_init: initial ``s``. The reference code and the study use -150, where fp32
            ``sigmoid`` and its gradient are exactly 0 and the thresholds never move (the search is
            then plain training and the prune is by magnitude); -15 lets them learn.
        search_epochs: epochs of the search stage (None: the trainer's default).
        retrain_epochs: epochs of the retrain stage (None: the trainer's default).

    Serving state: CSR (:mod:`embpress.tables.sparse_storage`) of the kept entries, ``nnz`` =
    the most the budget holds. Before the prune, ``serving_state()`` previews the entries the prune
    would keep now. Shapes: ids ``[N, F]`` -> ``[N, F, D]``.

    >>> from embpress.tables import Ratio
    >>> t = PEPTable(fields=[Field("a", 1000)], dim=16, budget=Ratio(4))
    >>> t.nnz_, t.serving_bytes() <= 1000 * 16, [s.name for s in t.stages()]
    (2993, True, ['search', 'retrain'])
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, granularity: str = "feature_dim",
                 threshold_init: float = -15.0, search_epochs: int | None = 1,
                 retrain_epochs: int | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if granularity not in GRANULARITIES:
            raise ValueError(f"pep: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity, self.threshold_init = granularity, threshold_init
        self.search_epochs, self.retrain_epochs = search_epochs, retrain_epochs
        self.nnz_ = csr_nonzeros_at_budget("pep", self.total_ids, dim, self.max_bytes)
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        self._init_rng = torch.get_rng_state()  # to redraw the initial values for the retrain stage
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        rows = {"global": 1, "dim": 1, "field": self.num_fields, "field_dim": self.num_fields}.get(granularity)
        width = dim if granularity.endswith("dim") else 1
        if rows is None:  # per id: as large as the table, with sparse gradients
            self.threshold = nn.Embedding(self.total_ids, width, sparse=True)
            nn.init.constant_(self.threshold.weight, threshold_init)
        else:
            self.threshold = nn.Parameter(torch.full((rows, width), float(threshold_init)))
        field_of_row = torch.repeat_interleave(torch.arange(self.num_fields), self._sizes)
        self.register_buffer("_field_of_row", field_of_row, persistent=False)
        self.register_buffer("mask", torch.ones(self.total_ids, dim, dtype=torch.bool))
        self.register_buffer("pruned", torch.tensor(False))

    # -- thresholds -----------------------------------------------------------------------------

    def _s(self, rows: torch.Tensor) -> torch.Tensor:
        """Thresholds ``s`` broadcastable to the values of global ``rows [...]``: ``[..., 1 or D]``."""
        if isinstance(self.threshold, nn.Embedding):
            return self.threshold(rows)
        if self.granularity in ("field", "field_dim"):
            return self.threshold[self._field_of_row[rows]]
        return self.threshold[0].expand(*rows.shape, -1)

    def margins(self) -> torch.Tensor:
        """``|v| - g(s)`` of every entry, ``float32[total, D]`` (pruned entries: ``-inf``)."""
        with torch.no_grad():
            rows = torch.arange(self.total_ids)
            m = self.weight.weight.abs() - torch.sigmoid(self._s(rows))
            return m.masked_fill(~self.mask, -torch.inf)

    def _values(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if bool(self.pruned):
            return v * self.mask[rows]
        return torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(self._s(rows)))

    # -- stages ---------------------------------------------------------------------------------

    @torch.no_grad()
    def prune_(self) -> None:
        """Keep the ``nnz_`` entries with the widest margin over their thresholds."""
        self.mask.copy_(keep_top(self.margins(), self.nnz_))
        self.pruned.fill_(True)

    @torch.no_grad()
    def rewind_(self) -> None:
        """Reset the values to their initial draw (the lottery ticket) and freeze the thresholds."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._init_rng)
            init = torch.empty_like(self.weight.weight)
            nn.init.normal_(init, std=INIT_STD)
        self.weight.weight.copy_(init)
        for p in self.threshold.parameters() if isinstance(self.threshold, nn.Module) else [self.threshold]:
            p.requires_grad_(False)

    def _prune_hook(self, ctx: StageContext) -> None:
        self.prune_()
        ctx.log(f"pep: kept {self.nnz_:,} of {self.total_ids * self.dim:,} entries "
                f"({self.serving_bytes():,} serving bytes)")

    def _rewind_hook(self, ctx: StageContext) -> None:
        self.rewind_()

    def stages(self) -> list[Stage]:
        return [Stage("search", epochs=self.search_epochs, after=self._prune_hook),
                Stage("retrain", epochs=self.retrain_epochs, reset_head=True, before=self._rewind_hook)]

    # -- contract -------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        return self._values(gid, self.weight(gid))

    def serving_bytes(self) -> int:
        return csr_bytes(self.total_ids, self.dim, self.nnz_)

    def serving_state(self) -> dict[str, np.ndarray]:
        """CSR ``values`` (fp32), ``indices`` (column, uint8 for D <= 256), ``row_len`` and ``group_ptr`` (see ``sparse_storage``)."""
        with torch.no_grad():
            rows = torch.arange(self.total_ids)
            values = self._values(rows, self.weight.weight)
            mask = self.mask if bool(self.pruned) else keep_top(self.margins(), self.nnz_)
        return csr_encode(values.numpy(), mask.numpy())

    def sparse_parameters(self) -> list[nn.Parameter]:
        params = [self.weight.weight]
        if isinstance(self.threshold, nn.Embedding):
            params.append(self.threshold.weight)
        return params

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz_}, granularity={self.granularity!r}"
