"""DPQ: differentiable product quantization of the embedding table (Chen, Li, Sun, ICML 2020).

Each id has a query vector (training only) cut into ``P`` parts of ``D / P`` dims. Part ``p``
scores its ``K`` keys, the scores go through batch normalization without affine terms (the
reference ``KDQuantizer(softmax_BN=True)``), and the best key's index is the id's code for that
part. Two variants (arXiv:1908.09756, Sec. 2.2):

- ``vq``: keys are the values; score ``-||q_p - k_pk||^2``; the output is the chosen centroid with
  the gradient passed straight through to the query (``q + sg(c - q)``), and the centroids move
  by the regularizer ``mean((c - sg(q))^2) + commitment * mean((sg(c) - q)^2)`` (eq. 5).
- ``sx``: separate value vectors; score ``q_p . k_pk``; the output is ``onehot @ V`` with the
  gradient of ``softmax(score / tau) @ V`` (straight-through softmax, eq. 3-4).

Serving stores only the codes (``log2 K`` bits each, packed back to back) and the value codebook
``[P, K, D / P]``; the query table, the keys of ``sx`` and the batch-norm statistics are training
state. The study's code (Hsword/Hetu ``methods/layers/dpq.py``) uses ``vq`` with ``K = 32`` and
``P = 8`` in one codebook shared by every field, as here. Training scores each distinct id of
the batch once, so the batch-norm statistics are over the batch's distinct ids (the reference
code scores every occurrence).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as fn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD
from embpress.tables.mgqe import code_bits, pack_codes, packed_bytes

MODES = ("vq", "sx")
MAX_PARTS = 8
"""Largest number of parts tried when ``parts`` is None (the study's setting)."""
MAX_CHOICES = 256
"""Largest codebook tried when ``choices`` is None (one byte per code)."""
BN_MOMENTUM = 0.1
BN_EPS = 1e-3
_ENCODE_CHUNK = 65536


@register_table("dpq")
class DPQTable(CompressedTable):
    """Differentiable product quantization (Chen et al. 2020, arXiv:1908.09756); see the module docstring.

    Sizing: with ``parts`` and ``choices`` left None, the configuration with the most code bits per
    row (``P * log2 K``) that fits, ``P`` a divisor of ``D`` up to 8 and ``K`` a power of two up to
    256 (fewer parts on ties); a given ``parts`` or ``choices`` is kept as is.

    Args:
        parts: number of parts ``P`` (divides ``D``); None: chosen by the budget (study: 8).
        choices: keys per part ``K`` (>= 2); None: chosen by the budget (study: 32).
        mode: ``"vq"`` (study) or ``"sx"``.
        batch_norm: normalize the scores over the batch before the argmax (reference: True).
        commitment: weight of the query-commitment term in ``vq`` (study: 0).
        tau: softmax temperature of ``sx``.

    Serving bytes: ``ceil(total * P * log2 K / 8) + 4 K D``. Shapes: ids ``[N, F]`` -> ``[N, F, D]``;
    codebook ``[P, K, D / P]``.

    >>> from embpress.tables import Ratio
    >>> t = DPQTable(fields=[Field("a", 10_000)], dim=16, budget=Ratio(16))
    >>> t.parts_, t.choices_, t.serving_bytes() <= 10_000 * 16 * 4 / 16
    (4, 64, True)
    """

    family = "inter"
    """Every id's vector is read from value codebooks shared by all ids (as MGQE's): inter-feature."""

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, parts: int | None = None,
                 choices: int | None = None, mode: str = "vq", batch_norm: bool = True, commitment: float = 0.0,
                 tau: float = 1.0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if parts is not None and (not isinstance(parts, int) or parts < 1 or dim % parts):
            raise ValueError(f"dpq: parts must be a positive divisor of dim={dim}, got {parts!r}")
        if choices is not None and (not isinstance(choices, int) or choices < 2):
            raise ValueError(f"dpq: choices must be an int >= 2, got {choices!r}")
        if mode not in MODES:
            raise ValueError(f"dpq: mode must be one of {MODES}, got {mode!r}")
        if not commitment >= 0 or not tau > 0:
            raise ValueError(f"dpq: need commitment >= 0 and tau > 0, got {commitment!r}, {tau!r}")
        self.parts, self.choices, self.mode = parts, choices, mode
        self.batch_norm, self.commitment, self.tau = batch_norm, commitment, tau
        self.parts_, self.choices_ = self._size()
        p, k, pd = self.parts_, self.choices_, dim // self.parts_
        self.query = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.query.weight, std=INIT_STD)
        self.keys = nn.Parameter(torch.randn(p, k, pd) * INIT_STD)
        self.values = self.keys if mode == "vq" else nn.Parameter(torch.randn(p, k, pd) * INIT_STD)
        self.register_buffer("bn_mean", torch.zeros(p * k))
        self.register_buffer("bn_var", torch.ones(p * k))
        self.register_buffer("_code_base", torch.arange(p) * k, persistent=False)
        self._reg: torch.Tensor | None = None
        self._codes_cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    # -- sizing ---------------------------------------------------------------------------------

    def _bytes(self, parts: int, choices: int) -> int:
        return packed_bytes(self.total_ids * parts, code_bits(choices)) + choices * self.dim * FP32_BYTES

    def _size(self) -> tuple[int, int]:
        part_opts = [self.parts] if self.parts else [p for p in range(1, min(self.dim, MAX_PARTS) + 1)
                                                     if self.dim % p == 0]
        choice_opts = [self.choices] if self.choices else [2**b for b in range(1, code_bits(MAX_CHOICES) + 1)]
        self.reserve_metadata({}, ndims=4)  # shapes: codes, codebook [P, K, D/P]
        fits = [(p * code_bits(k), -p, k, p) for p in part_opts for k in choice_opts
                if self.fits(self._bytes(p, k))]
        if not fits:
            p, k = min(part_opts), min(choice_opts)
            raise BudgetError(
                f"dpq: the smallest configuration ({p} part(s) of {k} choices: {code_bits(k) * p}-bit codes for "
                f"{self.total_ids:,} ids and a {k} x {self.dim} fp32 codebook) needs {self._bytes(p, k) + self.metadata_reserve:,} bytes "
                f"but the budget allows {self.max_bytes:,} (full table {self.full_bytes:,} bytes, budget {self.budget})"
            )
        _, _, k, p = max(fits)
        return p, k

    # -- quantization ---------------------------------------------------------------------------

    def _scores(self, q: torch.Tensor, training: bool) -> torch.Tensor:
        """Queries ``[n, D]`` -> normalized scores ``[n, P, K]`` (higher is better)."""
        p, k, pd = self.keys.shape
        qp = q.reshape(-1, p, pd).transpose(0, 1)  # [P, n, pd]
        if self.mode == "vq":
            s = 2 * torch.bmm(qp, self.keys.transpose(1, 2)) - self.keys.square().sum(-1).unsqueeze(1)
            s = s - qp.square().sum(-1, keepdim=True)  # -||q - k||^2
        else:
            s = torch.bmm(qp, self.keys.transpose(1, 2))
        s = s.transpose(0, 1).reshape(-1, p * k)
        if self.batch_norm:
            use_batch = training and s.shape[0] > 1
            s = fn.batch_norm(s, self.bn_mean, self.bn_var, training=use_batch, momentum=BN_MOMENTUM, eps=BN_EPS)
        return s.reshape(-1, p, k)

    def _gather(self, codes: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """Codes ``[n, P]`` -> concatenated codebook vectors ``[n, D]``."""
        p, k, pd = book.shape
        return fn.embedding(codes + self._code_base, book.reshape(p * k, pd)).reshape(-1, self.dim)

    def codes_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Codes ``[n, P]`` (int64) of global rows ``[n]`` from the current weights, as served."""
        with torch.no_grad():
            return self._scores(self.query.weight[rows], training=False).argmax(-1)

    def _key(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in (self.query.weight, self.keys, self.values,
                                                          self.bn_mean, self.bn_var))

    def encode_(self) -> torch.Tensor:
        """Codes ``int64[total, P]`` of every id, recomputed only when the weights or batch-norm
        statistics changed (their in-place version counters), so evaluation is a gather."""
        if self._codes_cache is None or self._cache_key != self._key():
            codes = [self.codes_of(torch.arange(s, min(s + _ENCODE_CHUNK, self.total_ids)))
                     for s in range(0, self.total_ids, _ENCODE_CHUNK)]
            self._codes_cache, self._cache_key = torch.cat(codes), self._key()
        return self._codes_cache

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids).reshape(-1)
        training = self.training and torch.is_grad_enabled()
        if not training:
            return self._gather(self.encode_()[gid], self.values).reshape(*ids.shape, self.dim)
        # Scores of the batch's distinct ids (batch-norm statistics over them), then expanded.
        rows, inverse = torch.unique(gid, return_inverse=True)
        q = self.query(rows)
        scores = self._scores(q if self.mode == "sx" else q.detach(), training=True)
        codes = scores.argmax(-1)
        if self.mode == "vq":
            c = self._gather(codes, self.values)
            reg = (c - q.detach()).square().mean()
            if self.commitment:
                reg = reg + self.commitment * (c.detach() - q).square().mean()
            self._reg = reg
            out = q + (c - q).detach()  # straight-through: the value of c, the gradient of q
        else:
            prob = torch.softmax(scores / self.tau, -1)
            onehot = fn.one_hot(codes, self.choices_).to(prob.dtype)
            weights = prob + (onehot - prob).detach()  # [n, P, K]
            out = torch.einsum("npk,pkd->npd", weights, self.values).reshape(-1, self.dim)
        return out[inverse].reshape(*ids.shape, self.dim)

    # -- contract -------------------------------------------------------------------------------

    def regularizer(self) -> torch.Tensor | None:
        reg, self._reg = self._reg, None
        return reg

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.query.weight]

    def array_bytes(self) -> int:
        return self._bytes(self.parts_, self.choices_)

    def array_ndims(self) -> int:  # analytic: packed codes [bytes] and codebook [P, K, D/P]
        return 4

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """``codes``: ``total * P`` codes of ``log2 K`` bits, packed in row-major order (little-endian);
        ``codebook``: ``float32[P, K, D / P]``."""
        flat = self.encode_().reshape(-1).numpy()
        return {"codes": pack_codes(flat, code_bits(self.choices_)), "codebook": to_numpy(self.values)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.parts_}, choices={self.choices_}, mode={self.mode!r}"

