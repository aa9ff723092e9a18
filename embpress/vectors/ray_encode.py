"""Corpus encoding on Ray Data: texts to vectors (and, optionally, vectors to codes) with an actor pool,
written as shards that :func:`assemble_shards` turns into the one ``.npy`` the index streams
(:meth:`embpress.vectors.index.Index.add_file`).

The batches are the single-process path's (:func:`embpress.vectors.encode.encode_texts`): texts in
the same length order, cut into the same groups of ``4 * batch_size``, each encoded by one
``SentenceTransformer.encode`` call with the same ``batch_size``, so every forward pass sees the
same texts with the same padding, and the vectors are those of the single-process cache. Each
actor loads the model once (``map_batches`` with ``compute=ActorPoolStrategy(...)``) and writes
its shards itself (a shared folder on a cluster), so the vectors never pass through the driver.
Ray is imported only when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embpress.atomic import atomic_open
from embpress.vectors.encode import _load_model, default_model_path


class _ShardEncoder:
    """One actor: the model loaded once; each call encodes one group of texts and writes its shard."""

    def __init__(self, model: str, out: str, batch_size: int, normalize: bool, threads: int, codec: Any) -> None:
        import torch

        torch.set_num_threads(threads)
        self.st = _load_model(model, "cpu")
        self.out, self.batch_size, self.normalize, self.codec = Path(out), batch_size, normalize, codec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], dtype=np.int64)
        emb = self.st.encode([str(t) for t in batch["text"]], batch_size=self.batch_size, show_progress_bar=False,
                             convert_to_numpy=True, normalize_embeddings=self.normalize)
        emb = np.asarray(emb, dtype=np.float32)
        name = f"shard-{int(batch['position'][0]):012d}"
        with atomic_open(self.out / f"{name}.rows.npy", "wb") as fh:
            np.save(fh, rows, allow_pickle=False)
        if self.codec is not None:
            with atomic_open(self.out / f"{name}.codes.npy", "wb") as fh:
                np.save(fh, self.codec.encode(emb), allow_pickle=False)
        with atomic_open(self.out / f"{name}.npy", "wb") as fh:  # last: its presence marks a whole shard
            np.save(fh, emb, allow_pickle=False)
        return {"shard": np.array([name]), "n": np.array([len(rows)], dtype=np.int64)}


def encode_corpus_ray(texts: Sequence[str], out: str | os.PathLike, *, model: str | None = None,
                      batch_size: int = 64, normalize: bool = False, actors: int = 2, threads_per_actor: int = 1,
                      codec: Any = None) -> list[str]:
    """Encode ``texts`` (N strings) on Ray Data into shards in folder ``out``; returns the shard names.

    Shard ``NAME`` holds ``NAME.npy`` (float32 (n, D) vectors), ``NAME.rows.npy`` (int64 (n,) their
    rows in ``texts``) and, with a fitted ``codec``, ``NAME.codes.npy`` (``codec.encode`` of the
    vectors). Uses the running Ray instance, or starts a local one.

    Args:
        texts, model, batch_size, normalize: as :func:`embpress.vectors.encode.encode_texts`.
        out: the shard folder (created; a shared file system when the actors run on several nodes).
        actors: the most actors in the pool (each loads the model once).
        threads_per_actor: CPUs each actor asks for, and its torch threads.
        codec: a fitted codec (:class:`embpress.vectors.codec.Codec`) to encode the vectors to codes.

    Raises:
        ValueError: no texts, a text that is not a string, or a count below 1.
        ImportError: Ray or sentence-transformers is not installed.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("encode_corpus_ray got no texts")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str")
    for name, v in (("batch_size", batch_size), ("actors", actors), ("threads_per_actor", threads_per_actor)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    try:
        import pyarrow as pa
        import ray
        from ray.data import ActorPoolStrategy
    except ImportError:
        raise ImportError("encoding on Ray needs Ray Data: pip install 'embpress[ray]'") from None
    model = model or default_model_path()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    order = np.argsort([len(t) for t in texts], kind="stable")  # the single-process path's order
    group = 4 * batch_size  # ... and its groups: blocks are whole groups, so no batch straddles two
    per_block = group * max(1, -(-len(texts) // (group * 4 * actors)))
    blocks = []
    for s in range(0, len(texts), per_block):
        idx = order[s:s + per_block]
        blocks.append(pa.table({"row": pa.array(idx, pa.int64()),
                                "position": pa.array(np.arange(s, s + len(idx)), pa.int64()),
                                "text": pa.array([texts[i] for i in idx], pa.string())}))
    ds = ray.data.from_arrow(blocks).map_batches(
        _ShardEncoder, batch_size=group, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=threads_per_actor,
        fn_constructor_kwargs={"model": model, "out": str(out), "batch_size": batch_size, "normalize": normalize,
                               "threads": threads_per_actor, "codec": codec})
    shards = [str(r["shard"]) for r in ds.iter_rows()]
    return sorted(shards)


def assemble_shards(out: str | os.PathLike, shards: Sequence[str], path: str | os.PathLike, *,
                    n: int, what: str = "vectors") -> np.ndarray:
    """Scatter the shards' ``what`` (``"vectors"`` or ``"codes"``) into their rows of one ``.npy`` at
    ``path`` (written atomically), which the index streams; returns it memory-mapped.

    Raises:
        ValueError: the shards do not cover rows ``0 .. n-1`` exactly once, or a shard is missing a file.
    """
    if what not in ("vectors", "codes"):
        raise ValueError(f"what must be 'vectors' or 'codes', got {what!r}")
    out = Path(out)
    suffix = ".npy" if what == "vectors" else ".codes.npy"
    seen = np.zeros(n, dtype=bool)
    result = None
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    try:
        for name in shards:
            try:
                rows = np.load(out / f"{name}.rows.npy", allow_pickle=False)
                x = np.load(out / f"{name}{suffix}", allow_pickle=False)
            except FileNotFoundError as e:
                raise ValueError(f"shard {name} in {out} is incomplete: {e.filename} is missing") from None
            if rows.min(initial=0) < 0 or rows.max(initial=-1) >= n or seen[rows].any():
                raise ValueError(f"shard {name} in {out}: rows outside 0..{n - 1} or already given by another shard")
            if result is None:
                result = np.lib.format.open_memmap(tmp, mode="w+", dtype=x.dtype, shape=(n, *x.shape[1:]))
            result[rows] = x
            seen[rows] = True
        if result is None or not seen.all():
            raise ValueError(f"the shards in {out} cover {int(seen.sum()):,} of {n:,} rows")
        result.flush()
        del result
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return np.load(path, mmap_mode="r", allow_pickle=False)
