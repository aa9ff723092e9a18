"""PEP: plug-in embedding pruning with learnable soft thresholds (Liu et al., ICLR 2021), and plain
magnitude pruning with the same rewind (``magprune``).

PEP (arXiv:2101.07577, eq. 5-7; reference code ssui-liu/learnable-embed-sizes-for-RecSys
``models/pep_embedding.py``, ``engine.py``, ``train_*.py``). Search: every entry is
soft-thresholded, ``v' = sign(v) * relu(|v| - g(s))`` with ``g = sigmoid`` and learnable thresholds
``s``, so the task loss itself decides how far each threshold rises. As in the reference, ``v`` and
``s`` are trained by Adam (lr 1e-3) with coupled L2 weight decay 1e-5, dense over the whole table: at
``s = -15`` the task gradient of ``s`` is ~1e-7 of the values', but Adam normalises each entry's
update, so the decay term alone lifts every threshold by about one ``lr`` per step and the task
gradient then pushes the thresholds of useful entries back down (the reference's thresholds rise
the same way; its Criteo/Avazu scripts start at -150, the MovieLens one at -15). One deviation:
the thresholds' lr (``threshold_lr``) is 10x the reference's by default, because our searches
are ~10x shorter. The
search runs until the soft-thresholded table has no more nonzeros than the budget's CSR holds (the
reference saves the mask when the count first reaches its target), at most ``search_epochs``
epochs; a search that ends short of the target keeps the entries with the widest margin
``|v| - g(s)``. Retrain: the kept entries restart from their ORIGINAL initial values (lottery
ticket, Sec. 3.3; ``re_init=False`` in the reference) with the head reset, under the fixed mask.

Stages: ``search`` (stop: target sparsity; after: prune) -> ``retrain`` (reset_head, before: rewind).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from embpress.tables.base import (
    Budget,
    CompressedTable,
    Field,
    ParamGroup,
    Stage,
    StageContext,
    register_table,
)
from embpress.tables.full import INIT_STD
from embpress.tables.sparse_storage import CSR_NDIMS, csr_bytes, csr_encode, csr_nonzeros_at_budget, keep_top

GRANULARITIES = ("global", "dim", "field", "field_dim", "feature", "feature_dim")
"""Threshold shapes of the reference code: one, per dim, per field, per (field, dim), per id, per (id, dim)."""


class _PrunedTable(CompressedTable):
    """What PEP and magnitude pruning share: the table, the mask, the rewind and the CSR serving state."""

    family = "intra"

    def _setup(self, search_epochs: int | None, retrain_epochs: int | None) -> None:
        for name, v in (("search_epochs", search_epochs), ("retrain_epochs", retrain_epochs)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{self.method}: {name} must be an int >= 0 or None, got {v!r}")
        self.search_epochs, self.retrain_epochs = search_epochs, retrain_epochs
        self.reserve_metadata({}, ndims=CSR_NDIMS)
        self.nnz_ = csr_nonzeros_at_budget(self.method, self.total_ids, self.dim, self.array_budget)
        self.weight = nn.Embedding(self.total_ids, self.dim, sparse=True)
        self._init_rng = torch.get_rng_state()  # to redraw the initial values for the retrain stage
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.register_buffer("mask", torch.ones(self.total_ids, self.dim, dtype=torch.bool))
        self.register_buffer("pruned", torch.tensor(False))

    def margins(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _values(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def prune_(self) -> None:
        """Keep the ``nnz_`` entries with the widest margin (magnitude, or magnitude over threshold)."""
        self.mask.copy_(keep_top(self.margins(), self.nnz_))
        self.pruned.fill_(True)

    def _frozen_after_rewind(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def rewind_(self) -> None:
        """Reset the values to their initial draw (the lottery ticket) and freeze the thresholds."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._init_rng)
            init = torch.empty_like(self.weight.weight)
            nn.init.normal_(init, std=INIT_STD)
        self.weight.weight.copy_(init)
        for p in self._frozen_after_rewind():
            p.requires_grad_(False)

    def _prune_hook(self, ctx: StageContext) -> None:
        self.prune_()
        ctx.log(f"{self.method}: kept {int(self.mask.sum()):,} of {self.total_ids * self.dim:,} entries "
                f"({self.serving_bytes():,} serving bytes)")

    def _rewind_hook(self, ctx: StageContext) -> None:
        self.rewind_()

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        return self._values(gid, self.weight(gid))

    def array_bytes(self) -> int:
        return csr_bytes(self.total_ids, self.dim, self.nnz_)

    def array_ndims(self) -> int:  # analytic: the CSR arrays are 1-D (building them encodes the table)
        return CSR_NDIMS

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """CSR ``values`` (fp32), ``indices`` (column, uint8 for D <= 256), ``row_len`` and ``group_ptr``
        (see ``sparse_storage``), ``nnz_`` entries (before the prune: the entries it would keep now)."""
        with torch.no_grad():
            rows = torch.arange(self.total_ids)
            values = self._values(rows, self.weight.weight)
            mask = self.mask if bool(self.pruned) else keep_top(self.margins(), self.nnz_)
        return csr_encode(values.detach().numpy(), mask.numpy())

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz_}"


@register_table("magprune")
class MagnitudePruneTable(_PrunedTable):
    """Magnitude pruning with lottery-ticket rewind (Frankle & Carbin, ICLR 2019, arXiv:1803.03635):
    train, keep the ``nnz_`` largest-magnitude entries, restart them from their initial values with
    the head reset and retrain under the mask. This is what ``pep`` did before its thresholds
    learned (they stayed at their initial value, so its prune was by magnitude).

    Args:
        search_epochs: epochs of the dense training before the prune (None: the trainer's default).
        retrain_epochs: epochs of the retrain stage (None: the trainer's default).

    Serving state: CSR (:mod:`embpress.tables.sparse_storage`), ``nnz`` = the most the budget holds.
    Shapes: ids ``[N, F]`` -> ``[N, F, D]``.

    >>> from embpress.tables import Ratio
    >>> t = MagnitudePruneTable(fields=[Field("a", 1000)], dim=16, budget=Ratio(4))
    >>> t.nnz_, [s.name for s in t.stages()]
    (2986, ['train', 'retrain'])
    """

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, search_epochs: int | None = 1,
                 retrain_epochs: int | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self._setup(search_epochs, retrain_epochs)

    def margins(self) -> torch.Tensor:
        """``|v|`` of every entry, ``float32[total, D]`` (pruned entries: ``-inf``)."""
        with torch.no_grad():
            return self.weight.weight.abs().masked_fill(~self.mask, -torch.inf)

    def _values(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v * self.mask[rows] if bool(self.pruned) else v

    def stages(self) -> list[Stage]:
        return [Stage("train", epochs=self.search_epochs, after=self._prune_hook),
                Stage("retrain", epochs=self.retrain_epochs, reset_head=True, before=self._rewind_hook)]


@register_table("pep")
class PEPTable(_PrunedTable):
    """Plug-in embedding pruning (Liu et al. 2021, arXiv:2101.07577); see the module docstring.

    Args:
        granularity: threshold shape, one of ``GRANULARITIES``; ``feature_dim`` (one threshold per
            entry) is the reference default and the study's ``feature_dimension``.
        threshold_init: initial ``s`` (reference: -15 on MovieLens, -150 on Criteo and Avazu, where
            the thresholds need ~10x more steps to reach the values' scale).
        search_lr: Adam learning rate of the values in the search (reference 1e-3).
        threshold_lr: Adam learning rate of the thresholds in the search. The reference uses one
            lr (1e-3) for both, over 10^4-10^5 search steps; our benchmark's searches have ~10^3, so
            the default is 10x larger for the thresholds to travel as far (1e-3 is the reference).
        weight_decay: coupled L2 weight decay of both Adams (reference 1e-5): it is what lifts the
            thresholds while ``sigmoid'(s)`` is ~0, and what shrinks the values of rare ids.
        search_epochs: the most epochs the search may take before the target sparsity (None: the
            trainer's default).
        retrain_epochs: epochs of the retrain stage (None: the trainer's default).

    Serving state: CSR (:mod:`embpress.tables.sparse_storage`) of the kept entries, ``nnz`` =
    the most the budget holds. Before the prune, ``serving_state()`` previews the entries the prune
    would keep now. Shapes: ids ``[N, F]`` -> ``[N, F, D]``.

    >>> from embpress.tables import Ratio
    >>> t = PEPTable(fields=[Field("a", 1000)], dim=16, budget=Ratio(4))
    >>> t.nnz_, t.serving_bytes() <= 1000 * 16, [s.name for s in t.stages()]
    (2986, True, ['search', 'retrain'])
    """

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, granularity: str = "feature_dim",
                 threshold_init: float = -15.0, search_lr: float = 1e-3, threshold_lr: float = 1e-2,
                 weight_decay: float = 1e-5, search_epochs: int | None = 20,
                 retrain_epochs: int | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if granularity not in GRANULARITIES:
            raise ValueError(f"pep: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        for name, v in (("search_lr", search_lr), ("threshold_lr", threshold_lr)):
            if not (isinstance(v, int | float) and v > 0):
                raise ValueError(f"pep: {name} must be a positive number, got {v!r}")
        if not (isinstance(weight_decay, int | float) and weight_decay >= 0):
            raise ValueError(f"pep: weight_decay must be a number >= 0, got {weight_decay!r}")
        self.granularity, self.threshold_init = granularity, threshold_init
        self.search_lr, self.threshold_lr, self.weight_decay = search_lr, threshold_lr, weight_decay
        self._setup(search_epochs, retrain_epochs)
        rows = {"global": 1, "dim": 1, "field": self.num_fields, "field_dim": self.num_fields}.get(granularity,
                                                                                              self.total_ids)
        width = dim if granularity.endswith("dim") else 1
        self.threshold = nn.Parameter(torch.full((rows, width), float(threshold_init)))
        field_of_row = torch.repeat_interleave(torch.arange(self.num_fields), self._sizes)
        self.register_buffer("_field_of_row", field_of_row, persistent=False)

    # -- thresholds -----------------------------------------------------------------------------

    def _s(self, rows: torch.Tensor) -> torch.Tensor:
        """Thresholds ``s`` broadcastable to the values of global ``rows [...]``: ``[..., 1 or D]``."""
        if self.granularity in ("feature", "feature_dim"):
            return self.threshold[rows]
        if self.granularity in ("field", "field_dim"):
            return self.threshold[self._field_of_row[rows]]
        return self.threshold[0].expand(*rows.shape, -1)

    def margins(self) -> torch.Tensor:
        """``|v| - g(s)`` of every entry, ``float32[total, D]`` (pruned entries: ``-inf``)."""
        with torch.no_grad():
            rows = torch.arange(self.total_ids)
            m = self.weight.weight.abs() - torch.sigmoid(self._s(rows))
            return m.masked_fill(~self.mask, -torch.inf)

    def nonzeros(self) -> int:
        """Entries the soft threshold lets through now (``|v| > g(s)``)."""
        return int((self.margins() > 0).sum())

    def _values(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if bool(self.pruned):
            return v * self.mask[rows]
        return torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(self._s(rows)))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        # the search's Adam with weight decay updates the whole table (dense gradient), as the reference
        return self._values(gid, F.embedding(gid, self.weight.weight, sparse=bool(self.pruned)))

    # -- stages ---------------------------------------------------------------------------------

    def _frozen_after_rewind(self) -> list[nn.Parameter]:
        return [self.threshold]

    def _search_groups(self) -> list[ParamGroup]:
        return [ParamGroup("values", [self.weight.weight], optimizer="adam", lr=self.search_lr,
                           weight_decay=self.weight_decay),
                ParamGroup("thresholds", [self.threshold], optimizer="adam", lr=self.threshold_lr,
                           weight_decay=self.weight_decay)]

    def _at_target(self, ctx: StageContext) -> bool:
        return self.nonzeros() <= self.nnz_

    def _prune_hook(self, ctx: StageContext) -> None:
        nz = self.nonzeros()
        super()._prune_hook(ctx)
        th = torch.sigmoid(self.threshold.detach())
        ctx.log(f"pep: search ended at {nz:,} nonzeros (target {self.nnz_:,}) after {ctx.step} steps; "
                f"g(s) from {float(th.min()):.3g} to {float(th.max()):.3g}")

    def stages(self) -> list[Stage]:
        return [Stage("search", epochs=self.search_epochs, early_stopping=False, groups=self._search_groups,
                      stop=self._at_target, after=self._prune_hook),
                Stage("retrain", epochs=self.retrain_epochs, reset_head=True, before=self._rewind_hook)]

    # -- contract -------------------------------------------------------------------------------

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight] if bool(self.pruned) else []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity!r}"
