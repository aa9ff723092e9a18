"""Similarity metrics and the search-result convention shared by codecs and indexes.

Every score in ``embpress.vectors`` is a *distance*: smaller is better. For :attr:`Metric.L2` it is
the squared Euclidean distance; for :attr:`Metric.IP` and :attr:`Metric.COSINE` it is the negated
similarity. Codecs treat COSINE exactly like IP and assume the caller (the index) has L2-normalised
both the corpus vectors and the queries.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class Metric(enum.Enum):
    """How two vectors are compared: inner product, cosine, or (squared) Euclidean distance."""

    IP = "ip"
    COSINE = "cosine"
    L2 = "l2"


_METRIC_ALIASES: dict[str, Metric] = {
    "ip": Metric.IP,
    "dot": Metric.IP,
    "inner_product": Metric.IP,
    "cos": Metric.COSINE,
    "cosine": Metric.COSINE,
    "l2": Metric.L2,
    "euclidean": Metric.L2,
}


def as_metric(m: str | Metric) -> Metric:
    """Turn a friendly spelling (``"ip"``, ``"dot"``, ``"cos"``, ``"euclidean"``, ...) into a :class:`Metric`.

    >>> as_metric("dot")
    <Metric.IP: 'ip'>
    """
    if isinstance(m, Metric):
        return m
    if isinstance(m, str):
        try:
            return _METRIC_ALIASES[m.strip().lower()]
        except KeyError:
            pass
    raise ValueError(f"unknown metric {m!r}; allowed: {sorted(_METRIC_ALIASES)} or a Metric member")


class SearchResult(NamedTuple):
    """Top-k hits of a batch of queries; unpacks as ``D, I = result``.

    distances: (nq, k) float32, ascending (smaller is better), ``+inf`` where fewer than k hits.
        L2: squared distance; IP / COSINE: negated similarity.
    ids: (nq, k) int64, ``-1`` where fewer than k hits.
    """

    distances: np.ndarray
    ids: np.ndarray


def pairwise_distances(q: np.ndarray, x: np.ndarray, metric: Metric) -> np.ndarray:
    """Exact distances between float vectors in the embpress convention (smaller is better).

    Args:
        q: (nq, D) float32 queries.
        x: (N, D) float32 vectors.
        metric: L2 gives squared distances; IP and COSINE give ``-<q, x>`` (inputs assumed
            normalised for COSINE).

    Returns:
        (nq, N) float32.
    """
    q = np.asarray(q, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    ip = q @ x.T
    if metric is Metric.L2:
        d = (q * q).sum(1, dtype=np.float32)[:, None] + (x * x).sum(1, dtype=np.float32)[None, :] - 2 * ip
        return np.maximum(d, 0, out=d).astype(np.float32, copy=False)
    return np.negative(ip, out=ip).astype(np.float32, copy=False)
