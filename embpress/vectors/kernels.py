"""Compiled (numba) scans of codes with a running top-k, over inverted lists.

Every kernel scans, for each query q, the lists ``probes[q]`` (``-1`` = none) of a CSR layout:
list ``l`` holds rows ``offsets[l] .. offsets[l+1]`` of ``codes``, whose ids are ``ids[row]``
(or the row number itself when ``ids`` is empty). A flat scan is one list holding everything.
Each query keeps a max-heap of its best ``k`` (distance, id) pairs, so memory is ``nq * k``
whatever the corpus size: no (nq, N) distance matrix is ever built. Ties are broken by the
smaller id, so results do not depend on the scan order.

``mask`` filters by id: shape (0, 0) for none, (1, N) shared by all queries, (nq, N) per query.

Why our own and not FAISS (100k x 384, 1 thread, alternating runs in one process): the 8-bit PQ
lookup-table scan ran at 1.0-1.1x ``IndexPQ``'s queries/s, and it also takes per-query masks,
inverted lists and a per-list bias. The XOR + popcount loop only matched ``IndexBinaryFlat``
(1.0x), so flat scans of sign codes go to FAISS (:func:`faiss_hamming_flat`) and this loop serves
lists and per-query masks. Float codecs (fp16, sq8, sq4) keep their BLAS path (see
:meth:`Codec.search_lists`), 1.7-2.2x ``IndexScalarQuantizer``.

Parallel over queries (``numba.set_num_threads`` sets the threads; see :func:`limit_threads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit, prange

_NO_ID = np.iinfo(np.int64).max


@contextlib.contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """Run searches on ``n`` threads inside the block: these kernels, FAISS and BLAS (``None``: as is)."""
    if n is None:
        yield
        return
    import faiss
    from threadpoolctl import threadpool_limits

    n = max(1, int(n))
    before_nb, before_fs = numba.get_num_threads(), faiss.omp_get_max_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        numba.set_num_threads(before_nb)
        faiss.omp_set_num_threads(before_fs)


@njit(cache=True, nogil=True, inline="always")
def _push(hd, hi, d, i):
    """Offer (d, i) to a full max-heap ordered by (distance, id); keeps the k smallest."""
    if d > hd[0] or (d == hd[0] and i >= hi[0]):
        return
    k = hd.shape[0]
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= k:
            break
        if c + 1 < k and (hd[c + 1] > hd[c] or (hd[c + 1] == hd[c] and hi[c + 1] > hi[c])):
            c += 1
        if hd[c] > d or (hd[c] == d and hi[c] > i):
            hd[pos] = hd[c]
            hi[pos] = hi[c]
            pos = c
        else:
            break
    hd[pos] = d
    hi[pos] = i


@njit(cache=True, nogil=True)
def _finish(hd, hi, out_d, out_i):
    """Heap -> ascending (distance, id) rows; empty slots become (+inf, -1)."""
    order = np.argsort(hi, kind="mergesort")
    order = order[np.argsort(hd[order], kind="mergesort")]
    for j in range(hd.shape[0]):
        t = order[j]
        if hi[t] == _NO_ID or not np.isfinite(hd[t]):
            out_d[j] = np.inf
            out_i[j] = -1
        else:
            out_d[j] = hd[t]
            out_i[j] = hi[t]


@njit(cache=True, nogil=True, inline="always")
def _allowed(mask, qi, ident):
    if mask.shape[0] == 0:
        return True
    r = np.int64(0)
    if mask.shape[0] > 1:
        r = np.int64(qi)
    return mask[r, ident]


@njit(cache=True, parallel=True)
def lut_search(luts, idx, extra, offsets, ids, probes, bias, mask, k):
    """Lookup-table (ADC) scan: ``d = bias[q, p] + sum_m luts[q, m, idx[row, m]] + extra[row]``.

    Args:
        luts: (nq, M, K) float32, each query's tables contiguous (a query's M tables at a stride of
            nq * K floats would alias in the cache). idx: (N, M) uint8 or uint16 sub-codes.
        extra: (N,) float32 per-row term, or empty. bias: (nq, P) float32, or (0, 0).
        offsets: (L+1,) int64. ids: (N,) int64 or empty. probes: (nq, P) int64. mask: see module.

    Returns:
        (nq, k) float32 distances and int64 ids, ascending.
    """
    nq, m = luts.shape[0], luts.shape[1]
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    has_ids, has_extra, has_bias = ids.shape[0] > 0, extra.shape[0] > 0, bias.shape[0] > 0
    for qi in prange(nq):
        hd = np.full(k, np.inf, dtype=np.float32)
        hi = np.full(k, _NO_ID, dtype=np.int64)
        lut = luts[qi]
        for p in range(probes.shape[1]):
            lst = probes[qi, p]
            if lst < 0:
                continue
            b = bias[qi, p] if has_bias else np.float32(0)
            lo, hi_row = offsets[lst], offsets[lst + 1]
            row = lo
            # four codes at a time: four independent sums keep the adder busy (each code's own sum
            # still runs in sub-code order, so distances equal the one-at-a-time loop's)
            while row + 4 <= hi_row:
                s0 = b
                s1 = b
                s2 = b
                s3 = b
                for j in range(m):
                    s0 += lut[j, idx[row, j]]
                    s1 += lut[j, idx[row + 1, j]]
                    s2 += lut[j, idx[row + 2, j]]
                    s3 += lut[j, idx[row + 3, j]]
                worst = hd[0]
                for u in range(4):
                    r = row + u
                    s = s0 if u == 0 else s1 if u == 1 else s2 if u == 2 else s3
                    if has_extra:
                        s += extra[r]
                    if s > worst:  # most codes stop here, before their id and mask are read
                        continue
                    ident = ids[r] if has_ids else r
                    if _allowed(mask, qi, ident):
                        _push(hd, hi, s, ident)
                        worst = hd[0]
                row += 4
            while row < hi_row:
                ident = ids[row] if has_ids else row
                s = b
                for j in range(m):
                    s += lut[j, idx[row, j]]
                if has_extra:
                    s += extra[row]
                if _allowed(mask, qi, ident):
                    _push(hd, hi, s, ident)
                row += 1
        _finish(hd, hi, out_d[qi], out_i[qi])
    return out_d, out_i


@njit(cache=True, nogil=True, inline="always")
def _popcount(v):
    v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (v * np.uint64(0x0101010101010101)) >> np.uint64(56)  # LLVM turns this into popcnt


@njit(cache=True, parallel=True)
def hamming_search(qwords, cwords, offsets, ids, probes, mask, k):
    """XOR + popcount scan of packed bits: ``d = popcount(q ^ c)`` as float32.

    Args:
        qwords: (nq, W) uint64. cwords: (N, W) uint64 (codes zero-padded to whole words).
        Others as in :func:`lut_search`.
    """
    nq, w = qwords.shape
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    has_ids = ids.shape[0] > 0
    for qi in prange(nq):
        hd = np.full(k, np.inf, dtype=np.float32)
        hi = np.full(k, _NO_ID, dtype=np.int64)
        qv = qwords[qi]
        for p in range(probes.shape[1]):
            lst = probes[qi, p]
            if lst < 0:
                continue
            row, end = offsets[lst], offsets[lst + 1]
            while row + 4 <= end:  # four codes at a time, as in lut_search
                h0 = np.uint64(0)
                h1 = np.uint64(0)
                h2 = np.uint64(0)
                h3 = np.uint64(0)
                for j in range(w):
                    t = qv[j]
                    h0 += _popcount(t ^ cwords[row, j])
                    h1 += _popcount(t ^ cwords[row + 1, j])
                    h2 += _popcount(t ^ cwords[row + 2, j])
                    h3 += _popcount(t ^ cwords[row + 3, j])
                worst = hd[0]
                for u in range(4):
                    h = h0 if u == 0 else h1 if u == 1 else h2 if u == 2 else h3
                    d = np.float32(h)
                    if d > worst:
                        continue
                    ident = ids[row + u] if has_ids else row + u
                    if _allowed(mask, qi, ident):
                        _push(hd, hi, d, ident)
                        worst = hd[0]
                row += 4
            while row < end:
                ident = ids[row] if has_ids else row
                h = np.uint64(0)
                for j in range(w):
                    h += _popcount(qv[j] ^ cwords[row, j])
                if _allowed(mask, qi, ident):
                    _push(hd, hi, np.float32(h), ident)
                row += 1
        _finish(hd, hi, out_d[qi], out_i[qi])
    return out_d, out_i


@njit(cache=True, parallel=True)
def planes_search(qwords, cwords, weights, nbits, offsets, ids, probes, mask, k):
    """Cosine of recurrent binary codes (BEBR): ``z = sum_i w_i b_i`` over P bit-planes of ``nbits``.

    ``<z_q, z_c> = sum_ij w_i w_j (nbits - 2 popcount(q_i ^ c_j))``; the code's own norm comes from
    its planes the same way. ``d = -<z_q, z_c> / (|z_q| |z_c|)``.

    Args:
        qwords: (nq, P, W) uint64. cwords: (N, P, W) uint64. weights: (P,) float64.
    """
    nq, n_planes, w = qwords.shape
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    has_ids = ids.shape[0] > 0
    for qi in prange(nq):
        hd = np.full(k, np.inf, dtype=np.float32)
        hi = np.full(k, _NO_ID, dtype=np.int64)
        qv = qwords[qi]
        qn = 0.0
        for a in range(n_planes):
            for b in range(n_planes):
                h = np.uint64(0)
                for j in range(w):
                    h += _popcount(qv[a, j] ^ qv[b, j])
                qn += weights[a] * weights[b] * (nbits - 2.0 * h)
        qn = np.sqrt(qn)
        for p in range(probes.shape[1]):
            lst = probes[qi, p]
            if lst < 0:
                continue
            for row in range(offsets[lst], offsets[lst + 1]):
                ident = ids[row] if has_ids else row
                if not _allowed(mask, qi, ident):
                    continue
                cv = cwords[row]
                sim = 0.0
                cn = 0.0
                for a in range(n_planes):
                    for b in range(n_planes):
                        h = np.uint64(0)
                        hc = np.uint64(0)
                        for j in range(w):
                            h += _popcount(qv[a, j] ^ cv[b, j])
                            hc += _popcount(cv[a, j] ^ cv[b, j])
                        sim += weights[a] * weights[b] * (nbits - 2.0 * h)
                        cn += weights[a] * weights[b] * (nbits - 2.0 * hc)
                _push(hd, hi, np.float32(-sim / (qn * np.sqrt(cn))), ident)
        _finish(hd, hi, out_d[qi], out_i[qi])
    return out_d, out_i


@njit(cache=True, parallel=True, fastmath=True)
def rerank_exact(q, vectors, cand, k, l2):
    """Exact distances of candidate ids (nq, C) (``-1`` = none) from float32 ``vectors`` (N, D); best k.

    ``d = |q - x|^2`` when ``l2`` else ``-<q, x>`` in float32 (vectorised sums: the order of the
    additions may differ from numpy's, within float32 rounding).
    """
    nq, c = cand.shape
    d = q.shape[1]
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    for qi in prange(nq):
        hd = np.full(k, np.inf, dtype=np.float32)
        hi = np.full(k, _NO_ID, dtype=np.int64)
        qv = q[qi]
        for j in range(c):
            ident = cand[qi, j]
            if ident < 0:
                continue
            x = vectors[ident]
            s = np.float32(0)
            if l2:
                for t in range(d):
                    diff = qv[t] - x[t]
                    s += diff * diff
            else:
                for t in range(d):
                    s -= qv[t] * x[t]
            _push(hd, hi, s, ident)
        _finish(hd, hi, out_d[qi], out_i[qi])
    return out_d, out_i


def lut_queries(make_luts, q, idx, k, offsets, ids, probes, bias, mask, *, rows: int,
                extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run :func:`lut_search` over query chunks of ``rows``; ``make_luts(q)`` gives (nq, M, K) tables."""
    nq = q.shape[0]
    out_d = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    extra = np.zeros(0, np.float32) if extra is None else extra
    for s in range(0, nq, rows):
        e = min(nq, s + rows)
        out_d[s:e], out_i[s:e] = lut_search(
            np.ascontiguousarray(make_luts(q[s:e])), idx, extra, offsets, ids, probes[s:e], bias[s:e] if bias.size else bias,
            mask[s:e] if mask.shape[0] > 1 else mask, k)
    return out_d, out_i


def faiss_hamming_flat(qcodes: np.ndarray, codes: np.ndarray, k: int,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat Hamming top-k by FAISS's ``hammings_knn_hc`` on the codes in place (no copy).

    Used for flat scans of sign codes, where :func:`hamming_search` only matched FAISS's speed
    (100k x 384 bits, 1 thread: 5.3k against 5.3k queries/s), so FAISS's kernel serves. A shared
    ``mask`` (N,) becomes an ``IDSelectorBitmap``. Returns float32 distances and int64 ids
    ordered by (distance, id), with (+inf, -1) past the hits, like the compiled kernels.
    """
    import faiss

    nq, n = qcodes.shape[0], codes.shape[0]
    dist = np.empty((nq, k), dtype=np.int32)
    ids = np.empty((nq, k), dtype=np.int64)
    heap = faiss.int_maxheap_array_t()
    heap.k, heap.nh = k, nq
    heap.ids, heap.val = faiss.swig_ptr(ids), faiss.swig_ptr(dist)
    qcodes, codes = np.ascontiguousarray(qcodes), np.ascontiguousarray(codes)
    sel, bitmap = None, None
    if mask is not None:
        bitmap = np.packbits(np.ascontiguousarray(mask[:n]), bitorder="little")  # FAISS reads bit i & 7 of byte i >> 3
        sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
    faiss.hammings_knn_hc(heap, faiss.swig_ptr(qcodes), faiss.swig_ptr(codes), n, codes.shape[1], 1,
                          faiss.EXACT_TOPK, sel)
    del bitmap
    d = np.where(ids >= 0, dist.astype(np.float32), np.float32(np.inf))
    ids = np.where(np.isfinite(d), ids, -1)
    order = np.lexsort((np.where(ids < 0, _NO_ID, ids), d), axis=1)  # FAISS's heap leaves ties unordered
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(ids, order, axis=1)


def as_words(codes: np.ndarray, n_planes: int = 1) -> np.ndarray:
    """View (N, n_planes * B) uint8 codes as (N, W) or (N, n_planes, W) uint64, padding planes to 8 bytes.

    Zero-copy when each plane is a whole number of 8-byte words and the rows are contiguous.
    """
    n, nb = codes.shape
    per = nb // n_planes
    pad = (-per) % 8
    if pad == 0 and codes.flags.c_contiguous:
        words = codes.view(np.uint64).reshape(n, n_planes, per // 8)
    else:
        buf = np.zeros((n, n_planes, per + pad), dtype=np.uint8)
        buf[:, :, :per] = codes.reshape(n, n_planes, per)
        words = buf.view(np.uint64)
    return words[:, 0, :] if n_planes == 1 else words
