"""Compressed-domain scoring kernels: popcount Hamming distances, lookup-table scans, bit fields.

These are the inner loops of the codecs' ``distances``: none of them decodes codes into float
vectors. Shapes: nq queries, N codes, M sub-codes per vector, K entries per lookup table.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

_SCAN_ELEMS = 1 << 22  # temporaries per chunk, keeps memory bounded for big blocks


def _as_words(codes: np.ndarray) -> np.ndarray:
    """View (N, nbytes) uint8 codes as (N, W) uint64 words, zero-padding to a multiple of 8 bytes."""
    n, nb = codes.shape
    pad = (-nb) % 8
    if pad:
        codes = np.concatenate([codes, np.zeros((n, pad), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(codes).view(np.uint64)


def hamming(qcodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distances between packed bit codes via XOR + popcount.

    Args:
        qcodes: (nq, nbytes) uint8 packed bits.
        codes: (N, nbytes) uint8 packed bits.

    Returns:
        (nq, N) int32 numbers of differing bits.
    """
    qw, cw = _as_words(qcodes), _as_words(codes)
    words = np.ascontiguousarray(cw.T)  # (W, N): each word of every code, contiguous
    acc_dtype = np.uint8 if qw.shape[1] * 64 < 256 else np.uint16 if qw.shape[1] * 64 < 65536 else np.int32
    out = np.empty((qw.shape[0], cw.shape[0]), dtype=np.int32)
    step = max(1, _SCAN_ELEMS // max(1, cw.shape[0]))
    for s in range(0, qw.shape[0], step):
        q = qw[s : s + step]
        # one XOR + popcount pass per 64-bit word over (queries, codes), accumulated in place:
        # long contiguous loops instead of a reduction over a short trailing axis
        acc = np.zeros((q.shape[0], cw.shape[0]), dtype=acc_dtype)
        for w in range(qw.shape[1]):
            acc += np.bitwise_count(np.bitwise_xor(q[:, w, None], words[w][None, :]))
        out[s : s + step] = acc
    return out


def lut_scan(luts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Sum of per-sub-code table entries: ``out[q, n] = sum_m luts[q, m, idx[n, m]]`` (ADC scan).

    The sum runs as a sparse product: each code is a row with M ones at columns ``m*K + idx[n, m]``,
    multiplied by the (M*K, nq) tables, so the M additions per (code, query) happen in one compiled
    loop (in sub-code order, the same float sums as a gather loop) instead of M numpy passes.

    Args:
        luts: (nq, M, K) float32 lookup tables.
        idx: (N, M) integer sub-codes in ``[0, K)``.

    Returns:
        (nq, N) float32.
    """
    nq, m_count, k = luts.shape
    out = np.empty((nq, idx.shape[0]), dtype=np.float32)
    tables = np.ascontiguousarray(luts.reshape(nq, m_count * k).T)  # (M*K, nq)
    step = max(1, _SCAN_ELEMS // max(1, m_count, nq))  # bounds both the one-hot block and its product
    offsets = np.arange(m_count, dtype=np.int64) * k
    for s in range(0, idx.shape[0], step):
        block = idx[s : s + step]
        n = block.shape[0]
        cols = (block.astype(np.int64) + offsets).ravel()
        onehot = sparse.csr_matrix(
            (np.ones(n * m_count, dtype=np.float32), cols, np.arange(0, n * m_count + 1, m_count)),
            shape=(n, m_count * k),
        )
        out[:, s : s + n] = (onehot @ tables).T
    return out


def unpack_fields(codes: np.ndarray, nbits: int, count: int, offset_bits: int = 0) -> np.ndarray:
    """Read ``count`` unsigned ``nbits``-bit fields per row from a little-endian bit stream.

    This is FAISS's code layout (``BitstringWriter``/``PQEncoderGeneric``): field i occupies bits
    ``offset_bits + i*nbits ...`` with the least significant bit first.

    Args:
        codes: (N, nbytes) uint8.

    Returns:
        (N, count) int64.
    """
    if nbits == 8 and offset_bits % 8 == 0:
        s = offset_bits // 8
        return codes[:, s : s + count].astype(np.int64)
    bits = np.unpackbits(codes, axis=1, bitorder="little")
    bits = bits[:, offset_bits : offset_bits + nbits * count].reshape(codes.shape[0], count, nbits)
    weights = np.left_shift(np.int64(1), np.arange(nbits, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def pack_fields(fields: np.ndarray, nbits: int, nbytes: int) -> np.ndarray:
    """Write (N, count) unsigned ``nbits``-bit fields into (N, nbytes) uint8, FAISS's layout (the
    inverse of :func:`unpack_fields`: field i at bits ``i*nbits ...``, least significant bit first)."""
    fields = np.asarray(fields)
    if fields.size and (fields.min() < 0 or fields.max() >= 1 << nbits):
        raise ValueError(f"pack_fields: values must lie in [0, {1 << nbits}), got [{fields.min()}, {fields.max()}]")
    if nbits == 8 and fields.shape[1] == nbytes:
        return fields.astype(np.uint8)
    bits = ((fields.astype(np.int64)[:, :, None] >> np.arange(nbits)) & 1).astype(np.uint8)
    bits = bits.reshape(fields.shape[0], -1)
    out = np.zeros((fields.shape[0], nbytes * 8), np.uint8)
    out[:, : bits.shape[1]] = bits
    return np.packbits(out, axis=1, bitorder="little")


def sign_bits(x: np.ndarray) -> np.ndarray:
    """Pack the signs of (N, D) values into (N, ceil(D/8)) uint8 (bit 1 where value > 0, MSB first)."""
    return np.packbits(x > 0, axis=1)


def pm1_lut(q: np.ndarray) -> np.ndarray:
    """Byte lookup tables for asymmetric scoring of a float query against packed ±1 codes.

    ``lut[q, j, byte] = sum_k q[q, 8j+k] * (+1 if bit k of byte is set else -1)`` with np.packbits's
    MSB-first order, so ``lut_scan(lut, codes)`` equals ``q @ decode_pm1(codes).T``.

    Args:
        q: (nq, D) float32.

    Returns:
        (nq, ceil(D/8), 256) float32.
    """
    nq, d = q.shape
    nb = -(-d // 8)
    qp = np.zeros((nq, nb * 8), dtype=np.float32)
    qp[:, :d] = q
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1
    return np.einsum("qjk,bk->qjb", qp.reshape(nq, nb, 8), table).astype(np.float32)
