"""Residual quantization (``rq{M}[x{nbits}]``): M codebooks applied one after another to the residual.

Chen, Guan, Wang, "Approximate Nearest Neighbor Search by Residual Vector Quantization", Sensors
2010; beam-search encoding as in Babenko & Lempitsky's additive quantizers and FAISS's
``ResidualQuantizer`` (Douze et al., https://arxiv.org/abs/2401.08281). Training and encoding call
FAISS with ``ST_norm_float``: each code holds M nbit indices plus the float32 squared norm of the
reconstruction, so L2 scoring is ``|q|^2 - 2 sum_m <q, c_m> + |x_hat|^2`` from an (M, 2^nbits)
lookup table per query, with no decoding. Codes equal ``IndexResidualQuantizer(..., ST_norm_float)``'s.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from embpress.vectors.codec import Codec, register_codec
from embpress.vectors.kernels import lut_queries
from embpress.vectors.metric import Metric
from embpress.vectors.scan import lut_scan, unpack_fields

_NORM_BITS = 32


@register_codec(r"rq(?P<m>\d+)(?:x(?P<nbits>\d+))?", form="rq{M}[x{nbits}]", examples=("rq4x4",))
class ResidualQuantizer(Codec):
    """Residual quantizer with M stages of 2^nbits full-dimensional centroids, plus a float32 norm.

    ``code_bytes = ceil((M * nbits + 32) / 8)``.

    Args:
        m: number of stages M.
        nbits: bits per stage (default 8).
        beam_size: beam width of the encoder (FAISS ``max_beam_size``).
        seed: k-means seed.

    Fitted: ``codebooks_`` (M, 2^nbits, D) float32.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
        >>> rq = ResidualQuantizer(m=2, nbits=4).fit(x)
        >>> rq.encode(x).shape
        (500, 5)
    """

    residual_ok = True

    def __init__(self, *, m: int, nbits: int = 8, beam_size: int = 5, seed: int = 0):
        self.m = m
        self.nbits = nbits
        self.beam_size = beam_size
        self.seed = seed

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls(m=int(groups["m"]), nbits=int(groups["nbits"] or 8), seed=seed)

    def _canonical_spec(self) -> str:
        return f"rq{self.m}x{self.nbits}"

    def _check_params(self) -> None:
        if not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"rq: number of stages M must be a positive int, got {self.m!r}")
        if not isinstance(self.nbits, int) or not 1 <= self.nbits <= 16:
            raise ValueError(f"rq: nbits must be an int in [1, 16], got {self.nbits!r}")
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"rq: beam_size must be a positive int, got {self.beam_size!r}")

    def _code_bytes_for(self, d: int) -> int:
        return (self.m * self.nbits + _NORM_BITS + 7) // 8

    def _new_faiss_rq(self, d: int) -> faiss.ResidualQuantizer:
        rq = faiss.ResidualQuantizer(d, self.m, self.nbits, faiss.AdditiveQuantizer.ST_norm_float)
        rq.cp.seed = int(self.seed)
        rq.max_beam_size = int(self.beam_size)
        return rq

    def _faiss_rq(self) -> faiss.ResidualQuantizer:
        rq = self.__dict__.get("_rq")
        if rq is None:
            rq = self._new_faiss_rq(self.codebooks_.shape[2])
            faiss.copy_array_to_vector(self.codebooks_.ravel(), rq.codebooks)
            rq.is_trained = True
            self._rq = rq
        return rq

    def _fit(self, x: np.ndarray) -> None:
        if x.shape[0] < 1 << self.nbits:
            raise ValueError(
                f"{self.spec}: k-means needs at least {1 << self.nbits} training vectors, "
                f"got {x.shape[0]}; use fewer nbits or more data"
            )
        rq = self._new_faiss_rq(x.shape[1])
        rq.train(x)
        self._rq = rq
        k = 1 << self.nbits
        self.codebooks_ = (
            faiss.vector_to_array(rq.codebooks).reshape(self.m, k, x.shape[1]).astype(np.float32)
        )

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return self._faiss_rq().compute_codes(x)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        idx = unpack_fields(codes, self.nbits, self.m)
        return self.codebooks_[np.arange(self.m), idx].sum(axis=1, dtype=np.float32)

    def _norms(self, codes: np.ndarray) -> np.ndarray:
        """Stored squared norms of the reconstructions, (N,) float32."""
        raw = unpack_fields(codes, _NORM_BITS, 1, offset_bits=self.m * self.nbits)[:, 0]
        return raw.astype(np.uint32).view(np.float32)

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        luts = np.einsum("qd,mkd->qmk", q, self.codebooks_).astype(np.float32)  # <q, c_mk>
        ip = lut_scan(luts, unpack_fields(codes, self.nbits, self.m))
        if metric is Metric.L2:
            d = (q * q).sum(1)[:, None] - 2 * ip + self._norms(codes)[None, :]
            return np.maximum(d, 0)
        return -ip

    def _search_lists(self, q, codes, k, metric, offsets, ids, probes, bias, mask):
        idx = unpack_fields(codes, self.nbits, self.m)
        idx = idx.astype(np.uint8 if self.nbits <= 8 else np.uint16)
        scale = np.float32(2 if metric is Metric.L2 else 1)

        def luts(qq: np.ndarray) -> np.ndarray:
            flat = self.codebooks_.reshape(-1, self.codebooks_.shape[2])  # (M*K, D): one matrix product
            return (np.float32(-scale) * (qq @ flat.T)).reshape(qq.shape[0], self.m, -1)

        extra = self._norms(codes) if metric is Metric.L2 else None
        dist, found = lut_queries(luts, q, idx, k, offsets, ids, probes, bias, mask, rows=self._query_rows,
                                  extra=extra)
        if metric is Metric.L2:  # |q|^2 - 2 <q, x_hat> + |x_hat|^2
            dist = np.maximum(dist + (q * q).sum(1)[:, None], 0)
        return dist, found
