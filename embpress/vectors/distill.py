"""PQ / OPQ codebooks learned for retrieval: ``dvq{M}[x{nbits}]`` and ``dopq{M}[x{nbits}]``.

Distill-VQ: Xiao et al., "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling
Knowledge from Dense Embeddings", SIGIR 2022, https://arxiv.org/abs/2204.00185 (Sec. 3: the
quantized scores of a query's candidates are trained to reproduce the float scores; the listwise
KL divergence over the float top-k plus sampled documents works best, and it needs no labels).
JPQ: Zhan et al., "Jointly Optimizing Query Encoder and Product Quantization to Improve Retrieval
Performance", CIKM 2021, https://arxiv.org/abs/2108.00644 (Sec. 4: PQ centroids trained with a
ranking loss on labelled pairs against hard negatives retrieved from the compressed index).

Training starts from FAISS's PQ (``dvq``) or OPQ (``dopq``) and makes the codebooks (and, for
``dopq``, the rotation) torch parameters. A document's sub-vector takes the softmax over its
distances to the centroids as a soft assignment; the forward pass uses the hard (nearest) centroid
and the gradient flows through the soft one (straight-through, as LibVQ's ``Quantization``). For a
batch of queries the candidates are the union of every query's float top-``n_top`` plus
``n_random`` sampled documents; the loss is, per query, either

* ``distill``: the cross-entropy of the quantized scores' softmax against the float scores'
  softmax (the KL divergence up to the teacher's constant entropy); or
* ``contrastive`` (needs labelled pairs): softmax cross-entropy of the relevant document against
  the candidates, the hard negatives being each query's top documents under the current codes
  (refreshed every epoch), the other relevant documents of the query masked out.

Queries: real training queries when ``fit`` gets ``queries``, otherwise pseudo-queries made from the
corpus (``pseudo="corpus"``: the vectors themselves, each masked out of its own candidates;
``"noisy"``: each vector plus isotropic Gaussian noise of ``noise`` times its norm, rescaled to it,
its own document left among the candidates; ``"mixed"``: both). A tenth of the queries (at most
``val_size``) is held out, always clean corpus vectors in pseudo-query mode; the epoch kept (the FAISS
start included) is the one whose codes best recall their float 10-NN (labelled mode: their judged
documents in the top 10). The distillation's softmaxes take ``temperature`` (student) and
``teacher_temperature`` (teacher, default the same).

Score-aware (anisotropic) codes, ScaNN: Guo et al., "Accelerating Large-Scale Inference with
Anisotropic Vector Quantization", ICML 2020, https://arxiv.org/abs/1908.10396 (Sec. 3-4). With
``anisotropic_threshold=T`` (or a fixed ``anisotropic_eta``) a document's quantization error parallel
to the document costs ``eta`` times its orthogonal error, ``eta = (d - 1) (T^2/|x|^2) / (1 - T^2/|x|^2)``
(Theorem 3.4; ScaNN's ``ComputeParallelCostMultiplier``): for inner-product search the parallel
error moves the high scores that decide the top-k, the orthogonal error mostly does not. Codes are
then chosen by coordinate descent over the sub-spaces from the nearest ones (ScaNN's noise shaping),
and before the distillation the codebooks take ``avq_rounds`` rounds of score-aware k-means: per
sub-space, the codes then each centroid's exact least-squares update under the anisotropic loss,
the other sub-spaces fixed (block coordinate descent: the loss never rises). The round kept, the
start included, is the best on the held-out queries. The distillation then trains with the same
score-aware codes. The codes and the scan are still FAISS's layout and kernel; only the encoder
differs from FAISS's nearest-centroid ``compute_codes`` (add documents with :meth:`encode`).

Learned IVF: :func:`distill_coarse_centroids` trains IVF coarse centroids with Distill-VQ's IVF
loss (each candidate scores the query by its list's centroid; ``Index(..., coarse_epochs=)``).

After training the codes are still FAISS's: nearest centroid in the (rotated) space (score-aware
codes when anisotropic), the same bit layout, and the same lookup-table scan as ``pq``/``opq`` (the
classes subclass them and change nothing of scoring).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from embpress.vectors.bebr import _TorchThreads
from embpress.vectors.codec import Codec, register_codec
from embpress.vectors.pq import OptimizedProductQuantizer, ProductQuantizer
from embpress.vectors.scan import pack_fields

log = logging.getLogger(__name__)

_LOSSES = ("distill", "contrastive")
_PSEUDO = ("corpus", "noisy", "mixed")
_SCHEDULES = ("constant", "linear")
_WARMUP = 0.1  # share of the steps warming up under schedule="linear" (LibVQ's warmup_steps_ratio)
_METRICS = ("ip", "l2")
_VAL_K = 10
_BLOCK = 4096
_CODE_FLOATS = 1 << 24  # rows x M x K per block of score-aware work (k-means tables, encode batches): 64 MiB
_AVQ_MAX_SWEEPS = 10  # coordinate-descent sweeps over the sub-spaces per code (ScaNN's kMaxRounds)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of a square ``a`` near an orthogonal matrix (the rotation after a
    step): Newton-Schulz iterations ``X <- X (3I - X^T X) / 2``, which converge quadratically there
    (LAPACK's SVD can fail to converge on such matrices, whose singular values are all about 1);
    numpy's SVD when they do not converge."""
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    x = a
    for _ in range(20):
        x = 0.5 * x @ (3 * eye - x.T @ x)
        if float((x.T @ x - eye).abs().max()) < 1e-5:
            return x
    u, _, vh = np.linalg.svd(a.numpy().astype(np.float64))
    return torch.from_numpy((u @ vh).astype(np.float32))


# ---------------------------------------------------------------------- score-aware (anisotropic) codes
def parallel_cost_multiplier(x: torch.Tensor, threshold: float | None = None,
                             eta: float | None = None) -> torch.Tensor:
    """(N,) ScaNN's eta per row of ``x`` (N, D): ``eta`` when given, else from ``threshold`` T,
    ``(D - 1) r / (1 - r)`` with ``r = T^2 / |x|^2`` (Theorem 3.4). A row of norm at most T cannot
    score above T against a unit query, so it gets 1 (plain squared error)."""
    if eta is not None:
        return torch.full((x.shape[0],), float(eta), dtype=x.dtype)
    if threshold is None:
        raise ValueError("parallel_cost_multiplier needs threshold or eta")
    r = float(threshold) ** 2 / (x * x).sum(1).clamp_min(1e-30)
    out = (x.shape[1] - 1) * r / (1 - r).clamp_min(1e-30)
    return torch.where(r < 1, out, torch.ones_like(out))


def _code_rows(m: int, k: int) -> int:
    """Rows handled at once so that a (rows, M, K) table stays about ``_CODE_FLOATS`` floats."""
    return max(16, _CODE_FLOATS // (m * k))


def _unit_subspaces(xr: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M, dsub) sub-vectors of ``xr`` and of its direction ``xr / |xr|``."""
    sub = xr.reshape(xr.shape[0], m, -1)
    return sub, sub / xr.norm(dim=1).clamp_min(1e-30)[:, None, None]


def anisotropic_loss(xr: torch.Tensor, cb: torch.Tensor, codes: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """(N,) ScaNN's loss of each row: ``|r|^2 + (eta - 1) <r, x/|x|>^2`` with ``r = x - decode(codes)``
    (the orthogonal error counted once, the parallel error ``eta`` times)."""
    m = cb.shape[0]
    r = xr - cb[torch.arange(m)[None, :], codes].reshape(xr.shape)
    par = (r * xr).sum(1) / xr.norm(dim=1).clamp_min(1e-30)
    return (r * r).sum(1) + (eta - 1) * par * par


@njit(cache=True, parallel=True)
def _anisotropic_codes_kernel(xr, cb, cnorm, eta, max_sweeps, codes):  # pragma: no cover - compiled
    n = xr.shape[0]
    m, k, ds = cb.shape
    for i in prange(n):
        x = xr[i]
        sq = 0.0
        for t in range(x.shape[0]):
            sq += x[t] * x[t]
        inv = 1.0 / max(np.sqrt(sq), 1e-30)
        err = np.empty((m, k))  # |x_m - c|^2 - |x_m|^2
        par = np.empty((m, k))  # <x_m - c, x / |x|>
        own = np.empty(m)
        total = 0.0
        for j in range(m):
            xx = 0.0
            for t in range(ds):
                xx += x[j * ds + t] * x[j * ds + t]
            best, arg = np.inf, 0
            for c in range(k):
                dot = 0.0
                for t in range(ds):
                    dot += x[j * ds + t] * cb[j, c, t]
                err[j, c] = cnorm[j, c] - 2.0 * dot
                par[j, c] = (xx - dot) * inv
                if err[j, c] < best:
                    best, arg = err[j, c], c
            codes[i, j] = arg
            own[j] = par[j, arg]
            total += own[j]
        w = eta[i] - 1.0
        for _ in range(max_sweeps):
            changed = False
            for j in range(m):
                rest = total - own[j]
                best, arg = np.inf, 0
                for c in range(k):
                    v = rest + par[j, c]
                    cost = err[j, c] + w * v * v
                    if cost < best:
                        best, arg = cost, c
                if arg != codes[i, j]:
                    changed = True
                    codes[i, j] = arg
                own[j] = par[j, arg]
                total = rest + own[j]
            if not changed:
                break


@torch.no_grad()
def anisotropic_codes(xr: torch.Tensor, cb: torch.Tensor, eta: torch.Tensor,
                      max_sweeps: int = _AVQ_MAX_SWEEPS) -> torch.Tensor:
    """(N, M) codes of rows ``xr`` (N, D) minimising :func:`anisotropic_loss` under codebooks ``cb``
    (M, K, dsub): from the nearest centroids, coordinate descent over the sub-spaces (each one's
    best centroid with the others fixed) until a sweep changes nothing (ScaNN's noise shaping).

    Compiled, parallel over rows, one row's (M, K) tables at a time. Measured against the torch
    version (one batched product for the (N, M, K) tables, then the sweeps; the tests keep it as the
    reference) on 20k x 384, M=32, K=256, 1 thread: 19.2k rows/s against about 6.3k, where writing
    and re-reading the tables was the cost; FAISS ``compute_codes`` (nearest codes) ran at 33.2k."""
    x = np.ascontiguousarray(xr.detach().numpy(), dtype=np.float32)
    c = np.ascontiguousarray(cb.detach().numpy(), dtype=np.float32)
    codes = np.empty((x.shape[0], c.shape[0]), np.int64)
    cnorm = (c.astype(np.float64) ** 2).sum(-1)
    _anisotropic_codes_kernel(x, c, cnorm, np.ascontiguousarray(eta.numpy(), dtype=np.float64), int(max_sweeps), codes)
    return torch.from_numpy(codes)


@torch.no_grad()
def anisotropic_kmeans_round(xr: torch.Tensor, cb: torch.Tensor, codes: torch.Tensor, eta: torch.Tensor) -> None:
    """One round of score-aware k-means, in place on ``cb`` (M, K, dsub) and ``codes`` (N, M): for
    each sub-space in turn, the codes minimising :func:`anisotropic_loss` with the other sub-spaces
    fixed, then each centroid's exact minimiser (a dsub x dsub linear system: ``(n I + sum w h h^T) c
    = sum x_m + sum w a h``, ``w = eta - 1``, ``h`` the row's direction in the sub-space, ``a`` its
    parallel target). Both steps are exact block minimisations, so the loss never rises; a centroid
    no row picks keeps its value. With eta = 1 this is Lloyd's k-means step per sub-space."""
    m, k, ds = cb.shape
    sub, h = _unit_subspaces(xr, m)
    idx = torch.arange(m)[None, :]
    own = (sub * h).sum(-1) - (h * cb[idx, codes]).sum(-1)
    total = own.sum(1)
    w = (eta - 1).double()
    eye = torch.eye(ds, dtype=torch.float64)
    for j in range(m):
        xj, hj, c = sub[:, j], h[:, j], cb[j]
        rest = total - own[:, j]
        base = (xj * hj).sum(1)
        step = _code_rows(1, k)
        new = torch.cat([((c * c).sum(1)[None] - 2 * xj[r:r + step] @ c.T + (eta[r:r + step] - 1)[:, None]
                          * (rest[r:r + step, None] + base[r:r + step, None] - hj[r:r + step] @ c.T) ** 2).argmin(1)
                         for r in range(0, xr.shape[0], step)])
        a = (rest + base).double()
        gram = torch.zeros(k, ds * ds, dtype=torch.float64)
        rhs = torch.zeros(k, ds, dtype=torch.float64)
        for s in range(0, xr.shape[0], _BLOCK):  # sum of w h h^T per centroid, in blocks (N x dsub^2)
            hb, wb = hj[s:s + _BLOCK].double(), w[s:s + _BLOCK]
            gram.index_add_(0, new[s:s + _BLOCK], (wb[:, None, None] * hb[:, :, None] * hb[:, None, :]).reshape(len(hb), -1))
            rhs.index_add_(0, new[s:s + _BLOCK], xj[s:s + _BLOCK].double() + (wb * a[s:s + _BLOCK])[:, None] * hb)
        count = torch.bincount(new, minlength=k).double()
        used = count > 0
        lhs = gram.reshape(k, ds, ds)[used] + count[used][:, None, None] * eye
        c[used] = torch.linalg.solve(lhs, rhs[used]).to(c.dtype)
        codes[:, j] = new
        own[:, j] = base - (hj * c[new]).sum(1)
        total = rest + own[:, j]


class _DistillTrainer:
    """Mixin: the torch training of a fitted FAISS PQ/OPQ (see the module docstring)."""

    # set by the concrete classes' __init__
    m: int
    nbits: int
    loss: str
    epochs: int
    batch_size: int
    n_top: int
    n_random: int
    n_code_top: int
    temperature: float
    teacher_temperature: float | None
    lr: float
    schedule: str
    pseudo: str
    noise: float
    metric: str
    max_train: int
    max_queries: int
    val_size: int
    num_threads: int | None
    seed: int
    anisotropic_threshold: float | None
    anisotropic_eta: float | None
    avq_rounds: int

    _trains_rotation = False

    def _check_distill_params(self) -> None:
        name = self._name  # type: ignore[attr-defined]
        if self.loss not in _LOSSES:
            raise ValueError(f"{name}: loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.pseudo not in _PSEUDO:
            raise ValueError(f"{name}: pseudo must be one of {_PSEUDO}, got {self.pseudo!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"{name}: schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.metric not in _METRICS:
            raise ValueError(f"{name}: metric must be one of {_METRICS} (cosine: 'ip' on normalised "
                             f"vectors), got {self.metric!r}")
        for key in ("anisotropic_threshold", "anisotropic_eta"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v != v):
                raise ValueError(f"{name}: {key} must be None (off) or > 0, got {v!r}")
        if self.anisotropic_threshold is not None and self.anisotropic_eta is not None:
            raise ValueError(f"{name}: give anisotropic_threshold or anisotropic_eta, not both")
        for key in ("epochs", "val_size", "n_top", "n_random", "n_code_top", "avq_rounds"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: {key} must be a non-negative int, got {v!r}")
        for key in ("batch_size", "max_train", "max_queries"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {key} must be a positive int, got {v!r}")
        for key in ("temperature", "lr"):
            v = getattr(self, key)
            if not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{name}: {key} must be > 0, got {v!r}")
        tt = self.teacher_temperature
        if tt is not None and (isinstance(tt, bool) or not isinstance(tt, int | float) or not tt > 0):
            raise ValueError(f"{name}: teacher_temperature must be None (= temperature) or > 0, got {tt!r}")
        if not isinstance(self.noise, int | float) or self.noise < 0:
            raise ValueError(f"{name}: noise must be >= 0, got {self.noise!r}")

    # ------------------------------------------------------------------ public fit
    def fit(self, x: np.ndarray, *, queries: np.ndarray | None = None,
            positives: np.ndarray | None = None, init: ProductQuantizer | None = None) -> Any:
        """Fit FAISS's quantizer on ``x`` (N, D), then train it for retrieval.

        Args:
            x: (N, D) corpus vectors (the training documents).
            queries: (nq, D) training queries; None: pseudo-queries from ``x`` (``pseudo``).
            positives: (P, 2) int pairs (query row, row of ``x``) judged relevant; needed by
                ``loss="contrastive"``, ignored by ``"distill"``.
            init: a fitted ``pq``/``opq`` (the same kind, M and nbits, fitted on this ``x``) to start
                from instead of training FAISS's quantizer again (an existing index upgraded).
        """
        from embpress.vectors.codec import as_matrix

        if queries is not None:
            queries = as_matrix(queries, name="queries")
            xd = np.asarray(x).shape[-1] if np.asarray(x).ndim == 2 else None
            if xd is not None and queries.shape[1] != xd:
                raise ValueError(f"{self._name}: queries have d={queries.shape[1]}, x has d={xd}")  # type: ignore[attr-defined]
        if self.loss == "contrastive":
            if queries is None or positives is None:
                raise ValueError(f"{self._name}: loss='contrastive' needs fit(x, queries=..., positives=...) "  # type: ignore[attr-defined]
                                 "with labelled (query row, corpus row) pairs; use loss='distill' without labels")
            positives = np.asarray(positives)
            n = np.asarray(x).shape[0]
            if positives.ndim != 2 or positives.shape[1] != 2 or positives.dtype.kind not in "iu" or not len(positives):
                raise ValueError(f"{self._name}: positives must be a non-empty (P, 2) int array of "  # type: ignore[attr-defined]
                                 f"(query row, corpus row), got {positives.dtype} {positives.shape}")
            bad = (positives[:, 0] < 0) | (positives[:, 0] >= len(queries)) | (positives[:, 1] < 0) | (positives[:, 1] >= n)
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{self._name}: positives row {r} = {positives[r].tolist()} is out of range "  # type: ignore[attr-defined]
                                 f"(queries: {len(queries)}, corpus rows: {n})")
        if init is not None:
            base = OptimizedProductQuantizer if isinstance(self, OptimizedProductQuantizer) else ProductQuantizer
            if type(init) is not base or not init.is_fitted or (init.m, init.nbits) != (self.m, self.nbits):
                raise ValueError(f"{self._name}: init must be a fitted {base.__name__} with m={self.m}, "  # type: ignore[attr-defined]
                                 f"nbits={self.nbits}, got {init!r}")
        self._train_queries, self._train_pairs, self._init = queries, positives, init
        try:
            return super().fit(x)  # type: ignore[misc]
        finally:
            del self._train_queries, self._train_pairs, self._init

    # ------------------------------------------------------------------ training
    def _fit(self, x: np.ndarray) -> None:
        if self._init is None:
            super()._fit(x)  # type: ignore[misc]  # FAISS PQ / OPQ: the start
        else:
            if self._init.d_ != x.shape[1]:
                raise ValueError(f"{self._name}: init was fit on d={self._init.d_}, x has d={x.shape[1]}")  # type: ignore[attr-defined]
            self.centroids_ = self._init.centroids_.copy()
            if hasattr(self._init, "rotation_"):
                self.rotation_ = self._init.rotation_.copy()
        with _TorchThreads(self.num_threads):
            self._train(x)
        for k in ("_pq", "_cent_t"):
            self.__dict__.pop(k, None)

    def _canonical_spec(self) -> str:
        base = super()._canonical_spec()  # type: ignore[misc]
        if self.anisotropic_eta is not None:
            return f"{base}a{_number(self.anisotropic_eta)}"
        if self.anisotropic_threshold is not None:
            return f"{base}t{_number(self.anisotropic_threshold)}"
        return base

    @property
    def anisotropic(self) -> bool:
        """Whether the codes are score-aware (ScaNN) rather than FAISS's nearest centroids."""
        return self.anisotropic_threshold is not None or self.anisotropic_eta is not None

    @property
    def residual_ok(self) -> bool:  # type: ignore[override]
        """Score-aware codes weigh the error parallel to the document itself, which a residual to an
        IVF centroid does not carry: in an IVF they encode the whole vector (FAISS's
        ``by_residual=False``); nearest-centroid codes encode the residual as ``pq``/``opq`` do."""
        return not self.anisotropic

    def _eta(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_cost_multiplier(x, self.anisotropic_threshold, self.anisotropic_eta)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        if not self.anisotropic:
            return super()._encode(x)  # type: ignore[misc]  # FAISS's compute_codes
        cb = torch.from_numpy(self.centroids_)  # type: ignore[attr-defined]
        out = np.empty((x.shape[0], self.code_bytes), np.uint8)  # type: ignore[attr-defined]
        step = _code_rows(self.m, cb.shape[1])
        for s in range(0, x.shape[0], step):
            xb = np.ascontiguousarray(x[s:s + step])
            xr = np.ascontiguousarray(self._rotate(xb), dtype=np.float32)  # type: ignore[attr-defined]
            codes = anisotropic_codes(torch.from_numpy(xr), cb, self._eta(torch.from_numpy(xb)))
            out[s:s + len(xb)] = pack_fields(codes.numpy(), self.nbits, self.code_bytes)  # type: ignore[attr-defined]
        return out

    def _train(self, x: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(int(self.seed))
        rows = np.arange(x.shape[0]) if x.shape[0] <= self.max_train else np.sort(
            rng.choice(x.shape[0], self.max_train, replace=False))
        xs = np.ascontiguousarray(x[rows])
        n = xs.shape[0]
        pairs = None
        self_rows = None
        if self._train_queries is not None:
            q = self._train_queries
            if self._train_pairs is not None:
                remap = np.full(x.shape[0], -1, np.int64)
                remap[rows] = np.arange(n)
                pairs = np.stack([self._train_pairs[:, 0].astype(np.int64), remap[self._train_pairs[:, 1]]], 1)
                pairs = pairs[pairs[:, 1] >= 0]
        else:
            pick = np.arange(n) if n <= self.max_queries else np.sort(rng.choice(n, self.max_queries, replace=False))
            q = xs[pick]
            self_rows = pick  # a corpus vector is never its own candidate
        q = np.ascontiguousarray(q, dtype=np.float32)
        nq = q.shape[0]
        # hold out queries whose float 10-NN pick the epoch kept
        order = rng.permutation(nq)
        n_val = min(self.val_size, nq // 10) if nq >= 20 else 0
        val_q, tr_q = np.sort(order[:n_val]), np.sort(order[n_val:])
        if self_rows is not None and self.pseudo != "corpus":
            # held-out queries stay clean corpus vectors (one yardstick for every pseudo mode); the
            # training rows get a noisy copy, appended with no row masked (its document is its neighbour)
            noisy = self._perturb(q[tr_q], rng)
            q = np.concatenate([q, noisy])
            self_rows = np.concatenate([self_rows, np.full(len(noisy), -1, self_rows.dtype)])
            extra = np.arange(nq, nq + len(noisy))
            tr_q = extra if self.pseudo == "noisy" else np.concatenate([tr_q, extra])
            nq = q.shape[0]
        if pairs is not None:
            keep = np.isin(pairs[:, 0], tr_q)
            val_pairs = pairs[~keep]
            pairs = pairs[keep]
            if not len(pairs):
                raise ValueError(f"{self._name}: no labelled pair left for training")  # type: ignore[attr-defined]
        n_top = min(self.n_top, n - 1)
        top = self._float_top(q, xs, max(n_top, _VAL_K), self_rows)

        xt = torch.from_numpy(xs)
        qt = torch.from_numpy(q)
        cb = torch.nn.Parameter(torch.from_numpy(self.centroids_.copy()))  # type: ignore[attr-defined]
        params = [cb]
        rot = None  # PQ: none; OPQ: its rotation, trained or (train_rotation=False) fixed
        if "rotation_" in self.__dict__:
            rot = torch.from_numpy(self.rotation_.copy())  # type: ignore[attr-defined]
            if self._trains_rotation:
                rot = torch.nn.Parameter(rot)
                params.append(rot)
        # soft-assignment temperature: the mean squared distance of a sub-vector to its centroid,
        # so the softmax over centroids is peaked on the data's own scale
        with torch.no_grad():
            d0 = self._sub_distances(self._rot(xt[:_BLOCK], rot), cb)
            self.assign_temperature_ = float(d0.min(-1).values.mean().clamp_min(1e-12))
        val = (qt[val_q], top[val_q, :_VAL_K]) if n_val else None
        if val is not None and self.loss == "contrastive":
            # labelled mode: the held-out queries' judged documents are the truth, not the float 10-NN
            rows = {int(qi): i for i, qi in enumerate(val_q)}
            truth = [set() for _ in val_q]
            for qi, di in val_pairs:
                truth[rows[int(qi)]].add(int(di))
            val = (qt[val_q], truth) if any(truth) else None
        if self.anisotropic:
            self._avq(xt, cb, rot, val, self_rows, val_q)
        groups = [{"params": [cb], "lr": self.lr}]
        if rot is not None and rot.requires_grad:
            rot_lr = getattr(self, "rotation_lr", None)
            groups.append({"params": [rot], "lr": self.lr if rot_lr is None else rot_lr})
        opt = torch.optim.Adam(groups)
        best_state = (self._val_recall(val, xt, cb, rot, self_rows, val_q), 0,
                      cb.detach().clone(), None if rot is None else rot.detach().clone())
        history, val_history = [], [best_state[0]]
        log.info("%s start: held-out recall@%d %.4f", self.spec, _VAL_K, best_state[0])  # type: ignore[attr-defined]
        units = pairs if pairs is not None and self.loss == "contrastive" else tr_q
        steps = self.epochs * -(-len(units) // self.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor(steps))
        hard = None
        n_code_top = min(self.n_code_top, n)
        for epoch in range(self.epochs):
            if self.loss == "contrastive":
                hard = self._code_top(qt, xt, cb.detach(), None if rot is None else rot.detach(), n_top)
            elif n_code_top:  # the student's own top documents: where its ranking errs (refreshed per epoch)
                hard = self._code_top(qt, xt, cb.detach(), None if rot is None else rot.detach(), n_code_top)
            perm = torch.randperm(len(units), generator=gen).numpy()
            total, count = 0.0, 0
            for s in range(0, len(units), self.batch_size):
                batch = units[perm[s:s + self.batch_size]]
                if self.loss == "contrastive":
                    loss = self._contrastive_step(batch, qt, xt, cb, rot, hard, pairs, rng)
                else:
                    loss = self._distill_step(batch, qt, xt, cb, rot, top[:, :n_top], self_rows, rng, hard)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                if rot is not None and rot.requires_grad:
                    with torch.no_grad():  # back to the nearest orthogonal matrix (polar factor)
                        rot.copy_(_polar(rot))
                total += float(loss.detach()) * len(batch)
                count += len(batch)
            history.append(total / max(count, 1))
            rec = self._val_recall(val, xt, cb, rot, self_rows, val_q)
            val_history.append(rec)
            log.info("%s epoch %d/%d loss %.4f held-out recall@%d %.4f", self.spec, epoch + 1,  # type: ignore[attr-defined]
                     self.epochs, history[-1], _VAL_K, rec)
            if val is None or rec > best_state[0]:
                best_state = (rec, epoch + 1, cb.detach().clone(), None if rot is None else rot.detach().clone())
        self.centroids_ = best_state[2].numpy().astype(np.float32)
        if rot is not None:
            self.rotation_ = best_state[3].numpy().astype(np.float32)
        self.loss_history_ = np.asarray(history, dtype=np.float32)
        self.val_recall_history_ = np.asarray(val_history, dtype=np.float32)
        self.best_epoch_ = int(best_state[1])

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def _avq(self, xt, cb, rot, val, self_rows, val_q) -> None:
        """``avq_rounds`` rounds of score-aware k-means on the training documents, in place on ``cb``;
        the round kept (the start included) is the best on the held-out queries (all of them
        without held-out queries). Sets ``avq_recall_history_``, ``avq_loss_history_`` and
        ``avq_best_round_``."""
        xr = torch.cat([self._rot(xt[s:s + _BLOCK], rot) for s in range(0, xt.shape[0], _BLOCK)])
        eta = self._eta(xt)
        step = _code_rows(self.m, cb.shape[1])
        codes = torch.cat([anisotropic_codes(xr[s:s + step], cb, eta[s:s + step]) for s in range(0, xr.shape[0], step)])
        best = (self._val_recall(val, xt, cb, rot, self_rows, val_q), 0, cb.detach().clone())
        recalls, losses = [best[0]], [float(anisotropic_loss(xr, cb, codes, eta).mean())]
        for r in range(self.avq_rounds):
            anisotropic_kmeans_round(xr, cb.data, codes, eta)
            losses.append(float(anisotropic_loss(xr, cb, codes, eta).mean()))
            recalls.append(self._val_recall(val, xt, cb, rot, self_rows, val_q))
            log.info("%s score-aware k-means round %d/%d loss %.5f held-out recall@%d %.4f", self.spec,  # type: ignore[attr-defined]
                     r + 1, self.avq_rounds, losses[-1], _VAL_K, recalls[-1])
            if val is None or recalls[-1] > best[0]:
                best = (recalls[-1], r + 1, cb.detach().clone())
        cb.data.copy_(best[2])
        self.avq_recall_history_ = np.asarray(recalls, dtype=np.float32)
        self.avq_loss_history_ = np.asarray(losses, dtype=np.float32)
        self.avq_best_round_ = int(best[1])

    def _assign(self, x: torch.Tensor, xr: torch.Tensor, cb: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        """(C, M) hard codes of documents ``x`` (rotated: ``xr``): nearest centroids, or score-aware."""
        if self.anisotropic:
            return anisotropic_codes(xr.detach(), cb.detach(), self._eta(x))
        return (self._sub_distances(xr, cb) if dist is None else dist).argmin(-1)

    def _lr_factor(self, steps: int):
        """Multiplier of the learning rate at a step: 1 (``constant``), or (``linear``, LibVQ's
        schedule) a linear warm-up over the first tenth of the steps, then a linear decay to 0."""
        if self.schedule == "constant":
            return lambda step: 1.0
        warm = max(1, int(_WARMUP * steps))
        return lambda step: (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))

    def _perturb(self, q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``q`` plus isotropic Gaussian noise of ``noise`` times each row's norm, rescaled to that norm."""
        g = rng.standard_normal(q.shape).astype(np.float32)
        norm = np.linalg.norm(q, axis=1, keepdims=True)
        g *= self.noise * norm / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        qn = q + g
        return (qn * (norm / np.maximum(np.linalg.norm(qn, axis=1, keepdims=True), 1e-12))).astype(np.float32)

    def _float_top(self, q: np.ndarray, xs: np.ndarray, k: int, self_rows: np.ndarray | None) -> np.ndarray:
        """(nq, k) float top-k rows of ``xs`` for each query (its own row excluded in corpus mode)."""
        kk = min(k + (self_rows is not None), xs.shape[0])
        fm = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        _, ids = faiss.knn(q, xs, kk, metric=fm)
        if self_rows is None:
            return ids[:, :k]
        out = np.empty((ids.shape[0], kk - 1), np.int64)
        for i, (row, own) in enumerate(zip(ids, self_rows, strict=True)):
            r = row[row != own]
            out[i] = r[: kk - 1] if len(r) >= kk - 1 else np.r_[r, row[-1]][: kk - 1]
        return out[:, :k]

    @staticmethod
    def _rot(x: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
        return x if rot is None else x @ rot.T

    @staticmethod
    def _sub_distances(xr: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        """(C, M, K) squared distances of sub-vectors to centroids, without the constant |x_m|^2."""
        m, _, ds = cb.shape
        sub = xr.reshape(xr.shape[0], m, ds)
        return (cb * cb).sum(-1)[None] - 2 * torch.einsum("cmd,mkd->cmk", sub, cb)

    def _quantize(self, x: torch.Tensor, cb: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
        """(C, D) quantized vectors in the rotated space: hard centroids forward, soft gradient."""
        xr = self._rot(x, rot)
        dist = self._sub_distances(xr, cb)
        soft = torch.softmax(-dist / self.assign_temperature_, dim=-1)
        hard = cb[torch.arange(cb.shape[0])[None, :], self._assign(x, xr, cb, dist.detach())]  # (C, M, dsub): value and centroid grad
        # straight-through: the soft assignment's gradient, with a forward value of exactly zero
        st = torch.einsum("cmk,mkd->cmd", soft - soft.detach(), cb.detach())
        return (hard + st).reshape(x.shape[0], -1)

    def _scores(self, qr: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """Similarities (larger is better) of rotated queries to (quantized) documents."""
        ip = qr @ xq.T
        if self.metric == "ip":
            return ip
        return 2 * ip - (qr * qr).sum(1, keepdim=True) - (xq * xq).sum(1)[None]

    def _candidates(self, must: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.n_random >= n:  # the whole (training) corpus: the exact listwise loss, nothing sampled
            return np.arange(n)
        extra = rng.integers(0, n, self.n_random) if self.n_random else np.zeros(0, np.int64)
        return np.unique(np.concatenate([must.ravel(), extra]))

    def _distill_step(self, batch, qt, xt, cb, rot, top, self_rows, rng, code_top=None) -> torch.Tensor:
        must = top[batch] if code_top is None else np.concatenate([top[batch], code_top[batch]], 1)
        cand = self._candidates(must, rng, xt.shape[0])
        ct = torch.from_numpy(cand)
        qb, xc = qt[batch], xt[ct]
        t_teacher = self.temperature if self.teacher_temperature is None else self.teacher_temperature
        teacher = self._scores(qb, xc) / t_teacher  # float scores (rotation-invariant)
        student = self._scores(self._rot(qb, rot), self._quantize(xc, cb, rot)) / self.temperature
        if self_rows is not None:
            own = torch.from_numpy(self_rows[batch])[:, None] == ct[None, :]
            teacher = teacher.masked_fill(own, float("-inf"))
            student = student.masked_fill(own, float("-inf"))
        logp = torch.log_softmax(student, dim=1)
        p = torch.softmax(teacher, dim=1)
        return -(p * logp.masked_fill(torch.isinf(logp), 0)).sum(1).mean()

    def _contrastive_step(self, batch, qt, xt, cb, rot, hard, pairs, rng) -> torch.Tensor:
        qrows, pos = batch[:, 0], batch[:, 1]
        cand = self._candidates(np.concatenate([pos, hard[qrows].ravel()]), rng, xt.shape[0])
        ct = torch.from_numpy(cand)
        student = self._scores(self._rot(qt[qrows], rot), self._quantize(xt[ct], cb, rot)) / self.temperature
        target = torch.from_numpy(np.searchsorted(cand, pos))
        # other documents judged relevant to the same query are not negatives
        rel = np.zeros((len(batch), len(cand)), dtype=bool)
        for i, qi in enumerate(qrows):
            others = pairs[pairs[:, 0] == qi, 1]
            rel[i, np.searchsorted(cand, others[np.isin(others, cand)])] = True
        rel[np.arange(len(batch)), target.numpy()] = False
        student = student.masked_fill(torch.from_numpy(rel), float("-inf"))
        return F.cross_entropy(student, target)

    @torch.no_grad()
    def _hard_codes(self, xt: torch.Tensor, cb: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
        """(N, D) hard-quantized documents in the rotated space (what the codes decode to)."""
        out = []
        step = min(_BLOCK, _code_rows(self.m, cb.shape[1]))
        for s in range(0, xt.shape[0], step):
            xr = self._rot(xt[s:s + step], rot)
            idx = self._assign(xt[s:s + step], xr, cb)  # (b, M)
            out.append(cb[torch.arange(cb.shape[0])[None, :], idx].reshape(xr.shape[0], -1))
        return torch.cat(out)

    @torch.no_grad()
    def _code_top(self, qt, xt, cb, rot, k: int) -> np.ndarray:
        """(nq, k) top rows under the current codes (JPQ's hard negatives)."""
        xq = self._hard_codes(xt, cb, rot)
        qr = self._rot(qt, rot)
        return torch.cat([torch.topk(self._scores(qr[s:s + 256], xq), k, dim=1).indices
                          for s in range(0, qt.shape[0], 256)]).numpy()

    @torch.no_grad()
    def _val_recall(self, val, xt, cb, rot, self_rows, val_q) -> float:
        """recall@10 of held-out queries under the hard codes (nan: none): of their float 10-NN, or in
        labelled mode of their judged documents (queries without any are skipped)."""
        if val is None:
            return float("nan")
        qv, truth = val
        xq = self._hard_codes(xt, cb, rot)
        sc = self._scores(self._rot(qv, rot), xq)
        if self_rows is not None:
            sc[torch.arange(len(qv)), torch.from_numpy(self_rows[val_q])] = float("-inf")
        top = torch.topk(sc, _VAL_K, dim=1).indices.numpy()
        if isinstance(truth[0], set):
            return float(np.mean([len(set(a.tolist()) & t) / len(t) for a, t in zip(top, truth, strict=True) if t]))
        return float(np.mean([len(set(a) & set(b)) for a, b in zip(top, truth, strict=True)]) / _VAL_K)



_SPEC = r"(?P<m>\d+)(?:x(?P<nbits>\d+))?(?:a(?P<eta>\d+(?:\.\d+)?)|t(?P<t>\d+(?:\.\d+)?))?"
_FORM = "{M}[x{nbits}][a{eta}|t{T}]"


def _distill_from_spec(cls: type, groups: dict[str, Any], seed: int) -> Codec:
    """``dvq32``, ``dopq48x8``; ``a4`` adds score-aware codes at eta 4, ``t0.1`` at ScaNN threshold 0.1."""
    eta, t = groups.get("eta"), groups.get("t")
    return cls(m=int(groups["m"]), nbits=int(groups["nbits"] or 8), seed=seed,
               anisotropic_eta=None if eta is None else float(eta), anisotropic_threshold=None if t is None else float(t))


def _number(v: float) -> str:
    return f"{v:g}"


@register_codec(r"dvq" + _SPEC, form="dvq" + _FORM, examples=("dvq4x4", "dvq4x4a4"))
class DistilledPQ(_DistillTrainer, ProductQuantizer):
    """FAISS PQ whose codebooks are then trained for retrieval (Distill-VQ; JPQ with labels).

    Args:
        m: sub-quantizers M (must divide D). nbits: bits per sub-code (default 8).
        loss: ``"distill"`` (no labels) or ``"contrastive"`` (labelled pairs given to ``fit``).
        epochs: passes over the training queries (0: FAISS's quantizer unchanged).
        batch_size: queries (or labelled pairs) per step.
        n_top: float top documents of each query among the candidates (contrastive: the hard
            negatives under the current codes).
        n_random: documents sampled per step and added to every query's candidates (at least the
            number of training documents: every document is a candidate, nothing is sampled).
        n_code_top: each query's top documents under the current codes (refreshed every epoch), also
            added to the candidates (distill only; 0: none): the documents the codes rank too high.
        temperature: the student's (quantized) score softmax divides the similarities by it.
        teacher_temperature: the teacher's (float) softmax temperature (None: ``temperature``);
            lower sharpens the target toward the float top documents.
        lr: Adam learning rate of the codebooks (and rotation). 3e-4 with the linear schedule beat a
            constant 1e-3 on SciFact (which peaked after one epoch, then lost recall).
        schedule: ``"constant"`` learning rate, or ``"linear"`` (default): warm-up over the first tenth
            of the steps, then linear decay to 0 (LibVQ's ``get_linear_schedule_with_warmup``).
        pseudo: pseudo-queries when ``fit`` gets no queries: ``"corpus"`` vectors, ``"noisy"`` copies
            of them, or ``"mixed"`` (both: twice the queries per epoch). The held-out queries are clean
            corpus vectors in every mode.
        noise: norm of the Gaussian noise of ``"noisy"`` pseudo-queries, relative to the vector's.
        metric: ``"ip"`` (also cosine on normalised vectors) or ``"l2"``: the scores distilled.
        max_train: documents sampled from ``x`` for training. max_queries: pseudo-queries used.
        val_size: held-out queries picking the epoch (at most a tenth of them).
        anisotropic_threshold: ScaNN's threshold T: score-aware codes whose parallel error costs
            ``eta(x) = (D - 1) (T^2/|x|^2) / (1 - T^2/|x|^2)`` times the orthogonal error (None: off,
            FAISS's nearest centroids). On unit vectors, T = sqrt(eta / (D - 1 + eta)).
        anisotropic_eta: a fixed eta for every document instead of T (None: from T, or off).
        avq_rounds: rounds of score-aware k-means on the codebooks before the distillation
            (anisotropic only; the best round on the held-out queries is kept, the start included).
        num_threads: torch threads while training (None: leave torch's setting).
        seed: seed of FAISS's k-means, the sampling and the batch order.

    Fitted: ``centroids_`` (M, 2^nbits, D/M) in FAISS's layout, ``loss_history_`` (epochs,),
    ``val_recall_history_`` (epochs + 1,) held-out recall@10 from the start, ``best_epoch_`` (0:
    the start kept), ``assign_temperature_``; anisotropic: ``avq_recall_history_`` and
    ``avq_loss_history_`` (avq_rounds + 1,), ``avq_best_round_``.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
        >>> c = DistilledPQ(m=4, nbits=4, epochs=1).fit(x)
        >>> c.encode(x).shape, c.spec
        ((600, 2), 'dvq4x4')
    """

    _name = "dvq"

    def __init__(self, *, m: int, nbits: int = 8, loss: str = "distill", epochs: int = 8, batch_size: int = 64,
                 n_top: int = 32, n_random: int = 256, n_code_top: int = 0, temperature: float = 0.05,
                 teacher_temperature: float | None = None, lr: float = 3e-4, schedule: str = "linear",
                 pseudo: str = "corpus", noise: float = 1.0,
                 metric: str = "ip", max_train: int = 100_000, max_queries: int = 20_000, val_size: int = 500,
                 anisotropic_threshold: float | None = None, anisotropic_eta: float | None = None,
                 avq_rounds: int = 6, num_threads: int | None = None, seed: int = 0):
        super().__init__(m=m, nbits=nbits, seed=seed)
        self.loss, self.epochs, self.batch_size = loss, epochs, batch_size
        self.n_top, self.n_random, self.temperature, self.lr = n_top, n_random, temperature, lr
        self.n_code_top, self.schedule, self.teacher_temperature = n_code_top, schedule, teacher_temperature
        self.pseudo, self.noise, self.metric = pseudo, noise, metric
        self.max_train, self.max_queries, self.val_size = max_train, max_queries, val_size
        self.anisotropic_threshold, self.anisotropic_eta = anisotropic_threshold, anisotropic_eta
        self.avq_rounds, self.num_threads = avq_rounds, num_threads

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return _distill_from_spec(cls, groups, seed)

    def _check_params(self) -> None:
        super()._check_params()
        self._check_distill_params()


@register_codec(r"dopq" + _SPEC, form="dopq" + _FORM, examples=("dopq4", "dopq4t0.5"))
class DistilledOPQ(_DistillTrainer, OptimizedProductQuantizer):
    """FAISS OPQ whose rotation and codebooks are then trained for retrieval (Distill-VQ / JPQ).

    The rotation stays orthogonal: after each step it is replaced by its polar factor.

    Args:
        m: sub-quantizers M (must divide D). nbits: bits per sub-code (default 8).
        niter: FAISS ``OPQMatrix`` iterations of the start.
        train_rotation: also train the rotation (default False, LibVQ's frozen rotation: trained at
            lr 1e-3 it lost recall on SciFact, and at rotation_lr 1e-4 it gained nothing; see the README).
        rotation_lr: Adam learning rate of the rotation (None: ``lr``).
        The other arguments are :class:`DistilledPQ`'s.

    Fitted: ``rotation_`` (D, D), ``centroids_`` and the histories as in :class:`DistilledPQ`.
    """

    _name = "dopq"

    def __init__(self, *, m: int, nbits: int = 8, niter: int = 50, train_rotation: bool = False,
                 rotation_lr: float | None = None, loss: str = "distill", epochs: int = 8, batch_size: int = 64,
                 n_top: int = 32, n_random: int = 256, n_code_top: int = 0, temperature: float = 0.05,
                 teacher_temperature: float | None = None, lr: float = 3e-4, schedule: str = "linear",
                 pseudo: str = "corpus", noise: float = 1.0,
                 metric: str = "ip", max_train: int = 100_000, max_queries: int = 20_000, val_size: int = 500,
                 anisotropic_threshold: float | None = None, anisotropic_eta: float | None = None,
                 avq_rounds: int = 6, num_threads: int | None = None, seed: int = 0):
        super().__init__(m=m, nbits=nbits, niter=niter, seed=seed)
        self.train_rotation, self.rotation_lr = train_rotation, rotation_lr
        self.loss, self.epochs, self.batch_size = loss, epochs, batch_size
        self.n_top, self.n_random, self.temperature, self.lr = n_top, n_random, temperature, lr
        self.n_code_top, self.schedule, self.teacher_temperature = n_code_top, schedule, teacher_temperature
        self.pseudo, self.noise, self.metric = pseudo, noise, metric
        self.max_train, self.max_queries, self.val_size = max_train, max_queries, val_size
        self.anisotropic_threshold, self.anisotropic_eta = anisotropic_threshold, anisotropic_eta
        self.avq_rounds, self.num_threads = avq_rounds, num_threads

    @property
    def _trains_rotation(self) -> bool:  # type: ignore[override]
        return bool(self.train_rotation)

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return _distill_from_spec(cls, groups, seed)

    def _check_params(self) -> None:
        super()._check_params()
        if not isinstance(self.train_rotation, bool | np.bool_ | int):
            raise ValueError(f"dopq: train_rotation must be a bool, got {self.train_rotation!r}")
        if self.rotation_lr is not None and (not isinstance(self.rotation_lr, int | float) or not self.rotation_lr > 0):
            raise ValueError(f"dopq: rotation_lr must be None (= lr) or > 0, got {self.rotation_lr!r}")
        self._check_distill_params()




# ---------------------------------------------------------------------- learned IVF
class CoarseDistillation(NamedTuple):
    """What :func:`distill_coarse_centroids` returns."""

    centroids: np.ndarray  # (nlist, D) float32: the epoch kept
    loss_history: np.ndarray  # (epochs,) mean distillation loss per epoch
    val_history: np.ndarray  # (epochs + 1,) held-out share of the float top-10 in the probed lists
    best_epoch: int  # 0: the k-means start kept


def _assign_lists(x: torch.Tensor, cent: torch.Tensor, metric: str) -> torch.Tensor:
    """(N,) list of each vector: largest inner product (ip) or nearest centroid (l2), as the index assigns."""
    out = []
    for s in range(0, x.shape[0], _BLOCK):
        ip = x[s:s + _BLOCK] @ cent.T
        out.append((ip if metric == "ip" else 2 * ip - (cent * cent).sum(1)[None]).argmax(1))
    return torch.cat(out)


def _probe_scores(q: torch.Tensor, cent: torch.Tensor, metric: str) -> torch.Tensor:
    ip = q @ cent.T
    return ip if metric == "ip" else 2 * ip - (cent * cent).sum(1)[None]


@torch.no_grad()
def _probed_share(q: torch.Tensor, truth: np.ndarray, lists: torch.Tensor, cent: torch.Tensor, metric: str,
                  nprobe: int) -> float:
    """Mean share of each query's ``truth`` rows (nq, k) whose list is among its ``nprobe`` probed lists."""
    probes = torch.topk(_probe_scores(q, cent, metric), nprobe, dim=1).indices  # (nq, nprobe)
    tl = lists[torch.from_numpy(truth)]  # (nq, k)
    return float((tl[:, :, None] == probes[:, None, :]).any(-1).float().mean())


def distill_coarse_centroids(centroids: np.ndarray, x: np.ndarray, *, queries: np.ndarray | None = None,
                             metric: str = "ip", epochs: int = 5, batch_size: int = 64, n_top: int = 32,
                             n_random: int = 256, temperature: float = 0.05, lr: float = 1e-3,
                             max_queries: int = 20_000, val_size: int = 500, val_nprobe: int | None = None,
                             seed: int = 0) -> CoarseDistillation:
    """IVF coarse centroids trained by distillation from the float scores (Distill-VQ's IVF loss).

    Each document scores a query by its list's centroid, ``<q, c_{list(d)}>`` (l2: ``-|q - c|^2``);
    per query, the softmax of these scores over the candidates (float top-``n_top`` plus ``n_random``
    sampled documents) is trained toward the softmax of the float scores (both at ``temperature``),
    so the lists holding a query's float top documents rank first when probing. Lists are the nearest
    centroid (as :class:`~embpress.vectors.index.Index` assigns), fixed within an epoch and
    recomputed after it. Queries: ``queries`` (nq, D), else the corpus vectors themselves (each
    masked out of its own candidates). A tenth of them (at most ``val_size``) is held out; the epoch
    kept (the start included) is the one whose probed lists (``val_nprobe``, default nlist // 16)
    hold the largest share of the held-out queries' float top-10.

    Args:
        centroids: (nlist, D) starting centroids (FAISS k-means). x: (N, D) corpus vectors.
    """
    cent0 = np.ascontiguousarray(centroids, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if cent0.ndim != 2 or x.ndim != 2 or cent0.shape[1] != x.shape[1]:
        raise ValueError(f"distill_coarse_centroids: centroids {cent0.shape} and x {x.shape} must be 2-D with "
                         "the same D")
    if metric not in _METRICS:
        raise ValueError(f"distill_coarse_centroids: metric must be one of {_METRICS}, got {metric!r}")
    for key, v, lo in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("n_top", n_top, 1),
                       ("n_random", n_random, 0), ("max_queries", max_queries, 1), ("val_size", val_size, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"distill_coarse_centroids: {key} must be an int >= {lo}, got {v!r}")
    for key, v in (("temperature", temperature), ("lr", lr)):
        if not isinstance(v, int | float) or not v > 0:
            raise ValueError(f"distill_coarse_centroids: {key} must be > 0, got {v!r}")
    nlist, n = cent0.shape[0], x.shape[0]
    nprobe = max(1, nlist // 16) if val_nprobe is None else int(val_nprobe)
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"distill_coarse_centroids: val_nprobe must be in 1..{nlist}, got {val_nprobe!r}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed))
    self_rows = None
    if queries is None:
        pick = np.arange(n) if n <= max_queries else np.sort(rng.choice(n, max_queries, replace=False))
        q, self_rows = x[pick], pick
    else:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != x.shape[1]:
            raise ValueError(f"distill_coarse_centroids: queries {q.shape} must be (nq, {x.shape[1]})")
    nq = q.shape[0]
    order = rng.permutation(nq)
    n_val = min(val_size, nq // 10) if nq >= 20 else 0
    val_q, tr_q = np.sort(order[:n_val]), np.sort(order[n_val:])
    n_top = min(n_top, n - 1)
    fm = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    kk = min(max(n_top, _VAL_K) + (self_rows is not None), n)
    _, ids = faiss.knn(q, x, kk, metric=fm)
    if self_rows is not None:  # a corpus vector is not its own neighbour
        keep = ids != self_rows[:, None]
        ids = np.stack([row[k][: kk - 1] if k.sum() >= kk - 1 else row[: kk - 1] for row, k in zip(ids, keep, strict=True)])
    top = ids
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    cent = torch.nn.Parameter(torch.from_numpy(cent0.copy()))
    opt = torch.optim.Adam([cent], lr=lr)
    lists = _assign_lists(xt, cent.detach(), metric)
    val_q_t = qt[torch.from_numpy(val_q)]

    def val_share() -> float:
        return _probed_share(val_q_t, top[val_q, :_VAL_K], lists, cent.detach(), metric, nprobe) if n_val else float("nan")

    best = (val_share(), 0, cent0.copy())
    history, val_history = [], [best[0]]
    for epoch in range(epochs):
        perm = torch.randperm(len(tr_q), generator=gen).numpy()
        total, count = 0.0, 0
        for s in range(0, len(tr_q), batch_size):
            batch = tr_q[perm[s:s + batch_size]]
            extra = rng.integers(0, n, n_random) if n_random else np.zeros(0, np.int64)
            cand = torch.from_numpy(np.unique(np.concatenate([top[batch, :n_top].ravel(), extra])))
            qb = qt[torch.from_numpy(batch)]
            xc = xt[cand]
            ip = qb @ xc.T
            teacher = (ip if metric == "ip" else 2 * ip - (xc * xc).sum(1)[None]) / temperature
            student = _probe_scores(qb, cent, metric)[:, lists[cand]] / temperature
            if self_rows is not None:
                own = torch.from_numpy(self_rows[batch])[:, None] == cand[None, :]
                teacher = teacher.masked_fill(own, float("-inf"))
                student = student.masked_fill(own, float("-inf"))
            logp = torch.log_softmax(student, dim=1)
            loss = -(torch.softmax(teacher, dim=1) * logp.masked_fill(torch.isinf(logp), 0)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        history.append(total / max(count, 1))
        lists = _assign_lists(xt, cent.detach(), metric)  # the index stores each vector in its nearest list
        share = val_share()
        val_history.append(share)
        log.info("coarse epoch %d/%d loss %.4f held-out top-10 share in %d probed lists %.4f", epoch + 1, epochs,
                 history[-1], nprobe, share)
        if n_val == 0 or share > best[0]:
            best = (share, epoch + 1, cent.detach().numpy().copy())
    return CoarseDistillation(best[2].astype(np.float32), np.asarray(history, np.float32),
                              np.asarray(val_history, np.float32), int(best[1]))
