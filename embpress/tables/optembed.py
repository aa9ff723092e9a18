"""OptEmbed: learned per-field row-pruning thresholds, a dimension supernet, evolutionary search of one
dimension per field, and lottery-ticket retraining (Lyu et al., CIKM 2022, arXiv:2208.04482)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    CompressedTable,
    Field,
    ParamGroup,
    Stage,
    StageContext,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD

WORD_BITS = 64
BITMAP_WORD_BYTES = 8
"""The kept-row bitmap: one uint64 word per 64 ids."""
RANK_BYTES = 4
"""The rank index: one int32 per word, the number of kept ids before it."""

SUPERNET, SEARCH, RETRAIN = 0, 1, 2


class BinaryStep(torch.autograd.Function):
    """``x > 0`` as 0/1, with OptEmbed's straight-through gradient (reference ``models/layer.py``):
    ``2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` for ``0.4 < |x| <= 1``, 0 beyond."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        a = x.abs()
        slope = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return grad * slope


def evolve(evaluate: Callable[[np.ndarray], float], *, num_fields: int, dim: int, fits: Callable[[np.ndarray], bool],
           rng: np.random.Generator, iterations: int = 30, keep_num: int = 15, mutation_num: int = 10,
           crossover_num: int = 10, mutation_prob: float = 0.1, max_tries: int = 10) -> tuple[np.ndarray, float]:
    """OptEmbed's evolutionary search of one dim per field (arXiv:2208.04482; reference ``evolution.py``).

    A population of ``keep_num + mutation_num + crossover_num`` random candidates (dims uniform in
    ``1..dim``; one over budget has a random field halved until it ``fits``) is scored with
    ``evaluate``; each iteration keeps the ``keep_num`` best, mutates each of the ``mutation_num``
    best (each field redrawn with ``mutation_prob``) and crosses pairs among the ``crossover_num + 1``
    best at one point. Children that do not ``fits`` are discarded (redrawn up to ``max_tries``
    times). Scores are cached per candidate. Returns the best candidate seen and its score.

    >>> best, score = evolve(lambda c: -abs(c - 3).sum(), num_fields=4, dim=8, fits=lambda c: c.sum() <= 20,
    ...                      rng=np.random.default_rng(0), iterations=10)
    >>> best.tolist(), score
    ([3, 3, 3, 3], 0.0)
    """
    cache: dict[tuple[int, ...], float] = {}

    def score(c: np.ndarray) -> float:
        key = tuple(int(v) for v in c)
        if key not in cache:
            cache[key] = float(evaluate(c))
        return cache[key]

    def random_candidate() -> np.ndarray:
        c = rng.integers(1, dim + 1, size=num_fields)
        while not fits(c):
            big = np.flatnonzero(c > 1)
            if not len(big):
                break
            f = big[rng.integers(len(big))]
            c[f] = (c[f] + 1) // 2
        return c

    pop = [random_candidate() for _ in range(keep_num + mutation_num + crossover_num)]
    best, best_score = pop[0], -math.inf
    for _ in range(iterations):
        scores = [score(c) for c in pop]
        order = np.argsort(-np.asarray(scores), kind="stable")
        pop = [pop[i] for i in order]
        if scores[order[0]] > best_score:
            best, best_score = pop[0].copy(), scores[order[0]]
        children = []
        for i in range(min(mutation_num, len(pop))):
            for _ in range(max_tries):
                c = pop[i].copy()
                redraw = rng.random(num_fields) < mutation_prob
                c[redraw] = rng.integers(1, dim + 1, size=int(redraw.sum()))
                if fits(c):
                    children.append(c)
                    break
        parents = min(crossover_num + 1, len(pop))
        for _ in range(crossover_num if num_fields > 1 and parents > 1 else 0):
            for _ in range(max_tries):
                x, y = rng.choice(parents, size=2, replace=False)
                point = int(rng.integers(1, num_fields))
                c = np.concatenate([pop[x][:point], pop[y][point:]])
                if fits(c):
                    children.append(c)
                    break
        pop = (pop[:keep_num] + children) or pop[:1]  # keep_num 0 and no child fits: the best goes on
    return best, best_score


@register_table("optembed")
class OptEmbedTable(CompressedTable):
    """OptEmbed (Lyu et al., CIKM 2022, arXiv:2208.04482; reference github.com/fuyuanlyu/OptEmbed
    and the VLDB 2024 study's ``OptEmbedding``).

    1. Stage ``supernet``: a full ``[N, D]`` table whose row ``e`` of field ``f`` is served as
       ``e * BinaryStep(||e||_1 - t_f)`` (:class:`BinaryStep`'s straight-through gradient), with a
       learned threshold ``t_f`` per field (init 0), and in training a random dimension prefix mask
       per sample and field (dim uniform in ``1..D``). The loss adds
       ``alpha * sum_f exp(-t_f)`` (:meth:`regularizer`). The thresholds are trained by their own
       plain SGD at ``threshold_lr`` (a stage parameter group; reference ``utils/train_help.py``
       ``get_optimizer``: SGD at ``t_lr`` = 3e-4; the study uses 1e-4), the rest by the trainer's
       optimisers, so the rows pruned follow ``alpha``, not the number of Adam steps. Afterwards the rows with
       ``||e||_1 > t_f`` are kept; if they exceed the budget at dim 1, the rows with the smallest
       margin ``||e||_1 - t_f`` are pruned as well until they fit (this is the only budget step the
       paper lacks: its thresholds set the row count alone).
    2. Stage ``search`` (no training): :func:`evolve` on validation AUC (``ctx.evaluate()``) picks one
       dim per field; candidates whose kept rows at those dims break the budget are discarded.
    3. Stage ``retrain`` (``reset_head=True``): the kept rows restart from their initial values in
       the supernet (the paper's lottery-ticket retraining, re-drawn from the saved RNG state) and
       are trained with the found row mask and dims. Pruned ids read a zero vector.

    Until each step runs, :meth:`serving_bytes` / :meth:`serving_state` describe the table that
    would be served now: current threshold mask (cut to fit), and the largest uniform dim that fits.

    Args:
        alpha: weight of the threshold regularizer ``sum_f exp(-t_f)``.
        threshold_lr: learning rate of the thresholds' plain SGD (reference default 3e-4).
        supernet_epochs: epochs of the supernet stage (default 1, CTR models peak within an epoch;
            None: the trainer's default).
        retrain_epochs: epochs of the retrain stage (None: the trainer's default).
        search_iterations: iterations of the evolutionary search.
        keep_num, mutation_num, crossover_num, mutation_prob: evolutionary search settings (the
            reference's defaults: ``keep_num`` 0, so each generation is the 10 mutations and 10
            crossovers of the last one's best; the best candidate seen is kept aside).
        seed: seed of the dimension masks and of the search.

    Serving state: ``{field}.weight [kept_f, d_f]`` fp32 per field; ``keep_bits`` uint64
    ``[ceil(N / 64)]`` (bit ``g % 64`` of word ``g // 64`` set when global id ``g`` is kept) and
    ``keep_rank`` int32 (kept ids before each word): a kept id's row is
    ``rank[w] + popcount(bits[w] & (2^(g % 64) - 1))`` minus the kept ids of earlier fields.
    Serving bytes: ``4 * sum_f kept_f d_f + 12 * ceil(N / 64)``.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``.

    >>> from embpress.tables import Ratio
    >>> t = OptEmbedTable(fields=[Field("a", 10), Field("b", 1000)], dim=8, budget=Ratio(4))
    >>> [s.name for s in t.stages()], t.plan()[1].tolist()
    (['supernet', 'search', 'retrain'], [1, 1])
    >>> t.prune_rows_()
    >>> int(t.row_keep.sum()), t.serving_bytes() <= t.full_bytes / 4
    (1010, True)
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, alpha: float = 3e-4,
                 threshold_lr: float = 3e-4, supernet_epochs: int | None = 1, retrain_epochs: int | None = None,
                 search_iterations: int = 30, keep_num: int = 0, mutation_num: int = 10, crossover_num: int = 10,
                 mutation_prob: float = 0.1, seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.alpha = alpha
        self.threshold_lr = threshold_lr
        self.supernet_epochs = supernet_epochs
        self.retrain_epochs = retrain_epochs
        self.search_iterations = search_iterations
        self.keep_num = keep_num
        self.mutation_num = mutation_num
        self.crossover_num = crossover_num
        self.mutation_prob = mutation_prob
        self.seed = seed
        if not (isinstance(alpha, int | float) and alpha >= 0):
            raise ValueError(f"optembed: alpha must be a number >= 0, got {alpha!r}")
        if not (isinstance(threshold_lr, int | float) and threshold_lr > 0):
            raise ValueError(f"optembed: threshold_lr must be a positive number, got {threshold_lr!r}")
        for name in ("supernet_epochs", "retrain_epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"optembed: {name} must be an int >= 0 or None, got {v!r}")
        for name in ("search_iterations", "keep_num", "mutation_num", "crossover_num"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"optembed: {name} must be an int >= 0, got {v!r}")
        if keep_num + mutation_num + crossover_num < 1:
            raise ValueError("optembed: keep_num + mutation_num + crossover_num must be >= 1 (the population)")
        if not 0 < mutation_prob <= 1:
            raise ValueError(f"optembed: mutation_prob must be in (0, 1], got {mutation_prob!r}")

        self.num_words = -(-self.total_ids // WORD_BITS)
        self._overhead = self.num_words * (BITMAP_WORD_BYTES + RANK_BYTES)
        self.reserve_metadata({}, ndims=2 * self.num_fields + 2)  # shapes: weights [kept, d], keep_bits, keep_rank
        self.require_fit(self._overhead + FP32_BYTES * self.num_fields,
                         f"the kept-row bitmap and rank index of {self.total_ids:,} ids plus one row of "
                         f"dim 1 per field")

        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        self._init_rng = torch.get_rng_state()  # the retrain stage re-draws these initial rows
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        self.threshold = nn.Parameter(torch.zeros(self.num_fields))
        field_of = torch.repeat_interleave(torch.arange(self.num_fields), self._sizes)
        self.register_buffer("field_of", field_of, persistent=False)
        self.register_buffer("row_keep", torch.ones(self.total_ids, dtype=torch.bool))
        self.register_buffer("field_dims", torch.full((self.num_fields,), dim, dtype=torch.long))
        self.register_buffer("stage", torch.tensor(SUPERNET))
        self.register_buffer("remap", torch.arange(self.total_ids), persistent=False)
        self._gen = torch.Generator().manual_seed(seed)

    # -- budget -------------------------------------------------------------------------------

    def _bytes(self, kept: np.ndarray, dims: np.ndarray) -> int:
        return int(FP32_BYTES * (kept * dims).sum()) + self._overhead

    def _fit_rows(self, keep: np.ndarray, margin: np.ndarray) -> np.ndarray:
        """Drop the kept rows of smallest margin until the rest fit at dim 1."""
        room = (self.array_budget - self._overhead) // FP32_BYTES
        if keep.sum() <= room:
            return keep
        idx = np.flatnonzero(keep)
        order = idx[np.argsort(-margin[idx], kind="stable")]
        out = np.zeros_like(keep)
        out[order[:room]] = True
        return out

    def _kept_per_field(self, keep: np.ndarray) -> np.ndarray:
        return np.add.reduceat(keep.astype(np.int64), self._offsets.numpy())

    def _uniform_dims(self, kept: np.ndarray) -> np.ndarray:
        d = max(d for d in range(1, self.dim + 1) if self.fits(self._bytes(kept, np.full(self.num_fields, d))))
        return np.full(self.num_fields, d, dtype=np.int64)

    @torch.no_grad()
    def _threshold_plan(self) -> np.ndarray:
        margin = (self.weight.weight.abs().sum(1) - self.threshold[self.field_of]).numpy()
        return self._fit_rows(margin > 0, margin)

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """``(row_keep bool[N], dims int[F])`` that would be served if the method stopped now."""
        if int(self.stage) == SUPERNET:
            keep = self._threshold_plan()
            return keep, self._uniform_dims(self._kept_per_field(keep))
        return self.row_keep.numpy(), self.field_dims.numpy()

    # -- steps --------------------------------------------------------------------------------

    @torch.no_grad()
    def prune_rows_(self) -> None:
        """End of the supernet: fix the kept rows (threshold mask, cut to the budget) and freeze ``t_f``."""
        if int(self.stage) != SUPERNET:
            return
        keep, dims = self.plan()
        self.row_keep.copy_(torch.from_numpy(keep))
        self.field_dims.copy_(torch.from_numpy(dims))
        self.threshold.requires_grad_(False)
        self.stage.fill_(SEARCH)

    def candidate_fits(self, dims: np.ndarray) -> bool:
        return self.fits(self._bytes(self._kept_per_field(self.row_keep.numpy()), np.asarray(dims)))

    def search_dims_(self, evaluate: Callable[[], float]) -> float:
        """Evolutionary search of one dim per field with ``evaluate()`` (validation AUC); sets ``field_dims``."""
        self.prune_rows_()

        def score(dims: np.ndarray) -> float:
            self.field_dims.copy_(torch.from_numpy(np.asarray(dims, dtype=np.int64)))
            return evaluate()

        best, auc = evolve(score, num_fields=self.num_fields, dim=self.dim, fits=self.candidate_fits,
                           rng=np.random.default_rng(self.seed), iterations=self.search_iterations,
                           keep_num=self.keep_num, mutation_num=self.mutation_num,
                           crossover_num=self.crossover_num, mutation_prob=self.mutation_prob)
        if self.search_iterations == 0:
            best = self.field_dims.numpy().copy()
        self.field_dims.copy_(torch.from_numpy(np.asarray(best, dtype=np.int64)))
        return auc

    @torch.no_grad()
    def start_retrain_(self) -> None:
        """Keep only the kept rows, restarted from their initial supernet values (no-op if done)."""
        if int(self.stage) == RETRAIN:
            return
        self.prune_rows_()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._init_rng)
            init = torch.empty(self.total_ids, self.dim).normal_(0, INIT_STD)
        rows = init[self.row_keep]
        self._resize(max(1, rows.shape[0]))
        self.weight.weight.zero_()
        self.weight.weight[: rows.shape[0]].copy_(rows)
        self.stage.fill_(RETRAIN)
        self._update_remap()

    def _resize(self, rows: int) -> None:
        if self.weight.num_embeddings != rows:
            self.weight = nn.Embedding(rows, self.dim, sparse=True)

    def _update_remap(self) -> None:
        self.remap.copy_((torch.cumsum(self.row_keep.long(), 0) - 1).clamp_(min=0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stage = state_dict.get(prefix + "stage")
        if stage is not None and int(stage) == RETRAIN:
            self._resize(state_dict[prefix + "weight.weight"].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.threshold.requires_grad_(int(self.stage) == SUPERNET)
        self._update_remap()

    # -- lookups ------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.global_ids(ids)
        stage = int(self.stage)
        if stage == SUPERNET:
            e = self.weight(g)
            e = e * BinaryStep.apply(e.abs().sum(-1) - self.threshold).unsqueeze(-1)
            if self.training:
                d = torch.randint(1, self.dim + 1, g.shape, generator=self._gen)
                e = e * (torch.arange(self.dim) < d.unsqueeze(-1))
            return e
        e = self.weight(self.remap[g] if stage == RETRAIN else g)
        dim_mask = torch.arange(self.dim) < self.field_dims.unsqueeze(-1)  # [F, D]
        return e * (self.row_keep[g].unsqueeze(-1) & dim_mask)

    # -- stages -------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        return [Stage("supernet", epochs=self.supernet_epochs, after=self._supernet_done,
                      groups=lambda: [ParamGroup("threshold", [self.threshold], optimizer="sgd",
                                                 lr=self.threshold_lr)]),
                Stage("search", epochs=0, before=self._search),
                Stage("retrain", epochs=self.retrain_epochs, reset_head=True, before=self._retrain_start)]

    def _supernet_done(self, ctx: StageContext) -> None:
        self.prune_rows_()
        kept = self._kept_per_field(self.row_keep.numpy())
        ctx.log(f"optembed: thresholds {self.threshold.tolist()}, kept rows per field {kept.tolist()}")

    def _search(self, ctx: StageContext) -> None:
        auc = self.search_dims_(ctx.evaluate)
        ctx.log(f"optembed: searched dims {self.field_dims.tolist()} (valid AUC {auc:.4f})")

    def _retrain_start(self, ctx: StageContext) -> None:
        self.start_retrain_()
        ctx.log(f"optembed: retraining {int(self.row_keep.sum()):,} rows, {self.serving_bytes():,} serving bytes")

    def regularizer(self) -> torch.Tensor | None:
        if int(self.stage) != SUPERNET or self.alpha == 0:
            return None
        return self.alpha * torch.exp(-self.threshold).sum()

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    # -- contract -----------------------------------------------------------------------------

    def array_bytes(self) -> int:
        keep, dims = self.plan()
        return self._bytes(self._kept_per_field(keep), dims)

    def serving_arrays(self) -> dict[str, np.ndarray]:
        keep, dims = self.plan()
        w = to_numpy(self.weight.weight)
        rows = w[self.remap.numpy()[keep]] if int(self.stage) == RETRAIN else w[keep]
        state, start = {}, 0
        for f, k, d in zip(self.fields, self._kept_per_field(keep), dims, strict=True):
            state[f"{f.name}.weight"] = np.ascontiguousarray(rows[start:start + k, :d])
            start += k
        bits = np.zeros(self.num_words * WORD_BITS, dtype=bool)
        bits[: self.total_ids] = keep
        words = np.packbits(bits, bitorder="little").view("<u8")
        per_word = bits.reshape(self.num_words, WORD_BITS).sum(1)
        state["keep_bits"] = words
        state["keep_rank"] = (np.cumsum(per_word) - per_word).astype(np.int32)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stage={int(self.stage)}, dims={self.plan()[1].tolist()}"
