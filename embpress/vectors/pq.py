"""Product quantization (``pq{M}[x{nbits}]``) and optimized PQ (``opq{M}[x{nbits}]``).

PQ: Jégou, Douze, Schmid, "Product Quantization for Nearest Neighbor Search", TPAMI 2011
(https://inria.hal.science/inria-00514462). OPQ: Ge, He, Ke, Sun, "Optimized Product Quantization",
CVPR 2013 / TPAMI 2014 (https://arxiv.org/abs/1311.4055). Training and encoding call FAISS
(``ProductQuantizer``, ``OPQMatrix``) so codes equal ``IndexPQ`` / ``OPQ{M},PQ{M}``'s; scoring is
an asymmetric distance computation (ADC): one (M, 2^nbits) lookup table per query, summed over the
sub-codes of each vector. Codes use FAISS's layout (little-endian bit fields, ``ceil(M*nbits/8)`` bytes).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from embpress.vectors.codec import Codec, register_codec
from embpress.vectors.kernels import lut_queries
from embpress.vectors.metric import Metric
from embpress.vectors.scan import lut_scan, unpack_fields


def _check_pq_params(name: str, m: int, nbits: int) -> None:
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"{name}: number of sub-quantizers M must be a positive int, got {m!r}")
    if not isinstance(nbits, int) or not 1 <= nbits <= 16:
        raise ValueError(f"{name}: nbits must be an int in [1, 16], got {nbits!r}")


def _check_enough_points(spec: str, n: int, k: int) -> None:
    if n < k:
        raise ValueError(
            f"{spec}: k-means needs at least {k} training vectors, got {n}; use fewer nbits or more data"
        )


@register_codec(r"pq(?P<m>\d+)(?:x(?P<nbits>\d+))?", form="pq{M}[x{nbits}]", examples=("pq8", "pq4x6"))
class ProductQuantizer(Codec):
    """Split D into M sub-vectors and quantize each with its own k-means codebook of 2^nbits centroids.

    Args:
        m: number of sub-quantizers M (must divide D).
        nbits: bits per sub-code (default 8).
        seed: k-means seed.

    Fitted: ``centroids_`` (M, 2^nbits, D/M) float32.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
        >>> pq = ProductQuantizer(m=4, nbits=4).fit(x)
        >>> pq.encode(x).shape
        (1000, 2)
    """

    residual_ok = True

    _name = "pq"

    def __init__(self, *, m: int, nbits: int = 8, seed: int = 0):
        self.m = m
        self.nbits = nbits
        self.seed = seed

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls(m=int(groups["m"]), nbits=int(groups["nbits"] or 8), seed=seed)

    def _canonical_spec(self) -> str:
        return f"{self._name}{self.m}x{self.nbits}"

    def _check_params(self) -> None:
        _check_pq_params(self._name, self.m, self.nbits)

    def _code_bytes_for(self, d: int) -> int:
        if d % self.m:
            raise ValueError(f"{self._name}{self.m}: M={self.m} must divide d={d}")
        return (self.m * self.nbits + 7) // 8

    # -------------------------------------------------------------- faiss objects
    def _new_faiss_pq(self, d: int) -> faiss.ProductQuantizer:
        pq = faiss.ProductQuantizer(d, self.m, self.nbits)
        pq.cp.seed = int(self.seed)
        return pq

    def _faiss_pq(self) -> faiss.ProductQuantizer:
        """FAISS quantizer holding ``centroids_`` (rebuilt lazily after from_state)."""
        pq = self.__dict__.get("_pq")
        if pq is None:
            pq = self._new_faiss_pq(self.centroids_.shape[0] * self.centroids_.shape[2])
            faiss.copy_array_to_vector(self.centroids_.ravel(), pq.centroids)
            self._pq = pq
        return pq

    def _train_pq(self, x: np.ndarray) -> None:
        _check_enough_points(self.spec, x.shape[0], 1 << self.nbits)
        pq = self._new_faiss_pq(x.shape[1])
        pq.train(x)
        self._pq = pq
        self.centroids_ = (
            faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub).astype(np.float32)
        )

    # -------------------------------------------------------------- rotation hooks (identity for PQ)
    def _rotate(self, x: np.ndarray) -> np.ndarray:
        return x

    def _unrotate(self, x: np.ndarray) -> np.ndarray:
        return x

    # -------------------------------------------------------------- codec hooks
    def _fit(self, x: np.ndarray) -> None:
        self._train_pq(x)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return self._faiss_pq().compute_codes(np.ascontiguousarray(self._rotate(x), dtype=np.float32))

    def _indices(self, codes: np.ndarray) -> np.ndarray:
        return unpack_fields(codes, self.nbits, self.m)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        idx = self._indices(codes)
        parts = self.centroids_[np.arange(self.m), idx]  # (N, M, dsub)
        return self._unrotate(parts.reshape(codes.shape[0], -1))

    def _luts(self, q: np.ndarray, metric: Metric) -> np.ndarray:
        """(nq, M, K) float32 lookup tables: distance of each query sub-vector to each centroid.

        One batched matrix product per sub-space (BLAS) written straight into the query-first
        layout the scans read (each query's tables contiguous).
        """
        nq = q.shape[0]
        qr = self._rotate(q).reshape(nq, self.m, -1).transpose(1, 0, 2)  # (M, nq, dsub)
        cent_t = self.__dict__.get("_cent_t")
        if cent_t is None or cent_t.shape[0] != self.m:
            cent_t = self._cent_t = np.ascontiguousarray(self.centroids_.transpose(0, 2, 1))  # (M, dsub, K)
        out = np.empty((nq, self.m, cent_t.shape[2]), dtype=np.float32)
        np.matmul(qr, cent_t, out=out.transpose(1, 0, 2))  # <q_m, c_mk>
        if metric is Metric.L2:
            out *= np.float32(-2)
            out += (qr * qr).sum(-1).T[:, :, None]
            out += (self.centroids_**2).sum(-1)[None, :, :]
            return out
        return np.negative(out, out=out)

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        return lut_scan(self._luts(q, metric), self._indices(codes))

    def _search_lists(self, q, codes, k, metric, offsets, ids, probes, bias, mask):
        idx = codes if self.nbits == 8 else self._indices(codes).astype(np.uint16)
        return lut_queries(lambda qq: self._luts(qq, metric), q, idx, k, offsets, ids, probes, bias, mask,
                           rows=self._query_rows)


@register_codec(r"opq(?P<m>\d+)(?:x(?P<nbits>\d+))?", form="opq{M}[x{nbits}]", examples=("opq4x4",))
class OptimizedProductQuantizer(ProductQuantizer):
    """PQ after a learned orthogonal rotation (FAISS ``OPQMatrix``, as in the factory string ``OPQ{M},PQ{M}``).

    Args:
        m: number of sub-quantizers M (must divide D).
        nbits: bits per sub-code (default 8).
        niter: alternations of rotation and PQ updates (FAISS ``OPQMatrix.niter``, default 50).
        seed: k-means seed of the final PQ.

    Fitted: ``rotation_`` (D, D) orthonormal (``xr = x @ rotation_.T``), ``centroids_`` as in PQ.
    """

    _name = "opq"

    def __init__(self, *, m: int, nbits: int = 8, niter: int = 50, seed: int = 0):
        super().__init__(m=m, nbits=nbits, seed=seed)
        self.niter = niter

    def _check_params(self) -> None:
        super()._check_params()
        if not isinstance(self.niter, int) or self.niter < 1:
            raise ValueError(f"opq: niter must be a positive int, got {self.niter!r}")

    def _rotate(self, x: np.ndarray) -> np.ndarray:
        return x @ self.rotation_.T

    def _unrotate(self, x: np.ndarray) -> np.ndarray:
        return x @ self.rotation_

    def _fit(self, x: np.ndarray) -> None:
        _check_enough_points(self.spec, x.shape[0], 256)  # OPQMatrix trains 8-bit PQs
        opq = faiss.OPQMatrix(x.shape[1], self.m)
        opq.niter = int(self.niter)
        opq.train(x)
        self.rotation_ = faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in).astype(np.float32)
        self._train_pq(np.ascontiguousarray(self._rotate(x), dtype=np.float32))

