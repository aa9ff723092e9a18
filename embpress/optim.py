"""Optimizers of the trainer: lazy (row-sparse) Adam with the arithmetic of ``torch.optim.SparseAdam``.

``torch.optim.SparseAdam`` coalesces each sparse gradient, then updates the moments through
sparse-dense additions and ``sparse_mask`` gathers; on CPU those cost several times the lookup
itself (most of a step of a hashed table at Criteo scale). :class:`RowSparseAdam` does the same
update with one ``unique`` over the row indices, one ``index_add_`` of the duplicate rows and
row gathers and scatters of the moments: the same operations in the same order on the touched
rows, so the parameters match SparseAdam's (up to the order in which duplicate rows of one
batch are summed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

COUNT_FACTOR = 8
"""Tables with at most this many rows per looked-up index find the touched rows by counting
(``bincount``, O(rows + lookups)) instead of sorting the indices (O(lookups log lookups))."""


def _unique_rows(index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(index, sorted=True, return_inverse=True)``, by counting for small tables."""
    if num_rows > COUNT_FACTOR * index.numel():
        return torch.unique(index, sorted=True, return_inverse=True)
    touched = torch.bincount(index, minlength=num_rows) > 0
    rows = touched.nonzero().squeeze(1)
    position = torch.cumsum(touched, 0) - 1
    return rows, position[index]


class RowSparseAdam(torch.optim.Optimizer):
    """Adam on the rows a sparse gradient touches (Kingma & Ba 2015; torch's SparseAdam semantics).

    Args:
        params: parameters that receive sparse COO gradients over their first dimension
            (``nn.Embedding(sparse=True)`` weights).
        lr, betas, eps: as in Adam. The step count is per parameter, as in SparseAdam.

    >>> w = torch.nn.Embedding(10, 2, sparse=True)
    >>> opt = RowSparseAdam(w.parameters(), lr=0.1)
    >>> w(torch.tensor([1, 1, 3])).sum().backward()
    >>> before = w.weight.detach().clone(); opt.step()
    >>> changed = (w.weight.detach() != before).any(1).nonzero().flatten().tolist(); changed
    [1, 3]
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"RowSparseAdam: need lr > 0, eps > 0 and betas in [0, 1), got lr={lr}, "
                             f"betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise ValueError("RowSparseAdam takes sparse gradients; use Adam for dense ones")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                index, values = grad._indices()[0], grad._values()
                if grad.is_coalesced():
                    rows, g = index, values
                else:
                    rows, inverse = _unique_rows(index, p.shape[0])
                    g = values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, inverse, values)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                old_avg, old_sq = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
                avg_update = g.sub(old_avg).mul_(1 - beta1)
                sq_update = g.pow(2).sub_(old_sq).mul_(1 - beta2)
                numer = avg_update.add_(old_avg)
                sq = sq_update.add_(old_sq)
                exp_avg.index_copy_(0, rows, numer)
                exp_avg_sq.index_copy_(0, rows, sq)
                denom = sq.sqrt().add_(eps)
                bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                step_size = lr * math.sqrt(bias2) / bias1
                p.index_add_(0, rows, numer.div_(denom).mul_(-step_size))
        return loss
