"""Serving layouts of pruned tables, and their exact byte counts (shared by pep, deeplight, autosrh).

Two layouts:

- **CSR** for unstructured pruning (PEP, DeepLight): ``values`` fp32 ``[nnz]`` in row-major order,
  ``indices`` (the column of each value: uint8 for ``D <= 256``), ``row_len`` (each row's count,
  uint8 for ``D <= 255``) and ``group_ptr`` (the offset of every ``ROW_GROUP``-th row, in the
  smallest unsigned dtype that holds ``nnz``). A lookup finds its row's slice from the group
  pointer and at most ``ROW_GROUP - 1`` lengths, and scatters it into a zero vector.
- **Block columns** for structured pruning by frequency block (AutoSrh): each field's ids are
  cut into contiguous blocks (``bounds [F, B + 1]``), block ``b`` keeps a set of columns
  (``cols[col_ptr[b]:col_ptr[b + 1]]``) and stores its rows densely on those columns
  (``values/<b> [rows_b, k_b]`` fp32, the rows of every field concatenated in field order).

The ``*_bytes`` functions are analytic and agree with the ``nbytes`` of what ``*_encode`` returns;
``*_decode`` reads rows back in numpy, as a server would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embpress.tables.base import FP32_BYTES, BudgetError

_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)


def uint_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned dtype that holds ``max_value``.

    >>> uint_dtype(255), uint_dtype(256), uint_dtype(70_000)
    (dtype('uint8'), dtype('uint16'), dtype('uint32'))
    """
    for dt in _UINTS:
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{max_value} does not fit in 64 bits")


def col_dtype(dim: int) -> np.dtype:
    """Dtype of a column index in ``0 .. dim - 1`` (uint8 up to ``dim = 256``)."""
    return uint_dtype(max(dim - 1, 0))


# ----------------------------------------------------------------------------- CSR

#: Rows per sampled pointer in the CSR layout: a lookup adds at most ``ROW_GROUP - 1`` row lengths.
ROW_GROUP = 64


def _group_pointers(rows: int) -> int:
    """Entries of ``group_ptr``: one per ``ROW_GROUP`` rows (the last group may be short) plus the end."""
    return -(-rows // ROW_GROUP) + 1


CSR_NDIMS = 4
"""Shape words of a CSR table's serving arrays: values, indices, row_len and group_ptr, each 1-D."""


def csr_bytes(rows: int, dim: int, nnz: int) -> int:
    """Bytes of a CSR table: fp32 values and column indices per nonzero, one row length per row
    and one pointer per ``ROW_GROUP`` rows (plus the end).

    >>> csr_bytes(rows=100, dim=16, nnz=300)  # 300 * (4 + 1) + 100 * 1 + (2 + 1) * 2
    1606
    """
    return (nnz * (FP32_BYTES + col_dtype(dim).itemsize) + rows * uint_dtype(dim).itemsize
            + _group_pointers(rows) * uint_dtype(nnz).itemsize)


def csr_capacity(rows: int, dim: int, max_bytes: int) -> int | None:
    """The most nonzeros (at most ``rows * dim``) whose CSR form fits ``max_bytes``; None if none fits.

    >>> n = csr_capacity(rows=100, dim=16, max_bytes=1606)
    >>> n, csr_bytes(100, 16, n) <= 1606 < csr_bytes(100, 16, n + 1)
    (300, True)
    """
    per_value = FP32_BYTES + col_dtype(dim).itemsize
    fixed = rows * uint_dtype(dim).itemsize
    groups = _group_pointers(rows)
    best = None
    for dt in _UINTS:  # the pointer dtype depends on nnz: try each, keep the largest consistent nnz
        free = max_bytes - fixed - groups * np.dtype(dt).itemsize
        if free < 0:
            continue
        nnz = min(free // per_value, rows * dim, int(np.iinfo(dt).max))
        if best is None or nnz > best:
            best = int(nnz)
    return best


def csr_nonzeros_at_budget(method: str, rows: int, dim: int, max_bytes: int) -> int:
    """:func:`csr_capacity`, raising :class:`BudgetError` (naming ``method``) when not one nonzero fits."""
    nnz = csr_capacity(rows, dim, max_bytes)
    if not nnz:
        raise BudgetError(
            f"{method}: a CSR table of {rows:,} rows needs {csr_bytes(rows, dim, 1):,} bytes for one nonzero "
            f"(row lengths and pointers included) but the budget allows {max_bytes:,}"
        )
    return nnz


def csr_encode(values: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """``values float[R, D]`` kept where ``mask bool[R, D]`` -> ``{"values", "indices", "row_len", "group_ptr"}``.

    ``row_len[r]`` is row ``r``'s nonzero count (uint8 for ``D <= 255``) and ``group_ptr[g]`` the
    offset of row ``g * ROW_GROUP`` in ``values`` (``group_ptr[-1] = nnz``), in the smallest
    unsigned dtype that holds ``nnz``. Row pointers cost ~1 byte per row instead of the 2 or 4 of
    a full ``indptr``, which at 10x budgets is a large share of the table.

    >>> s = csr_encode(np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[0, 1, 1], [1, 0, 0]], bool))
    >>> s["values"].tolist(), s["indices"].tolist(), s["row_len"].tolist(), s["group_ptr"].tolist()
    ([1.0, 2.0, 3.0], [1, 2, 0], [2, 1], [0, 3])
    """
    values = np.asarray(values, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(f"values and mask must be [R, D] of one shape, got {values.shape} and {mask.shape}")
    rows, dim = mask.shape
    nnz = int(mask.sum())
    r, c = np.nonzero(mask)  # row-major order
    row_len = np.bincount(r, minlength=rows)
    starts = np.concatenate([[0], np.cumsum(row_len)])
    group_ptr = np.append(starts[0:rows:ROW_GROUP], nnz)
    return {
        "values": values[r, c],
        "indices": c.astype(col_dtype(dim)),
        "row_len": row_len.astype(uint_dtype(dim)),
        "group_ptr": group_ptr.astype(uint_dtype(nnz)),
    }


def csr_decode(state: dict[str, np.ndarray], rows: np.ndarray, dim: int, prefix: str = "") -> np.ndarray:
    """Rows ``int[N]`` of a CSR table -> ``float32[N, D]`` (zeros where pruned), as a server reads
    them: the group pointer plus the lengths of the rows before ``r`` in its group."""
    values, indices = state[prefix + "values"], state[prefix + "indices"]
    row_len = state[prefix + "row_len"].astype(np.int64)
    group_ptr = state[prefix + "group_ptr"].astype(np.int64)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.zeros((rows.size, dim), dtype=np.float32)
    for i, r in enumerate(rows):
        first = r - r % ROW_GROUP
        lo = group_ptr[r // ROW_GROUP] + int(row_len[first:r].sum())
        hi = lo + row_len[r]
        out[i, indices[lo:hi].astype(np.int64)] = values[lo:hi]
    return out


def keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of ``score``'s shape with exactly ``min(k, numel)`` True at the largest scores."""
    flat = score.detach().reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    k = max(0, min(int(k), flat.numel()))
    if k == flat.numel():
        mask[:] = True
    elif k:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(score.shape)


# ----------------------------------------------------------------------------- block columns


def block_columns_bytes(block_rows: Sequence[int], kept: Sequence[int], num_fields: int,
                        max_id: int, dim: int) -> int:
    """Bytes of the block-column layout: fp32 ``rows_b * k_b`` values per block, one column index
    per kept column, ``B + 1`` column pointers and ``F * (B + 1)`` id bounds.

    ``max_id`` is the largest bound (the largest field's size).
    """
    nblocks = len(block_rows)
    total_kept = int(sum(kept))
    values = sum(int(r) * int(k) for r, k in zip(block_rows, kept, strict=True)) * FP32_BYTES
    return (values + total_kept * col_dtype(dim).itemsize
            + (nblocks + 1) * uint_dtype(total_kept).itemsize
            + num_fields * (nblocks + 1) * uint_dtype(max_id).itemsize)


def block_columns_encode(weight: np.ndarray, offsets: Sequence[int], bounds: np.ndarray,
                         kept: np.ndarray) -> dict[str, np.ndarray]:
    """Encode a table in block-column form.

    Args:
        weight: ``float[total, D]``, the rows of every field concatenated.
        offsets: first row of each field in ``weight``.
        bounds: ``int[F, B + 1]``, block ``b`` of field ``f`` holds its ids ``bounds[f, b] .. bounds[f, b + 1] - 1``.
        kept: ``bool[B, D]``, the columns each block keeps.

    Returns ``{"bounds", "col_ptr", "cols", "values/<b>" for each block}``.
    """
    weight = np.asarray(weight, dtype=np.float32)
    bounds = np.asarray(bounds, dtype=np.int64)
    kept = np.asarray(kept, dtype=bool)
    nblocks, dim = kept.shape
    counts = kept.sum(1)
    col_ptr = np.zeros(nblocks + 1, dtype=np.int64)
    np.cumsum(counts, out=col_ptr[1:])
    state = {
        "bounds": bounds.astype(uint_dtype(int(bounds.max(initial=0)))),
        "col_ptr": col_ptr.astype(uint_dtype(int(col_ptr[-1]))),
        "cols": np.concatenate([np.nonzero(kept[b])[0] for b in range(nblocks)]).astype(col_dtype(dim)),
    }
    for b in range(nblocks):
        cols = np.nonzero(kept[b])[0]
        parts = [weight[off + bounds[f, b]: off + bounds[f, b + 1]][:, cols] for f, off in enumerate(offsets)]
        state[f"values/{b}"] = np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)
    return state


def block_columns_decode(state: dict[str, np.ndarray], field: int, ids: np.ndarray, dim: int) -> np.ndarray:
    """Ids ``int[N]`` of field ``field`` -> ``float32[N, D]`` (zeros on the columns a block dropped)."""
    bounds = state["bounds"].astype(np.int64)
    col_ptr = state["col_ptr"].astype(np.int64)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.zeros((ids.size, dim), dtype=np.float32)
    sizes = bounds[:, 1:] - bounds[:, :-1]  # [F, B] rows of each field in each block
    for i, x in enumerate(ids):
        b = int(np.searchsorted(bounds[field], x, side="right")) - 1
        row = int(sizes[:field, b].sum()) + x - bounds[field, b]
        cols = state["cols"][col_ptr[b]:col_ptr[b + 1]].astype(np.int64)
        out[i, cols] = state[f"values/{b}"][row]
    return out
