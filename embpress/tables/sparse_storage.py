"""Serving layouts of pruned tables, and their exact byte counts (shared by pep, deeplight, autosrh).

Two layouts:

- **CSR** for unstructured pruning (PEP, DeepLight): ``values`` fp32 ``[nnz]`` in row-major order,
  ``indices`` (the column of each value: uint8 for ``D <= 256``) and ``indptr`` ``[rows + 1]``
  (row ``r`` holds ``values[indptr[r]:indptr[r + 1]]``), in the smallest unsigned dtype that
  holds ``nnz``. A lookup reads one row's slice and scatters it into a zero vector.
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

from embpress.tables.base import FP32_BYTES

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


def csr_bytes(rows: int, dim: int, nnz: int) -> int:
    """Bytes of a CSR table: fp32 values and column indices per nonzero, plus ``rows + 1`` pointers.

    >>> csr_bytes(rows=100, dim=16, nnz=300)  # 300 * (4 + 1) + 101 * 2
    1702
    """
    return nnz * (FP32_BYTES + col_dtype(dim).itemsize) + (rows + 1) * uint_dtype(nnz).itemsize


def csr_capacity(rows: int, dim: int, max_bytes: int) -> int | None:
    """The most nonzeros (at most ``rows * dim``) whose CSR form fits ``max_bytes``; None if none fits.

    >>> n = csr_capacity(rows=100, dim=16, max_bytes=1702)
    >>> n, csr_bytes(100, 16, n) <= 1702 < csr_bytes(100, 16, n + 1)
    (300, True)
    """
    per_value = FP32_BYTES + col_dtype(dim).itemsize
    best = None
    for dt in _UINTS:  # the pointer dtype depends on nnz: try each, keep the largest consistent nnz
        free = max_bytes - (rows + 1) * np.dtype(dt).itemsize
        if free < 0:
            continue
        nnz = min(free // per_value, rows * dim, int(np.iinfo(dt).max))
        if best is None or nnz > best:
            best = int(nnz)
    return best


def csr_encode(values: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """``values float[R, D]`` kept where ``mask bool[R, D]`` -> ``{"values", "indices", "indptr"}``.

    >>> s = csr_encode(np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[0, 1, 1], [1, 0, 0]], bool))
    >>> s["values"].tolist(), s["indices"].tolist(), s["indptr"].tolist()
    ([1.0, 2.0, 3.0], [1, 2, 0], [0, 2, 3])
    """
    values = np.asarray(values, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(f"values and mask must be [R, D] of one shape, got {values.shape} and {mask.shape}")
    rows, dim = mask.shape
    nnz = int(mask.sum())
    r, c = np.nonzero(mask)  # row-major order
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=rows), out=indptr[1:])
    return {
        "values": values[r, c],
        "indices": c.astype(col_dtype(dim)),
        "indptr": indptr.astype(uint_dtype(nnz)),
    }


def csr_decode(state: dict[str, np.ndarray], rows: np.ndarray, dim: int, prefix: str = "") -> np.ndarray:
    """Rows ``int[N]`` of a CSR table -> ``float32[N, D]`` (zeros where pruned)."""
    values, indices = state[prefix + "values"], state[prefix + "indices"]
    indptr = state[prefix + "indptr"].astype(np.int64)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.zeros((rows.size, dim), dtype=np.float32)
    for i, r in enumerate(rows):
        lo, hi = indptr[r], indptr[r + 1]
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
