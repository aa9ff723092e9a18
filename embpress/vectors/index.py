"""A flat index over compressed codes, with optional exact re-ranking from float32 originals on disk.

This is the bi-granular layout of BiDR (Xiao et al., "Progressively Optimized Bi-Granular Document
Representation for Scalable Embedding Based Retrieval", WWW 2022, arXiv 2201.05409): compact codes in
memory select ``k * oversample`` candidates, and the dense float32 vectors, kept in a memory-mapped
file, re-score those candidates exactly. The corpus is scanned block by block through
``codec.distances`` (the codec's compressed scoring path) with a running top-k.

Ids are implicit: the i-th vector added has id i (no per-vector id bytes). Optional integer
attributes, one row per vector, support filtered search.

Filters (``search(..., filter=...)``), in every case ``True`` means "may be returned":
  * ``None``: no filter.
  * a bool array ``(N,)`` shared by all queries, or ``(nq, N)`` one mask per query.
  * a callable ``f(attrs) -> mask`` on a block of attributes ``attrs`` int64 ``(b, A)``, returning
    ``(b,)`` (shared) or ``(nq, b)`` (per query); see :func:`attribute_equals`, :func:`attribute_in`.
  * a sequence of ``nq`` such callables returning ``(b,)``, one predicate per query.
Fewer than ``k`` allowed vectors give ``-1`` ids and ``+inf`` distances in the tail.

``k`` larger than the corpus is not an error: results are padded with ``-1`` / ``+inf`` (STYLE §7).

Saved layout (one folder; :data:`FORMAT_VERSION`)::

    header.json        format, version, n, d, metric, codec spec, file names, sha256 of every file
    codes.npy          uint8 (N, code_bytes)
    codec_state.npz    the codec's get_state() arrays and scalars
    attributes.npy     int64 (N, A)            (when attributes were added)
    originals.f32      raw float32 (N, D)      (when the index re-ranks)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embpress.vectors.codec import Codec, NotFittedError, as_matrix, build_codec, codec_from_state
from embpress.vectors.metric import Metric, SearchResult, as_metric
from embpress.vectors.vecio import append_f32, open_f32, sha256_file

FORMAT_NAME = "embpress-vectors-index"
FORMAT_VERSION = 1
HEADER = "header.json"
_CODES, _STATE, _ATTRS, _ORIG = "codes.npy", "codec_state.npz", "attributes.npy", "originals.f32"
_SCAN_ELEMS = 1 << 23  # distances computed per codec call (queries x block rows)
_RERANK_ELEMS = 1 << 23  # float32 gathered per re-ranking step

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


def _merge_topk(dist: np.ndarray, ids: np.ndarray, new: np.ndarray, start: int,
                kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge a block's distances (m, b), ids ``start..start+b``, into running (m, kk) top lists."""
    m, b = new.shape
    if b > kk:
        part = np.argpartition(new, kk - 1, axis=1)[:, :kk]
        nd = np.take_along_axis(new, part, axis=1)
        ni = part.astype(np.int64) + start
    else:
        nd = new
        ni = np.broadcast_to(np.arange(start, start + b, dtype=np.int64), (m, b))
    cd = np.concatenate([dist, nd], axis=1)
    ci = np.concatenate([ids, ni], axis=1)
    sel = np.argpartition(cd, kk - 1, axis=1)[:, :kk]
    return np.take_along_axis(cd, sel, axis=1), np.take_along_axis(ci, sel, axis=1)


def _sorted_topk(dist: np.ndarray, ids: np.ndarray, k: int) -> SearchResult:
    """Best ``k`` per row, ascending distance (ties by id), padded to k with +inf / -1."""
    m, kk = dist.shape
    if kk > k:
        part = np.argpartition(dist, k - 1, axis=1)[:, :k]
        dist, ids = np.take_along_axis(dist, part, axis=1), np.take_along_axis(ids, part, axis=1)
    ids = np.where(np.isfinite(dist), ids, -1)
    dist = np.where(ids >= 0, dist, np.inf)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), dist), axis=1)
    dist, ids = np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if dist.shape[1] < k:
        pad = k - dist.shape[1]
        dist = np.concatenate([dist, np.full((m, pad), np.inf)], axis=1)
        ids = np.concatenate([ids, np.full((m, pad), -1, dtype=np.int64)], axis=1)
    return SearchResult(np.ascontiguousarray(dist, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def _flatten_state(state: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "O":
            raise ValueError(f"codec state entry {key!r} is not an array or scalar ({type(value).__name__})")
        out[key] = arr
    return out


class Index:
    """Codes in memory, scanned blockwise; optional float32 originals on disk for exact re-ranking.

    Args:
        codec: a codec spec (``"sq8"``, ``"pq32x8"``, ``"pca128+sq8"``, ...) or a ``Codec`` instance.
        metric: ``"ip"``, ``"cosine"`` or ``"l2"`` (aliases as in :func:`as_metric`). For cosine the
            index L2-normalises vectors and queries, then uses inner product.
        rerank_path: file that receives the float32 originals at ``add`` time (created or truncated
            by the first ``add``); ``None`` keeps no originals and forbids ``oversample > 1``.
        seed: seed passed to :func:`build_codec` for a spec.
        block_size: codes scored per ``codec.distances`` call.

    Shapes: N indexed vectors, D dim, nq queries, A attribute columns.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2000, 32)).astype("float32")
        >>> index = Index("sq8", metric="l2").fit(x)
        >>> index.add(x)
        >>> D, I = index.search(x[:3], k=5)
        >>> I[:, 0].tolist()
        [0, 1, 2]
    """

    def __init__(self, codec: str | Codec, *, metric: str | Metric = "ip",
                 rerank_path: str | os.PathLike | None = None, seed: int = 0, block_size: int = 1 << 15):
        self.codec = codec
        self.metric = metric
        self.rerank_path = rerank_path
        self.seed = seed
        self.block_size = block_size
        self.metric_ = as_metric(metric)  # validate at the boundary: unknown metric fails here
        if isinstance(codec, Codec):
            self.codec_ = codec
        elif isinstance(codec, str):
            self.codec_ = build_codec(codec, seed=seed)
        else:
            raise TypeError(f"codec must be a spec string or a Codec, got {type(codec).__name__}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self._blocks: list[np.ndarray] = []
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
        return bool(self.codec_.is_fitted)

    @property
    def has_originals(self) -> bool:
        return self.rerank_path is not None

    @property
    def attribute_columns(self) -> int:
        """A, the number of integer attribute columns (0 without attributes)."""
        return 0 if self._attrs is None else int(self._attrs.shape[1])

    def bytes_per_vector(self) -> int:
        """In-memory bytes per indexed vector: the code (with its norms or scales) plus attributes.

        Ids are implicit (positions), so they cost nothing; the float32 originals live on disk
        (:meth:`disk_bytes_per_vector`).
        """
        return int(self.codec_.code_bytes) + 8 * self.attribute_columns

    def disk_bytes_per_vector(self) -> int:
        """Bytes per vector of the re-ranking originals on disk (0 without them)."""
        return 4 * self.d if self.has_originals else 0

    def fixed_bytes(self) -> int:
        """Bytes shared by all vectors: the codec's learned state (codebooks, rotations, scales)."""
        return sum(np.asarray(v).nbytes for v in self.codec_.get_state().values() if isinstance(v, np.ndarray))

    def __repr__(self) -> str:
        return (f"Index(codec={self.codec_.spec!r}, metric={self.metric_.value!r}, ntotal={self.ntotal}, "
                f"rerank={'yes' if self.has_originals else 'no'})")

    # ------------------------------------------------------------------ checks
    def _check_trained(self) -> None:
        if not self.codec_.is_fitted:
            raise NotFittedError(f"index codec {self.codec_.spec!r} is not trained; call index.fit(x) first")

    def _prepare(self, x: Any, name: str, *, check_dim: bool = True) -> np.ndarray:
        """Validate (finite, 2-D, right dim) and normalise for cosine: (n, D) float32 C-contiguous."""
        x = as_matrix(x, name=name)
        if check_dim and self.codec_.is_fitted and x.shape[1] != self.codec_.d_:
            raise ValueError(f"{name} has d={x.shape[1]}, but the index was trained on d={self.codec_.d_}")
        if self.metric_ is Metric.COSINE:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norms > 0, norms, 1).astype(np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    # ------------------------------------------------------------------ build
    def fit(self, x: np.ndarray) -> Index:
        """Train the codec on (N, D) vectors (normalised first for cosine); returns self."""
        x = self._prepare(x, "x", check_dim=False)
        if x.shape[0] == 0:
            raise ValueError("cannot train an index on an empty array (0 vectors)")
        if self.ntotal:
            raise ValueError(f"index already holds {self.ntotal} vectors; retraining would invalidate their codes")
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
        if self._frozen_originals is not None:
            raise ValueError(f"this index re-ranks from {self._frozen_originals}, which belongs to a saved index "
                             "folder; call index.set_rerank_path(new_file) first to copy the originals "
                             "somewhere they may grow")
        codes = self.codec_.encode(x)
        if self.rerank_path is not None:
            path = Path(self.rerank_path)
            if self.ntotal == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                open(path, "wb").close()
            try:
                append_f32(path, x)
            except BaseException:
                with open(path, "r+b") as fh:  # undo a partial append
                    fh.truncate(self.ntotal * self.d * 4)
                raise
            self._originals = open_f32(path, self.d, n=self.ntotal + n)
        last = self._blocks[-1] if self._blocks else None
        if last is not None and not isinstance(last, np.memmap) and last.shape[0] + n <= self.block_size:
            self._blocks[-1] = np.concatenate([self._blocks[-1], codes])
        else:
            self._blocks.append(codes)
        if attrs is not None:
            self._attrs = attrs if self._attrs is None else np.concatenate([self._attrs, attrs])
        self.ntotal += n

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
        if self._originals is not None:
            src = Path(self._frozen_originals or self.rerank_path)  # type: ignore[arg-type]
            if src.resolve() != path.resolve():
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, path)
            self._originals = open_f32(path, self.d, n=self.ntotal)
        elif self.ntotal:
            raise ValueError("this index holds no originals to re-rank from; build it with rerank_path set")
        self.rerank_path = path
        self._frozen_originals = None

    # ------------------------------------------------------------------ search
    def _code_chunks(self):
        """(start id, codes) for every block of at most ``block_size`` codes."""
        start = 0
        for arr in self._blocks:
            for s in range(0, arr.shape[0], self.block_size):
                chunk = arr[s:s + self.block_size]
                yield start + s, chunk
            start += arr.shape[0]

    def _resolve_filter(self, filt: FilterSpec, nq: int) -> Callable[[int, int], np.ndarray | None]:
        """A function (start, stop) -> None, a (b,) mask or an (nq, b) mask of allowed vectors."""
        n = self.ntotal
        if filt is None:
            return lambda start, stop: None
        if isinstance(filt, np.ndarray):
            if filt.dtype != np.bool_:
                raise TypeError(f"a filter array must be bool (True = allowed), got dtype {filt.dtype}")
            if filt.shape not in ((n,), (nq, n)):
                raise ValueError(f"a filter mask must have shape ({n},) or ({nq}, {n}) (N={n} vectors, "
                                 f"nq={nq} queries), got {filt.shape}")
            return (lambda s, e: filt[s:e]) if filt.ndim == 1 else (lambda s, e: filt[:, s:e])
        if callable(filt):
            preds, per_query = [filt], False
        elif isinstance(filt, Sequence) and all(callable(f) for f in filt):
            if len(filt) != nq:
                raise ValueError(f"a per-query filter needs one predicate per query: got {len(filt)}, nq={nq}")
            preds, per_query = list(filt), True
        else:
            raise TypeError("filter must be None, a bool mask (N,) or (nq, N), a predicate on attributes, or "
                            f"a sequence of nq predicates; got {type(filt).__name__}")
        if self._attrs is None:
            raise ValueError("filter predicates read integer attributes, but none were added: "
                             "pass add(x, attributes=...) or filter with a bool mask")
        attrs = self._attrs

        def mask(start: int, stop: int) -> np.ndarray:
            block = attrs[start:stop]
            outs = [np.asarray(p(block)) for p in preds]
            for o in outs:
                ok = (o.shape == (stop - start,)) or (not per_query and o.shape == (nq, stop - start))
                if not ok or o.dtype != np.bool_:
                    raise ValueError(f"a filter predicate must return a bool array of shape ({stop - start},)"
                                     f"{'' if per_query else f' or ({nq}, {stop - start})'} for a block of "
                                     f"{stop - start} rows; got {o.dtype} {o.shape}")
            return np.stack(outs) if per_query else outs[0]

        return mask

    def _scan(self, q: np.ndarray, kk: int, filt: FilterSpec) -> tuple[np.ndarray, np.ndarray]:
        """Running top-kk over all code blocks: (nq, kk) distances and ids, padded with +inf / -1."""
        nq = q.shape[0]
        mask_of = self._resolve_filter(filt, nq)
        dist = np.full((nq, kk), np.inf, dtype=np.float32)
        ids = np.full((nq, kk), -1, dtype=np.int64)
        metric = Metric.IP if self.metric_ is Metric.COSINE else self.metric_
        for start, codes in self._code_chunks():
            b = codes.shape[0]
            mask = mask_of(start, start + b)
            if mask is not None and not mask.any():
                continue
            qb = max(1, _SCAN_ELEMS // b)
            for s in range(0, nq, qb):
                e = min(nq, s + qb)
                dq = self.codec_.distances(q[s:e], codes, metric)
                if mask is not None:
                    allowed = mask if mask.ndim == 1 else mask[s:e]
                    dq = np.where(allowed, dq, np.float32(np.inf))
                dist[s:e], ids[s:e] = _merge_topk(dist[s:e], ids[s:e], dq, start, kk)
        return dist, ids

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> SearchResult:
        """Exact distances of the candidates (nq, kk) from the float32 originals; best k of them."""
        assert self._originals is not None
        nq, kk = cand.shape
        d = q.shape[1]
        out_d = np.full((nq, kk), np.inf, dtype=np.float32)
        step = max(1, _RERANK_ELEMS // max(1, kk * d))
        for s in range(0, nq, step):
            ids = cand[s:s + step]
            valid = ids >= 0
            uniq = np.unique(ids[valid])
            if uniq.size == 0:
                continue
            rows = np.asarray(self._originals[uniq], dtype=np.float32)  # sorted ids: near-sequential reads
            vecs = rows[np.searchsorted(uniq, np.where(valid, ids, uniq[0]))]  # (m, kk, D)
            qq = q[s:s + step]
            ip = np.matmul(vecs, qq[:, :, None])[:, :, 0]
            if self.metric_ is Metric.L2:
                dd = np.einsum("mkd,mkd->mk", vecs, vecs) - 2 * ip + np.einsum("md,md->m", qq, qq)[:, None]
                dd = np.maximum(dd, 0)
            else:
                dd = -ip
            out_d[s:s + step] = np.where(valid, dd, np.inf)
        return _sorted_topk(out_d, cand, k)

    def search(self, q: np.ndarray, k: int, *, oversample: int = 1, filter: FilterSpec = None) -> SearchResult:
        """The k nearest indexed vectors of each query.

        Args:
            q: (nq, D) finite queries.
            k: hits per query (>= 1). A k above the corpus size pads with -1 ids / +inf distances.
            oversample: 1 returns the codes' distances; > 1 fetches ``k * oversample`` candidates from
                the codes and re-ranks them exactly from the float32 originals (needs ``rerank_path``).
            filter: which vectors may be returned (see the module docstring).

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
        if oversample > 1 and not self.has_originals:
            raise ValueError(f"oversample={oversample} re-ranks from float32 originals, but this index keeps "
                             "none; build it with Index(..., rerank_path='originals.f32')")
        if self.ntotal == 0:
            raise ValueError("the index is empty: add vectors before searching")
        k = int(k)
        kk = k * int(oversample)
        dist, ids = self._scan(q, kk, filter)
        if oversample > 1:
            return self._rerank(q, np.where(np.isfinite(dist), ids, -1), k)
        return _sorted_topk(dist, ids, k)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to folder ``path`` atomically (a temp folder renamed into place).

        An existing index folder at ``path`` is replaced; any other non-empty folder is refused.
        """
        self._check_trained()
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
            self._originals = open_f32(path / _ORIG, self.d, n=self.ntotal) if self.ntotal else None
            self.rerank_path = path / _ORIG
            self._frozen_originals = path / _ORIG

    def _write_folder(self, folder: Path) -> None:
        files: dict[str, Any] = {}
        codes = np.lib.format.open_memmap(folder / _CODES, mode="w+", dtype=np.uint8,
                                          shape=(self.ntotal, self.codec_.code_bytes))
        start = 0
        for block in self._blocks:
            codes[start:start + block.shape[0]] = block
            start += block.shape[0]
        codes.flush()
        del codes
        with open(folder / _STATE, "wb") as fh:
            np.savez(fh, **_flatten_state(self.codec_.get_state()))
        if self._attrs is not None:
            np.save(folder / _ATTRS, self._attrs, allow_pickle=False)
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
            "codes": _CODES, "codec_state": _STATE, "attributes": _ATTRS if self._attrs is not None else None,
            "originals": _ORIG if self.has_originals else None, "files": files,
        }
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
        try:
            header = json.loads(hpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{hpath}: corrupt index header ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise ValueError(f"{hpath}: not an embpress index header (format {header.get('format')!r} "
                             f"!= {FORMAT_NAME!r})" if isinstance(header, dict) else f"{hpath}: not a JSON object")
        version = header.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{hpath}: index format version {version!r} is not supported (this embpress "
                             f"reads version {FORMAT_VERSION}); re-save the index with a matching embpress")
        try:
            n, d, files = int(header["n"]), int(header["d"]), dict(header["files"])
            metric, code_bytes = header["metric"], int(header["code_bytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{hpath}: malformed index header ({e!r})") from None
        needed = [header.get("codes"), header.get("codec_state"), header.get("attributes"), header.get("originals")]
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
        codes = np.load(path / header["codes"], mmap_mode="r" if mmap else None, allow_pickle=False)
        if codes.dtype != np.uint8 or codes.shape != (n, code_bytes):
            raise ValueError(f"{path / header['codes']}: codes {codes.dtype} {codes.shape}, expected uint8 "
                             f"({n}, {code_bytes})")
        index = cls(codec, metric=metric, seed=int(header.get("seed", 0)),
                    block_size=int(header.get("block_size", 1 << 15)))
        index._blocks = [codes] if n else []
        index.ntotal = n
        if header.get("attributes"):
            attrs = np.load(path / header["attributes"], allow_pickle=False)
            if attrs.dtype != np.int64 or attrs.ndim != 2 or attrs.shape[0] != n:
                raise ValueError(f"{path / header['attributes']}: attributes {attrs.dtype} {attrs.shape}, "
                                 f"expected int64 ({n}, A)")
            index._attrs = attrs
        if header.get("originals"):
            opath = path / header["originals"]
            index._originals = open_f32(opath, d, n=n) if n else None
            index.rerank_path = opath
            index._frozen_originals = opath
        return index


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
