"""Quantization-aware training of the full table to int8 / int16 (INT8/INT16 of the VLDB 2024 study).

The rows train in fp32 (shadow weights) while every lookup sees them fake-quantized: rounded to
the integer grid the server will store, with the straight-through estimator passing the gradient
to the fp32 rows unchanged (Jacob et al., arXiv:1712.05877, Sec. 3; for embedding tables the
study cites "Training with Low-precision Embedding Tables", Yang et al. 2020). The study's code
(Hsword/Hetu ``methods/layers/quantize.py``, ``gpu_ops/QuantizeEmbedding.py``) keeps the table
itself in int8/int16 during training, with one fixed scale and zero point for the whole table
(``scale=0.01, middle=0``) and stochastic rounding of the updated rows; that low-precision
storage is :mod:`embpress.tables.alpt` (with learned step sizes). Here the per-table scale
follows the table's current range (``max |w| / (2**(bits-1) - 1)`` per field), so no scale has
to be tuned, and ``granularity="row"`` uses FBGEMM's asymmetric row-wise format (scale and offset
per row, shared with :mod:`embpress.tables.quant`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn

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
from embpress.tables.quant import ROW_QPARAM_BYTES, dequantize_rows, quantize_rows

GRANULARITIES = ("table", "row")
"""``table``: one symmetric fp32 scale per field; ``row``: fp32 scale and offset per row."""


def fake_quant_symmetric(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``round(w / scale)`` clamped to ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, times ``scale`` (no gradient)."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        return torch.round(w / scale).clamp_(-qmax, qmax) * scale


class _QATTable(CompressedTable):
    """Quantization-aware training of one fp32 row per id; see the module docstring."""

    family = "intra"

    bits: ClassVar[int] = 8
    code_dtype: ClassVar[type] = np.int8

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None,
                 granularity: str = "table") -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if granularity not in GRANULARITIES:
            raise ValueError(f"{self.method}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        # shapes: codes [total, D] and scale (table), or codes, scale and offset (row)
        self.reserve_metadata({}, ndims=3 if granularity == "table" else 4)
        need = self._bytes() + self.metadata_reserve
        if need > self.max_bytes:
            raise BudgetError(
                f"{self.method}: {self.total_ids:,} rows of {self.bits}-bit codes with "
                f"{'one fp32 scale per field' if granularity == 'table' else 'an fp32 scale and offset per row'} "
                f"need {need:,} bytes with their shapes but the budget allows {self.max_bytes:,}: {self.method} "
                f"reaches at most "
                f"ratio {self.full_bytes / need:.3f} at dim {dim} (granularity={granularity!r})"
            )
        self.weight = nn.Embedding(self.total_ids, dim, sparse=True)
        nn.init.normal_(self.weight.weight, std=INIT_STD)
        field_of_row = torch.repeat_interleave(torch.arange(self.num_fields), self._sizes)
        self.register_buffer("_field_of_row", field_of_row, persistent=False)
        self._scale_cache: torch.Tensor | None = None
        self._scale_key: tuple | None = None

    def _bytes(self) -> int:
        code = np.dtype(self.code_dtype).itemsize
        if self.granularity == "table":
            return self.total_ids * self.dim * code + self.num_fields * FP32_BYTES
        return self.total_ids * (self.dim * code + ROW_QPARAM_BYTES)

    # -- quantization ----------------------------------------------------------------------

    def field_scales(self) -> torch.Tensor:
        """Per-field scale ``max |w_f| / (2**(bits-1) - 1)`` (``float32[F]``; 1 for an all-zero field).

        Recomputed only when the weights changed (tracked by their in-place version counter):
        during training that is every step, a pass over the whole table.
        """
        w = self.weight.weight
        key = (w._version, w.data_ptr())
        if self._scale_cache is None or self._scale_key != key:
            with torch.no_grad():
                amax = torch.zeros(self.num_fields, dtype=w.dtype, device=w.device)
                amax.scatter_reduce_(0, self._field_of_row, w.abs().amax(1), reduce="amax")
                scale = amax / (2 ** (self.bits - 1) - 1)
                self._scale_cache = torch.where(scale > 0, scale, torch.ones_like(scale))
                self._scale_key = key
        return self._scale_cache

    def _quantized(self, w: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """The served values of rows ``w [..., D]`` whose fields are ``fields [...]`` (no gradient)."""
        if self.granularity == "table":
            return fake_quant_symmetric(w, self.field_scales()[fields].unsqueeze(-1), self.bits)
        rows = w.detach().reshape(-1, self.dim)
        codes, scale, offset = quantize_rows(rows, self.bits)
        return dequantize_rows(codes, scale, offset).reshape(w.shape)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        w = self.weight(gid)
        q = self._quantized(w, self._field_of_row[gid])
        return w + (q - w).detach()  # straight-through: the value of q, the gradient of w

    # -- contract ---------------------------------------------------------------------------

    def array_bytes(self) -> int:
        return self._bytes()

    def array_ndims(self) -> int:  # analytic: codes [rows, D], scale (and offset, row-wise)
        return 3 if self.granularity == "table" else 4

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """``table``: ``codes int[total, D]`` (signed) and ``scale float32[F]``; ``row``: ``codes
        uint[total, D]``, ``scale`` and ``offset float32[total]`` (``w ~ codes * scale + offset``)."""
        w = self.weight.weight.detach()
        if self.granularity == "table":
            scale = self.field_scales()
            qmax = 2 ** (self.bits - 1) - 1
            codes = torch.round(w / scale[self._field_of_row, None]).clamp_(-qmax, qmax)
            return {"codes": codes.numpy().astype(self.code_dtype), "scale": to_numpy(scale)}
        codes, scale, offset = quantize_rows(w, self.bits)
        unsigned = np.uint8 if self.bits == 8 else np.uint16
        return {"codes": codes.numpy().astype(unsigned), "scale": to_numpy(scale), "offset": to_numpy(offset)}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, granularity={self.granularity!r}"


@register_table("int8-qat")
class Int8QATTable(_QATTable):
    """Quantization-aware training to int8 codes (straight-through rounding, arXiv:1712.05877 Sec. 3).

    Args:
        granularity: ``"table"`` (one fp32 scale per field, symmetric codes in ``[-127, 127]``;
            the study's unified scale) or ``"row"`` (FBGEMM row-wise: uint8 codes, fp32 scale and
            offset per row).

    Serving bytes: ``total * D + 4 F`` (table: at most ~4x smaller than fp32) or
    ``total * (D + 8)`` (row: 2x at ``D = 8``), plus the arrays' shapes (3 or 4 int64 words).
    Shapes: ids ``[N, F]`` -> ``[N, F, D]``.

    >>> t = Int8QATTable(fields=[Field("a", 100)], dim=8, budget=800 + 4 + 3 * 8)
    >>> t.serving_bytes(), sorted(t.serving_state())
    (828, ['codes', 'meta/shapes', 'scale'])
    """

    bits = 8
    code_dtype = np.int8


@register_table("int16-qat")
class Int16QATTable(_QATTable):
    """Quantization-aware training to int16 codes (straight-through rounding, arXiv:1712.05877 Sec. 3).

    Args:
        granularity: ``"table"`` (one fp32 scale per field, codes in ``[-32767, 32767]``) or
            ``"row"`` (uint16 codes, fp32 scale and offset per row).

    Serving bytes: ``2 * total * D + 4 F`` (table: at most ~2x) or ``total * (2 D + 8)`` (row).
    """

    bits = 16
    code_dtype = np.int16
