"""Wide & Deep (Cheng et al. 2016, arXiv:1606.07792): a linear model and an MLP on the same input, summed."""

from __future__ import annotations

import torch
from torch import nn

from embpress.models.base import CTRModel, mlp, register_model
from embpress.tables.base import CompressedTable


@register_model("wdl")
class WideDeep(CTRModel):
    """``logit = w . x + MLP(x)`` with ``x = [flatten(embeddings), dense]`` (paper eq. 3).

    The paper's wide part is a linear model over sparse one-hot features and their cross
    products, which needs one weight per id (or per crossed id pair). That would be a second,
    uncompressed per-id table beside the one being measured, so, as the VLDB 2024 study's code
    does (Hetu ``WDL_Head``), the wide part here is linear in the table's output: each field
    contributes ``w_f . e_f``, a per-field weight vector times the id's embedding, and every
    per-id parameter lives in the compressed table. Dense features enter both parts, linearly in
    the wide one and concatenated in the deep one.

    Args:
        deep: hidden sizes of the deep MLP (the study uses 256, 256).

    Shapes: dense ``[B, Dd]``, ids ``[B, F]`` -> logits ``[B]``.
    """

    def __init__(self, *, table: CompressedTable, num_dense: int, deep: tuple[int, ...] = (256, 256)) -> None:
        super().__init__(table=table, num_dense=num_dense)
        width = self.num_fields * self.dim + num_dense
        self.wide = nn.Linear(width, 1, bias=False)
        self.deep = mlp([width, *deep, 1])

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        dense = self.check_dense(dense)
        x = self.table(ids).flatten(1)
        if self.num_dense:
            x = torch.cat([x, dense], dim=1)
        return (self.wide(x) + self.deep(x)).squeeze(1)
