"""``load_dataset(spec)``: one entry point from a dataset spec string to a processed ``CTRDataset``.

Specs: ``synthetic[:key=value,...]``, ``criteo:PATH[,PATH...]``, ``avazu:PATH[,PATH...]``,
``movielens:FOLDER`` (or ``movielens:100k`` / ``movielens:1m`` to download),
``libfm:PATH[,PATH...]`` and ``recbole:DIR[,cold=0.1]`` (RecBole atomic files, cold-item split). File formats are processed once (see :mod:`embpress.data.preprocess`)
and cached (see :mod:`embpress.data.cache`); the synthetic set is generated in memory, except its
production-size presets (``synthetic:preset=criteo,rows=45000000``), streamed into the cache.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from embpress.data import cache
from embpress.data.avazu import AvazuSource
from embpress.data.criteo import CriteoSource
from embpress.data.libfm import LibFMSource
from embpress.data.movielens import MOVIELENS_DOWNLOADS, MovieLensSource
from embpress.data.preprocess import PREPROCESS_VERSION, Source, preprocess, progress_task
from embpress.data.recbole import RecBoleSource
from embpress.data.schema import CTRDataset
from embpress.data.synthetic import SYNTHETIC_VERSION, SyntheticConfig, make_synthetic, write_synthetic

FORMATS: dict[str, type[Source]] = {
    "criteo": CriteoSource,
    "avazu": AvazuSource,
    "movielens": MovieLensSource,
    "libfm": LibFMSource,
    "recbole": RecBoleSource,
}
"""File formats by spec prefix; ``synthetic`` is handled apart (nothing to read or cache)."""


def dataset_formats() -> list[str]:
    """Every spec prefix ``load_dataset`` accepts."""
    return sorted([*FORMATS, "synthetic"])


def _synthetic_config(options: str, seed: int) -> SyntheticConfig:
    types = {f.name: f.type for f in dataclasses.fields(SyntheticConfig)}
    values: dict = {"seed": seed}
    for item in filter(None, options.split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(f"synthetic option {item!r}: expected key=value with key in {sorted(types)}")
        kind = {"int": int, "float": float, "float | None": float, "str": str}[str(types[key])]
        try:
            values[key] = kind(raw.strip())
        except ValueError:
            raise ValueError(f"synthetic option {key}={raw!r}: expected a{'n' if kind is int else ''} "
                             f"{kind.__name__}") from None
    return SyntheticConfig(**values)


def source_from_spec(spec: str, *, cache_dir: str | Path | None = None, progress: bool = False) -> Source:
    """The :class:`~embpress.data.preprocess.Source` of a file-format spec (not ``synthetic``)."""
    prefix, _, arg = spec.partition(":")
    if prefix not in FORMATS:
        raise ValueError(f"unknown dataset format {prefix!r} in spec {spec!r}; formats: {dataset_formats()} "
                         "(e.g. 'criteo:/data/train.txt', 'synthetic:rows=100000')")
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    return FORMATS[prefix].from_spec(arg.strip(), cache_dir=cache_dir, progress=progress)


def check_spec(spec: str) -> None:
    """Check a dataset spec without loading, processing or downloading anything: the format, the
    ``synthetic`` options, and that every named file exists once (``movielens:100k`` / ``1m`` are
    download names and pass).

    Raises:
        ValueError: empty spec, unknown format or option, an empty or repeated file name.
        FileNotFoundError: a named file or folder does not exist.

    >>> check_spec("synthetic:rows=1000")
    >>> check_spec("synthetic:rows=ten")
    Traceback (most recent call last):
    ...
    ValueError: synthetic option rows='ten': expected an int
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}; formats: {dataset_formats()}")
    prefix, _, arg = spec.strip().partition(":")
    if prefix == "synthetic":
        _synthetic_config(arg, 0)
        return
    if prefix == "movielens" and arg.strip().lower() in MOVIELENS_DOWNLOADS and not Path(arg.strip()).exists():
        return
    source_from_spec(spec.strip())


def load_dataset(spec: str, *, cache_dir: str | Path | None = None, min_count: int | None = None,
                 seed: int = 0, chunk_rows: int = 1_000_000, progress: bool = True) -> CTRDataset:
    """Load a CTR dataset by spec, processing and caching raw files on first use.

    Args:
        spec: ``"synthetic"`` or ``"synthetic:rows=100000,seed=3"`` (keys: ``SyntheticConfig`` fields),
            ``"criteo:PATH"``, ``"avazu:PATH"``, ``"movielens:FOLDER"``, ``"libfm:PATH[,PATH...]"``,
            ``"recbole:DIR[,cold=0.1][,threshold=4][,skip=COL+COL]"``.
        cache_dir: where processed datasets live; default ``$EMBPRESS_CACHE`` or ``~/.cache/embpress/data``.
        min_count: training count a raw value needs for its own id (rarer values share the field's
            OOV id). None: the format default (criteo 10, avazu 5, movielens 1, libfm 1), at most 2
            under 100,000 training rows. Not accepted for ``synthetic``.
        seed: seed of the random train/valid/test split (and of ``synthetic`` unless its spec sets one).
        chunk_rows: rows per processing chunk; the output does not depend on it.
        progress: rich progress bars on stderr while hashing and processing.

    Returns:
        The dataset; processed splits are copy-on-write memory maps of the cache folder
        (``info["cache"]``), with ``dense float32[N, Dd]``, ``sparse int32[N, F]``, ``label float32[N]``.

    Raises:
        ValueError: unknown format or option, malformed data (message ``file:line: what``).
        FileNotFoundError: a data file or folder does not exist.

    Examples:
        >>> ds = load_dataset("synthetic:rows=1000,num_fields=3,max_cardinality=50", progress=False)
        >>> len(ds.train), len(ds.fields), ds.fields[0].num_embeddings
        (800, 3, 11)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}; formats: {dataset_formats()}")
    spec = spec.strip()
    prefix, _, arg = spec.partition(":")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_cache_dir()
    if prefix == "synthetic":
        if min_count is not None:
            raise ValueError("min_count does not apply to 'synthetic' (its ids are generated, not counted)")
        cfg = _synthetic_config(arg, seed)
        if not cfg.preset:
            ds = make_synthetic(cfg)
            ds.info["spec"] = spec
            return ds
        key = cache.cache_key({"format": "synthetic", "generator": SYNTHETIC_VERSION, "config": cfg.__dict__})
        return _cached(cache_dir / f"synthetic-{cfg.preset}-{key[:16]}",
                       lambda tmp: {**_write_preset(cfg, tmp, progress), "spec": spec})

    source = source_from_spec(spec, cache_dir=cache_dir, progress=progress)
    digests = []
    for path in source.files:
        with progress_task(f"hashing {path.name}", path.stat().st_size, enabled=progress) as advance:
            digests.append(cache.file_sha256(path, memo_dir=cache_dir, advance=advance))
    key = cache.cache_key({"format": source.format, "preprocess": PREPROCESS_VERSION, "sources": digests,
                           "min_count": min_count, "seed": seed, "split": list(source.split_ratios)})
    name = re.sub(r"[^A-Za-z0-9._-]", "_", source.dataset_name())
    folder = cache_dir / f"{name}-{key[:16]}"

    def build(tmp: Path) -> dict:
        meta = preprocess(source, tmp, min_count=min_count, seed=seed, chunk_rows=chunk_rows, progress=progress)
        meta["spec"] = spec
        meta["sources"] = [{"path": os.fspath(p), "sha256": d, "bytes": p.stat().st_size}
                           for p, d in zip(source.files, digests, strict=True)]
        return meta

    return _cached(folder, build)


def _cached(folder: Path, build: Callable[[Path], dict]) -> CTRDataset:
    """Read the cached dataset ``folder``; build it (atomically) when absent or damaged."""
    if folder.is_dir():
        try:
            return cache.read_dataset(folder)
        except cache.CacheError as e:
            warnings.warn(f"rebuilding a damaged dataset cache: {e}", RuntimeWarning, stacklevel=3)
            cache.discard(folder)
    with cache.atomic_build(folder) as tmp:
        cache.write_meta(tmp, build(tmp))
    return cache.read_dataset(folder)


def _write_preset(cfg: SyntheticConfig, folder: Path, progress: bool) -> dict:
    with progress_task(f"generating synthetic preset {cfg.preset}", cfg.rows, enabled=progress) as advance:
        return write_synthetic(cfg, folder, progress=advance)
