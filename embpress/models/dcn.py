"""DCN-v2 (Wang et al. 2021, arXiv:2008.13535): full-rank cross network and a deep network in parallel."""

from __future__ import annotations

import torch
from torch import nn

from embpress.models.base import CTRModel, mlp, register_model
from embpress.tables.base import CompressedTable


class CrossLayer(nn.Module):
    """``x_{l+1} = x_0 * (W x_l + b) + x_l`` (DCN-v2, eq. 1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


@register_model("dcn")
class DCNv2(CTRModel):
    """Parallel DCN-v2 over ``x_0 = [flatten(embeddings), dense]``.

    Args:
        cross_layers: number of cross layers.
        deep: hidden sizes of the deep tower.
    """

    def __init__(self, *, table: CompressedTable, num_dense: int, cross_layers: int = 3,
                 deep: tuple[int, ...] = (256, 128)) -> None:
        super().__init__(table=table, num_dense=num_dense)
        width = self.num_fields * self.dim + num_dense
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(cross_layers))
        self.deep = mlp([width, *deep], last_activation=True)
        self.out = nn.Linear(width + deep[-1], 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        emb = self.table(ids).flatten(1)
        x0 = torch.cat([emb, self.check_dense(dense)], dim=1) if self.num_dense else emb
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.out(torch.cat([x, self.deep(x0)], dim=1)).squeeze(1)
