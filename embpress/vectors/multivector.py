"""Multi-vector retrieval: MUVERA fixed dimensional encodings (FDE), exact Chamfer scoring, and an index.

MUVERA (Dhulipala et al., "MUVERA: Multi-Vector Retrieval via Fixed Dimensional Encodings", NeurIPS 2024,
arXiv 2405.19504, §2 and Algorithm 1) maps a point cloud (a text's token vectors) to one vector whose inner
product approximates the Chamfer similarity ``sum_q max_d <q, d>``. Per repetition, k SimHash bits split
the space into 2^k partitions; a query puts the SUM of its points in each partition, a document the
AVERAGE; each partition's vector is projected to ``dproj`` dims by a random ±1 (AMS) matrix; the R
repetitions are concatenated and optionally Count-Sketched to a final dimension. Candidates found by the
FDE are re-ranked by the exact Chamfer score.

The layout follows Google's reference (google/graph-mining ``sketching/point_cloud/
fixed_dimensional_encoding.cc``): the partition index is built bit by bit as ``(p << 1) + (bit ^ (p & 1))``
(its sketch bits are then ``p ^ (p >> 1)``, first hyperplane in the top bit); an empty document partition
takes the projected point whose sketch is nearest in Hamming distance to the partition's (the first such
point on ties); filled partitions are not averaged; the AMS matrix has one ±1 per input coordinate and no
scaling. The random matrices come from ``numpy.random.Generator`` (not the reference's mt19937), so
encodings equal the reference's only given the same matrices.

Ragged point clouds are ``(vectors (T, D), offsets (N+1,))``: cloud i owns rows ``offsets[i]:offsets[i+1]``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from embpress.vectors.metric import SearchResult

Ragged = tuple[np.ndarray, np.ndarray]


def as_ragged(clouds: Any, *, name: str = "clouds") -> Ragged:
    """Normalise point clouds to ``(vectors (T, D), offsets (N+1,) int64)``.

    Accepts a ``TokenStates``/``(vectors, offsets)`` pair or a sequence of (n_i, D) arrays. Every cloud
    must hold at least one point.

    >>> v, o = as_ragged([np.ones((2, 3)), np.zeros((1, 3))])
    >>> v.shape, o.tolist()
    ((3, 3), [0, 2, 3])
    """
    if isinstance(clouds, tuple) and len(clouds) == 2 and np.ndim(clouds[1]) == 1 and np.ndim(clouds[0]) == 2:
        vectors, offsets = clouds
        offsets = np.asarray(offsets)
        if offsets.dtype.kind not in "iu":
            raise TypeError(f"{name}: offsets must be integers, got dtype {offsets.dtype}")
        offsets = offsets.astype(np.int64)
    else:
        parts = [np.asarray(c) for c in clouds]
        if not parts:
            raise ValueError(f"{name}: no point clouds")
        for i, c in enumerate(parts):
            if c.ndim != 2:
                raise ValueError(f"{name}[{i}] must be 2-D (n_points, D), got shape {c.shape}")
        lengths = np.array([c.shape[0] for c in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        vectors = np.concatenate(parts, axis=0)
    if offsets.size < 2 or offsets[0] != 0 or offsets[-1] != vectors.shape[0]:
        raise ValueError(f"{name}: offsets must start at 0 and end at the {vectors.shape[0]} rows of vectors, "
                         f"got {offsets[:1].tolist()}..{offsets[-1:].tolist()}")
    lengths = np.diff(offsets)
    if (lengths < 1).any():
        i = int(np.flatnonzero(lengths < 1)[0])
        raise ValueError(f"{name}: point cloud {i} is empty (offsets {offsets[i]}..{offsets[i + 1]}); "
                         "every text needs at least one vector")
    if np.asarray(vectors).dtype.kind not in "fiu":
        raise TypeError(f"{name}: vectors must be real numbers, got dtype {np.asarray(vectors).dtype}")
    return vectors, offsets


def _sketch_codes(bits: np.ndarray) -> np.ndarray:
    """Sketch code of bits (..., k) (bool), first hyperplane in the top bit: int64 (...)."""
    k = bits.shape[-1]
    return bits.astype(np.uint8) @ (np.int64(1) << np.arange(k - 1, -1, -1, dtype=np.int64))


def _gray_partition(code: np.ndarray) -> np.ndarray:
    """Partition index of sketch codes: the reference's ``AppendToGrayCode`` fold over the bits, top bit
    first, i.e. the inverse Gray code (p_j = s_0 ^ ... ^ s_j), computed by xor-shifts."""
    p = code.copy()
    shift = 1
    while shift < 32:
        p ^= p >> shift
        shift *= 2
    return p


class FDEEncoder:
    """MUVERA fixed dimensional encoder (queries SUM, documents AVERAGE), vectorised over ragged batches.

    Args:
        repetitions: R independent SimHash partitionings, concatenated.
        simhash_bits: k hyperplanes per repetition (2^k partitions, k <= 30).
        dproj: projected dimension per partition (``None``: no projection, keep D).
        projection: ``"ams"`` (the reference: one ±1 per input coordinate, unscaled) or ``"dense"``
            (the paper's and fastembed's i.i.d. ±1 matrix scaled by 1/sqrt(dproj)).
        final_dim: optional Count-Sketch of the whole encoding to this many dims.
        fill_empty: fill an empty document partition with its Hamming-nearest point (the reference).
        seed: seed of every random matrix.

    Output dimension: ``R * 2^k * dproj`` (or ``final_dim``). Fitted state: ``simhash_`` (R, D, k),
    ``projection_`` (R, D, dproj) or None, ``sketch_index_``/``sketch_sign_`` (F,) or None.

    >>> enc = FDEEncoder(repetitions=2, simhash_bits=1, dproj=None).fit(2)
    >>> enc.output_dim
    8
    """

    def __init__(self, *, repetitions: int = 20, simhash_bits: int = 5, dproj: int | None = 8,
                 projection: str = "ams", final_dim: int | None = None, fill_empty: bool = True, seed: int = 0):
        self.repetitions, self.simhash_bits, self.dproj = repetitions, simhash_bits, dproj
        self.projection, self.final_dim, self.fill_empty, self.seed = projection, final_dim, fill_empty, seed

    def _check_params(self) -> None:
        for name in ("repetitions", "simhash_bits", "dproj", "final_dim", "seed"):
            v = getattr(self, name)
            if v is None and name in ("dproj", "final_dim"):
                continue
            low = 0 if name in ("simhash_bits", "seed") else 1
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
                raise ValueError(f"FDEEncoder {name} must be an int >= {low}, got {v!r}")
        if self.simhash_bits > 30:
            raise ValueError(f"FDEEncoder simhash_bits must be <= 30, got {self.simhash_bits}")
        if self.projection not in ("ams", "dense"):
            raise ValueError(f"FDEEncoder projection must be 'ams' or 'dense', got {self.projection!r}")

    def fit(self, d: int) -> FDEEncoder:
        """Draw the random matrices for D-dimensional points; returns self."""
        self._check_params()
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1:
            raise ValueError(f"FDEEncoder.fit needs the point dimension D (a positive int), got {d!r}")
        d, r, k = int(d), self.repetitions, self.simhash_bits
        rng = np.random.default_rng(self.seed)
        self.d_ = d
        self.simhash_ = rng.standard_normal((r, d, k)).astype(np.float32)
        if self.dproj is None:
            self.projection_ = None
        elif self.projection == "ams":
            proj = np.zeros((r, d, self.dproj), dtype=np.float32)
            cols = rng.integers(0, self.dproj, size=(r, d))
            signs = rng.integers(0, 2, size=(r, d)) * 2.0 - 1.0
            proj[np.arange(r)[:, None], np.arange(d)[None, :], cols] = signs
            self.projection_ = proj
        else:
            self.projection_ = ((rng.integers(0, 2, size=(r, d, self.dproj)) * 2.0 - 1.0)
                                / np.sqrt(self.dproj)).astype(np.float32)
        inner = self.inner_dim
        if self.final_dim is not None:
            self.sketch_index_ = rng.integers(0, self.final_dim, size=inner)
            self.sketch_sign_ = (rng.integers(0, 2, size=inner) * 2.0 - 1.0).astype(np.float32)
        else:
            self.sketch_index_ = self.sketch_sign_ = None
        return self

    @property
    def inner_dim(self) -> int:
        """R * 2^k * dproj: the encoding before the optional Count-Sketch."""
        p = self.dproj if self.dproj is not None else self.d_
        return self.repetitions * 2**self.simhash_bits * p

    @property
    def output_dim(self) -> int:
        return self.final_dim if self.final_dim is not None else self.inner_dim

    def _check_fitted(self) -> None:
        if not hasattr(self, "simhash_"):
            raise ValueError("FDEEncoder is not fitted: call fit(D) first")

    def encode_queries(self, clouds: Any, *, batch: int = 4096) -> np.ndarray:
        """Query FDEs (SUM per partition, no filling): (N, output_dim), float64 for float64 input else float32."""
        return self._encode(clouds, query=True, batch=batch)

    def encode_documents(self, clouds: Any, *, batch: int = 1024) -> np.ndarray:
        """Document FDEs (AVERAGE per partition, empty partitions filled): (N, output_dim)."""
        return self._encode(clouds, query=False, batch=batch)

    def _encode(self, clouds: Any, *, query: bool, batch: int) -> np.ndarray:
        self._check_fitted()
        vectors, offsets = as_ragged(clouds, name="queries" if query else "documents")
        if vectors.shape[1] != self.d_:
            raise ValueError(f"FDEEncoder was fit on D={self.d_}, got points of D={vectors.shape[1]}")
        dtype = np.float64 if np.asarray(vectors[:1]).dtype == np.float64 else np.float32
        n = offsets.shape[0] - 1
        out = np.empty((n, self.output_dim), dtype=dtype)
        for s in range(0, n, batch):
            e = min(n, s + batch)
            x = np.asarray(vectors[offsets[s]:offsets[e]], dtype=dtype)
            fde = self._encode_block(x, offsets[s:e + 1] - offsets[s], query=query)
            if self.final_dim is not None:
                sk = np.zeros((e - s, self.final_dim), dtype=dtype)
                # sk[:, idx[j]] += sign[j] * fde[:, j], summed over j, as one transposed add
                np.add.at(sk.T, self.sketch_index_, (fde * self.sketch_sign_.astype(dtype)).T)
                fde = sk
            out[s:e] = fde
        if not np.isfinite(out).all():
            raise ValueError("FDE of non-finite input: the token vectors hold NaN or inf")
        return out

    def _encode_block(self, x: np.ndarray, offsets: np.ndarray, *, query: bool) -> np.ndarray:
        r, k = self.repetitions, self.simhash_bits
        b = 2**k
        n, t = offsets.shape[0] - 1, x.shape[0]
        lengths = np.diff(offsets)
        seg = np.repeat(np.arange(n), lengths)  # cloud of each point
        if k > 0:
            w = self.simhash_.astype(x.dtype).transpose(1, 0, 2).reshape(x.shape[1], r * k)
            code = _sketch_codes((x @ w).reshape(t, r, k) > 0)  # (T, R)
            part = _gray_partition(code)
        else:
            code = part = np.zeros((t, r), dtype=np.int64)
        if self.projection_ is None:
            proj = np.broadcast_to(x[:, None, :], (t, r, x.shape[1]))
        else:
            pw = self.projection_.astype(x.dtype).transpose(1, 0, 2).reshape(x.shape[1], -1)
            proj = (x @ pw).reshape(t, r, -1)
        p = proj.shape[2]
        # one slot per (cloud, repetition, partition); sum the projected points into their slots
        slot = (seg[:, None] * r + np.arange(r)[None, :]) * b + part  # (T, R)
        flat = slot.reshape(-1)
        sums = np.zeros((n * r * b, p), dtype=x.dtype)
        order = np.argsort(flat, kind="stable")
        fs = flat[order]
        starts = np.flatnonzero(np.r_[True, fs[1:] != fs[:-1]])
        sums[fs[starts]] = np.add.reduceat(proj.reshape(-1, p)[order], starts, axis=0)
        if query:
            return sums.reshape(n, r * b * p)
        counts = np.bincount(flat, minlength=n * r * b)
        nz = counts > 0
        sums[nz] /= counts[nz, None]
        if self.fill_empty and k > 0 and not nz.all():
            self._fill(sums, nz, code, seg, offsets, proj)
        return sums.reshape(n, r * b * p)

    def _fill(self, sums: np.ndarray, occupied: np.ndarray, code: np.ndarray, seg: np.ndarray,
              offsets: np.ndarray, proj: np.ndarray) -> None:
        """Each empty (cloud, repetition, partition) slot takes the projected point of that cloud whose
        sketch bits are Hamming-nearest to the partition's, the first such point on ties."""
        r, k = self.repetitions, self.simhash_bits
        b = 2**k
        t = code.shape[0]
        local = np.arange(t) - offsets[seg]  # point's index inside its cloud
        n = offsets.shape[0] - 1
        # first point of each (cloud, repetition, code): the only candidate among equal codes
        first = np.full(n * r * b, np.iinfo(np.int64).max, dtype=np.int64)
        key = ((seg[:, None] * r + np.arange(r)[None, :]) * b + code).reshape(-1)
        np.minimum.at(first, key, np.repeat(local, r))
        first = first.reshape(n, r, b)
        has = first < np.iinfo(np.int64).max
        empty = np.flatnonzero(~occupied)
        ci, rest = np.divmod(empty, r * b)
        ri, pi = np.divmod(rest, b)
        codes = np.arange(b, dtype=np.uint64)[None, :]
        gray = (pi ^ (pi >> 1)).astype(np.uint64)  # the partitions' sketch bits
        big = np.int64(1) << 32
        point = np.empty(empty.size, dtype=np.int64)
        step = max(1, (1 << 22) // b)  # bound the (empty slots, codes) work array
        for s in range(0, empty.size, step):
            e = min(empty.size, s + step)
            dist = np.bitwise_count(codes ^ gray[s:e, None]).astype(np.int64)
            # rank candidates by (Hamming distance, point index): distance * big + index, the minimum wins
            cand, ok = first[ci[s:e], ri[s:e]], has[ci[s:e], ri[s:e]]
            score = np.where(ok, dist * big + np.where(ok, cand, 0), np.iinfo(np.int64).max)
            best = score.argmin(axis=1)
            point[s:e] = offsets[ci[s:e]] + cand[np.arange(e - s), best]
        sums[empty] = proj[point, ri]


_FDE_SPEC = re.compile(r"^fde(?::(?P<args>.*))?$")
_FDE_KEYS = {"r": "repetitions", "k": "simhash_bits", "dproj": "dproj", "final": "final_dim", "seed": "seed",
             "proj": "projection"}


def parse_fde_spec(spec: str) -> FDEEncoder:
    """``"fde:R=20,k=5,dproj=8[,final=10240][,proj=ams|dense][,seed=0]"`` -> an unfitted :class:`FDEEncoder`.

    >>> parse_fde_spec("fde:R=20,k=5,dproj=8").repetitions
    20
    """
    m = _FDE_SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"multi-vector spec {spec!r} is not of the form 'fde:R=20,k=5,dproj=8'")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (m.group("args") or "").split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _FDE_KEYS:
            raise ValueError(f"multi-vector spec {spec!r}: unknown setting {item!r}; "
                             f"allowed: {', '.join(f'{k}=' for k in _FDE_KEYS)}")
        if key == "proj":
            kwargs["projection"] = value.strip()
            continue
        if key == "dproj" and value.strip() == "none":
            kwargs["dproj"] = None
            continue
        try:
            kwargs[_FDE_KEYS[key]] = int(value)
        except ValueError:
            raise ValueError(f"multi-vector spec {spec!r}: {key} must be an integer, got {value!r}") from None
    enc = FDEEncoder(**kwargs)
    enc._check_params()
    return enc


def chamfer_scores(query: np.ndarray, docs: Ragged, ids: np.ndarray | None = None) -> np.ndarray:
    """Chamfer similarity ``sum_i max_j <q_i, d_j>`` of one query (n_q, D) to documents (all, or ``ids``)."""
    vectors, offsets = docs
    q = np.asarray(query, dtype=np.float32)
    if ids is None:
        ids = np.arange(offsets.shape[0] - 1)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(0, dtype=np.float32)
    starts, ends = offsets[ids], offsets[ids + 1]
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    block = np.asarray(vectors[rows], dtype=np.float32)
    sims = q @ block.T  # (n_q, tokens of the candidates)
    bounds = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
    return np.maximum.reduceat(sims, bounds, axis=1).sum(axis=0)


def chamfer_search(queries: Ragged, docs: Ragged, k: int, *, block_tokens: int = 1 << 14) -> SearchResult:
    """Exact Chamfer top-k of every query against every document (brute force, document blocks).

    Returns SearchResult (nq, k) with distances = -Chamfer similarity (embpress's IP convention).
    """
    qv, qo = as_ragged(queries, name="queries")
    dv, do = as_ragged(docs, name="documents")
    qx = np.asarray(qv, dtype=np.float32)
    nq, n = qo.shape[0] - 1, do.shape[0] - 1
    scores = np.empty((nq, n), dtype=np.float32)
    qstarts = qo[:-1]
    d0 = 0
    while d0 < n:
        d1 = int(np.searchsorted(do, do[d0] + block_tokens, side="right")) - 1
        d1 = max(d1, d0 + 1)
        d1 = min(d1, n)
        block = np.asarray(dv[do[d0]:do[d1]], dtype=np.float32)
        sims = qx @ block.T  # (query tokens, block tokens)
        mx = np.maximum.reduceat(sims, do[d0:d1] - do[d0], axis=1)  # (query tokens, docs in block)
        scores[:, d0:d1] = np.add.reduceat(mx, qstarts, axis=0)
        d0 = d1
    kk = min(k, n)
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    ts = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -ts), axis=1)
    ids = np.take_along_axis(top, order, axis=1)
    dist = -np.take_along_axis(ts, order, axis=1)
    if kk < k:
        ids = np.concatenate([ids, np.full((nq, k - kk), -1)], axis=1)
        dist = np.concatenate([dist, np.full((nq, k - kk), np.inf, np.float32)], axis=1)
    return SearchResult(dist.astype(np.float32), ids.astype(np.int64))


class MultiVectorIndex:
    """MUVERA retrieval: document FDEs compressed by any codec (or an IVF spec) in an :class:`Index` select
    candidates; the exact Chamfer score from the token vectors (kept ragged, e.g. a memmap on disk)
    re-ranks them.

    Args:
        encoder: an :class:`FDEEncoder` or a spec ``"fde:R=20,k=5,dproj=8"``.
        codec: the FDE index spec (``"fp16"``, ``"pq640"``, ``"ivf64,sq8"``, ...).
        nprobe: lists scanned per query for an IVF spec.
        seed: codec and k-means seed.

    Memory: :meth:`bytes_per_doc` (FDE codes in memory) and :meth:`disk_bytes_per_doc` (token vectors at
    their stored precision plus one int64 offset).

    >>> rng = np.random.default_rng(0)
    >>> docs = [rng.standard_normal((5, 16)).astype("float32") for _ in range(50)]
    >>> mv = MultiVectorIndex("fde:R=4,k=2,dproj=4", codec="fp16").build(docs)
    >>> mv.search(docs[:2], k=1, candidates=10).ids.ravel().tolist()
    [0, 1]
    """

    def __init__(self, encoder: FDEEncoder | str = "fde:R=20,k=5,dproj=8", *, codec: str = "fp16",
                 nprobe: int = 1, seed: int = 0):
        self.encoder, self.codec, self.nprobe, self.seed = encoder, codec, nprobe, seed

    def build(self, docs: Any, *, fde: np.ndarray | None = None) -> MultiVectorIndex:
        """Encode every document's FDE, fit the codec on them, index them; keep ``docs`` for re-ranking.

        ``fde``: the documents' FDEs already encoded by this index's (fitted) encoder, to share one
        encoding between indexes with different codecs."""
        from embpress.vectors.index import Index

        vectors, offsets = as_ragged(docs, name="documents")
        enc = parse_fde_spec(self.encoder) if isinstance(self.encoder, str) else self.encoder
        if not hasattr(enc, "simhash_"):
            enc.fit(vectors.shape[1])
        self.encoder_ = enc
        if fde is None:
            t = time.perf_counter()
            fde = enc.encode_documents((vectors, offsets)).astype(np.float32, copy=False)
            self.encode_seconds_ = time.perf_counter() - t
        elif fde.shape != (offsets.shape[0] - 1, enc.output_dim):
            raise ValueError(f"fde must be ({offsets.shape[0] - 1}, {enc.output_dim}) for these documents and "
                             f"encoder, got {fde.shape}")
        else:
            self.encode_seconds_ = float("nan")
            fde = np.ascontiguousarray(fde, dtype=np.float32)
        self.index_ = Index(self.codec, metric="ip", nprobe=self.nprobe, seed=self.seed).fit(fde)
        self.index_.add(fde)
        self.docs_ = (vectors, offsets)
        return self

    def _check_built(self) -> None:
        if not hasattr(self, "index_"):
            raise ValueError("MultiVectorIndex is not built: call build(docs) first")

    def candidates(self, queries: Any, n: int) -> np.ndarray:
        """(nq, n) document ids whose FDE codes score best against the query FDEs (-1 pads)."""
        self._check_built()
        qf = self.encoder_.encode_queries(queries).astype(np.float32, copy=False)
        return self.index_.search(qf, n).ids

    def search(self, queries: Any, k: int, *, candidates: int = 100) -> SearchResult:
        """Top-k by exact Chamfer among the ``candidates`` best FDE matches of each query."""
        self._check_built()
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(candidates, bool) or not isinstance(candidates, int | np.integer) or candidates < k:
            raise ValueError(f"candidates must be an int >= k={k}, got {candidates!r}")
        qv, qo = as_ragged(queries, name="queries")
        cand = self.candidates((qv, qo), int(candidates))
        return rerank_chamfer((qv, qo), self.docs_, cand, k)

    def bytes_per_doc(self) -> int:
        """In-memory bytes per document: its FDE code (and id, for IVF)."""
        self._check_built()
        return self.index_.bytes_per_vector()

    def disk_bytes_per_doc(self) -> float:
        """Mean bytes per document of the re-ranking token vectors at their stored precision + offsets."""
        self._check_built()
        vectors, offsets = self.docs_
        n = offsets.shape[0] - 1
        return float((vectors.shape[0] * vectors.shape[1] * np.asarray(vectors[:1]).itemsize + 8 * (n + 1)) / n)


def rerank_chamfer(queries: Ragged, docs: Ragged, cand: np.ndarray, k: int) -> SearchResult:
    """Re-rank each query's candidate ids (nq, c; -1 = none) by exact Chamfer; (nq, k) result."""
    qv, qo = queries
    nq = qo.shape[0] - 1
    ids = np.full((nq, k), -1, dtype=np.int64)
    dist = np.full((nq, k), np.inf, dtype=np.float32)
    for i in range(nq):
        c = cand[i][cand[i] >= 0]
        if c.size == 0:
            continue
        s = chamfer_scores(np.asarray(qv[qo[i]:qo[i + 1]], dtype=np.float32), docs, c)
        order = np.lexsort((c, -s))[:k]
        ids[i, :order.size] = c[order]
        dist[i, :order.size] = -s[order]
    return SearchResult(dist, ids)


def ball_carve(points: np.ndarray, tau: float = 0.7) -> np.ndarray:
    """MUVERA's optional query clustering ("ball carving", arXiv 2405.19504 §3.2): the first unclustered
    point opens a cluster and takes every unclustered point within similarity ``tau`` of it; repeat. Each
    cluster is replaced by the SUM of its points (fewer query vectors to re-rank with). (m, D) sums.

    >>> ball_carve(np.array([[1, 0], [0.9, 0.1], [0, 1]], "float32")).tolist()
    [[1.899999976158142, 0.10000000149011612], [0.0, 1.0]]
    """
    x = np.asarray(points, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"ball_carve needs (n >= 1, D) points, got shape {x.shape}")
    centres: list[int] = []
    assign = np.empty(x.shape[0], dtype=np.int64)
    for i in range(x.shape[0]):
        if centres:
            near = np.flatnonzero(x[centres] @ x[i] >= tau)
            if near.size:  # the earliest centre carved this point before any later one could
                assign[i] = int(near[0])
                continue
        assign[i] = len(centres)
        centres.append(i)
    out = np.zeros((len(centres), x.shape[1]), dtype=np.float32)
    np.add.at(out, assign, x)
    return out
