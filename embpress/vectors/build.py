"""Build an index folder from a vector file larger than memory: sample, fit, stream, save.

The training sample is read from random rows; then the whole file is encoded block by block
(:meth:`Index.add_file`), so peak memory is the codes, one block, the coarse quantizer and the
sample, never the float32 corpus.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from embpress.vectors.index import Index
from embpress.vectors.vecio import VectorFile


def sample_file_rows(path: str | os.PathLike, n: int, *, d: int | None = None, seed: int = 0) -> np.ndarray:
    """``n`` distinct random rows (sorted by position) of a ``.npy``/``.f32`` file as float32 (n, D)."""
    reader = VectorFile(path, d=d)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"train size must be a positive int, got {n!r}")
    n = min(n, reader.n)
    rows = np.sort(np.random.default_rng(seed).choice(reader.n, n, replace=False))
    out = np.empty((n, reader.d), dtype=np.float32)
    for i, r in enumerate(rows):
        out[i] = reader.read(int(r), int(r) + 1)[0]
    return out


def build_index(base: str | os.PathLike, spec: str, out: str | os.PathLike, *, metric: str = "ip",
                train_size: int = 100_000, rerank: bool = True, nprobe: int = 1, seed: int = 0,
                block_size: int = 1 << 16, d: int | None = None, progress: bool = False) -> tuple[Index, dict[str, Any]]:
    """Fit ``spec`` on ``train_size`` random rows of ``base``, stream every row in, save to folder ``out``.

    Args:
        base: ``.npy`` or raw ``.f32`` (with ``d``) float vectors.
        spec: index spec, e.g. ``"ivf1024,pq32"`` or ``"sq8"``.
        out: index folder (replaced if it is an index folder; see :meth:`Index.save`).
        rerank: keep the float32 originals in the folder for exact re-ranking.

    Returns:
        The saved index (opened from ``out``) and timings: ``fit_s``, ``add_s``, ``vectors_per_s``, ``save_s``.
    """
    out = Path(out)
    reader = VectorFile(base, d=d)
    if reader.n == 0:
        raise ValueError(f"{base}: holds no vectors")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        index = Index(spec, metric=metric, nprobe=nprobe, seed=seed, block_size=block_size,
                      rerank_path=work / "originals.f32" if rerank else None)
        t = time.perf_counter()
        index.fit(sample_file_rows(base, train_size, d=d, seed=seed))
        fit_s = time.perf_counter() - t
        added = index.add_file(base, d=d, progress=progress)
        t = time.perf_counter()
        index.save(out)
        save_s = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Index.load(out), {"fit_s": fit_s, "add_s": added["seconds"], "vectors_per_s": added["vectors_per_s"],
                             "save_s": save_s, "n": reader.n}
