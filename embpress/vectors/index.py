"""An index over compressed codes, flat or in IVF lists, with exact re-ranking from float32 originals on disk.

This is the bi-granular layout of BiDR (Xiao et al., "Progressively Optimized Bi-Granular Document
Representation for Scalable Embedding Based Retrieval", WWW 2022, arXiv 2201.05409): compact codes in
memory select ``k * oversample`` candidates, and the dense float32 vectors, kept in a memory-mapped
file, re-score those candidates exactly. The codes are scanned through the codec's
``search_lists`` hook (compiled kernels with a running top-k, or BLAS for float codecs). With
``nlist`` (or a spec ``"ivf{nlist},{codec}"``) the codes live in inverted lists around a FAISS
k-means coarse quantizer and a query scans only its ``nprobe`` nearest lists (Jégou et al., TPAMI
2011, Sec. IV).

The i-th vector added has id i. A flat index stores no ids (positions); an IVF index stores an
int64 id per vector. Optional integer attributes, one row per vector, support filtered search,
also inside lists.

Filters (``search(..., filter=...)``), in every case ``True`` means "may be returned":
  * ``None``: no filter.
  * a bool array ``(N,)`` shared by all queries, or ``(nq, N)`` one mask per query.
  * a callable ``f(attrs) -> mask`` on a block of attributes ``attrs`` int64 ``(b, A)`` (in id order), returning
    ``(b,)`` (shared) or ``(nq, b)`` (per query); see :func:`attribute_equals`, :func:`attribute_in`.
  * a sequence of ``nq`` such callables returning ``(b,)``, one predicate per query.
Fewer than ``k`` allowed vectors give ``-1`` ids and ``+inf`` distances in the tail.

``k`` larger than the corpus is not an error: results are padded with ``-1`` / ``+inf`` (STYLE §7).

Saved layout (one folder; :data:`FORMAT_VERSION`)::

    header.json        format, version, n, d, metric, codec spec, nlist, file names, sha256 of every
                       file, and a sha256 of the header itself
    codes.npy          uint8 (N, code_bytes)   (IVF: grouped by list)
    codec_state.npz    the codec's get_state() arrays and scalars
    attributes.npy     int64 (N, A)            (when attributes were added)
    originals.f32      raw float32 (N, D)      (when the index re-ranks)
    centroids.npy      float32 (nlist, D)      (IVF)
    offsets.npy        int64 (nlist + 1,)      (IVF: list l is rows offsets[l]:offsets[l+1])
    ids.npy            int64 (N,)              (IVF: the id of each row)

Version 1 folders (flat, before IVF) still load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embpress.progress import progress_task
from embpress.vectors.codec import Codec, NotFittedError, as_matrix, build_codec, codec_from_state
from embpress.vectors.distill import distill_coarse_centroids
from embpress.vectors.kernels import rerank_exact
from embpress.vectors.metric import Metric, SearchResult, as_metric
from embpress.vectors.vecio import VectorFile, append_f32, open_f32, sha256_file

FORMAT_NAME = "embpress-vectors-index"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
HEADER = "header.json"
_CODES, _STATE, _ATTRS, _ORIG = "codes.npy", "codec_state.npz", "attributes.npy", "originals.f32"
_CENTROIDS, _OFFSETS, _IDS = "centroids.npy", "offsets.npy", "ids.npy"
_IVF_SPEC = re.compile(r"ivf(?P<nlist>\d+)\s*,\s*(?P<codec>.+)")
_RESIDUAL_ROWS = 1 << 13  # rows whose residuals are formed at once while encoding
_MASK_ROWS = 1 << 16  # attribute rows a filter predicate sees at once
_MASK_BYTES = 1 << 27  # bound on a per-query mask chunk (queries x N bools)

FilterSpec = None | np.ndarray | Callable[[np.ndarray], np.ndarray] | Sequence[Callable[[np.ndarray], np.ndarray]]


def attribute_equals(column: int, value: int | np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Filter on ``attrs[:, column] == value``: one int (shared) or an int array (nq,) (one per query).

    >>> f = attribute_equals(0, np.array([1, 2]))
    >>> f(np.array([[1], [2], [2]])).tolist()
    [[True, False, False], [False, True, True]]
    """
    values = np.asarray(value)
    if values.dtype.kind not in "iub" or values.ndim > 1:
        raise ValueError(f"attribute_equals value must be an int or a 1-D int array, got {value!r}")

    def pred(attrs: np.ndarray) -> np.ndarray:
        col = attrs[:, column]
        return col[None, :] == values[:, None] if values.ndim == 1 else col == values

    return pred


def attribute_in(column: int, values: Sequence[int] | np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Shared filter on ``attrs[:, column] in values``.

    >>> attribute_in(0, [3, 5])(np.array([[3], [4], [5]])).tolist()
    [True, False, True]
    """
    allowed = np.asarray(values, dtype=np.int64).ravel()
    return lambda attrs: np.isin(attrs[:, column], allowed)


def _flatten_state(state: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "O":
            raise ValueError(f"codec state entry {key!r} is not an array or scalar ({type(value).__name__})")
        out[key] = arr
    return out


class Index:
    """Codes in memory (flat or in inverted lists); optional float32 originals on disk for re-ranking.

    Args:
        codec: a codec spec (``"sq8"``, ``"pq32x8"``, ``"pca128+sq8"``, ...), an IVF spec in FAISS's
            factory style (``"ivf1024,pq32"``), or a ``Codec`` instance.
        metric: ``"ip"``, ``"cosine"`` or ``"l2"`` (aliases as in :func:`as_metric`). For cosine the
            index L2-normalises vectors and queries, then uses inner product.
        nlist: number of inverted lists (IVF partitions); ``None`` (or 0) scans every code (flat).
            ``"ivf{nlist},..."`` in the spec sets it too.
        nprobe: lists scanned per query by default (``search(..., nprobe=...)`` overrides).
        rerank_path: file that receives the float32 originals at ``add`` time (created or truncated
            by the first ``add``); ``None`` keeps no originals and forbids ``oversample > 1``.
        seed: seed of the codec (:func:`build_codec`) and of the coarse k-means.
        block_size: rows encoded at once when streaming from a file (:meth:`add_file`).
        kmeans_iters: iterations of the coarse k-means (FAISS ``Kmeans``).
        coarse_epochs: epochs of distillation of the coarse centroids after k-means (0: k-means
            only): Distill-VQ's learned IVF, :func:`~embpress.vectors.distill.distill_coarse_centroids`
            with the training vectors as pseudo-queries, so that the probed lists hold the float top-k.

    With IVF, a vector is stored in the list of its nearest coarse centroid (largest inner product
    under ip/cosine, smallest distance under l2). Under ip/cosine, codecs whose distance is an
    inner product with the decoded vector (pq, opq, rq, sq, fp16) encode the residual ``x - c``
    and scoring adds ``-<q, c>`` per list, as FAISS's ``IndexIVFPQ`` does; other codecs, and every
    codec under l2, encode the vector itself, so one lookup table per query serves every list.

    Shapes: N indexed vectors, D dim, nq queries, A attribute columns.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2000, 32)).astype("float32")
        >>> index = Index("sq8", metric="l2").fit(x)
        >>> index.add(x)
        >>> D, I = index.search(x[:3], k=5)
        >>> I[:, 0].tolist()
        [0, 1, 2]
        >>> ivf = Index("ivf16,pq8", metric="l2", nprobe=16).fit(x)
        >>> ivf.add(x)
        >>> ivf.search(x[:3], k=5, oversample=1).ids.shape
        (3, 5)
    """

    def __init__(self, codec: str | Codec, *, metric: str | Metric = "ip", nlist: int | None = None,
                 nprobe: int = 1, rerank_path: str | os.PathLike | None = None, seed: int = 0,
                 block_size: int = 1 << 16, kmeans_iters: int = 20, coarse_epochs: int = 0):
        self.codec = codec
        self.metric = metric
        self.nlist = nlist
        self.nprobe = nprobe
        self.rerank_path = rerank_path
        self.seed = seed
        self.block_size = block_size
        self.kmeans_iters = kmeans_iters
        self.coarse_epochs = coarse_epochs
        self.metric_ = as_metric(metric)  # validate at the boundary: unknown metric fails here
        spec_nlist = None
        if isinstance(codec, Codec):
            self.codec_ = codec
        elif isinstance(codec, str):
            m = _IVF_SPEC.fullmatch(codec.strip().lower())
            if m is not None:
                spec_nlist = int(m["nlist"])
                codec = m["codec"]
            elif codec.strip().lower().startswith("ivf"):
                raise ValueError(f"malformed IVF spec {self.codec!r}; write it as 'ivf{{nlist}},{{codec}}', "
                                 "e.g. 'ivf1024,pq32'")
            self.codec_ = build_codec(codec, seed=seed)
        else:
            raise TypeError(f"codec must be a spec string or a Codec, got {type(codec).__name__}")
        if spec_nlist is not None and nlist not in (None, spec_nlist):
            raise ValueError(f"the spec {self.codec!r} says nlist={spec_nlist} but nlist={nlist!r} was passed")
        nl = spec_nlist if spec_nlist is not None else (nlist or 0)
        if isinstance(nl, bool) or not isinstance(nl, int | np.integer) or nl < 0:
            raise ValueError(f"nlist must be a positive int (or None for a flat index), got {nlist!r}")
        self.nlist_ = int(nl)
        self._check_nprobe(nprobe)
        for name, v in (("block_size", block_size), ("kmeans_iters", kmeans_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(coarse_epochs, bool) or not isinstance(coarse_epochs, int) or coarse_epochs < 0:
            raise ValueError(f"coarse_epochs must be a non-negative int, got {coarse_epochs!r}")
        if coarse_epochs and not self.nlist_:
            raise ValueError(f"coarse_epochs={coarse_epochs} trains IVF centroids, but this index is flat "
                             f"({self.codec!r}); give nlist or an 'ivf{{nlist}},...' spec")
        self.residual_ = bool(self.nlist_ and self.codec_.residual_ok and self.metric_ is not Metric.L2)
        self.centroids_: np.ndarray | None = None
        self._quantizer = None
        self._codes = np.zeros((0, 0), dtype=np.uint8)
        self._ids: np.ndarray | None = None  # (N,) int64 with IVF (ids in list order); flat: row = id
        self._offsets = np.zeros(max(self.nlist_, 1) + 1, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray | None, int]] = []  # (codes, lists, first id)
        self._attrs: np.ndarray | None = None
        self._originals: np.ndarray | None = None
        self._frozen_originals: Path | None = None  # originals that belong to a saved folder
        self.ntotal = 0

    # ------------------------------------------------------------------ properties
    @property
    def d(self) -> int:
        """Input dimension (after ``fit``)."""
        self._check_trained()
        return int(self.codec_.d_)

    @property
    def is_trained(self) -> bool:
        return bool(self.codec_.is_fitted) and (not self.nlist_ or self.centroids_ is not None)

    @property
    def is_ivf(self) -> bool:
        return self.nlist_ > 0

    @property
    def spec(self) -> str:
        """The index spec: the codec's, prefixed by ``ivf{nlist},`` for an IVF index."""
        return f"ivf{self.nlist_},{self.codec_.spec}" if self.nlist_ else self.codec_.spec

    @property
    def has_originals(self) -> bool:
        return self.rerank_path is not None

    @property
    def attribute_columns(self) -> int:
        """A, the number of integer attribute columns (0 without attributes)."""
        return 0 if self._attrs is None else int(self._attrs.shape[1])

    def bytes_per_vector(self) -> int:
        """In-memory bytes per indexed vector: the code (with its norms or scales), its id, attributes.

        A flat index's ids are implicit (positions) and cost nothing; an IVF index stores an int64
        id per vector beside its code (as FAISS's inverted lists do). The float32 originals live
        on disk (:meth:`disk_bytes_per_vector`).
        """
        return int(self.codec_.code_bytes) + (8 if self.nlist_ else 0) + 8 * self.attribute_columns

    def disk_bytes_per_vector(self) -> int:
        """Bytes per vector of the re-ranking originals on disk (0 without them)."""
        return 4 * self.d if self.has_originals else 0

    def fixed_bytes(self) -> int:
        """Bytes shared by all vectors: the codec's state (codebooks, rotations, scales), the coarse
        centroids and the list offsets."""
        codec = sum(np.asarray(v).nbytes for v in self.codec_.get_state().values() if isinstance(v, np.ndarray))
        ivf = self.centroids_.nbytes + self._offsets.nbytes if self.centroids_ is not None else 0
        return int(codec + ivf)

    def list_sizes(self) -> np.ndarray:
        """(nlist,) vectors per inverted list (a flat index is one list)."""
        self._consolidate()
        return np.diff(self._offsets)

    def __repr__(self) -> str:
        return (f"Index({self.spec!r}, metric={self.metric_.value!r}, ntotal={self.ntotal}, "
                f"nprobe={self.nprobe}, rerank={'yes' if self.has_originals else 'no'})")

    # ------------------------------------------------------------------ checks
    def _check_trained(self) -> None:
        if not self.is_trained:
            raise NotFittedError(f"index {self.spec!r} is not trained; call index.fit(x) first")

    def _check_nprobe(self, nprobe: Any) -> int:
        if isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer) or nprobe < 1:
            raise ValueError(f"nprobe must be a positive int, got {nprobe!r}")
        if self.nlist_ and nprobe > self.nlist_:
            raise ValueError(f"nprobe={nprobe} exceeds nlist={self.nlist_}: an index cannot scan more lists "
                             f"than it has; use nprobe <= {self.nlist_}")
        return int(nprobe)

    def _prepare(self, x: Any, name: str, *, check_dim: bool = True) -> np.ndarray:
        """Validate (finite, 2-D, right dim) and normalise for cosine: (n, D) float32 C-contiguous."""
        x = as_matrix(x, name=name)
        if check_dim and self.codec_.is_fitted and x.shape[1] != self.codec_.d_:
            raise ValueError(f"{name} has d={x.shape[1]}, but the index was trained on d={self.codec_.d_}")
        if self.metric_ is Metric.COSINE:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norms > 0, norms, 1).astype(np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    # ------------------------------------------------------------------ coarse quantizer
    def _coarse(self):
        """FAISS flat index over the centroids (inner product under ip/cosine, L2 otherwise)."""
        if self._quantizer is None:
            assert self.centroids_ is not None
            d = self.centroids_.shape[1]
            qz = faiss.IndexFlatL2(d) if self.metric_ is Metric.L2 else faiss.IndexFlatIP(d)
            qz.add(self.centroids_)
            self._quantizer = qz
        return self._quantizer

    def _assign(self, x: np.ndarray) -> np.ndarray:
        """(n,) int64 list of each prepared vector."""
        return self._coarse().search(x, 1)[1][:, 0].astype(np.int64)

    def _encode(self, x: np.ndarray, lists: np.ndarray | None) -> np.ndarray:
        if not self.residual_:
            return self.codec_.encode(x)
        assert lists is not None and self.centroids_ is not None
        out = np.empty((x.shape[0], self.codec_.code_bytes), dtype=np.uint8)
        for s in range(0, x.shape[0], _RESIDUAL_ROWS):  # residuals a slice at a time: small temporaries
            e = min(x.shape[0], s + _RESIDUAL_ROWS)
            out[s:e] = self.codec_.encode(x[s:e] - self.centroids_[lists[s:e]])
        return out

    # ------------------------------------------------------------------ build
    def fit(self, x: np.ndarray) -> Index:
        """Train the coarse k-means (IVF) and the codec on (N, D) vectors; returns self."""
        x = self._prepare(x, "x", check_dim=False)
        if x.shape[0] == 0:
            raise ValueError("cannot train an index on an empty array (0 vectors)")
        if self.ntotal:
            raise ValueError(f"index already holds {self.ntotal} vectors; retraining would invalidate their codes")
        if self.nlist_:
            if x.shape[0] < self.nlist_:
                raise ValueError(f"nlist={self.nlist_} needs at least {self.nlist_} training vectors, got "
                                 f"{x.shape[0]}; lower nlist (FAISS suggests >= 39 vectors per list) or train on more")
            km = faiss.Kmeans(x.shape[1], self.nlist_, niter=self.kmeans_iters, seed=self.seed or 1234,
                              max_points_per_centroid=256)
            km.train(x)
            self.centroids_ = np.ascontiguousarray(km.centroids, dtype=np.float32)
            if self.coarse_epochs:
                fit = distill_coarse_centroids(self.centroids_, x, epochs=self.coarse_epochs,
                                               metric="l2" if self.metric_ is Metric.L2 else "ip", seed=self.seed)
                self.centroids_ = fit.centroids
                self.coarse_history_ = fit
            self._quantizer = None
            if self.residual_:
                x = x - self.centroids_[self._assign(x)]
        self.codec_.fit(x)
        return self

    train = fit

    def add(self, x: np.ndarray, attributes: np.ndarray | None = None) -> None:
        """Encode and append (N, D) vectors; they get ids ``ntotal .. ntotal+N-1``.

        Args:
            x: (N, D) finite vectors.
            attributes: optional int (N,) or (N, A) attributes for filtered search. Either every
                ``add`` passes attributes with the same A, or none does.
        """
        self._check_trained()
        x = self._prepare(x, "x")
        n = x.shape[0]
        if n == 0:
            raise ValueError("add got an empty array (0 vectors)")
        attrs = self._check_attributes(attributes, n)
        self._check_growable()
        lists = self._assign(x) if self.nlist_ else None
        codes = self._encode(x, lists)
        self._append_originals(x)
        self._pending.append((codes, lists, self.ntotal))
        if attrs is not None:
            self._attrs = attrs if self._attrs is None else np.concatenate([self._attrs, attrs])
        self.ntotal += n

    def add_file(self, path: str | os.PathLike, *, d: int | None = None, attributes: np.ndarray | None = None,
                 progress: bool = False) -> dict[str, float]:
        """Stream (N, D) vectors from a ``.npy`` or raw ``.f32`` file into the index, ``block_size`` rows at a time.

        The file may be larger than memory: it is read block by block (not memory-mapped), so the
        peak memory is the codes, one block and the coarse quantizer. An empty IVF index places
        each code straight into its list (two passes over the file: assign, then encode).

        Returns:
            ``{"n": rows added, "seconds": wall time, "vectors_per_s": encode throughput}``.
        """
        self._check_trained()
        reader = VectorFile(path, d=d)
        if reader.d != self.d:
            raise ValueError(f"{path}: vectors have d={reader.d}, but the index was trained on d={self.d}")
        n = reader.n
        if n == 0:
            raise ValueError(f"{path}: holds no vectors")
        attrs = self._check_attributes(attributes, n)
        self._check_growable()
        t0 = time.perf_counter()
        blocks = range(0, n, self.block_size)
        total = 2 * n if self.nlist_ and not self.ntotal else n  # an empty IVF index reads the file twice
        before = (self.ntotal, len(self._pending), self._codes, self._ids, self._offsets)
        try:
            with progress_task(f"encode {Path(path).name}", total, enabled=progress) as advance:
                if self.ntotal == 0 and not self._pending:
                    self._stream_into_place(reader, blocks, advance)
                else:
                    for s in blocks:
                        e = min(n, s + self.block_size)
                        x = self._prepare(reader.read(s, e), f"{path} rows {s}:{e}")
                        lists = self._assign(x) if self.nlist_ else None
                        self._pending.append((self._encode(x, lists), lists, self.ntotal))
                        self._append_originals(x)
                        del x
                        self.ntotal += e - s
                        advance(e - s)
        except BaseException:
            # a bad block (NaN, a file changed while read) or an interrupt: the index is as it was
            ntotal, pending, self._codes, self._ids, self._offsets = before
            del self._pending[pending:]
            if self.rerank_path is not None and self.ntotal != ntotal:
                with open(self.rerank_path, "r+b") as fh:
                    fh.truncate(ntotal * self.d * 4)
                self._originals = None
            self.ntotal = ntotal
            raise
        if attrs is not None:
            self._attrs = attrs if self._attrs is None else np.concatenate([self._attrs, attrs])
        secs = time.perf_counter() - t0
        return {"n": float(n), "seconds": secs, "vectors_per_s": n / secs if secs > 0 else float("inf")}

    def _stream_into_place(self, reader: VectorFile, blocks: range, advance: Callable[[int], None]) -> None:
        """Empty index: codes written straight into their final rows (CSR order for IVF)."""
        n = reader.n
        codes = np.empty((n, self.codec_.code_bytes), dtype=np.uint8)
        name = reader.path
        if not self.nlist_:
            for s in blocks:
                e = min(n, s + self.block_size)
                x = self._prepare(reader.read(s, e), f"{name} rows {s}:{e}")
                codes[s:e] = self._encode(x, None)
                self._append_originals(x)
                del x  # drop the block before the next read: one block alive at a time
                self.ntotal = e
                advance(e - s)
            self._codes, self._offsets = codes, np.array([0, n], dtype=np.int64)
            return
        lists = np.empty(n, dtype=np.int32)
        for s in blocks:  # pass 1: list of every vector
            e = min(n, s + self.block_size)
            lists[s:e] = self._assign(self._prepare(reader.read(s, e), f"{name} rows {s}:{e}"))
            advance(e - s)
        counts = np.bincount(lists, minlength=self.nlist_)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cursor = offsets[:-1].copy()
        ids = np.empty(n, dtype=np.int64)
        for s in blocks:  # pass 2: encode and scatter into the lists
            e = min(n, s + self.block_size)
            x = self._prepare(reader.read(s, e), f"{name} rows {s}:{e}")
            bl = lists[s:e].astype(np.int64)
            block_codes = self._encode(x, bl)
            pos = _slots(bl, cursor)
            codes[pos] = block_codes
            ids[pos] = np.arange(s, e, dtype=np.int64)
            self._append_originals(x)
            del x, block_codes
            self.ntotal = e
            advance(e - s)
        self._codes, self._ids, self._offsets = codes, ids, offsets

    def _check_growable(self) -> None:
        if self._frozen_originals is not None:
            raise ValueError(f"this index re-ranks from {self._frozen_originals}, which belongs to a saved index "
                             "folder; call index.set_rerank_path(new_file) first to copy the originals "
                             "somewhere they may grow")

    def _append_originals(self, x: np.ndarray) -> None:
        if self.rerank_path is None:
            return
        path = Path(self.rerank_path)
        if self.ntotal == 0:
            self._claim(path, truncate=True)
        try:
            append_f32(path, x)
        except BaseException:
            with open(path, "r+b") as fh:  # undo a partial append
                fh.truncate(self.ntotal * self.d * 4)
            raise
        self._originals = None  # reopened (with the new size) when re-ranking

    def _consolidate(self) -> None:
        """Merge pending adds into the searchable layout (CSR by list for IVF)."""
        if not self._pending:
            return
        cb = self.codec_.code_bytes
        parts = [self._codes.reshape(-1, cb)] + [c for c, _, _ in self._pending]
        if not self.nlist_:
            self._codes = np.concatenate(parts)
            self._offsets = np.array([0, self._codes.shape[0]], dtype=np.int64)
        else:
            old_lists = np.repeat(np.arange(self.nlist_, dtype=np.int64), np.diff(self._offsets))
            lists = np.concatenate([old_lists] + [lst for _, lst, _ in self._pending])  # type: ignore[misc]
            old_ids = self._ids if self._ids is not None else np.zeros(0, dtype=np.int64)
            ids = np.concatenate([old_ids] + [np.arange(s, s + c.shape[0], dtype=np.int64) for c, _, s in self._pending])
            order = np.argsort(lists, kind="stable")
            self._codes = np.concatenate(parts)[order]
            self._ids = ids[order]
            self._offsets = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=self.nlist_))]).astype(np.int64)
        self._pending = []

    def _check_attributes(self, attributes: Any, n: int) -> np.ndarray | None:
        if attributes is None:
            if self._attrs is not None:
                raise ValueError(f"this index has {self.attribute_columns} attribute column(s); "
                                 "pass attributes to every add")
            return None
        a = np.asarray(attributes)
        if a.dtype.kind not in "iub":
            raise TypeError(f"attributes must be integers, got dtype {a.dtype}")
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2 or a.shape[0] != n:
            raise ValueError(f"attributes must have shape ({n},) or ({n}, A) to match x, got {np.shape(attributes)}")
        if self.ntotal and self._attrs is None:
            raise ValueError("the first add had no attributes; an index has attributes for all vectors or none")
        if self._attrs is not None and a.shape[1] != self._attrs.shape[1]:
            raise ValueError(f"attributes have {a.shape[1]} column(s), the index has {self._attrs.shape[1]}")
        return np.ascontiguousarray(a, dtype=np.int64)

    def set_rerank_path(self, path: str | os.PathLike) -> None:
        """Copy the current originals to ``path`` and keep appending there (e.g. after :meth:`load`)."""
        path = Path(path)
        if self.ntotal and self.rerank_path is None:
            raise ValueError("this index holds no originals to re-rank from; build it with rerank_path set")
        if self.ntotal:
            src = Path(self._frozen_originals or self.rerank_path)  # type: ignore[arg-type]
            if src.resolve() != path.resolve():
                self._claim(path, truncate=False)
                shutil.copyfile(src, path)
            self._originals = None
        self.rerank_path = path
        self._frozen_originals = None

    def _claim(self, path: Path, *, truncate: bool) -> None:
        """Make ``path`` this index's own working originals: an exclusive lock held while the index lives.

        Two open indexes can never append to, truncate or re-rank from one file; a second claim
        fails here instead of corrupting the first index's distances.
        """
        if self.__dict__.get("_claimed") == path.resolve() and "_claim_close" in self.__dict__:
            if truncate:  # already ours (e.g. a first add again after a rolled-back one)
                os.truncate(path, 0)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"{path} is the re-ranking file of another open index; give each index its own "
                             "rerank_path") from None
        if truncate:
            os.ftruncate(fd, 0)
        self._release_claim()
        self._claim_close = weakref.finalize(self, os.close, fd)
        self._claimed = path.resolve()

    def _release_claim(self) -> None:
        self.__dict__.pop("_claimed", None)
        closer = self.__dict__.pop("_claim_close", None)
        if closer is not None:
            closer()

    # ------------------------------------------------------------------ search
    def _mask(self, filt: FilterSpec, nq: int, lo: int, hi: int) -> np.ndarray | None:
        """None, a shared (N,) or a per-query (hi-lo, N) bool mask of allowed ids for queries lo:hi."""
        n = self.ntotal
        if filt is None:
            return None
        if isinstance(filt, np.ndarray):
            if filt.dtype != np.bool_:
                raise TypeError(f"a filter array must be bool (True = allowed), got dtype {filt.dtype}")
            if filt.shape not in ((n,), (nq, n)):
                raise ValueError(f"a filter mask must have shape ({n},) or ({nq}, {n}) (N={n} vectors, "
                                 f"nq={nq} queries), got {filt.shape}")
            return filt if filt.ndim == 1 else filt[lo:hi]
        if callable(filt):
            preds, per_query = [filt], False
        elif isinstance(filt, Sequence) and all(callable(f) for f in filt):
            if len(filt) != nq:
                raise ValueError(f"a per-query filter needs one predicate per query: got {len(filt)}, nq={nq}")
            preds, per_query = list(filt)[lo:hi], True
        else:
            raise TypeError("filter must be None, a bool mask (N,) or (nq, N), a predicate on attributes, or "
                            f"a sequence of nq predicates; got {type(filt).__name__}")
        if self._attrs is None:
            raise ValueError("filter predicates read integer attributes, but none were added: "
                             "pass add(x, attributes=...) or filter with a bool mask")
        out: np.ndarray | None = None
        for s in range(0, n, _MASK_ROWS):
            e = min(n, s + _MASK_ROWS)
            block = self._attrs[s:e]
            outs = [np.asarray(p(block)) for p in preds]
            for o in outs:
                ok = (o.shape == (e - s,)) or (not per_query and o.shape == (nq, e - s))
                if not ok or o.dtype != np.bool_:
                    raise ValueError(f"a filter predicate must return a bool array of shape ({e - s},)"
                                     f"{'' if per_query else f' or ({nq}, {e - s})'} for a block of "
                                     f"{e - s} rows; got {o.dtype} {o.shape}")
            m = np.stack(outs) if per_query else (outs[0][lo:hi] if outs[0].ndim == 2 else outs[0])
            if out is None:
                out = np.empty(m.shape[:-1] + (n,), dtype=np.bool_)
            out[..., s:e] = m
        return out

    def _query_rows(self, filt: FilterSpec) -> int:
        """Queries searched at once: bounded so a per-query mask stays under ~128 MB."""
        per_query = (isinstance(filt, np.ndarray) and filt.ndim == 2) or (
            filt is not None and not isinstance(filt, np.ndarray))
        return max(1, _MASK_BYTES // max(1, self.ntotal)) if per_query else 1 << 14

    def _scan(self, q: np.ndarray, kk: int, filt: FilterSpec, nprobe: int) -> SearchResult:
        """Top-kk of the codes over all lists (flat) or the ``nprobe`` nearest lists (IVF)."""
        self._consolidate()
        nq = q.shape[0]
        metric = Metric.IP if self.metric_ is Metric.COSINE else self.metric_
        dist = np.empty((nq, kk), dtype=np.float32)
        ids = np.empty((nq, kk), dtype=np.int64)
        step = self._query_rows(filt)
        for lo in range(0, nq, step):
            hi = min(nq, lo + step)
            qq = q[lo:hi]
            probes = bias = None
            if self.nlist_:
                sims, probes = self._coarse().search(qq, nprobe)
                if self.residual_:
                    bias = -sims  # ip/cosine: -<q, c + r> = -<q, c> - <q, r>
            dist[lo:hi], ids[lo:hi] = self.codec_.search_lists(
                qq, self._codes, kk, metric, offsets=self._offsets, ids=self._ids, probes=probes, bias=bias,
                mask=self._mask(filt, nq, lo, hi))
        return SearchResult(dist, ids)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> SearchResult:
        """Exact distances of the candidates (nq, kk) from the float32 originals; best k of them."""
        originals = self._open_originals()
        dist, ids = rerank_exact(q, originals, np.ascontiguousarray(cand, dtype=np.int64), k,
                                 self.metric_ is Metric.L2)
        return SearchResult(dist, ids)

    def _open_originals(self) -> np.ndarray:
        """The memory-mapped originals, re-checked against the index size before every use.

        A file shrunk or grown under the index is an error here rather than a bus error or
        wrong distances later.
        """
        path = Path(self._frozen_originals or self.rerank_path)  # type: ignore[arg-type]
        expect = self.ntotal * self.d * 4
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ValueError(f"{path}: re-ranking originals are gone ({e.strerror})") from None
        if size != expect:
            raise ValueError(f"{path}: re-ranking originals hold {size} bytes, the index expects {expect} "
                             f"({self.ntotal} x {self.d} float32); the file was changed under the index")
        if self._originals is None or self._originals.shape[0] != self.ntotal:
            self._originals = open_f32(path, self.d, n=self.ntotal)
        return self._originals

    def search(self, q: np.ndarray, k: int, *, oversample: int = 1, filter: FilterSpec = None,
               nprobe: int | None = None) -> SearchResult:
        """The k nearest indexed vectors of each query.

        Args:
            q: (nq, D) finite queries.
            k: hits per query (>= 1). A k above the corpus size pads with -1 ids / +inf distances.
            oversample: 1 returns the codes' distances; > 1 fetches ``k * oversample`` candidates from
                the codes and re-ranks them exactly from the float32 originals (needs ``rerank_path``).
            filter: which vectors may be returned (see the module docstring).
            nprobe: lists scanned per query (IVF only; default: the index's ``nprobe``).

        Returns:
            SearchResult of (nq, k) distances (ascending; L2 squared, IP/cosine negated similarity)
            and int64 ids.
        """
        self._check_trained()
        q = self._prepare(q, "q")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int | np.integer) or oversample < 1:
            raise ValueError(f"oversample must be an int >= 1, got {oversample!r}")
        if nprobe is not None and not self.nlist_:
            raise ValueError(f"nprobe={nprobe} applies to IVF indexes only; this index is flat ({self.spec!r})")
        nprobe = self._check_nprobe(self.nprobe if nprobe is None else nprobe)
        if oversample > 1 and not self.has_originals:
            raise ValueError(f"oversample={oversample} re-ranks from float32 originals, but this index keeps "
                             "none; build it with Index(..., rerank_path='originals.f32')")
        if self.ntotal == 0:
            raise ValueError("the index is empty: add vectors before searching")
        k = int(k)
        kk = k * int(oversample)
        dist, ids = self._scan(q, kk, filter, nprobe)  # sorted by (distance, id), padded (+inf, -1)
        if oversample > 1:
            return self._rerank(q, ids, k)
        return SearchResult(dist, ids)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to folder ``path`` atomically (a temp folder renamed into place).

        An existing index folder at ``path`` is replaced; any other non-empty folder is refused.
        Leftovers of an interrupted earlier save beside ``path`` are removed first.
        """
        self._check_trained()
        self._consolidate()
        path = Path(path)
        work = Path(self.rerank_path).resolve() if self.rerank_path is not None else None
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"cannot save an index to {path}: it exists and is not a folder")
            entries = {p.resolve() for p in path.iterdir()}
            if entries and not (path / HEADER).is_file() and entries != {work}:
                raise ValueError(f"refusing to replace {path}: it is a non-empty folder that is not an "
                                 "embpress index (no header.json)")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            self._write_folder(tmp)
            _fsync_dir(tmp)
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if work is not None and path.resolve() in work.parents:
            # The working originals were inside the folder just replaced: use the saved copy.
            self._release_claim()
            self._originals = None
            self.rerank_path = path / _ORIG
            self._frozen_originals = path / _ORIG

    def _write_folder(self, folder: Path) -> None:
        files: dict[str, Any] = {}
        np.save(folder / _CODES, np.ascontiguousarray(self._codes.reshape(self.ntotal, self.codec_.code_bytes)),
                allow_pickle=False)
        with open(folder / _STATE, "wb") as fh:
            np.savez(fh, **_flatten_state(self.codec_.get_state()))
        if self._attrs is not None:
            np.save(folder / _ATTRS, self._attrs, allow_pickle=False)
        if self.nlist_:
            assert self.centroids_ is not None
            np.save(folder / _CENTROIDS, self.centroids_, allow_pickle=False)
            np.save(folder / _OFFSETS, self._offsets, allow_pickle=False)
            np.save(folder / _IDS, self._ids if self._ids is not None else np.zeros(0, np.int64), allow_pickle=False)
        if self.has_originals:
            src = self._frozen_originals or Path(self.rerank_path)  # type: ignore[arg-type]
            with open(folder / _ORIG, "wb") as fo:
                if self.ntotal:
                    with open(src, "rb") as fi:
                        shutil.copyfileobj(_Limited(fi, self.ntotal * self.d * 4), fo, 1 << 22)
        for name in sorted(p.name for p in folder.iterdir()):
            with open(folder / name, "rb+") as fh:
                os.fsync(fh.fileno())
            files[name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        header = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "n": self.ntotal, "d": self.d,
            "metric": self.metric_.value, "codec_spec": self.codec_.spec, "code_bytes": self.codec_.code_bytes,
            "seed": self.seed, "block_size": self.block_size, "attribute_columns": self.attribute_columns,
            "nlist": self.nlist_, "nprobe": self.nprobe, "residual": self.residual_,
            "codes": _CODES, "codec_state": _STATE, "attributes": _ATTRS if self._attrs is not None else None,
            "originals": _ORIG if self.has_originals else None, "files": files,
        }
        header["header_sha256"] = _header_digest(header)
        with open(folder / HEADER, "w") as fh:
            json.dump(header, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True) -> Index:
        """Open an index folder written by :meth:`save`.

        Args:
            path: the folder.
            mmap: memory-map the codes (read-only) instead of reading them into memory. The
                originals are always memory-mapped.
            verify: check every file's size and sha256 against the header.

        Raises:
            ValueError: wrong format or version, or a missing, truncated or tampered file (named).
        """
        path = Path(path)
        hpath = path / HEADER
        if not hpath.is_file():
            raise ValueError(f"{path} is not an embpress index folder: {HEADER} not found")
        _remove_leftovers(path)
        try:
            header = json.loads(hpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{hpath}: corrupt index header ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise ValueError(f"{hpath}: not an embpress index header (format {header.get('format')!r} "
                             f"!= {FORMAT_NAME!r})" if isinstance(header, dict) else f"{hpath}: not a JSON object")
        version = header.get("version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"{hpath}: index format version {version!r} is not supported (this embpress "
                             f"reads versions {list(_READABLE_VERSIONS)}); rebuild the index with this embpress "
                             "(`embpress vectors build`) or open it with the embpress that wrote it")
        if version >= 2 and header.get("header_sha256") != _header_digest(header):
            raise ValueError(f"{hpath}: header checksum does not match its content (corrupted or edited)")
        try:
            n, d, files = int(header["n"]), int(header["d"]), dict(header["files"])
            metric, code_bytes = header["metric"], int(header["code_bytes"])
            nlist = int(header.get("nlist", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{hpath}: malformed index header ({e!r})") from None
        ivf_files = [_CENTROIDS, _OFFSETS, _IDS] if nlist else []
        needed = [header.get("codes"), header.get("codec_state"), header.get("attributes"), header.get("originals"),
                  *ivf_files]
        for name in filter(None, needed):
            if name not in files:
                raise ValueError(f"{hpath}: no checksum recorded for {name}")
        for name, meta in files.items():
            fpath = path / name
            if Path(name).name != name:
                raise ValueError(f"{hpath}: bad file name {name!r}")
            if not fpath.is_file():
                raise ValueError(f"{fpath}: missing index file")
            size = fpath.stat().st_size
            if size != meta.get("bytes"):
                raise ValueError(f"{fpath}: {size} bytes, the header says {meta.get('bytes')} "
                                 "(truncated or modified)")
            if verify and sha256_file(fpath) != meta.get("sha256"):
                raise ValueError(f"{fpath}: sha256 does not match the header (corrupted or tampered)")
        try:
            state = dict(np.load(path / header["codec_state"], allow_pickle=False))
            codec = codec_from_state(state)
        except (ValueError, OSError, KeyError) as e:
            raise ValueError(f"{path / header['codec_state']}: cannot rebuild the codec ({e})") from None
        if codec.d_ != d or codec.code_bytes != code_bytes:
            raise ValueError(f"{path / header['codec_state']}: codec has d={codec.d_}, code_bytes="
                             f"{codec.code_bytes}; the header says d={d}, code_bytes={code_bytes}")
        codes = _load_array(path / header["codes"], np.uint8, (n, code_bytes), mmap)
        index = cls(codec, metric=metric, nlist=nlist or None, nprobe=int(header.get("nprobe", 1)),
                    seed=int(header.get("seed", 0)), block_size=int(header.get("block_size", 1 << 16)))
        index._codes = codes
        index._offsets = np.array([0, n], dtype=np.int64)
        index.ntotal = n
        if nlist:
            index.centroids_ = _load_array(path / _CENTROIDS, np.float32, (nlist, d), False)
            index._offsets = _load_array(path / _OFFSETS, np.int64, (nlist + 1,), False)
            index._ids = _load_array(path / _IDS, np.int64, (n,), mmap)
            index.residual_ = bool(header.get("residual", index.residual_))
            if index._offsets[0] != 0 or index._offsets[-1] != n or (np.diff(index._offsets) < 0).any():
                raise ValueError(f"{path / _OFFSETS}: list offsets must rise from 0 to n={n}")
        if header.get("attributes"):
            attrs = np.load(path / header["attributes"], allow_pickle=False)
            if attrs.dtype != np.int64 or attrs.ndim != 2 or attrs.shape[0] != n:
                raise ValueError(f"{path / header['attributes']}: attributes {attrs.dtype} {attrs.shape}, "
                                 f"expected int64 ({n}, A)")
            index._attrs = attrs
        if header.get("originals"):
            opath = path / header["originals"]
            open_f32(opath, d, n=n)  # size check now, a clear error rather than a late one
            index.rerank_path = opath
            index._frozen_originals = opath
        return index


def _slots(lists: np.ndarray, cursor: np.ndarray) -> np.ndarray:
    """Target rows of a block's vectors in CSR order, advancing each list's ``cursor`` in place.

    >>> cur = np.array([0, 3]); _slots(np.array([1, 0, 1]), cur).tolist(), cur.tolist()
    ([3, 0, 4], [1, 5])
    """
    order = np.argsort(lists, kind="stable")
    sl = lists[order]
    first = np.r_[0, np.flatnonzero(sl[1:] != sl[:-1]) + 1]
    rank = np.arange(sl.size) - np.repeat(first, np.diff(np.r_[first, sl.size]))
    pos = np.empty_like(lists)
    pos[order] = cursor[sl] + rank
    np.add.at(cursor, lists, 1)
    return pos


def _header_digest(header: dict[str, Any]) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load_array(path: Path, dtype: Any, shape: tuple[int, ...], mmap: bool) -> np.ndarray:
    arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if arr.dtype != dtype or arr.shape != shape:
        raise ValueError(f"{path}: {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
    return arr


def _remove_leftovers(path: Path) -> None:
    """Delete temporary folders an interrupted save left beside ``path`` (``.NAME.*.tmp``, ``.NAME.old-*``)."""
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{path.name}.*"):
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.startswith(f".{path.name}.old-")):
                shutil.rmtree(p, ignore_errors=True)


class _Limited:
    """A read-only file wrapper that stops after ``limit`` bytes (copy exactly N rows)."""

    def __init__(self, fh, limit: int):
        self.fh, self.left = fh, limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size < 0 else min(size, self.left)
        data = self.fh.read(size)
        self.left -= len(data)
        return data


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
