"""DLRM (Naumov et al. 2019, arXiv:1906.00091): bottom MLP on dense features, pairwise dot
interactions of all embedding vectors, top MLP."""

from __future__ import annotations

import torch

from embpress.models.base import CTRModel, mlp, register_model
from embpress.tables.base import CompressedTable


@register_model("dlrm")
class DLRM(CTRModel):
    """``z = [bottom(dense), dot(e_i, e_j) for i < j]`` -> top MLP -> logit.

    Args:
        bottom: hidden sizes of the bottom MLP (its output is the embedding dim).
        top: hidden sizes of the top MLP.
    """

    def __init__(self, *, table: CompressedTable, num_dense: int,
                 bottom: tuple[int, ...] = (64,), top: tuple[int, ...] = (128, 64)) -> None:
        super().__init__(table=table, num_dense=num_dense)
        self.bottom = mlp([num_dense, *bottom, self.dim], last_activation=True) if num_dense else None
        n = self.num_fields + (1 if num_dense else 0)
        iu = torch.triu_indices(n, n, offset=1)
        self.register_buffer("_pairs", iu[0] * n + iu[1], persistent=False)  # flat upper triangle
        width = n * (n - 1) // 2 + (self.dim if num_dense else 0)
        self.top = mlp([width, *top, 1])

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        emb = self.table(ids)                                   # [B, F, D]
        parts = []
        if self.bottom is not None:
            x = self.bottom(self.check_dense(dense))            # [B, D]
            emb = torch.cat([x.unsqueeze(1), emb], dim=1)
            parts.append(x)
        inter = torch.bmm(emb, emb.transpose(1, 2))            # [B, n, n]
        parts.append(inter.flatten(1).index_select(1, self._pairs))
        return self.top(torch.cat(parts, dim=1)).squeeze(1)
