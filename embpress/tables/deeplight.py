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

``T`` comes from the training-set size (``sum(Field.counts)`` of the first field; counted from
the training batches when counts are unknown) and the batch size of the first pruning step.
"""

from __future__ import annotations

import math
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
    (2993, ['warmup', 'prune', 'finetune'])
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
        self.nnz_ = nnz = csr_nonzeros_at_budget("deeplight", self.total_ids, dim, self.max_bytes)
        self.target_sparsity_ = 1.0 - nnz / (self.total_ids * dim)
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.register_buffer("mask", torch.ones(self.total_ids, dim, dtype=torch.bool))
        self.register_buffer("pruned", torch.tensor(False))
        self._pruning = False
        self._step = 0
        self._train_rows: int | None = None
        self._total_steps: int | None = None

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

    def _maybe_prune(self, batch_size: int) -> None:
        self._step += 1
        if self._total_steps is None:
            rows = self._train_rows if self._train_rows is not None else batch_size
            self._total_steps = max(1, self.prune_epochs * math.ceil(rows / batch_size))
        t = self._step
        if t % self.prune_every == 0 or t == self._total_steps:
            s_t = self.sparsity_at(t, self._total_steps)
            self.prune_to_(round((1.0 - s_t) * self.total_ids * self.dim))

    def _start_pruning(self, ctx: StageContext) -> None:
        counts = self.fields[0].counts
        if counts is not None:
            self._train_rows = int(np.asarray(counts).sum())
        else:  # unknown training size: count it once
            self._train_rows = sum(len(y) for _, _, y in ctx.train_batches())
        self._pruning, self._step, self._total_steps = True, 0, None

    def _finish_pruning(self, ctx: StageContext) -> None:
        self._pruning = False
        self.prune_to_(self.nnz_)
        self.pruned.fill_(True)
        ctx.log(f"deeplight: kept {self.nnz_:,} of {self.total_ids * self.dim:,} entries after {self._step} steps")

    def stages(self) -> list[Stage]:
        return [Stage("warmup", epochs=self.warmup_epochs),
                Stage("prune", epochs=self.prune_epochs, early_stopping=False,
                      before=self._start_pruning, after=self._finish_pruning),
                Stage("finetune", epochs=self.finetune_epochs)]

    # -- contract -------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self._pruning and self.training and torch.is_grad_enabled():
            self._maybe_prune(ids.shape[0])
        gid = self.global_ids(ids)
        return self.weight(gid) * self.mask[gid]

    def serving_bytes(self) -> int:
        return csr_bytes(self.total_ids, self.dim, self.nnz_)

    def serving_state(self) -> dict[str, np.ndarray]:
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
