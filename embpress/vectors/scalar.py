"""Scalar codecs: fp16 and per-dimension min/max uniform quantizers (``sq8``, ``sq4``).

``sq8``/``sq4`` follow FAISS's ``ScalarQuantizer`` ``QT_8bit``/``QT_4bit`` with the default
``RS_minmax`` range: per dimension j, ``code = floor(levels * clip((x - vmin_j) / vdiff_j, 0, 1))``
and ``decode = vmin_j + (code + 0.5) / levels * vdiff_j``. ``sq4`` packs two dims per byte, the
even dim in the low nibble. Scoring folds the per-dim scale into the query and runs on the integer
codes (Jégou et al. use the same trick for SQ in FAISS: https://arxiv.org/abs/2401.08281).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embpress.vectors.codec import Codec, register_codec
from embpress.vectors.metric import Metric, pairwise_distances


@register_codec(r"fp16", form="fp16", examples=("fp16",))
class Float16Codec(Codec):
    """Half-precision storage: 2 bytes per dimension; scores in float32 block by block.

    Examples:
        >>> import numpy as np
        >>> x = np.ones((2, 4), dtype=np.float32) / 3
        >>> Float16Codec().fit(x).encode(x).shape
        (2, 8)
    """

    residual_ok = True

    def __init__(self) -> None:
        pass

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls()

    def _canonical_spec(self) -> str:
        return "fp16"

    def _code_bytes_for(self, d: int) -> int:
        return 2 * d

    def _fit(self, x: np.ndarray) -> None:
        pass

    def _encode(self, x: np.ndarray) -> np.ndarray:
        if np.abs(x).max(initial=0) > np.finfo(np.float16).max:
            raise ValueError("fp16 codec: values beyond +-65504 overflow float16; rescale the vectors")
        return x.astype(np.float16).view(np.uint8)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        return codes.view(np.float16).astype(np.float32)

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        return pairwise_distances(q, codes.view(np.float16).astype(np.float32), metric)


@register_codec(r"sq(?P<bits>\d+)", form="sq8|sq4", examples=("sq8", "sq4"))
class ScalarQuantizer(Codec):
    """Per-dimension uniform scalar quantization with ``bits`` in {4, 8} (FAISS ``QT_8bit``/``QT_4bit``).

    Args:
        bits: 8 (one byte per dim) or 4 (two dims per byte).

    Fitted: ``vmin_`` (D,) and ``vdiff_`` (D,) float32 ranges.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((100, 6)).astype(np.float32)
        >>> sq = ScalarQuantizer(bits=4).fit(x)
        >>> sq.code_bytes, float(np.abs(sq.decode(sq.encode(x)) - x).max() <= sq.vdiff_.max() / 15)
        (3, 1.0)
    """

    residual_ok = True

    def __init__(self, *, bits: int = 8):
        self.bits = bits

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        return cls(bits=int(groups["bits"]))

    def _canonical_spec(self) -> str:
        return f"sq{self.bits}"

    def _check_params(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"sq bits must be 4 or 8, got {self.bits!r} (use 'sq8' or 'sq4')")

    @property
    def _levels(self) -> int:
        return (1 << self.bits) - 1

    def _code_bytes_for(self, d: int) -> int:
        return d if self.bits == 8 else (d + 1) // 2

    def _fit(self, x: np.ndarray) -> None:
        vmin = x.min(axis=0)
        self.vmin_ = vmin.astype(np.float32)
        self.vdiff_ = (x.max(axis=0) - vmin).astype(np.float32)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        safe = np.where(self.vdiff_ > 0, self.vdiff_, np.float32(1))
        xi = np.clip((x - self.vmin_) / safe, 0, 1)
        xi[:, self.vdiff_ == 0] = 0
        c = (np.float32(self._levels) * xi).astype(np.uint8)
        if self.bits == 8:
            return c
        if c.shape[1] % 2:
            c = np.concatenate([c, np.zeros((c.shape[0], 1), dtype=np.uint8)], axis=1)
        return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)

    def _levels_of(self, codes: np.ndarray) -> np.ndarray:
        """Integer levels (N, D) as float32 from packed codes."""
        if self.bits == 8:
            return codes.astype(np.float32)
        c = np.empty((codes.shape[0], 2 * codes.shape[1]), dtype=np.uint8)
        c[:, 0::2] = codes & 0x0F
        c[:, 1::2] = codes >> 4
        return c[:, : self.d_].astype(np.float32)

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """decode(c) = a + b * c per dim."""
        b = self.vdiff_ / np.float32(self._levels)
        return (self.vmin_ + np.float32(0.5) * b).astype(np.float32), b.astype(np.float32)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        a, b = self._affine()
        return a + b * self._levels_of(codes)

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        a, b = self._affine()
        c = self._levels_of(codes)
        if metric is Metric.L2:
            r = q - a  # |r - b*c|^2 = |r|^2 - 2 c.(r*b) + c^2.b^2, scale folded into the query
            d = (r * r).sum(1)[:, None] - 2 * ((r * b) @ c.T) + ((c * c) @ (b * b))[None, :]
            return np.maximum(d, 0)
        return -((q @ a)[:, None] + (q * b) @ c.T)
