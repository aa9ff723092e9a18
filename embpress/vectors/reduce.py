"""Dimension reducers: PCA projection (``pca{d}``) and Matryoshka truncation (``mrl{d}``).

Alone, a reducer stores the reduced vectors in float32 (``4 * d`` bytes); before a codec
(``"pca128+sq8"``) it shrinks what the codec sees. Both decode back to the input space, and their
query transforms make a composition score exactly like its decoded vectors (see
:class:`embpress.vectors.codec.Reducer`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embpress.vectors.codec import Codec, Reducer, register_codec
from embpress.vectors.metric import Metric


def _check_out_dim(name: str, dim: int, d: int | None = None) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{name} output dim must be a positive int, got {dim!r} (e.g. '{name}128')")
    if d is not None and dim > d:
        raise ValueError(f"{name}{dim} cannot reduce d={d} vectors to {dim} dims; use a dim <= {d}")


@register_codec(r"pca(?P<dim>\d+)", form="pca{d}", examples=("pca16",))
class PCAReducer(Reducer):
    """Project centred vectors on the top-``dim`` principal directions (Pearson 1901; FAISS ``PCAMatrix``).

    ``y = (x - mean_) @ components_.T``; ``inverse_transform(y) = mean_ + y @ components_``.
    For IP/COSINE queries are projected without centring (``<q, mean_ + V^T y> = <q, mean_> +
    <V q, y>``), so rankings are exact with respect to the decoded vectors.

    Args:
        dim: output dimension (<= input dim).

    Fitted: ``mean_`` (D,), ``components_`` (dim, D) orthonormal rows, ``explained_variance_`` (dim,).

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
        >>> PCAReducer(dim=3).fit(x).transform(x).shape
        (200, 3)
    """

    def __init__(self, *, dim: int):
        self.dim = dim

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls(dim=int(groups["dim"]))

    def _canonical_spec(self) -> str:
        return f"pca{self.dim}"

    def _check_params(self) -> None:
        _check_out_dim("pca", self.dim)

    def _out_dim_for(self, d: int) -> int:
        _check_out_dim("pca", self.dim, d)
        return self.dim

    def _fit(self, x: np.ndarray) -> None:
        mean = x.mean(axis=0, dtype=np.float64)
        xc = x.astype(np.float64) - mean
        cov = xc.T @ xc / max(1, x.shape[0] - 1)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][: self.dim]
        comps = evecs[:, order].T
        # Deterministic signs: the largest-magnitude entry of each component is positive.
        flip = np.sign(comps[np.arange(self.dim), np.abs(comps).argmax(axis=1)])
        comps *= np.where(flip == 0, 1, flip)[:, None]
        self.mean_ = mean.astype(np.float32)
        self.components_ = np.ascontiguousarray(comps, dtype=np.float32)
        self.explained_variance_ = np.maximum(evals[order], 0).astype(np.float32)

    def _transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) @ self.components_.T

    def _inverse_transform(self, y: np.ndarray) -> np.ndarray:
        return self.mean_ + y @ self.components_

    def _query_transform(self, q: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        if metric is Metric.L2:
            qc = q - self.mean_
            yq = qc @ self.components_.T
            return yq, np.maximum((qc * qc).sum(1) - (yq * yq).sum(1), 0)
        return q @ self.components_.T, -(q @ self.mean_)


@register_codec(r"mrl(?P<dim>\d+)", form="mrl{d}", examples=("mrl16",))
class MatryoshkaReducer(Reducer):
    """Keep the first ``dim`` dimensions of Matryoshka embeddings (Kusupati et al. 2022, arXiv:2205.13147).

    With ``normalize=True`` (default) the kept prefix of each corpus vector is rescaled to unit
    norm, which is how Matryoshka prefixes are compared (cosine). Queries are truncated but not
    rescaled: for IP/COSINE a positive per-query scale does not change the ranking, and it keeps
    ``distances`` equal to the distances to ``decode`` (the zero-padded normalised prefix). For L2
    the query's dropped tail adds the constant ``|q[dim:]|^2``.

    Args:
        dim: number of leading dimensions kept (<= input dim).
        normalize: rescale kept prefixes of the corpus vectors to unit norm.

    Examples:
        >>> import numpy as np
        >>> x = np.arange(8, dtype=np.float32).reshape(2, 4)
        >>> MatryoshkaReducer(dim=2, normalize=False).fit(x).transform(x)
        array([[0., 1.],
               [4., 5.]], dtype=float32)
    """

    def __init__(self, *, dim: int, normalize: bool = True):
        self.dim = dim
        self.normalize = normalize

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls(dim=int(groups["dim"]))

    def _canonical_spec(self) -> str:
        return f"mrl{self.dim}"

    def _check_params(self) -> None:
        _check_out_dim("mrl", self.dim)

    def _out_dim_for(self, d: int) -> int:
        _check_out_dim("mrl", self.dim, d)
        return self.dim

    def _fit(self, x: np.ndarray) -> None:
        pass

    def _transform(self, x: np.ndarray) -> np.ndarray:
        y = np.array(x[:, : self.dim], dtype=np.float32)
        if self.normalize:
            norms = np.linalg.norm(y, axis=1, keepdims=True)
            y /= np.where(norms > 0, norms, 1)
        return y

    def _inverse_transform(self, y: np.ndarray) -> np.ndarray:
        out = np.zeros((y.shape[0], self.d_), dtype=np.float32)
        out[:, : self.dim] = y
        return out

    def _query_transform(self, q: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        yq = q[:, : self.dim]
        if metric is Metric.L2:
            tail = q[:, self.dim :]
            return yq, (tail * tail).sum(1)
        return yq, np.zeros(q.shape[0], dtype=np.float32)
