"""Data-parallel training under ``torchrun``: every process holds the whole model (compressed tables are
small enough to replicate), reads the same global batch, trains on its slice of it, and the
gradients are combined before each optimizer step so that every replica takes the same step.

The gradient of the global batch is the row-weighted sum of the slices' gradients; it is computed
exactly (up to the order of float additions), so 2 processes follow the 1-process run:

- dense gradients: one flat ``all_reduce`` (sum) of every parameter's gradient scaled by its
  slice's share of the batch, as DistributedDataParallel's buckets do;
- sparse (row) gradients, which gloo's sparse ``all_reduce`` handles and NCCL's does not: the
  touched rows and their values are ``all_gather``-ed (padded to the largest slice) and the
  optimiser (:class:`embpress.optim.RowSparseAdam`) sums duplicate rows as it does in one process.

Why not ``torch.nn.parallel.DistributedDataParallel`` around the model: DDP fixes its parameter
list and buckets when it wraps the model, but a table's stages replace, freeze and add parameters
between stages (supernets, pruning masks, retrain, post-training quantisation) and name their own
parameter groups, and our tables' sparse gradients come from ``F.embedding(..., sparse=True)`` on
plain parameters, which DDP does not know to expect sparse. The explicit reduction after
``backward`` works on whatever parameters a stage trains. Limits, in :data:`LIMITS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

LIMITS = (
    "evaluation is not split: every process evaluates the whole validation and test split (the same "
    "numbers on every process, so early stopping agrees); it costs each process a full pass",
    "every process reads the whole global batch and keeps its slice: data loading is not split",
    "work a stage does outside the trainer's step loop (its before/after hooks: searches, calibration, "
    "dedup merges, evolutionary search) runs on every process on the whole data, the same on each, "
    "so it is repeated, not parallel",
    "the trainer runs on CPU: gloo only; NCCL (a GPU per process) needs the model and batches on the "
    "device, which the trainer does not place",
    "a process whose loss becomes non-finite raises while the others wait in the next collective "
    "(they end at the process group's timeout)",
)
"""What does not work, or does not scale, in data-parallel training."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the process group: ``rank`` of ``world_size``."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> DataParallel | None:
        """The initialised default process group with more than one process, else None."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This process's contiguous slice of a global batch (slices differ by at most one row)."""
        return tuple(torch.tensor_split(t, self.world_size)[self.rank] for t in tensors)

    def sync_gradients(self, params: list[torch.nn.Parameter], local_rows: int, global_rows: int) -> None:
        """Make every ``param.grad`` the global batch's gradient, on every process.

        Each process's gradient is of a loss that is a mean over its ``local_rows`` rows (plus terms
        such as a regulariser, the same on every process); scaled by ``local_rows / global_rows`` and
        summed over processes it is the gradient of the mean over the ``global_rows`` rows. A
        parameter no process has a gradient for keeps ``grad=None`` (its optimiser skips it).

        Raises:
            ValueError: a parameter's gradient is sparse on one process and dense on another.
        """
        weight = local_rows / global_rows
        kinds = torch.tensor([0 if p.grad is None else (2 if p.grad.is_sparse else 1) for p in params],
                             dtype=torch.int64)
        seen = kinds.clone()
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        mixed = ((kinds != 0) & (kinds != seen)).nonzero().flatten().tolist()
        if mixed:
            raise ValueError(f"rank {self.rank}: parameters {mixed} have a dense gradient here and a sparse one "
                             "on another process; a parameter's gradient must have one layout everywhere")
        dense = [p for p, k in zip(params, seen.tolist(), strict=True) if k == 1]
        if dense:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense])
            flat.mul_(weight)
            dist.all_reduce(flat)
            at = 0
            for p in dense:
                n = p.numel()
                p.grad = flat[at:at + n].view_as(p).clone()
                at += n
        for p, k in zip(params, seen.tolist(), strict=True):
            if k == 2:
                p.grad = self._gather_rows(p, weight)

    def _gather_rows(self, p: torch.nn.Parameter, weight: float) -> torch.Tensor:
        """The sparse gradients of every process, concatenated (duplicate rows not summed)."""
        if p.grad is None:
            index = torch.empty(0, dtype=torch.int64)
            values = p.new_empty((0, *p.shape[1:]))
        else:
            g = p.grad
            index, values = g._indices()[0], g._values() * weight
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([index.numel()], dtype=torch.int64))
        counts = [int(s) for s in sizes]
        width = max(counts)
        pad_index = torch.zeros(width, dtype=torch.int64)
        pad_index[:index.numel()] = index
        pad_values = values.new_zeros((width, *values.shape[1:]))
        pad_values[:len(values)] = values
        indices = [torch.empty_like(pad_index) for _ in range(self.world_size)]
        vals = [torch.empty_like(pad_values) for _ in range(self.world_size)]
        dist.all_gather(indices, pad_index)
        dist.all_gather(vals, pad_values.contiguous())
        index = torch.cat([i[:c] for i, c in zip(indices, counts, strict=True)])
        values = torch.cat([v[:c] for v, c in zip(vals, counts, strict=True)])
        return torch.sparse_coo_tensor(index.unsqueeze(0), values, p.shape, check_invariants=False)


def init_from_env(backend: str = "gloo") -> DataParallel | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment), else None.

    Raises:
        ValueError: a backend other than gloo (the trainer runs on CPU).
    """
    if backend != "gloo":
        raise ValueError(f"backend {backend!r}: the trainer runs on CPU, where only gloo applies")
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DataParallel.current()
