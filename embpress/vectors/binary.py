"""Sign binarization: plain ``bin``, and the baselines ``rbin{B}`` (random rotation) and ``itq{B}`` (ITQ).

``bin`` keeps the sign of every dimension (``ceil(D/8)`` bytes, as in sentence-transformers' binary
quantization). ``rbin{B}`` centres the vectors and takes the signs of B random orthogonal
projections (sign random projections, Charikar 2002). ``itq{B}`` centres, projects on the top-B
principal directions (or, for B > D, a random orthogonal expansion to B dims) and learns a rotation
that minimises the binarization error (Gong & Lazebnik, "Iterative Quantization", CVPR 2011,
https://doi.org/10.1109/CVPR.2011.5995432). They are the fixed-projection baselines for BEBR.

Scoring is symmetric by default: the query is binarized the same way and distances come from XOR +
popcount on packed bits. With B bits and Hamming distance h, the codes are treated as ±1 vectors:
IP/COSINE distance ``= 2h - B`` (the negated ±1 inner product ``B - 2h``) and L2 distance ``= 4h``
(the squared distance between ±1 vectors). ``asymmetric=True`` scores the projected float query
against the ±1 codes instead (``-<v_q, b>`` and ``|v_q - b|^2``) through byte lookup tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embpress.vectors.codec import Codec, register_codec
from embpress.vectors.kernels import as_words, faiss_hamming_flat, hamming_search, lut_queries
from embpress.vectors.metric import Metric
from embpress.vectors.scan import hamming, lut_scan, pm1_lut, sign_bits

_ITQ_MAX_TRAIN = 50_000


class _SignCodec(Codec):
    """Shared maths of sign codecs: project to B dims, pack signs, score by popcount."""

    asymmetric: bool

    def _n_bits(self, d: int) -> int:
        raise NotImplementedError

    def _project(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, B) float32 values whose signs are the bits."""
        raise NotImplementedError

    def _unproject(self, pm1: np.ndarray) -> np.ndarray:
        """(N, B) ±1 -> (N, D) float32 approximate reconstruction."""
        raise NotImplementedError

    def _code_bytes_for(self, d: int) -> int:
        return (self._n_bits(d) + 7) // 8

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return sign_bits(self._project(x))

    def _pm1(self, codes: np.ndarray) -> np.ndarray:
        bits = np.unpackbits(codes, axis=1, count=self._n_bits(self.d_))
        return bits.astype(np.float32) * 2 - 1

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        return self._unproject(self._pm1(codes))

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        nbits = self._n_bits(self.d_)
        v = self._project(q)
        if self.asymmetric:
            ip = lut_scan(pm1_lut(v), codes)
            if metric is Metric.L2:
                return np.maximum((v * v).sum(1)[:, None] - 2 * ip + np.float32(nbits), 0)
            return -ip
        h = hamming(sign_bits(v), codes).astype(np.float32)
        return self._from_hamming(h, metric)

    def _from_hamming(self, h: np.ndarray, metric: Metric) -> np.ndarray:
        """Hamming distances -> this codec's distances (both monotone in h)."""
        if metric is Metric.L2:
            return 4 * h
        return 2 * h - np.float32(self._n_bits(self.d_))

    def _search_lists(self, q, codes, k, metric, offsets, ids, probes, bias, mask):
        if bias.size:
            raise ValueError(f"{self.spec}: sign codes cannot take a per-list bias (no residual encoding)")
        nbits = self._n_bits(self.d_)
        v = self._project(q)
        if self.asymmetric:
            scale = np.float32(2 if metric is Metric.L2 else 1)
            dist, found = lut_queries(lambda vv: -scale * pm1_lut(vv), v, codes, k, offsets, ids, probes, bias,
                                      mask, rows=self._query_rows)
            if metric is Metric.L2:  # |v|^2 - 2 <v, b> + B
                dist = np.maximum(dist + ((v * v).sum(1)[:, None] + np.float32(nbits)), 0)
            return dist, found
        flat = offsets.size == 2 and not ids.size and not probes.any() and probes.shape[1] == 1
        if flat and mask.shape[0] <= 1:  # FAISS's kernel, as fast as ours here (see kernels)
            h, found = faiss_hamming_flat(sign_bits(v), codes, k, mask[0] if mask.size else None)
        else:
            h, found = hamming_search(as_words(sign_bits(v)), as_words(codes), offsets, ids, probes, mask, k)
        return np.where(found >= 0, self._from_hamming(h, metric), np.float32(np.inf)), found


@register_codec(r"bin", form="bin", examples=("bin",))
class SignBinarizer(_SignCodec):
    """One bit per dimension: the sign of each coordinate; decodes to ±1.

    Args:
        asymmetric: score float queries against the ±1 codes instead of binarizing them.

    Examples:
        >>> import numpy as np
        >>> x = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
        >>> c = SignBinarizer().fit(x)
        >>> c.encode(x), c.decode(c.encode(x))
        (array([[160]], dtype=uint8), array([[ 1., -1.,  1.]], dtype=float32))
    """

    def __init__(self, *, asymmetric: bool = False):
        self.asymmetric = asymmetric

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls()

    def _canonical_spec(self) -> str:
        return "bin"

    def _n_bits(self, d: int) -> int:
        return d

    def _fit(self, x: np.ndarray) -> None:
        pass

    def _project(self, x: np.ndarray) -> np.ndarray:
        return x

    def _unproject(self, pm1: np.ndarray) -> np.ndarray:
        return pm1


def random_orthogonal(d: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """A (d, b) projection whose columns are orthonormal in blocks of at most d (stacked when b > d)."""
    blocks = []
    for s in range(0, b, d):
        g = rng.standard_normal((d, d))
        qm, r = np.linalg.qr(g)
        qm *= np.sign(np.diag(r))  # Haar-distributed
        blocks.append(qm[:, : min(d, b - s)])
    return np.concatenate(blocks, axis=1).astype(np.float32)


class _ProjectedSignCodec(_SignCodec):
    """Centre, project with ``proj_`` (D, B), binarize; decode with the pseudo-inverse, scaled."""

    bits: int

    def _check_params(self) -> None:
        if not isinstance(self.bits, int) or self.bits < 1:
            raise ValueError(
                f"{self._canonical_spec()}: number of bits B must be a positive int, got {self.bits!r}"
            )

    def _n_bits(self, d: int) -> int:
        return self.bits

    def _learn_projection(self, xc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _fit(self, x: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        self.mean_ = x.mean(axis=0).astype(np.float32)
        xc = x - self.mean_
        if xc.shape[0] > _ITQ_MAX_TRAIN:
            xc = xc[rng.choice(xc.shape[0], _ITQ_MAX_TRAIN, replace=False)]
        self.proj_ = np.ascontiguousarray(self._learn_projection(xc, rng), dtype=np.float32)
        v = xc @ self.proj_
        self.scale_ = float(np.abs(v).mean()) or 1.0  # least-squares scale of ±1 towards v
        self.back_ = np.linalg.pinv(self.proj_.astype(np.float64)).astype(np.float32)

    def _project(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) @ self.proj_

    def _unproject(self, pm1: np.ndarray) -> np.ndarray:
        return self.mean_ + (np.float32(self.scale_) * pm1) @ self.back_


@register_codec(r"rbin(?P<bits>\d+)", form="rbin{B}", examples=("rbin48",))
class RandomRotationBinarizer(_ProjectedSignCodec):
    """B sign bits of random orthogonal projections of the centred vectors (B may exceed D).

    Args:
        bits: total bits B per vector.
        seed: seed of the random rotation.
        asymmetric: score float projected queries against ±1 codes.

    Fitted: ``mean_`` (D,), ``proj_`` (D, B), ``back_`` (B, D) pseudo-inverse, ``scale_``.
    """

    def __init__(self, *, bits: int, seed: int = 0, asymmetric: bool = False):
        self.bits = bits
        self.seed = seed
        self.asymmetric = asymmetric

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls(bits=int(groups["bits"]), seed=seed)

    def _canonical_spec(self) -> str:
        return f"rbin{self.bits}"

    def _learn_projection(self, xc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return random_orthogonal(xc.shape[1], self.bits, rng)


@register_codec(r"itq(?P<bits>\d+)", form="itq{B}", examples=("itq16",))
class ITQBinarizer(_ProjectedSignCodec):
    """Iterative Quantization: PCA to B dims (random expansion when B > D), then a learned rotation.

    Alternates ``b = sign(v R)`` and the orthogonal Procrustes update of R (Gong & Lazebnik 2011,
    Sec. 2.3) for ``niter`` iterations on at most 50k training vectors.

    Args:
        bits: total bits B per vector.
        niter: ITQ iterations.
        seed: seed of the initial rotation (and of the expansion when B > D).
        asymmetric: score float projected queries against ±1 codes.

    Fitted: ``mean_`` (D,), ``proj_`` (D, B), ``back_`` (B, D), ``scale_``.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
        >>> ITQBinarizer(bits=8).fit(x).encode(x).shape
        (300, 1)
    """

    def __init__(self, *, bits: int, niter: int = 50, seed: int = 0, asymmetric: bool = False):
        self.bits = bits
        self.niter = niter
        self.seed = seed
        self.asymmetric = asymmetric

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls(bits=int(groups["bits"]), seed=seed)

    def _canonical_spec(self) -> str:
        return f"itq{self.bits}"

    def _learn_projection(self, xc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        d, b = xc.shape[1], self.bits
        x64 = xc.astype(np.float64)
        if b <= d:
            evals, evecs = np.linalg.eigh(x64.T @ x64)
            pca = evecs[:, np.argsort(evals)[::-1][:b]]
        else:
            pca = random_orthogonal(d, b, rng).astype(np.float64)
        return pca @ itq_rotation((x64 @ pca).astype(np.float32), self.niter, rng).astype(np.float64)


def itq_rotation(v: np.ndarray, niter: int, rng: np.random.Generator) -> np.ndarray:
    """ITQ's learned rotation ``R`` (B, B) of projected data ``v`` (N, B): from a random orthogonal
    start, alternate ``b = sign(v R)`` and the orthogonal Procrustes solution of ``min |b - v R|``."""
    b = v.shape[1]
    rot = random_orthogonal(b, b, rng)
    for _ in range(niter):
        bits = np.where(v @ rot > 0, np.float32(1), np.float32(-1))
        u, _, wt = np.linalg.svd((v.T @ bits).astype(np.float64))
        rot = (u @ wt).astype(np.float32)
    return rot
