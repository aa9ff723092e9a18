"""Dedup: train a full table, then merge near-duplicate blocks of rows found with LSH (study's "Dedup")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    CompressedTable,
    Field,
    Stage,
    StageContext,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD

REMAP_BYTES = 4
"""One int32 per block: the index of the unique block that serves it."""

_WINDOW = 4
"""Within an LSH bucket, each block is paired with its next ``_WINDOW`` neighbours along a projection."""

_REPEAT_FRACTION = 0.05
"""A round that merges at least this fraction of the groups is repeated at the same bucket width."""

_PAIR_CHUNK = 1 << 18
"""Candidate pairs whose distances are computed at once."""


@register_table("dedup")
class DedupTable(CompressedTable):
    """Post-training merge of near-duplicate blocks of rows (the VLDB 2024 study's Dedup, arXiv:2311.15578).

    The study adapts Zhou et al., "Serving Deep Learning Models with Deduplication from Relational
    Databases" (VLDB 2022, arXiv:2201.10442). The concatenated table of all fields is cut into ``B = ceil(N / R)`` blocks of ``R`` consecutive
    rows (the study: blocks of 10,000 rows; ids are numbered by frequency, so a block holds ids of
    similar frequency). Stage ``train`` trains it as a full fp32 table (so training memory is the
    full table). Stage ``dedup`` (no epochs) hashes every block with L2 LSH (p-stable projections
    ``floor(a.x / r + u)``, ``lsh_tables`` tables of ``lsh_hashes`` concatenated hashes, as the
    study's ``L2LSH``), verifies candidate pairs within a bucket by exact L2 distance, and merges
    the closest pairs first (Boruvka steps of single linkage: each group's nearest candidate,
    shortest edges first; edges longer than ``r`` wait for a wider round), doubling the bucket
    width ``r`` until exactly ``M`` unique blocks remain, where ``M`` is the most the budget holds. The merge threshold is therefore set by
    the budget (``threshold_``: the largest L2 distance merged). A merged group is served by its
    most frequent block (the block with the highest summed training counts). Stage ``finetune``
    (``finetune_epochs``, 0 to skip) trains the unique blocks, shared by their groups, as the
    study's second stage does.

    Deviations from the study's code: blocks merge by nearest L2 distance under the budget
    instead of a fixed element-wise similarity (fraction of entries within ``fp=0.01``, at least
    ``sim=0.7``), since a fixed similarity cannot guarantee a budget; and the block size adapts
    to the budget by default.

    Serving bytes: ``M * R * D * 4`` (unique blocks, fp32) ``+ B * 4`` (int32 remap). Looking up
    global id ``g`` reads row ``remap[g // R] * R + g % R`` of the unique blocks.

    Args:
        block_rows: rows per block R; None picks the smallest power of two whose remap takes at
            most a quarter of the budget (R = 1 at D >= 16 and ratio <= 4).
        finetune_epochs: epochs of training after deduplication (0: none; None: trainer default).
        lsh_tables: LSH tables (bands); more finds more candidate pairs per round.
        lsh_hashes: concatenated hashes per table; more makes buckets stricter.
        lsh_seed: seed of the LSH projections.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``; unique blocks ``[M * R, D]``; remap ``[B]`` int32.

    >>> from embpress.tables import Ratio
    >>> t = DedupTable(fields=[Field("item", 1000)], dim=16, budget=Ratio(4))
    >>> t.block_rows_, t.num_blocks, t.unique_blocks, t.serving_bytes()
    (2, 500, 109, 15984)
    >>> t.deduplicate_()
    >>> t(torch.tensor([[0], [999]])).shape, t.weight.weight.shape
    (torch.Size([2, 1, 16]), torch.Size([218, 16]))
    """

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, block_rows: int | None = None,
                 finetune_epochs: int | None = 1, lsh_tables: int = 8, lsh_hashes: int = 4, lsh_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.block_rows = block_rows
        self.finetune_epochs = finetune_epochs
        self.lsh_tables = lsh_tables
        self.lsh_hashes = lsh_hashes
        self.lsh_seed = lsh_seed
        if block_rows is not None and (not isinstance(block_rows, int) or block_rows < 1):
            raise ValueError(f"dedup: block_rows must be a positive int or None, got {block_rows!r}")
        if finetune_epochs is not None and (not isinstance(finetune_epochs, int) or finetune_epochs < 0):
            raise ValueError(f"dedup: finetune_epochs must be an int >= 0 or None, got {finetune_epochs!r}")
        for name in ("lsh_tables", "lsh_hashes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"dedup: {name} must be a positive int, got {v!r}")

        self.reserve_metadata({"block_rows": 0}, ndims=3)  # shapes: blocks [M * R, D], remap [B]
        n = self.total_ids
        r = block_rows if block_rows is not None else self._auto_block_rows()
        b = math.ceil(n / r)
        block_bytes = r * dim * FP32_BYTES
        self.require_fit(b * REMAP_BYTES + block_bytes,
                         f"the int32 remap of {b:,} blocks of {r} rows plus one block")
        self.block_rows_ = r
        self.num_blocks = b
        self.unique_blocks = min(b, (self.array_budget - b * REMAP_BYTES) // block_bytes)
        self.threshold_: float | None = None
        # Before deduplication every block is its own unique block (remap = identity).
        self.weight = nn.Embedding(b * r, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.register_buffer("remap", torch.arange(b, dtype=torch.int32))

    def _auto_block_rows(self) -> int:
        """Smallest power of two R whose remap (``ceil(N / R)`` int32) is at most a quarter of the budget."""
        n, r = self.total_ids, 1
        while math.ceil(n / r) * REMAP_BYTES * 4 > self.array_budget and r < n:
            r *= 2
        return r

    @property
    def deduplicated(self) -> bool:
        """True once :meth:`deduplicate_` has reduced the table to its unique blocks."""
        return self.weight.num_embeddings == self.unique_blocks * self.block_rows_ < self.num_blocks * self.block_rows_

    # -- lookups ------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.global_ids(ids)
        r = self.block_rows_
        if r == 1:
            return self.weight(self.remap[g].long())
        blk = torch.div(g, r, rounding_mode="floor")
        return self.weight(self.remap[blk].long() * r + (g - blk * r))

    # -- deduplication ------------------------------------------------------------------------

    def _block_priority(self) -> np.ndarray:
        """Summed training counts of each block; the padded last block ranks below every full block."""
        counts = np.concatenate([f.frequencies() for f in self.fields]).astype(np.float64)
        pad = self.num_blocks * self.block_rows_ - self.total_ids
        counts = np.concatenate([counts, np.zeros(pad)])
        prio = counts.reshape(self.num_blocks, self.block_rows_).sum(1)
        if pad:
            prio[-1] = -1.0
        return prio

    def plan(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Deduplicate the current (not yet deduplicated) weights without changing the table.

        Returns ``(remap int32[B], kept int64[M], threshold)``: block ``b`` is served by unique block
        ``remap[b]``, which holds the current values of block ``kept[remap[b]]``; ``threshold`` is
        the largest L2 distance between merged blocks.
        """
        if self.deduplicated:
            raise RuntimeError("dedup: the table is already deduplicated")
        x = to_numpy(self.weight.weight).reshape(self.num_blocks, self.block_rows_ * self.dim)
        valid_last = (self.total_ids - (self.num_blocks - 1) * self.block_rows_) * self.dim
        return merge_blocks(x, self.unique_blocks, self._block_priority(), tables=self.lsh_tables,
                            hashes=self.lsh_hashes, seed=self.lsh_seed, valid_last=valid_last)

    def deduplicate_(self) -> None:
        """Replace the table by its ``unique_blocks`` unique blocks and the remap (no-op if done)."""
        if self.deduplicated or self.unique_blocks == self.num_blocks:
            return
        remap, kept, self.threshold_ = self.plan()
        r = self.block_rows_
        old = self.weight.weight.detach()
        rows = (torch.from_numpy(kept)[:, None] * r + torch.arange(r)).reshape(-1).to(old.device)
        self._resize(len(kept) * r)
        with torch.no_grad():
            self.weight.weight.copy_(old[rows])
            self.remap.copy_(torch.from_numpy(remap))

    def _resize(self, rows: int) -> None:
        if self.weight.num_embeddings != rows:
            old = self.weight.weight.data
            self.weight = nn.Embedding(rows, self.dim, sparse=True).to(device=old.device, dtype=old.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A deduplicated checkpoint has fewer rows than a fresh table: take its shape before loading.
        key = prefix + "weight.weight"
        if key in state_dict:
            self._resize(state_dict[key].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- contract -----------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        stages = [Stage("train"), Stage("dedup", epochs=0, before=self._dedup_hook)]
        if self.finetune_epochs != 0:
            stages.append(Stage("finetune", epochs=self.finetune_epochs))
        return stages

    def _dedup_hook(self, ctx: StageContext) -> None:
        self.deduplicate_()
        ctx.log(f"dedup: {self.num_blocks:,} blocks of {self.block_rows_} rows -> {self.unique_blocks:,} unique "
                f"(largest merged L2 distance {self.threshold_})")

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def array_bytes(self) -> int:
        return self.unique_blocks * self.block_rows_ * self.dim * FP32_BYTES + self.num_blocks * REMAP_BYTES

    def array_ndims(self) -> int:  # analytic: blocks [M * R, D] and remap [B] (building them plans)
        return 3

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """``blocks`` (fp32 ``[M * R, D]``, unique blocks) and ``remap`` (int32 ``[B]``).

        Before :meth:`deduplicate_` has run, this is what deduplicating the current weights would
        export (the table itself is unchanged).
        """
        if self.deduplicated or self.unique_blocks == self.num_blocks:
            return {"blocks": to_numpy(self.weight.weight), "remap": self.remap.cpu().numpy().astype(np.int32)}
        remap, kept, _ = self.plan()
        x = to_numpy(self.weight.weight).reshape(self.num_blocks, -1)
        return {"blocks": np.ascontiguousarray(x[kept].reshape(-1, self.dim)), "remap": remap}

    def serving_spec(self) -> dict[str, int]:
        return {"block_rows": int(self.block_rows_)}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_rows={self.block_rows_}, blocks={self.num_blocks}, "
                f"unique={self.unique_blocks}, deduplicated={self.deduplicated}")


def merge_blocks(x: np.ndarray, target: int, priority: np.ndarray, *, tables: int = 8, hashes: int = 4,
                 seed: int = 0, valid_last: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Merge the rows of ``x`` (``[B, W]`` blocks) into exactly ``target`` groups, closest pairs first.

    Candidate pairs share an L2-LSH bucket (``floor(x.a / r + u)``, ``a ~ N(0, I)``,
    ``u ~ U[0, 1)``) in one of ``tables`` tables of ``hashes`` hashes; within a bucket each block is
    paired with its ``_WINDOW`` next blocks along the bucket's projection sum. Each round gives every
    group its nearest candidate (by L2 distance, ties broken by index, so the edges form a forest)
    and accepts the shortest edges no longer than ``r`` until ``target`` groups remain (longer
    ones collided by chance and wait for a wider round); ``r`` starts at half the median
    nearest-neighbour distance of a sample and doubles whenever a round merges less than 5% of
    the groups and not enough. A group is served by its member of highest ``priority``
    (ties: lowest index). The last block compares only its first ``valid_last`` columns (padding).

    Returns ``(remap int32[B], kept int64[target], threshold)``: block ``b`` belongs to group
    ``remap[b]``, served by block ``kept[remap[b]]``; ``threshold`` is the largest merged distance.

    >>> x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], dtype=np.float32)
    >>> remap, kept, thr = merge_blocks(x, 3, np.array([4.0, 3.0, 2.0, 1.0]))
    >>> remap.tolist(), kept.tolist(), thr
    ([0, 0, 1, 2], [0, 2, 3], 0.0)
    """
    b, w = x.shape
    if not 1 <= target <= b:
        raise ValueError(f"merge_blocks: target must be in [1, {b}], got {target}")
    if not np.isfinite(x).all():
        raise ValueError("merge_blocks: the blocks hold non-finite values (NaN or inf); the table diverged")
    valid_last = w if valid_last is None else valid_last
    owner = np.arange(b)  # the block that currently serves each block
    alive = np.arange(b)  # blocks that serve a group
    threshold = 0.0
    if target < b:
        rng = np.random.default_rng(seed)
        proj = x @ rng.standard_normal((w, tables * hashes)).astype(np.float32)
        shift = rng.random(tables * hashes)
        width = _initial_width(x, rng)
        while len(alive) > target:
            need = len(alive) - target
            a, c, d = _candidate_edges(x, proj, alive, width, shift, tables, hashes, b - 1, valid_last)
            a, c, d = _nearest_forest(a, c, d, len(alive))
            # Longer edges than the bucket width were found by luck: defer them to a wider round,
            # so that merges happen roughly in order of distance.
            short = d <= width * width
            a, c, d = a[short], c[short], d[short]
            take = min(need, len(a))
            if take:
                a, c = a[:take], c[:take]  # the shortest first
                threshold = max(threshold, float(np.sqrt(d[take - 1])))
                n = len(alive)
                from scipy.sparse import coo_matrix  # here: scipy costs every process 20 MB
                from scipy.sparse.csgraph import connected_components

                graph = coo_matrix((np.ones(take), (a, c)), shape=(n, n))
                ncomp, label = connected_components(graph, directed=False)
                # The member of highest priority (then lowest index) serves each group.
                members = np.lexsort((alive, -priority[alive], label))
                first = np.ones(n, dtype=bool)
                first[1:] = label[members][1:] != label[members][:-1]
                server = np.empty(ncomp, dtype=np.int64)
                server[label[members][first]] = alive[members][first]
                new_owner = np.arange(b)
                new_owner[alive] = server[label]
                owner = new_owner[owner]
                alive = np.sort(server)
            if take < need and take < _REPEAT_FRACTION * (len(alive) + take):
                width *= 2.0
    kept = alive
    group = np.full(b, -1, dtype=np.int64)
    group[kept] = np.arange(len(kept))
    return group[owner].astype(np.int32), kept.astype(np.int64), threshold


def _initial_width(x: np.ndarray, rng: np.random.Generator) -> float:
    """Half the median distance from a sample of blocks to their nearest other block."""
    b = len(x)
    xs = x[rng.choice(b, size=min(b, 256), replace=False)].astype(np.float64)
    best = np.full(len(xs), np.inf)
    sq = (xs * xs).sum(1)
    step = max(1, (1 << 22) // x.shape[1])
    for s in range(0, b, step):
        xc = x[s:s + step].astype(np.float64)
        d = sq[:, None] + (xc * xc).sum(1)[None, :] - 2.0 * xs @ xc.T
        d[d <= 1e-12 * (sq[:, None] + 1e-30)] = np.inf  # the block itself and exact copies
        best = np.minimum(best, d.min(1))
    nn_dist = np.sqrt(best[np.isfinite(best) & (best > 0)])
    return float(np.median(nn_dist)) / 2 if len(nn_dist) else 1.0


def _candidate_edges(x, proj, alive, width, shift, tables, hashes, last, valid_last):
    """Pairs ``(a < c)`` of positions in ``alive`` that share an LSH bucket, sorted, with squared L2 distances."""
    n = len(alive)
    keys = np.floor(proj[alive] / width + shift).astype(np.int64).view(np.uint64)
    pairs = []
    for t in range(tables):
        # One bucket id per table from its `hashes` keys (a rare false collision only adds a pair to verify).
        bucket = np.zeros(n, dtype=np.uint64)
        for h in range(t * hashes, (t + 1) * hashes):
            bucket = bucket * np.uint64(0x9E3779B97F4A7C15) + keys[:, h]
        along = proj[alive, t * hashes:(t + 1) * hashes].sum(1)
        order = np.lexsort((along, bucket))
        sb = bucket[order]
        for off in range(1, min(_WINDOW, n - 1) + 1):
            same = sb[off:] == sb[:-off]
            pairs.append((order[:-off][same], order[off:][same]))
    if not pairs or not sum(len(p[0]) for p in pairs):  # no two blocks share a bucket
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    i = np.concatenate([p[0] for p in pairs]).astype(np.int64)
    j = np.concatenate([p[1] for p in pairs]).astype(np.int64)
    code = np.sort(np.minimum(i, j) * n + np.maximum(i, j))
    code = code[np.r_[True, code[1:] != code[:-1]]]
    a, c = code // n, code % n
    d = np.empty(len(code))
    for s in range(0, len(code), _PAIR_CHUNK):
        bi, bj = alive[a[s:s + _PAIR_CHUNK]], alive[c[s:s + _PAIR_CHUNK]]
        diff = x[bi] - x[bj]
        pad = (bi == last) | (bj == last)
        if valid_last < x.shape[1] and pad.any():
            diff[pad, valid_last:] = 0.0
        np.square(diff, out=diff)
        d[s:s + _PAIR_CHUNK] = diff.sum(1)
    return a, c, d


def _nearest_forest(a, c, d, n):
    """Each node's shortest incident edge under the total order ``(d, a, c)``; these edges form a forest.

    ``(a, c)`` must be sorted pairs with ``a < c``, in increasing ``(a, c)`` order. Returns the
    chosen edges once each, in increasing order.
    """
    if not len(a):
        return a, c, d
    rank = np.empty(len(d), dtype=np.int64)
    rank[np.argsort(d, kind="stable")] = np.arange(len(d))  # ties keep the (a, c) order
    best = np.full(n, len(d), dtype=np.int64)
    np.minimum.at(best, a, rank)
    np.minimum.at(best, c, rank)
    mark = np.zeros(len(d), dtype=bool)
    mark[best[best < len(d)]] = True
    chosen = np.flatnonzero(mark)  # ranks of the chosen edges, ascending, each once
    edge = np.empty(len(d), dtype=np.int64)
    edge[rank] = np.arange(len(d))
    e = edge[chosen]
    return a[e], c[e], d[e]
