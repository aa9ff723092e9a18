"""Semantic-ID tokenizers: content vectors ``float32[N, C]`` to code tuples ``int64[N, L]``.

Two residual quantizers of frozen content embeddings, as the semantic-ID literature uses them:

- :class:`RQKMeans`: per-level k-means on the residuals (FAISS k-means), the "RQ-KMeans" baseline
  of semantic-ID papers (e.g. Deng et al., OneRec, arXiv:2502.18965; Luo et al., QARM, arXiv:2411.11739).
- :class:`RQVAE`: the residual-quantized autoencoder of TIGER (Rajput et al., "Recommender Systems
  with Generative Retrieval", NeurIPS 2023, arXiv:2305.05065, Sec. 3.1) that Singh et al. ("Better
  Generalization with Semantic IDs", RecSys 2024, arXiv:2306.08121) use for ranking: an MLP
  encoder to a latent ``z``, ``L`` codebooks quantizing the residual of ``z`` level by level, an
  MLP decoder of the summed codewords, loss ``||x - x_hat||^2 + sum_l ||sg[r_l] - e_l||^2 +
  beta ||r_l - sg[e_l]||^2`` with the straight-through estimator, codebooks initialised by
  k-means on the first batch. TIGER's defaults: ``L=3``, ``K=256``, latent dim 32, beta 0.25.

:func:`add_collision_suffix` appends TIGER's extra level that makes tuples unique, and
:func:`collision_stats` measures how many items share a tuple.

>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(500, 16)).astype(np.float32)
>>> tok = RQKMeans(levels=2, codes=8, seed=0).fit(x)
>>> tok.encode(x).shape, bool(tok.reconstruction_error(x) < 1.0)
((500, 2), True)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _as_content(x: np.ndarray, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be content vectors [N, C] with N, C >= 1, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise ValueError(f"{name} must hold finite floats, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_sizes(levels: int, codes: int, n: int) -> None:
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    if not isinstance(codes, int) or codes < 2:
        raise ValueError(f"codes (per level) must be an int >= 2, got {codes!r}")
    if codes > n:
        raise ValueError(f"codes={codes} per level needs at least as many vectors to fit on, got {n}")


def kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = 25) -> np.ndarray:
    """``float32[k, C]`` centroids of ``x`` by FAISS k-means (seeded, deterministic)."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-len(x) // k)))
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    return d.argmin(1).astype(np.int64)


class RQKMeans:
    """Residual k-means: level ``l`` clusters the residuals left by levels ``< l`` into ``codes`` centroids.

    Args:
        levels: code tuple length ``L``.
        codes: centroids per level ``K``.
        seed: k-means seed (level ``l`` uses ``seed + l``).
        niter: k-means iterations per level.
    """

    def __init__(self, *, levels: int = 3, codes: int = 256, seed: int = 0, niter: int = 25) -> None:
        self.levels, self.codes, self.seed, self.niter = levels, codes, seed, niter

    def fit(self, x: np.ndarray) -> RQKMeans:
        x = _as_content(x)
        _check_sizes(self.levels, self.codes, len(x))
        residual = x.copy()
        books = []
        for level in range(self.levels):
            book = kmeans(residual, self.codes, seed=self.seed + level, niter=self.niter)
            residual -= book[_nearest(residual, book)]
            books.append(book)
        self.codebooks_ = np.stack(books)  # [L, K, C]
        return self

    def _fitted(self) -> None:
        if not hasattr(self, "codebooks_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(x) first")

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``int64[N, L]`` codes (greedy residual assignment)."""
        self._fitted()
        x = _as_content(x)
        if x.shape[1] != self.codebooks_.shape[2]:
            raise ValueError(f"RQKMeans was fit on C={self.codebooks_.shape[2]}, got C={x.shape[1]}")
        residual = x.copy()
        out = np.empty((len(x), self.levels), dtype=np.int64)
        for level, book in enumerate(self.codebooks_):
            out[:, level] = _nearest(residual, book)
            residual -= book[out[:, level]]
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``float32[N, C]``: the sum of the codewords of each tuple."""
        self._fitted()
        codes = np.asarray(codes, dtype=np.int64)
        return sum(self.codebooks_[level][codes[:, level]] for level in range(self.levels)).astype(np.float32)

    def reconstruction_error(self, x: np.ndarray) -> float:
        """Relative squared error ``sum ||x - x_hat||^2 / sum ||x||^2`` in the content space."""
        x = _as_content(x)
        return float(((x - self.decode(self.encode(x))) ** 2).sum() / max((x ** 2).sum(), 1e-30))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE:
    """TIGER's RQ-VAE (arXiv:2305.05065, Sec. 3.1 and 4.1): MLP encoder, ``L`` residual codebooks of
    ``K`` codewords in a ``latent``-dim space, MLP decoder; trained with reconstruction,
    codebook and commitment losses (weight ``beta``), straight-through gradients, and each codebook
    initialised by k-means on the first batch's residuals.

    Args:
        levels, codes, latent, beta: ``L``, ``K``, code dim and commitment weight (TIGER: 3, 256, 32, 0.25).
        hidden: encoder widths between the content dim and ``latent`` (decoder mirrored; TIGER: 512, 256, 128).
        epochs, batch_size, lr: Adam training of the whole model on the content vectors.
        seed: seed of initialisation, batches and k-means.
    """

    def __init__(self, *, levels: int = 3, codes: int = 256, latent: int = 32, beta: float = 0.25,
                 hidden: tuple[int, ...] = (512, 256, 128), epochs: int = 200, batch_size: int = 1024,
                 lr: float = 1e-3, seed: int = 0) -> None:
        self.levels, self.codes, self.latent, self.beta = levels, codes, latent, beta
        self.hidden, self.epochs, self.batch_size, self.lr, self.seed = hidden, epochs, batch_size, lr, seed

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes [N, L], quantized sum [N, latent], codebook + commitment loss)``."""
        residual, total = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        for book in self.books_:
            d = torch.cdist(residual, book)
            c = d.argmin(1)
            e = book[c]
            loss = loss + ((residual.detach() - e) ** 2).sum(1).mean() + self.beta * (
                (residual - e.detach()) ** 2).sum(1).mean()
            codes.append(c)
            total = total + e
            residual = residual - e.detach()
        return torch.stack(codes, 1), total, loss

    def fit(self, x: np.ndarray) -> RQVAE:
        x = _as_content(x)
        _check_sizes(self.levels, self.codes, len(x))
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.encoder_ = _mlp([x.shape[1], *self.hidden, self.latent])
            self.decoder_ = _mlp([self.latent, *reversed(self.hidden), x.shape[1]])
        xt = torch.from_numpy(x)
        first = xt[torch.randperm(len(xt), generator=gen)[: max(self.batch_size, self.codes)]]
        with torch.no_grad():
            residual = self.encoder_(first).numpy()
            books = []
            for level in range(self.levels):
                book = kmeans(residual, self.codes, seed=self.seed + level)
                residual = residual - book[_nearest(residual, book)]
                books.append(nn.Parameter(torch.from_numpy(book)))
        self.books_ = nn.ParameterList(books)
        params = [*self.encoder_.parameters(), *self.decoder_.parameters(), *self.books_.parameters()]
        opt = torch.optim.Adam(params, lr=self.lr)
        self.history_ = []
        for _ in range(self.epochs):
            total = 0.0
            for idx in torch.randperm(len(xt), generator=gen).split(self.batch_size):
                batch = xt[idx]
                z = self.encoder_(batch)
                _, q, vq_loss = self._quantize(z)
                z_q = z + (q - z).detach()  # straight-through
                loss = ((self.decoder_(z_q) - batch) ** 2).sum(1).mean() + vq_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            self.history_.append(total / len(xt))
        return self

    def _fitted(self) -> None:
        if not hasattr(self, "books_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(x) first")

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``int64[N, L]`` codes of the encoder's latent."""
        self._fitted()
        with torch.no_grad():
            return self._quantize(self.encoder_(torch.from_numpy(_as_content(x))))[0].numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``float32[N, C]``: the decoder of the summed codewords."""
        self._fitted()
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        with torch.no_grad():
            q = sum(book[codes[:, level]] for level, book in enumerate(self.books_))
            return self.decoder_(q).numpy()

    def reconstruction_error(self, x: np.ndarray) -> float:
        """Relative squared error ``sum ||x - x_hat||^2 / sum ||x||^2`` in the content space."""
        x = _as_content(x)
        return float(((x - self.decode(self.encode(x))) ** 2).sum() / max((x ** 2).sum(), 1e-30))


TOKENIZERS = {"rq-kmeans": RQKMeans, "rq-vae": RQVAE}


def build_tokenizer(name: str, *, levels: int, codes: int, seed: int) -> RQKMeans | RQVAE:
    """A tokenizer by name (``rq-kmeans`` or ``rq-vae``) with its other settings at their defaults."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown semantic-ID tokenizer {name!r}; available: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](levels=levels, codes=codes, seed=seed)


def add_collision_suffix(codes: np.ndarray) -> np.ndarray:
    """``int64[N, L + 1]``: ``codes`` plus a last level numbering the items that share a tuple
    (0, 1, 2, ... in item order), which makes every tuple unique (TIGER, Sec. 3.1).

    >>> add_collision_suffix(np.array([[1, 2], [1, 2], [0, 2]])).tolist()
    [[1, 2, 0], [1, 2, 1], [0, 2, 0]]
    """
    codes = np.asarray(codes, dtype=np.int64)
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    sorted_groups = inverse[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    rank_sorted = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    suffix = np.empty(len(codes), dtype=np.int64)
    suffix[order] = rank_sorted
    return np.concatenate([codes, suffix[:, None]], axis=1)


def collision_stats(codes: np.ndarray) -> dict[str, float]:
    """How items share code tuples: ``items``, ``unique`` tuples, ``collision_rate`` (share of items
    whose tuple another item also has) and ``max_share`` (most items on one tuple: the codes the
    collision suffix level needs).

    >>> collision_stats(np.array([[1, 2], [1, 2], [0, 2]]))
    {'items': 3, 'unique': 2, 'collision_rate': 0.6666666666666666, 'max_share': 2}
    """
    codes = np.asarray(codes, dtype=np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1
    return {"items": int(len(codes)), "unique": int(len(counts)), "collision_rate": float(shared.mean()),
            "max_share": int(counts.max())}
