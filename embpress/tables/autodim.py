"""AutoDim: a per-field embedding dimension searched by differentiable architecture weights, then
retrained from scratch (Zhao et al., WWW 2021, arXiv:2002.11252)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    Stage,
    StageContext,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD


def default_candidates(dim: int) -> list[int]:
    """Powers of two below ``dim``, then ``dim`` itself: ``[1, 2, 4, 8]`` for ``dim = 8``.

    >>> default_candidates(16), default_candidates(12)
    ([1, 2, 4, 8, 16], [1, 2, 4, 8, 12])
    """
    out, c = [], 1
    while c < dim:
        out.append(c)
        c *= 2
    return [*out, dim]


class _Supernet(nn.Module):
    """Every candidate dim of every field, computed at once.

    Candidate ``c`` owns columns ``[s_c, s_c + c)`` of one row table ``[N, S]`` (``S = sum c``) and
    rows ``[s_c, s_c + c)`` of the per-field projections ``[F, S, D]``; a block-diagonal mask keeps
    candidates apart, so one lookup and one contraction give every candidate's ``[N, F, C, D]``.
    """

    def __init__(self, total_ids: int, num_fields: int, dim: int, candidates: Sequence[int]) -> None:
        super().__init__()
        c = torch.tensor(list(candidates))
        starts = torch.cumsum(c, 0) - c
        self.slices = [(int(a), int(a + b)) for a, b in zip(starts, c, strict=True)]
        width = int(c.sum())
        self.emb = nn.Embedding(total_ids, width, sparse=True)
        nn.init.normal_(self.emb.weight, std=INIT_STD)
        w = torch.empty(num_fields, width, dim)
        for a, b in self.slices:  # xavier-uniform per field and candidate
            bound = float(np.sqrt(6.0 / (b - a + dim)))
            w[:, a:b].uniform_(-bound, bound)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(num_fields, len(self.slices), dim))
        owner = torch.repeat_interleave(torch.arange(len(self.slices)), c)
        self.register_buffer("block", (owner[:, None] == torch.arange(len(self.slices))).float(), persistent=False)
        # Batch normalization without affine parameters per (field, candidate, channel).
        self.register_buffer("bn_mean", torch.zeros(num_fields * len(self.slices) * dim))
        self.register_buffer("bn_var", torch.ones(num_fields * len(self.slices) * dim))

    def forward(self, g: torch.Tensor, bn_training: bool) -> torch.Tensor:
        """Global ids ``g [N, F]`` -> ``BN(E_c[g] W_{f,c} + b_{f,c})`` for every candidate, ``[N, F, C, D]``."""
        x = self.emb(g)  # [N, F, S]
        w = self.weight.unsqueeze(2) * self.block[None, :, :, None]  # [F, S, C, D], block diagonal
        y = torch.einsum("nfs,fscd->nfcd", x, w) + self.bias
        shape = y.shape
        y = F.batch_norm(y.reshape(shape[0], -1), self.bn_mean, self.bn_var, training=bn_training,
                         momentum=0.1, eps=1e-5)
        return y.reshape(shape)


@register_table("autodim")
class AutoDimTable(CompressedTable):
    """AutoDim (Zhao et al., WWW 2021, arXiv:2002.11252; the VLDB 2024 study's
    ``AutoDimEmbedding`` / ``AutoDimRetrainEmbedding``).

    Stage ``search`` (bilevel) trains a supernet: every field ``f`` has one row table per candidate
    dim ``c``, each projected to ``D`` by a per-field linear map and batch-normalized,
    then mixed by Gumbel-softmax weights of per-field architecture logits ``alpha [F, C]``
    with temperature ``max(min_temperature, 1 - temperature_decay * t)`` (``t`` counts training
    forwards). The trainer updates ``alpha`` on validation batches (first-order DARTS). Stage
    ``retrain`` (``reset_head=True``) builds each field at its chosen dim ``d_f`` with a fresh
    ``[n_f, d_f]`` table and a linear map ``d_f -> D`` with bias, initialised from scratch.

    Choice under the budget (:meth:`plan_dims`): each field's argmax candidate; while the result
    exceeds the budget, the field whose step down to its next smaller candidate loses the least
    softmax weight per byte saved is stepped down. The supernet itself is training memory and is
    not budgeted; until the search ends, :meth:`serving_bytes` / :meth:`serving_state` describe
    what would be served if the current choice were taken (that field's candidate rows, map, bias).

    Args:
        candidates: candidate dims (default: 1, 2, 4, ... below ``D``, and ``D``; the study starts
            at 2, 1 is added so that 4x fits at small ``D``).
        search_epochs: epochs of the search stage (None: the trainer's default).
        retrain_epochs: epochs of the retrain stage (None: the trainer's default).
        gumbel: add Gumbel noise to the architecture logits in training (False: plain softmax).
        temperature_decay: temperature decrease per training forward.
        min_temperature: temperature floor.
        seed: seed of the Gumbel noise.

    Serving bytes: ``4 * sum_f (n_f d_f + d_f D + D)`` (rows, map and bias of every field).

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``; field ``f``: rows ``[n_f, d_f]``, map ``[d_f, D]``, bias ``[D]``.

    >>> from embpress.tables import Ratio
    >>> t = AutoDimTable(fields=[Field("a", 10), Field("b", 1000)], dim=8, budget=Ratio(4))
    >>> t.candidates_, t.plan_dims(), [s.name for s in t.stages()]
    ([1, 2, 4, 8], [1, 1], ['search', 'retrain'])
    >>> t.finalize_()
    >>> t.final_dims.tolist(), t(torch.tensor([[3, 999]])).shape
    ([1, 1], torch.Size([1, 2, 8]))
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None,
                 candidates: Sequence[int] | None = None, search_epochs: int | None = 1,
                 retrain_epochs: int | None = None, gumbel: bool = True, temperature_decay: float = 2.5e-5,
                 min_temperature: float = 0.01, seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.candidates = candidates
        self.search_epochs = search_epochs
        self.retrain_epochs = retrain_epochs
        self.gumbel = gumbel
        self.temperature_decay = temperature_decay
        self.min_temperature = min_temperature
        self.seed = seed
        cands = default_candidates(dim) if candidates is None else sorted(set(candidates))
        if not cands or not all(isinstance(c, int | np.integer) and 1 <= c <= dim for c in cands):
            raise ValueError(f"autodim: candidates must be ints in [1, dim={dim}], got {candidates!r}")
        for name in ("search_epochs", "retrain_epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"autodim: {name} must be an int >= 0 or None, got {v!r}")
        if not (0 < min_temperature <= 1) or temperature_decay < 0:
            raise ValueError(f"autodim: need 0 < min_temperature <= 1 and temperature_decay >= 0, got "
                             f"{min_temperature!r}, {temperature_decay!r}")
        self.candidates_ = [int(c) for c in cands]
        n = np.array([f.num_embeddings for f in self.fields], dtype=np.int64)[:, None]
        c = np.array(self.candidates_, dtype=np.int64)[None, :]
        self._field_bytes = FP32_BYTES * (n * c + c * dim + dim)  # [F, C]
        self.reserve_metadata({}, ndims=5 * self.num_fields)  # shapes: per field weight, proj [d, D], bias
        self.require_fit(int(self._field_bytes[:, 0].sum()),
                         f"every field at the smallest candidate dim {self.candidates_[0]} (rows, map and bias)")

        self.supernet: _Supernet | None = _Supernet(self.total_ids, self.num_fields, dim, self.candidates_)
        self.alpha = nn.Parameter(torch.zeros(self.num_fields, len(self.candidates_)))
        self.final_emb: nn.ModuleList | None = None
        self.final_proj: nn.ModuleList | None = None
        self.register_buffer("final_dims", torch.zeros(self.num_fields, dtype=torch.long))
        self._gen = torch.Generator().manual_seed(seed)
        self._forwards = 0

    # -- architecture -------------------------------------------------------------------------

    @property
    def finalized(self) -> bool:
        return self.final_emb is not None

    def temperature(self) -> float:
        return max(self.min_temperature, 1.0 - self.temperature_decay * self._forwards)

    def mixing_weights(self) -> torch.Tensor:
        """Per-field weights of the candidates ``[F, C]``: Gumbel-softmax in training, softmax otherwise."""
        tau = self.temperature()
        logits = torch.log_softmax(self.alpha, dim=1)
        if self.training and torch.is_grad_enabled():
            self._forwards += 1
            if self.gumbel:
                u = torch.rand(self.alpha.shape, generator=self._gen).clamp_(1e-10, 1 - 1e-7)
                logits = logits - torch.log(-torch.log(u))
        return torch.softmax(logits / tau, dim=1)

    def plan_dims(self) -> list[int]:
        """Each field's argmax candidate, stepped down greedily (least weight lost per byte) to fit the budget."""
        p = torch.softmax(self.alpha.detach(), dim=1).numpy().astype(np.float64)
        choice = p.argmax(1)
        cost = self._field_bytes
        rows = np.arange(self.num_fields)
        while not self.fits(int(cost[rows, choice].sum())):
            movable = np.flatnonzero(choice > 0)
            if not len(movable):  # unreachable: the constructor checked the smallest candidates fit
                raise BudgetError(f"autodim: the smallest candidates do not fit {self.max_bytes:,} bytes")
            loss = p[movable, choice[movable]] - p[movable, choice[movable] - 1]
            saved = cost[movable, choice[movable]] - cost[movable, choice[movable] - 1]
            f = movable[np.argmin(loss / saved)]
            choice[f] -= 1
        return [self.candidates_[int(i)] for i in choice]

    def _build_final(self, dims: Sequence[int]) -> None:
        self.final_emb = nn.ModuleList()
        self.final_proj = nn.ModuleList()
        for f, d in zip(self.fields, dims, strict=True):
            e = nn.Embedding(f.num_embeddings, int(d), sparse=True)
            nn.init.normal_(e.weight, std=INIT_STD)
            lin = nn.Linear(int(d), self.dim)
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.final_emb.append(e)
            self.final_proj.append(lin)
        self.final_dims.copy_(torch.tensor([int(d) for d in dims]))
        self.supernet = None
        self.alpha.requires_grad_(False)

    def finalize_(self) -> None:
        """Fix the dims (:meth:`plan_dims`) and replace the supernet by fresh per-field tables (no-op if done)."""
        if not self.finalized:
            self._build_final(self.plan_dims())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A retrained checkpoint holds per-field tables instead of the supernet: take its structure first.
        dims = state_dict.get(prefix + "final_dims")
        if dims is not None and int(dims.min()) > 0 and not self.finalized:
            self._build_final(dims.tolist())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- lookups ------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.finalized:
            return torch.stack([self.final_proj[j](self.final_emb[j](ids[:, j])) for j in range(self.num_fields)],
                               dim=1)
        g = self.global_ids(ids)
        bn_training = self.training and g.shape[0] > 1
        return torch.einsum("nfcd,fc->nfd", self.supernet(g, bn_training), self.mixing_weights())

    # -- stages -------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        return [Stage("search", epochs=self.search_epochs, bilevel=True, after=self._search_done),
                Stage("retrain", epochs=self.retrain_epochs, reset_head=True, before=self._retrain_start)]

    def _search_done(self, ctx: StageContext) -> None:
        p = torch.softmax(self.alpha.detach(), dim=1)
        ctx.log(f"autodim: argmax dims {[self.candidates_[int(i)] for i in p.argmax(1)]}, "
                f"within budget {self.plan_dims()}")

    def _retrain_start(self, ctx: StageContext) -> None:
        self.finalize_()
        ctx.log(f"autodim: retraining with dims {self.final_dims.tolist()}, {self.serving_bytes():,} serving bytes")

    def arch_parameters(self) -> list[nn.Parameter]:
        return [] if self.finalized else [self.alpha]

    def sparse_parameters(self) -> list[nn.Parameter]:
        if self.finalized:
            return [e.weight for e in self.final_emb]
        return [self.supernet.emb.weight]

    # -- contract -----------------------------------------------------------------------------

    def _dims(self) -> list[int]:
        return self.final_dims.tolist() if self.finalized else self.plan_dims()

    def array_bytes(self) -> int:
        idx = [self.candidates_.index(d) for d in self._dims()]
        return int(self._field_bytes[np.arange(self.num_fields), idx].sum())

    def serving_arrays(self) -> dict[str, np.ndarray]:
        state = {}
        for j, (f, d) in enumerate(zip(self.fields, self._dims(), strict=True)):
            if self.finalized:
                rows, proj, bias = self.final_emb[j].weight, self.final_proj[j].weight.T, self.final_proj[j].bias
            else:
                i = self.candidates_.index(d)
                a, b = self.supernet.slices[i]
                lo = int(self._offsets[j])
                rows = self.supernet.emb.weight[lo:lo + f.num_embeddings, a:b]
                proj, bias = self.supernet.weight[j, a:b], self.supernet.bias[j, i]
            state[f"{f.name}.weight"] = to_numpy(rows)
            state[f"{f.name}.proj"] = to_numpy(proj)
            state[f"{f.name}.bias"] = to_numpy(bias)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, candidates={self.candidates_}, dims={self._dims()}"
