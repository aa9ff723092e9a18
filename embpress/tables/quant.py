"""Post-training row-wise quantization of any table's float parameters to int8 or int16.

The inner table trains as usual; a final ``quantize`` stage replaces each float parameter, seen
as ``[rows, last_dim]``, by unsigned integer codes with one fp32 scale and offset per row
(FBGEMM's 8-bit rowwise format, ``w ~ code * scale + offset``), writes the dequantized values back
so that evaluation sees the served weights, and freezes them. A method whose serving state is not
its parameters as stored (CSR values, folded BatchNorm, searched dims, codebooks) has the float
arrays of its serving state quantized instead (row-wise where rows exist, per tensor otherwise),
and its lookups after the stage are the served lookups (:mod:`embpress.serving`) of the
dequantized arrays, exactly what the artifact serves. ``build_table("qr+int8", ...)`` wraps any
method this way, and the compressions multiply. Row-wise uniform post-training
quantization of embedding tables: Guan et al., arXiv:1911.02079 (Sec. 3); the INT8/INT16 baseline of
the VLDB 2024 study (arXiv:2311.15578).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    INT64_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    Stage,
    StageContext,
    build_table,
    register_table,
    spec_bytes,
    table_class,
)

SUFFIXES: dict[str, type[np.unsignedinteger]] = {"int8": np.uint8, "int16": np.uint16}
"""Spec suffix -> dtype of the stored codes."""
ROW_QPARAM_BYTES = 2 * FP32_BYTES
"""Per quantized row: its fp32 scale and fp32 offset."""
MAX_TRIES = 16
SHRINK = 0.95


def _code_dtype(suffix: str) -> type[np.unsignedinteger]:
    if suffix not in SUFFIXES:
        raise ValueError(f"quantization suffix {suffix!r} not understood; use one of {sorted(SUFFIXES)} "
                         f"(e.g. 'qr+int8')")
    return SUFFIXES[suffix]


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric row-wise quantization of ``x: float[R, C]`` to ``bits``-bit unsigned codes.

    Returns ``codes int64[R, C]`` in ``0 .. 2**bits - 1``, ``scale float32[R]`` and
    ``offset float32[R]`` with ``scale = (max - min) / (2**bits - 1)`` and ``offset = min`` per row,
    so that ``|x - (codes * scale + offset)| <= scale / 2`` (FBGEMM 8-bit rowwise convention).
    """
    x = x.detach().float()
    levels = 2**bits - 1
    if x.numel() == 0:
        empty = torch.zeros(x.shape[0], dtype=torch.float32)
        return torch.zeros(x.shape, dtype=torch.long), empty, empty.clone()
    lo, hi = x.min(1).values, x.max(1).values
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - lo[:, None]) / safe[:, None]).clamp_(0, levels).long()
    return codes, scale, lo


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``codes[R, C] * scale[R] + offset[R]`` in float32."""
    return codes.float() * scale[:, None] + offset[:, None]


def _float_parameters(table: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in table.named_parameters() if p.is_floating_point()]


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def serves_parameters(table: CompressedTable) -> bool:
    """True when the table's float serving arrays are exactly its float parameters (each equal to
    one of them, none left over): quantizing the parameters then quantizes what it serves, and the
    table's own lookups stay valid."""
    free = [p.detach().numpy().reshape(-1) for _, p in _float_parameters(table)]
    arrays = [np.asarray(v).reshape(-1) for v in table.serving_arrays().values() if _is_float(v)]
    if len(free) != len(arrays):
        return False
    for a in arrays:
        i = next((i for i, p in enumerate(free) if p.size == a.size and np.array_equal(p, a)), None)
        if i is None:
            return False
        free.pop(i)
    return True


def state_rows(shape: Sequence[int], code_bytes: int) -> tuple[int, int]:
    """How a float serving array of ``shape`` is quantized: ``(rows, cols)``, one fp32 scale and offset
    per row. Row-wise (``[prod(shape[:-1]), shape[-1]]``) where rows exist and a row's codes are at
    least as large as its scale and offset; otherwise per tensor (one row)."""
    n = int(np.prod(shape)) if len(shape) else 1
    if len(shape) >= 2 and shape[-1] * code_bytes >= ROW_QPARAM_BYTES:
        return n // max(1, shape[-1]), int(shape[-1])
    return 1, n


def quantized_bytes(table: CompressedTable, suffix: str) -> int:
    """Serving bytes of ``table`` once its float parameters (or, for a table that does not serve
    them as stored, the float arrays of its serving state) are quantized with ``suffix``."""
    code_bytes = np.dtype(_code_dtype(suffix)).itemsize
    state = table.serving_arrays()
    other = sum(np.asarray(v).nbytes for v in state.values() if not _is_float(v))
    total = 0
    if serves_parameters(table):
        for _, p in _float_parameters(table):
            rows, cols = state_rows(p.shape, code_bytes)
            total += rows * (cols * code_bytes + ROW_QPARAM_BYTES)
    else:
        for v in state.values():
            if _is_float(v):
                rows, cols = state_rows(np.shape(v), code_bytes)
                total += rows * (cols * code_bytes + ROW_QPARAM_BYTES)
    return int(other + total)


def quantized_ndims(table: CompressedTable) -> int:
    """Shape words (:meth:`CompressedTable.array_ndims`) of ``table``'s serving arrays once quantized:
    its non-float arrays as they are, and per float array ``codes [rows, cols]``, ``scale [rows]`` and
    ``offset [rows]``."""
    state = table.serving_arrays()
    return sum(np.ndim(v) if not _is_float(v) else 4 for v in state.values())


def state_quantized_bound(table: CompressedTable, suffix: str) -> int:
    """The most a table that does not serve its parameters as stored may need once quantized, if its
    stages fill its own budget with float arrays: its non-float bytes now, the rest of its budget at
    ``suffix`` precision, and a scale and offset per float array (each quantized per tensor at worst,
    see :meth:`PostTrainingQuantized.quantize`)."""
    code_bytes = np.dtype(_code_dtype(suffix)).itemsize
    state = table.serving_arrays()
    other = sum(np.asarray(v).nbytes for v in state.values() if not _is_float(v))
    arrays = sum(1 for v in state.values() if _is_float(v))
    floats = max(0, table.max_bytes - other) // FP32_BYTES
    return int(other + floats * code_bytes + arrays * ROW_QPARAM_BYTES)


class PostTrainingQuantized(CompressedTable):
    """Any float table, trained, then quantized row-wise to int8/int16 (FBGEMM rowwise format).

    The inner table is built with the largest budget (from ``budget * 32 / bits`` down, shrinking
    geometrically; kept as ``inner_budget``) whose quantized size fits ``budget``. Its stages run
    first, with hooks that see the inner table as ``ctx.table``; then ``Stage("quantize",
    epochs=0)`` calls :meth:`quantize`.
    Before that stage, :meth:`serving_state` reports what quantizing the current weights would
    store. Use :meth:`wrap` (``build_table("qr+int8", ...)``) rather than this constructor.

    Args:
        inner: the registered float method to wrap.
        suffix: ``"int8"`` (uint8 codes) or ``"int16"`` (uint16 codes).
        inner_hparams: hyper-parameters of the inner method.

    Shapes: ids ``[N, F]`` -> ``[N, F, D]``. Serving state: the inner table's non-float arrays, and
    per float parameter ``NAME`` (a module path): ``NAME.codes [rows, last_dim]`` uint8/uint16,
    ``NAME.scale [rows]`` and ``NAME.offset [rows]`` fp32.

    >>> from embpress.tables import Ratio
    >>> t = build_table("hash+int8", fields=[Field("a", 1000)], dim=16, budget=Ratio(8))
    >>> [s.name for s in t.stages()], t.serving_bytes() <= 1000 * 16 * 4 / 8
    (['train', 'quantize'], True)
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, inner: str = "full",
                 suffix: str = "int8", inner_hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.code_dtype = _code_dtype(suffix)
        self.inner_method = inner
        self.suffix = suffix
        self.bits = 8 * np.dtype(self.code_dtype).itemsize
        self.inner_hparams = dict(inner_hparams or {})
        if type(self) is PostTrainingQuantized:
            self.method = f"{inner}+{suffix}"
        self.inner = self._build_inner()
        self.by_state = not serves_parameters(self.inner)
        """True when the float arrays of the inner serving state are quantized (not its parameters)."""
        if self.by_state:
            from embpress import serving

            try:
                serving.served_class(inner)
            except ValueError as e:
                raise ValueError(f"{inner}+{suffix}: {inner!r} does not serve its parameters as stored, so its "
                                 f"quantized serving arrays need a served lookup ({e})") from None
        self.codes_: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._served: nn.Module | None = None

    @classmethod
    def wrap(cls, inner_method: str, *, suffix: str, fields: Sequence[Field], dim: int,
             budget: Budget = None, **hparams: Any) -> PostTrainingQuantized:
        """``inner_method`` (with its ``hparams``) trained, then quantized to ``suffix``."""
        _code_dtype(suffix)
        return PostTrainingQuantized(fields=fields, dim=dim, budget=budget, inner=inner_method,
                                     suffix=suffix, inner_hparams=hparams)

    # -- sizing ------------------------------------------------------------------------------

    def _build_inner(self) -> CompressedTable:
        spec = f"{self.inner_method}+{self.suffix}"
        cls = table_class(self.inner_method)
        if issubclass(cls, PostTrainingQuantized):
            raise ValueError(f"{spec}: {self.inner_method!r} is already quantized; wrap a float method")
        inner_budget = self.max_bytes * 32 / self.bits
        rng = torch.get_rng_state()
        nbytes = None
        for _ in range(1 if cls.reference else MAX_TRIES):
            torch.set_rng_state(rng)  # every try draws the same initial weights
            try:
                table = build_table(self.inner_method, fields=self.fields, dim=self.dim,
                                    budget=None if cls.reference else max(1, int(inner_budget)),
                                    **self.inner_hparams)
            except BudgetError as e:
                raise BudgetError(
                    f"{spec}: the inner {self.inner_method!r} cannot fit {int(inner_budget):,} bytes before "
                    f"quantization ({e})" + (f"; its last fit quantized to {nbytes:,} bytes" if nbytes else "")
                    + f", budget {self.max_bytes:,} bytes"
                ) from None
            by_state = not serves_parameters(table)
            if not by_state:
                nbytes = quantized_bytes(table, self.suffix)
            else:  # its stages may reshape what it serves: size it for the worst case
                nbytes = state_quantized_bound(table, self.suffix)
            nbytes += spec_bytes(self._spec_for(table, by_state))  # the metadata: inner spec, shapes
            nbytes += INT64_BYTES * quantized_ndims(table)  # the quantized arrays' own shapes
            if nbytes <= self.max_bytes:
                self.inner_budget = None if cls.reference else max(1, int(inner_budget))
                return table
            inner_budget *= min(SHRINK, self.max_bytes / nbytes)
        if cls.reference:
            raise BudgetError(
                f"{spec}: the quantized {self.inner_method} table needs {nbytes:,} bytes but the budget allows "
                f"{self.max_bytes:,}: {self.suffix} reaches at most ratio {self.full_bytes / nbytes:.2f} "
                f"at dim {self.dim} (one fp32 scale and offset per row)"
            )
        raise BudgetError(
            f"{spec}: after {MAX_TRIES} tries the quantized {self.inner_method} table still needs {nbytes:,} "
            f"bytes (inner budget {int(inner_budget):,}) but the budget allows {self.max_bytes:,}"
        )

    # -- contract ----------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self._served is not None:
            return self._served._lookup(ids)
        return self.inner._lookup(ids)

    def array_bytes(self) -> int:
        if self.by_state:
            return int(sum(np.asarray(v).nbytes for v in self.serving_arrays().values()))
        return quantized_bytes(self.inner, self.suffix)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(state_rows(t.shape, np.dtype(self.code_dtype).itemsize))

    def _quantize_state(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Codes, scales and offsets of every float array of the inner serving state: row-wise
        (:func:`state_rows`) where the budget holds the rows' scales and offsets (largest arrays
        first), per tensor otherwise, so that the inner stages cannot push it over the budget."""
        state = self.inner.serving_arrays()
        code_bytes = np.dtype(self.code_dtype).itemsize
        floats = {k: np.asarray(v) for k, v in state.items() if _is_float(v)}
        used = sum(np.asarray(v).nbytes for v in state.values() if not _is_float(v))
        used += spec_bytes(self.serving_spec()) + INT64_BYTES * quantized_ndims(self.inner)  # the metadata
        used += sum(v.size * code_bytes + ROW_QPARAM_BYTES for v in floats.values())  # all per tensor
        shape = {k: (1, v.size) for k, v in floats.items()}
        for k in sorted(floats, key=lambda k: (-floats[k].size, k)):
            rows, cols = state_rows(floats[k].shape, code_bytes)
            extra = (rows - 1) * ROW_QPARAM_BYTES
            if rows > 1 and used + extra <= self.max_bytes:
                shape[k], used = (rows, cols), used + extra
        out = {}
        for k, v in floats.items():
            x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(shape[k]))
            c, sc, o = quantize_rows(x, self.bits)
            out[k] = (c.numpy().astype(self.code_dtype), sc.numpy(), o.numpy())
        return out

    def serving_arrays(self) -> dict[str, np.ndarray]:
        state = {k: v for k, v in self.inner.serving_arrays().items() if not _is_float(v)}
        if self.by_state:
            quantized = self.codes_ if self.codes_ is not None else self._quantize_state()
        else:
            quantized = {}
            for name, p in _float_parameters(self.inner):
                if self.codes_ is not None:
                    quantized[name] = self.codes_[name]
                else:
                    c, sc, o = quantize_rows(self._rows(p.detach()), self.bits)
                    quantized[name] = (c.numpy().astype(self.code_dtype), sc.numpy(), o.numpy())
        for name, (codes, scale, offset) in quantized.items():
            state[f"{name}.codes"] = codes
            state[f"{name}.scale"] = scale
            state[f"{name}.offset"] = offset
        return state

    def serving_spec(self) -> dict[str, Any]:
        """The inner method and its spec, and how each of the inner table's float serving arrays is
        rebuilt: ``arrays`` (quantized serving arrays, name -> shape) or ``param_of`` (quantized
        parameter and shape); a served lookup dequantizes the codes into them."""
        return self._spec_for(self.inner, self.by_state)

    def _spec_for(self, inner: CompressedTable, by_state: bool) -> dict[str, Any]:
        spec = {"inner": self.inner_method, "inner_spec": inner.serving_spec(), "suffix": self.suffix}
        if by_state:
            spec["arrays"] = {k: list(np.shape(v)) for k, v in inner.serving_arrays().items() if _is_float(v)}
            return spec
        params = dict(_float_parameters(inner))
        free = list(params)
        param_of = {}
        for key, arr in inner.serving_arrays().items():
            if not _is_float(arr):
                continue
            flat = np.asarray(arr).reshape(-1)
            match = next((n for n in free if params[n].numel() == flat.size
                          and np.array_equal(params[n].detach().numpy().reshape(-1), flat)), None)
            if match is None:
                raise ValueError(f"{self.method}: serving array {key!r} is not one of the float parameters")
            free.remove(match)
            param_of[key] = [match, list(np.asarray(arr).shape)]
        spec["param_of"] = param_of
        return spec

    @torch.no_grad()
    def quantize(self) -> None:
        """Quantize the inner table row-wise and freeze it; :meth:`serving_state` then returns the
        stored codes. Parameters served as stored: their dequantized values are loaded back into
        the inner table. Otherwise: the float serving arrays are quantized and lookups from now on
        are the served lookups of their dequantized values."""
        for p in self.inner.parameters():
            p.requires_grad_(False)
        if self.by_state:
            from embpress import serving

            spec = self.serving_spec()
            self.codes_ = self._quantize_state()
            arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.serving_state().items()}
            self._served = serving.served_class(self.method)(
                fields=[(f.name, f.num_embeddings) for f in self.fields], dim=self.dim, arrays=arrays,
                spec=spec, method=self.method)
            return
        stored = {}
        for name, p in _float_parameters(self.inner):
            codes, scale, offset = quantize_rows(self._rows(p), self.bits)
            p.copy_(dequantize_rows(codes, scale, offset).reshape(p.shape))
            stored[name] = (codes.numpy().astype(self.code_dtype), scale.numpy(), offset.numpy())
        self.codes_ = stored

    def _quantize_stage(self, ctx: StageContext) -> None:
        self.quantize()
        ctx.log(f"{self.method}: quantized to {self.suffix}, {self.serving_bytes():,} serving bytes")

    def _for_inner(self, hook: Callable[[StageContext], Any] | None) -> Callable[[StageContext], Any] | None:
        if hook is None:
            return None
        return lambda ctx: hook(dataclasses.replace(ctx, table=self.inner))

    def stages(self) -> list[Stage]:
        inner = [dataclasses.replace(s, before=self._for_inner(s.before), after=self._for_inner(s.after),
                                     on_step=self._for_inner(s.on_step), stop=self._for_inner(s.stop))
                 for s in self.inner.stages()]
        return [*inner, Stage("quantize", epochs=0, early_stopping=False, before=self._quantize_stage)]

    def regularizer(self) -> torch.Tensor | None:
        return self.inner.regularizer()

    def sparse_parameters(self) -> list[nn.Parameter]:
        return self.inner.sparse_parameters()

    def arch_parameters(self) -> list[nn.Parameter]:
        return self.inner.arch_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inner={self.inner_method!r}, suffix={self.suffix!r}"


@register_table("int8")
class Int8Table(PostTrainingQuantized):
    """The ``full`` table, trained in fp32, then quantized to int8 row-wise (``full+int8``).

    Serving bytes are ``rows * (D + 8)`` and the metadata (the inner method, the suffix, the
    quantized parameter's name and shape: 61 bytes here): at most 4x smaller than fp32, 2x at ``D = 8``.

    >>> t = Int8Table(fields=[Field("a", 100)], dim=8, budget=1700)
    >>> t.serving_bytes(), sorted(t.serving_state())
    (1693, ['meta/ints', 'meta/shapes', 'meta/text', 'weight.weight.codes', 'weight.weight.offset', 'weight.weight.scale'])
    """

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget, inner="full", suffix="int8")


@register_table("int16")
class Int16Table(PostTrainingQuantized):
    """The ``full`` table, trained in fp32, then quantized to int16 row-wise (``full+int16``).

    Serving bytes are ``rows * (2 D + 8)``: at most 2x smaller than fp32, 1.33x at ``D = 8``.
    """

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget, inner="full", suffix="int16")
