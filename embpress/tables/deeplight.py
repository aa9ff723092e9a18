"""DeepLight: gradual magnitude pruning of the embedding table during training (Deng et al., WSDM 2021).

After a dense ``warmup``, the ``prune`` stage raises the sparsity step by step: every
``prune_every`` training steps the smallest-magnitude surviving entries are zeroed and masked
for good, until the sparsity the budget needs is reached at the end of the stage; a ``finetune``
stage then trains the survivors under the fixed mask (arXiv:2002.06987, Sec. 4, "gradual
pruning"; reference code WayneDW/DeepLight ``model/DeepFMs.py`` ``fit``, and the study's Hetu
``methods/layers/deeplight.py``, both with ``s_t = s * (1 - 0.99 ** (t / 100))`` and a prune every
10 iterations). DeepLight's structured pruning acts on the model head (field-pair interaction
matrix, DNN layers), outside the table; the embedding table is pruned entry by entry, as here.

Schedules (``schedule``):

- ``polynomial`` (default): ``s_t = s * (1 - (1 - t / T) ** 3)`` over the ``T`` steps of the
  prune stage (Zhu & Gupta, arXiv:1710.01878, eq. 1), which reaches ``s`` when the stage ends.
- ``exponential``: the reference code's ``s * (1 - 0.99 ** (t / 100))``; with few steps it stays
  far below ``s``, and the end of the stage prunes the rest at once.

``t`` and ``T`` are the prune stage's step and planned steps, which the trainer passes to the
stage's per-step hook (:class:`~embpress.tables.base.Stage` ``on_step``), called after each
optimiser step as in the reference.
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
from embpress.tables.sparse_storage import CSR_NDIMS, csr_bytes, csr_encode, csr_nonzeros_at_budget, keep_top

SCHEDULES = ("polynomial", "exponential")
DAMPING = 0.99
"""The reference code's ``s_t = s * (1 - DAMPING ** (t / 100))``."""


@register_table("deeplight")
class DeepLightTable(CompressedTable):
    """DeepLight's gradual embedding pruning (Deng et al. 2021, arXiv:2002.06987); see the module docstring.

    Args:
        warmup_epochs: dense training before pruning (None: the trainer's default; the study's
            Hetu code warms up with a full table).
        prune_epochs: epochs over which the sparsity rises to the target (no early stopping).
        finetune_epochs: training under the final mask (None: the trainer's default).
        prune_every: steps between two prunes (reference: 10).
        schedule: ``"polynomial"`` or ``"exponential"`` (the reference code's).

    Serving state: CSR of the surviving entries (:mod:`embpress.tables.sparse_storage`), ``nnz``
    = the most the budget holds. Shapes: ids ``[N, F]`` -> ``[N, F, D]``.

    >>> from embpress.tables import Ratio
    >>> t = DeepLightTable(fields=[Field("a", 1000)], dim=16, budget=Ratio(4))
    >>> t.nnz_, [s.name for s in t.stages()]
    (2986, ['warmup', 'prune', 'finetune'])
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, warmup_epochs: int | None = 1,
                 prune_epochs: int = 1, finetune_epochs: int | None = None, prune_every: int = 10,
                 schedule: str = "polynomial") -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if schedule not in SCHEDULES:
            raise ValueError(f"deeplight: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not (isinstance(prune_epochs, int) and prune_epochs >= 1):
            raise ValueError(f"deeplight: prune_epochs must be an int >= 1, got {prune_epochs!r}")
        if not (isinstance(prune_every, int) and prune_every >= 1):
            raise ValueError(f"deeplight: prune_every must be an int >= 1, got {prune_every!r}")
        self.warmup_epochs, self.prune_epochs, self.finetune_epochs = warmup_epochs, prune_epochs, finetune_epochs
        self.prune_every, self.schedule = prune_every, schedule
        self.reserve_metadata({}, ndims=CSR_NDIMS)
        self.nnz_ = nnz = csr_nonzeros_at_budget("deeplight", self.total_ids, dim, self.array_budget)
        self.target_sparsity_ = 1.0 - nnz / (self.total_ids * dim)
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.register_buffer("mask", torch.ones(self.total_ids, dim, dtype=torch.bool))
        self.register_buffer("pruned", torch.tensor(False))

    # -- pruning --------------------------------------------------------------------------------

    def sparsity_at(self, t: int, total: int) -> float:
        """Scheduled sparsity after ``t`` of ``total`` steps."""
        if self.schedule == "polynomial":
            return self.target_sparsity_ * (1.0 - (1.0 - min(t, total) / total) ** 3)
        return self.target_sparsity_ * (1.0 - DAMPING ** (t / 100.0))

    @torch.no_grad()
    def prune_to_(self, keep: int) -> None:
        """Zero and mask all but the ``keep`` largest-magnitude surviving entries (never un-prunes)."""
        keep = max(self.nnz_, min(int(keep), int(self.mask.sum())))
        score = self.weight.weight.abs().masked_fill(~self.mask, -1.0)
        self.mask.copy_(keep_top(score, keep))
        self.weight.weight.mul_(self.mask)

    def prune_step_(self, t: int, total: int) -> None:
        """After optimiser step ``t`` of ``total``: prune to the scheduled sparsity every
        ``prune_every`` steps and at the last step."""
        if t % self.prune_every == 0 or t == total:
            s_t = self.sparsity_at(t, max(1, total))
            self.prune_to_(round((1.0 - s_t) * self.total_ids * self.dim))

    def _prune_step(self, ctx: StageContext) -> None:
        self.prune_step_(ctx.step, ctx.total_steps)

    def _finish_pruning(self, ctx: StageContext) -> None:
        self.prune_to_(self.nnz_)
        self.pruned.fill_(True)
        ctx.log(f"deeplight: kept {self.nnz_:,} of {self.total_ids * self.dim:,} entries after {ctx.step} steps")

    def stages(self) -> list[Stage]:
        return [Stage("warmup", epochs=self.warmup_epochs),
                Stage("prune", epochs=self.prune_epochs, early_stopping=False, on_step=self._prune_step,
                      after=self._finish_pruning),
                Stage("finetune", epochs=self.finetune_epochs)]

    # -- contract -------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        return self.weight(gid) * self.mask[gid]

    def array_bytes(self) -> int:
        return csr_bytes(self.total_ids, self.dim, self.nnz_)

    def array_ndims(self) -> int:  # analytic: the CSR arrays are 1-D (building them encodes the table)
        return CSR_NDIMS

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """CSR ``values`` (fp32), ``indices`` (column, uint8 for D <= 256), ``row_len`` and ``group_ptr`` (see ``sparse_storage``);
        before the prune stage ends, the ``nnz_`` largest-magnitude surviving entries."""
        with torch.no_grad():
            w = self.weight.weight * self.mask
            mask = self.mask if bool(self.pruned) else keep_top(w.abs().masked_fill(~self.mask, -1.0), self.nnz_)
        return csr_encode(w.numpy(), mask.numpy())

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz_}, schedule={self.schedule!r}"
