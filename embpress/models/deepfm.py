"""DeepFM (Guo et al., IJCAI 2017, arXiv:1703.04247): a factorization machine and an MLP sharing one embedding."""

from __future__ import annotations

import torch
from torch import nn

from embpress.models.base import CTRModel, mlp, register_model
from embpress.tables.base import CompressedTable


@register_model("deepfm")
class DeepFM(CTRModel):
    """``logit = y_FM + y_DNN`` (paper eq. 1-4), every per-id parameter in the table.

    The FM's first-order term needs a scalar weight per id. Following the VLDB 2024 study's code
    (Hetu ``DeepFM_Head``), the table's D-dim output carries it: coordinate 0 of each field's
    embedding is that id's first-order weight, and coordinates ``1 .. D-1`` are its latent
    vector ``v`` for the FM's pairwise term ``sum_{i<j} <v_i, v_j>`` and for the deep MLP. So a
    compressed table compresses the first-order weights too, and no uncompressed per-id table
    sits beside it. Dense features enter the first-order term linearly and the deep MLP
    concatenated (the study's code feeds them only to the linear term).

    Args:
        deep: hidden sizes of the deep MLP (the study uses 256, 256).

    Shapes: dense ``[B, Dd]``, ids ``[B, F]`` -> logits ``[B]``; needs D >= 2.
    """

    def __init__(self, *, table: CompressedTable, num_dense: int, deep: tuple[int, ...] = (256, 256)) -> None:
        super().__init__(table=table, num_dense=num_dense)
        if self.dim < 2:
            raise ValueError(f"deepfm needs dim >= 2 (one first-order weight plus a latent vector), got {self.dim}")
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        self.deep = mlp([self.num_fields * (self.dim - 1) + num_dense, *deep, 1])

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        dense = self.check_dense(dense)
        emb = self.table(ids)                                    # [B, F, D]
        first = emb[:, :, 0].sum(1)                              # [B]
        v = emb[:, :, 1:]                                        # [B, F, D-1]
        s = v.sum(1)
        pairwise = 0.5 * (s.square() - v.square().sum(1)).sum(1)  # sum_{i<j} <v_i, v_j>
        x = v.flatten(1)
        if self.dense_linear is not None:
            first = first + self.dense_linear(dense).squeeze(1)
            x = torch.cat([x, dense], dim=1)
        return first + pairwise + self.deep(x).squeeze(1)
