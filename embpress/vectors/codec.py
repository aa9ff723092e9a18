"""The codec contract for corpus vectors: base class, spec strings, registry and composition.

A codec compresses float vectors ``(N, D)`` into uint8 codes ``(N, code_bytes)`` and scores queries
against codes without decoding the whole corpus (lookup tables, popcount, folded scales). Codecs are
named by short spec strings in the spirit of FAISS's index factory (``"sq8"``, ``"pq16x8"``,
``"pca128+sq8"``); :func:`build_codec` parses them and :func:`code_size` sizes them without fitting.

Distances follow :mod:`embpress.vectors.metric`: smaller is better; L2 is the squared distance and
IP / COSINE the negated similarity. Codecs treat COSINE as IP and assume the caller normalises the
corpus and the queries.
"""

from __future__ import annotations

import abc
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np

from embpress.vectors.metric import Metric, SearchResult, as_metric, pairwise_distances

StateValue = np.ndarray | int | float | str
"""A value in a codec state dict: arrays and plain scalars only, so it saves with ``np.savez``."""


_CLASSES: dict[str, type[Codec]] = {}
"""Every codec class by name, for :func:`codec_from_state`."""


_SCAN_ELEMS = 1 << 23  # distances computed at once by the default list scan (queries x rows)
_NO_ID = np.iinfo(np.int64).max


def merge_topk(best_d: np.ndarray, best_i: np.ndarray, new_d: np.ndarray, new_ids: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge a block's distances into running top-k lists, ordered by (distance, id).

    Args:
        best_d, best_i: (m, k) current best distances and ids (-1 = empty).
        new_d: (m, b) distances of the block. new_ids: (b,) ids of its columns.

    Returns:
        (m, k) merged distances and ids, ascending; ties go to the smaller id.

    >>> d, i = merge_topk(np.full((1, 2), np.inf, "f4"), np.full((1, 2), -1), np.array([[1., 0., 1.]], "f4"),
    ...                   np.array([7, 8, 5]), 2)
    >>> i.tolist()
    [[8, 5]]
    """
    m, b = new_d.shape
    cols = np.broadcast_to(new_ids, (m, b))
    if b > k:
        part = np.argpartition(new_d, k - 1, axis=1)[:, :k]
        thr = np.take_along_axis(new_d, part, axis=1).max(axis=1)
        tied = np.flatnonzero((new_d <= thr[:, None]).sum(axis=1) > k)
        nd, ni = np.take_along_axis(new_d, part, axis=1), np.take_along_axis(cols, part, axis=1)
        for r in tied:  # more than k candidates at the threshold: take the smallest ids among ties
            cand = np.flatnonzero(new_d[r] <= thr[r])
            pick = cand[np.lexsort((cols[r, cand], new_d[r, cand]))[:k]]
            nd[r], ni[r] = new_d[r, pick], cols[r, pick]
    else:
        nd, ni = new_d, cols
    cd = np.concatenate([best_d, nd], axis=1)
    ci = np.concatenate([best_i, ni], axis=1)
    order = np.lexsort((np.where(ci < 0, _NO_ID, ci), cd), axis=1)[:, :k]
    return np.take_along_axis(cd, order, axis=1), np.take_along_axis(ci, order, axis=1)


class NotFittedError(ValueError):
    """Raised when a codec is used before ``fit``."""


def as_matrix(x: Any, *, name: str = "x") -> np.ndarray:
    """Check that ``x`` is a finite 2-D real array and return it as C-contiguous float32.

    Accepts numpy arrays, nested lists and CPU torch tensors. Raises TypeError for non-numeric
    dtypes and ValueError for wrong rank or NaN/inf.
    """
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n, d), got shape {arr.shape}; pass a single vector as v[None, :]"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(
            f"{name} contains NaN or inf (first at row {row}) after conversion to float32; "
            "clean or clip the vectors before encoding"
        )
    return arr


def _state_scalar(v: Any) -> Any:
    """Unwrap 0-d arrays (what ``np.savez`` gives back for scalars and strings)."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


class Codec(abc.ABC):
    """Base class of every codec: validation, batching, fitted checks and state; subclasses do the maths.

    Subclasses implement ``_fit``, ``_encode``, ``_decode``, ``_distances`` and ``_code_bytes_for``
    on validated float32 C-contiguous input, and may override ``_check_params``. Constructors are
    keyword-only and only store their arguments; fitted state lives in attributes ending in ``_``.

    Shapes: N corpus vectors, nq queries, D input dim (``d_``), C ``code_bytes``.
    """

    is_reducer: ClassVar[bool] = False
    residual_ok: ClassVar[bool] = False
    """True when the IP distance is ``-<q, decode(code)>`` exactly, so an IVF index may encode the
    residual to a coarse centroid and add ``-<q, c>`` per list."""
    _batch_rows: ClassVar[int] = 1 << 15
    _query_rows: ClassVar[int] = 1024  # queries scored at once (bounds lookup-table memory)

    # ------------------------------------------------------------------ spec and params
    @property
    def spec(self) -> str:
        """The spec string this codec was built from (its canonical spec when built directly)."""
        return self.__dict__.get("_spec") or self._canonical_spec()

    @spec.setter
    def spec(self, value: str) -> None:
        self._spec = value

    @abc.abstractmethod
    def _canonical_spec(self) -> str:
        """The spec string that rebuilds this codec's hyper-parameters."""

    def _check_params(self) -> None:
        """Raise ValueError for invalid hyper-parameters (called by build_codec and fit)."""
        return None

    def _params(self) -> dict[str, Any]:
        """Constructor arguments by name (STYLE §2: stored unchanged under their own names)."""
        names = [
            p.name
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ sizes
    @abc.abstractmethod
    def _code_bytes_for(self, d: int) -> int:
        """Bytes per vector at input dim ``d`` (ValueError when ``d`` does not suit the params)."""

    @property
    def code_bytes(self) -> int:
        """In-memory bytes per encoded vector, including per-vector norms or scales."""
        self._check_fitted()
        return self._code_bytes_for(self.d_)

    # ------------------------------------------------------------------ checks
    @property
    def is_fitted(self) -> bool:
        return "d_" in self.__dict__

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} ({self.spec!r}) is not fitted; call fit(x) first")

    def _check_vectors(self, x: Any, name: str) -> np.ndarray:
        self._check_fitted()
        x = as_matrix(x, name=name)
        if x.shape[1] != self.d_:
            raise ValueError(f"{type(self).__name__} was fit on d={self.d_}, got d={x.shape[1]} in {name}")
        return x

    def _check_codes(self, codes: Any) -> np.ndarray:
        self._check_fitted()
        codes = np.asarray(codes)
        if codes.dtype != np.uint8:
            raise TypeError(f"codes must be uint8 (as returned by encode), got dtype {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != self.code_bytes:
            raise ValueError(
                f"codes must have shape (n, {self.code_bytes}) for {self.spec!r}, got {codes.shape}"
            )
        return np.ascontiguousarray(codes)

    # ------------------------------------------------------------------ public API
    def fit(self, x: np.ndarray) -> Self:
        """Learn the codec's parameters from ``x`` (N, D); returns self."""
        self._check_params()
        x = as_matrix(x, name="x")
        if x.shape[0] == 0:
            raise ValueError(f"cannot fit {type(self).__name__} on an empty array of shape {x.shape}")
        self._code_bytes_for(x.shape[1])  # fail early when d does not suit the params
        for k in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, k)
        self._fit(x)
        self.d_ = int(x.shape[1])
        return self

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Encode (N, D) vectors into uint8 codes (N, code_bytes), in batches."""
        x = self._check_vectors(x, "x")
        out = np.empty((x.shape[0], self.code_bytes), dtype=np.uint8)
        for s in range(0, x.shape[0], self._batch_rows):
            out[s : s + self._batch_rows] = self._encode(x[s : s + self._batch_rows])
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstruct (N, D) float32 vectors from codes (N, code_bytes)."""
        codes = self._check_codes(codes)
        out = np.empty((codes.shape[0], self.d_), dtype=np.float32)
        for s in range(0, codes.shape[0], self._batch_rows):
            out[s : s + self._batch_rows] = self._decode(codes[s : s + self._batch_rows])
        return out

    def distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric | str) -> np.ndarray:
        """Score queries (nq, D) against a block of codes (N, code_bytes): (nq, N) float32, smaller is better.

        L2 gives squared distances, IP and COSINE the negated similarity (COSINE assumes the caller
        normalised vectors and queries). Uses the codec's compressed scoring path.
        """
        metric = as_metric(metric)
        q = self._check_vectors(q, "q")
        codes = self._check_codes(codes)
        out = np.zeros((q.shape[0], codes.shape[0]), dtype=np.float32)
        if codes.shape[0] == 0:
            return out
        for s in range(0, q.shape[0], self._query_rows):
            out[s : s + self._query_rows] = self._distances(q[s : s + self._query_rows], codes, metric)
        return out

    def search_lists(
        self,
        q: np.ndarray,
        codes: np.ndarray,
        k: int,
        metric: Metric | str,
        *,
        offsets: np.ndarray | None = None,
        ids: np.ndarray | None = None,
        probes: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> SearchResult:
        """The ``k`` best codes of each query, scanned with a running top-k (no (nq, N) matrix kept).

        Flat by default; with ``offsets`` and ``probes`` it scans inverted lists (see
        :mod:`embpress.vectors.kernels` for the layout). Ties are broken by the smaller id.

        Args:
            q: (nq, D) queries. codes: (N, code_bytes) uint8.
            k: hits per query.
            metric: distances as in :meth:`distances`.
            offsets: (L+1,) int64 list bounds over the rows of ``codes`` (default: one list).
            ids: (N,) int64 id of each row (default: the row number).
            probes: (nq, P) int64 lists scanned per query, ``-1`` for none (default: list 0).
            bias: (nq, P) float32 added to every distance in probed list p (an IVF centroid's term).
            mask: bool (N,) shared or (nq, N) per query over ids; False excludes the id.

        Returns:
            SearchResult (nq, k): ascending distances (+inf past the hits) and ids (-1 past them).
        """
        metric = as_metric(metric)
        q = self._check_vectors(q, "q")
        codes = self._check_codes(codes)
        nq, n = q.shape[0], codes.shape[0]
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        offsets = np.array([0, n], dtype=np.int64) if offsets is None else np.ascontiguousarray(offsets, np.int64)
        if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
            raise ValueError(f"offsets must rise from 0 to N={n}, got {offsets[:8]}...")
        ids = np.zeros(0, np.int64) if ids is None else np.ascontiguousarray(ids, np.int64)
        if ids.size and ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
        probes = np.zeros((nq, 1), np.int64) if probes is None else np.ascontiguousarray(probes, np.int64)
        if probes.ndim != 2 or probes.shape[0] != nq or probes.max(initial=-1) >= offsets.size - 1:
            raise ValueError(f"probes must be ({nq}, P) list numbers below {offsets.size - 1}, got {probes.shape}")
        bias = np.zeros((0, 0), np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        if bias.size and bias.shape != probes.shape:
            raise ValueError(f"bias must have the shape of probes {probes.shape}, got {bias.shape}")
        if mask is None:
            mask = np.zeros((0, 0), dtype=np.bool_)
        else:
            mask = np.asarray(mask)
            n_ids = int(ids.max(initial=-1)) + 1 if ids.size else n
            if mask.dtype != np.bool_ or mask.ndim not in (1, 2) or mask.shape[-1] < n_ids or (
                    mask.ndim == 2 and mask.shape[0] not in (1, nq)):
                raise ValueError(f"mask must be bool (N,) or ({nq}, N) over ids, got {mask.dtype} {mask.shape}")
            mask = np.ascontiguousarray(mask.reshape(1, -1) if mask.ndim == 1 else mask)
        if nq == 0:
            return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
        dist, found = self._search_lists(q, codes, int(k), metric, offsets, ids, probes, bias, mask)
        return SearchResult(np.ascontiguousarray(dist, np.float32), np.ascontiguousarray(found, np.int64))

    def _search_lists(self, q: np.ndarray, codes: np.ndarray, k: int, metric: Metric, offsets: np.ndarray,
                      ids: np.ndarray, probes: np.ndarray, bias: np.ndarray,
                      mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Default scan: every list against the queries that probe it, through ``_distances``.

        Codecs whose scoring is a matrix product (fp16, sq8, sq4, reducers) keep this path: one
        BLAS call per (list, query group) beats a per-code loop. Others override it with a
        compiled kernel from :mod:`embpress.vectors.kernels`.
        """
        nq = q.shape[0]
        best_d = np.full((nq, k), np.inf, dtype=np.float32)
        best_i = np.full((nq, k), -1, dtype=np.int64)
        qs_all, slots = np.nonzero(probes >= 0)
        lists = probes[qs_all, slots]
        order = np.argsort(lists, kind="stable")
        qs_all, slots, lists = qs_all[order], slots[order], lists[order]
        starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]]) if lists.size else np.zeros(0, int)
        for g, s0 in enumerate(starts):
            s1 = starts[g + 1] if g + 1 < len(starts) else lists.size
            lst = lists[s0]
            lo, hi = int(offsets[lst]), int(offsets[lst + 1])
            if hi <= lo:
                continue
            qs = qs_all[s0:s1]
            step = max(1, _SCAN_ELEMS // qs.size)
            for s in range(lo, hi, step):
                e = min(hi, s + step)
                d = np.zeros((qs.size, e - s), np.float32)
                for r in range(0, qs.size, self._query_rows):
                    d[r:r + self._query_rows] = self._distances(q[qs[r:r + self._query_rows]], codes[s:e], metric)
                if bias.size:
                    d += bias[qs, slots[s0:s1]][:, None]
                rid = ids[s:e] if ids.size else np.arange(s, e, dtype=np.int64)
                if mask.size:
                    allowed = mask[0, rid][None, :] if mask.shape[0] == 1 else mask[qs[:, None], rid[None, :]]
                    d = np.where(allowed, d, np.float32(np.inf))
                best_d[qs], best_i[qs] = merge_topk(best_d[qs], best_i[qs], d, rid, k)
        best_i[~np.isfinite(best_d)] = -1
        best_d[best_i < 0] = np.inf
        return best_d, best_i

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _fit(self, x: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _encode(self, x: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _decode(self, codes: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray: ...

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict[str, StateValue]:
        """Everything needed to rebuild the fitted codec: class, spec, params and fitted arrays."""
        self._check_fitted()
        state: dict[str, StateValue] = {"class": type(self).__name__, "spec": self.spec}
        for name, value in self._params().items():
            if value is not None:
                state[f"param.{name}"] = int(value) if isinstance(value, bool | np.bool_) else value
        state.update(self._fitted_state())
        return state

    def _fitted_state(self) -> dict[str, StateValue]:
        """Fitted attributes (public names ending in ``_``); override for non-array state."""
        out: dict[str, StateValue] = {}
        for k, v in vars(self).items():
            if k.endswith("_") and not k.startswith("_"):
                out[k] = v.item() if isinstance(v, np.generic) else v
        return out

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v if isinstance(v, np.ndarray) and v.ndim > 0 else _state_scalar(v))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Codec:
        """Rebuild a fitted codec from :meth:`get_state` output (also after an ``np.savez`` round trip)."""
        name = str(_state_scalar(state.get("class", "")))
        target = _CLASSES.get(name)
        if target is None:
            raise ValueError(f"state names unknown codec class {name!r}; known: {sorted(_CLASSES)}")
        if not issubclass(target, cls):
            raise ValueError(f"state is for {name}, not a {cls.__name__}")
        return target._from_state(state)

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Codec:
        params = {k[len("param.") :]: _state_scalar(v) for k, v in state.items() if k.startswith("param.")}
        obj = cls(**params)
        obj._load_fitted_state(
            {k: v for k, v in state.items() if not k.startswith("param.") and k not in ("class", "spec")}
        )
        obj.spec = str(_state_scalar(state["spec"]))
        if not obj.is_fitted:
            raise ValueError(f"state for {name_of(state)} has no fitted dimension 'd_'")
        return obj

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls


def name_of(state: dict[str, Any]) -> str:
    """The spec recorded in a codec state, for messages."""
    return repr(_state_scalar(state.get("spec", "?")))


class Reducer(Codec):
    """A dimension reducer ``D -> out_dim`` usable alone (fp32 codes) or before a codec (``"pca128+sq8"``).

    Subclasses implement ``_transform`` (N, D) -> (N, out_dim), ``_inverse_transform`` back to
    the input space, ``_out_dim_for(d)`` and ``_query_transform(q, metric) -> (yq, offset)`` such
    that ``inner_distance(yq, y) + offset`` equals the distance from ``q`` to
    ``inverse_transform(y)`` for every reduced ``y`` — so a composition scores exactly like its
    decoded vectors.
    """

    is_reducer: ClassVar[bool] = True

    @abc.abstractmethod
    def _out_dim_for(self, d: int) -> int: ...

    @abc.abstractmethod
    def _transform(self, x: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _inverse_transform(self, y: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _query_transform(self, q: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]: ...

    @property
    def out_dim(self) -> int:
        """Dimension of the reduced vectors."""
        self._check_fitted()
        return self._out_dim_for(self.d_)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Reduce (N, D) vectors to (N, out_dim) float32."""
        x = self._check_vectors(x, "x")
        return np.ascontiguousarray(self._transform(x), dtype=np.float32)

    def inverse_transform(self, y: np.ndarray) -> np.ndarray:
        """Map reduced (N, out_dim) vectors back to the input space (N, D)."""
        self._check_fitted()
        y = as_matrix(y, name="y")
        if y.shape[1] != self.out_dim:
            raise ValueError(f"{type(self).__name__} reduces to d={self.out_dim}, got d={y.shape[1]}")
        return np.ascontiguousarray(self._inverse_transform(y), dtype=np.float32)

    def transform_queries(self, q: np.ndarray, metric: Metric | str) -> tuple[np.ndarray, np.ndarray]:
        """Reduce queries for scoring: (nq, out_dim) float32 and a per-query offset (nq,) float32."""
        metric = as_metric(metric)
        q = self._check_vectors(q, "q")
        yq, off = self._query_transform(q, metric)
        return np.ascontiguousarray(yq, dtype=np.float32), np.asarray(off, dtype=np.float32)

    def _code_bytes_for(self, d: int) -> int:
        return 4 * self._out_dim_for(d)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._transform(x), dtype=np.float32).view(np.uint8)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        return self._inverse_transform(codes.view(np.float32))

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        yq, off = self._query_transform(q, metric)
        return pairwise_distances(yq, codes.view(np.float32), metric) + off[:, None]


class ComposedCodec(Codec):
    """A reducer followed by a codec, spelled ``"pca128+sq8"``: codes are the inner codec's codes.

    ``d_`` is the input dim; ``decode`` maps back to the input space through the reducer, and
    ``distances`` reduces the queries, then uses the inner codec's compressed scoring path.
    """

    def __init__(self, *, reducer: Reducer, inner: Codec):
        self.reducer = reducer
        self.inner = inner

    def _canonical_spec(self) -> str:
        return f"{self.reducer.spec}+{self.inner.spec}"

    def _check_params(self) -> None:
        if not getattr(self.reducer, "is_reducer", False):
            raise ValueError(
                f"only a reducer (pca{{d}}, mrl{{d}}) may come before '+', got {self.reducer.spec!r}"
            )
        self.reducer._check_params()
        self.inner._check_params()

    def _code_bytes_for(self, d: int) -> int:
        return self.inner._code_bytes_for(self.reducer._out_dim_for(d))

    def _fit(self, x: np.ndarray) -> None:
        self.reducer.fit(x)
        self.inner.fit(self.reducer.transform(x))

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return self.inner.encode(self.reducer.transform(x))

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        return self.reducer.inverse_transform(self.inner.decode(codes))

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        yq, off = self.reducer.transform_queries(q, metric)
        return self.inner.distances(yq, codes, metric) + off[:, None]

    def _search_lists(self, q, codes, k, metric, offsets, ids, probes, bias, mask):
        # a reducer's query offset is one number per query: it shifts distances, not the ranking
        yq, off = self.reducer.transform_queries(q, metric)
        dist, found = self.inner._search_lists(yq, codes, k, metric, offsets, ids, probes, bias, mask)
        return dist + off[:, None], found

    def get_state(self) -> dict[str, StateValue]:
        self._check_fitted()
        state: dict[str, StateValue] = {"class": type(self).__name__, "spec": self.spec, "d_": self.d_}
        for prefix, part in (("reducer/", self.reducer), ("inner/", self.inner)):
            state.update({prefix + k: v for k, v in part.get_state().items()})
        return state

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Codec:
        parts = {}
        for prefix in ("reducer/", "inner/"):
            parts[prefix] = codec_from_state(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
        obj = cls(reducer=parts["reducer/"], inner=parts["inner/"])  # type: ignore[arg-type]
        obj.d_ = int(_state_scalar(state["d_"]))
        obj.spec = str(_state_scalar(state["spec"]))
        return obj


# ---------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Family:
    pattern: re.Pattern[str]
    form: str
    examples: tuple[str, ...]
    build: Callable[[dict[str, str | None], int], Codec]


_FAMILIES: list[_Family] = []


def register_codec(
    pattern: str, *, form: str, examples: tuple[str, ...]
) -> Callable[[type[Codec]], type[Codec]]:
    """Register a codec class under a spec regex; the class provides ``_from_spec(groups, seed)``.

    Args:
        pattern: regex matched against the whole spec part, with named groups for numbers.
        form: the human-readable form listed in error messages, e.g. ``"pq{M}[x{nbits}]"``.
        examples: specs for contract tests, valid at d=32.
    """

    def deco(cls: type[Codec]) -> type[Codec]:
        _FAMILIES.append(_Family(re.compile(pattern), form, examples, cls._from_spec))  # type: ignore[attr-defined]
        return cls

    return deco


def _allowed_forms() -> str:
    forms = ", ".join(f.form for f in _FAMILIES)
    return f"{forms}; compose a reducer first with '+', e.g. 'pca128+sq8'"


def _build_part(part: str, spec: str, seed: int) -> Codec:
    for fam in _FAMILIES:
        m = fam.pattern.fullmatch(part)
        if m is not None:
            codec = fam.build(m.groupdict(), seed)
            try:
                codec._check_params()
            except ValueError as e:
                raise ValueError(f"invalid codec spec {spec!r}: {e}") from None
            return codec
    raise ValueError(
        f"unknown or malformed codec spec {spec!r} (part {part!r}); allowed forms: {_allowed_forms()}"
    )


def build_codec(spec: str, *, seed: int = 0) -> Codec:
    """Build an unfitted codec from a spec string such as ``"sq8"``, ``"pq16x8"`` or ``"pca128+sq8"``.

    Args:
        spec: one of the registered forms (``fp16``, ``sq8``, ``sq4``, ``bin``, ``rbin{B}``,
            ``itq{B}``, ``pq{M}[x{nbits}]``, ``opq{M}[x{nbits}]``, ``rq{M}[x{nbits}]``, ``pca{d}``,
            ``mrl{d}``, ``bebr{u}[d{D}]``, ``dvq{M}[x{nbits}]``, ``dopq{M}[x{nbits}]``), or reducers
            joined before a codec with ``+``.
        seed: seed of every random step (k-means, rotations, BEBR training).

    Raises:
        ValueError: unknown or malformed spec, naming the spec and listing the allowed forms.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((500, 32)).astype("float32")
        >>> codec = build_codec("pca16+sq8").fit(x)
        >>> codec.encode(x).shape, code_size(32, "pca16+sq8")
        ((500, 16), 16)
        >>> codec.distances(x[:2], codec.encode(x), "l2").shape
        (2, 500)
    """
    if not isinstance(spec, str):
        raise TypeError(f"codec spec must be a str, got {type(spec).__name__}")
    text = spec.strip()
    parts = [p.strip().lower() for p in text.split("+")]
    if not text or any(not p for p in parts):
        raise ValueError(f"empty part in codec spec {spec!r}; allowed forms: {_allowed_forms()}")
    codecs = [_build_part(p, spec, seed) for p in parts]
    for c, p in zip(codecs[:-1], parts[:-1], strict=True):
        if not c.is_reducer:
            raise ValueError(
                f"invalid codec spec {spec!r}: {p!r} is not a reducer; only pca{{d}} or mrl{{d}} may come before '+'"
            )
    codec = codecs[-1]
    for reducer in reversed(codecs[:-1]):
        codec = ComposedCodec(reducer=reducer, inner=codec)  # type: ignore[arg-type]
    codec.spec = text
    return codec


def code_size(d: int, spec: str) -> int:
    """Bytes per vector of ``spec`` at input dim ``d``, computed without fitting.

    >>> code_size(768, "pq16x8"), code_size(768, "bin"), code_size(768, "pca128+sq4")
    (16, 96, 64)
    """
    if not isinstance(d, int | np.integer) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    codec = build_codec(spec)
    try:
        return int(codec._code_bytes_for(int(d)))
    except ValueError as e:
        raise ValueError(f"codec spec {spec!r} does not fit d={d}: {e}") from None


def registered_codecs() -> list[str]:
    """Example specs covering every registered family and a composition, all valid at d=32."""
    specs = [s for fam in _FAMILIES for s in fam.examples]
    return specs + ["pca16+sq8", "mrl16+pq4"]


def codec_from_state(state: dict[str, Any]) -> Codec:
    """Rebuild any fitted codec from its :meth:`Codec.get_state` dict."""
    return Codec.from_state(state)
