"""The uncompressed baseline, and the no-id floor that every compressed table must beat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import FP32_BYTES, Budget, CompressedTable, Field, register_table, to_numpy

INIT_STD = 0.01
"""Every learned embedding row starts as N(0, 0.01^2) unless a method's paper says otherwise."""


@register_table("full")
class FullTable(CompressedTable):
    """One fp32 row per id of every field (the reference ``full_bytes``).

    Rows are stored as one concatenated ``nn.Embedding(sparse=True)``: the trainer updates it
    with SparseAdam, so a step touches only the rows of the batch, not the whole table.

    >>> t = FullTable(fields=[Field("a", 10), Field("b", 5)], dim=4)
    >>> t(torch.tensor([[9, 4]])).shape, t.serving_bytes()
    (torch.Size([1, 2, 4]), 256)
    """

    family = "reference"

    reference = True

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight(self.global_ids(ids))

    def array_bytes(self) -> int:
        return self.total_ids * self.dim * FP32_BYTES

    def serving_arrays(self) -> dict[str, np.ndarray]:
        return {"weight": to_numpy(self.weight.weight)}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]


@register_table("noid")
class NoIdTable(CompressedTable):
    """One learned vector per field, ignoring the id: the floor of a model without per-id embeddings."""

    family = "reference"

    reference = True

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.weight = nn.Parameter(torch.randn(self.num_fields, dim) * INIT_STD)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(ids.shape[0], -1, -1)

    def array_bytes(self) -> int:
        return self.num_fields * self.dim * FP32_BYTES

    def serving_arrays(self) -> dict[str, np.ndarray]:
        return {"weight": to_numpy(self.weight)}
