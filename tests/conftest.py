"""Shared fixtures: small seeded fields and a tiny CTR task that every table must learn."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from content_vectors import clustered_content

from embpress.data import SyntheticConfig, make_synthetic
from embpress.tables import Field

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def zipf_counts(n: int, seed: int = 0) -> np.ndarray:
    """Descending Zipf-like training counts for ``n`` ids."""
    rng = np.random.default_rng(seed)
    c = (1e5 / np.arange(1, n + 1) ** 1.1).astype(np.int64) + rng.integers(0, 2, n)
    return np.sort(c)[::-1].copy()


@pytest.fixture(scope="session")
def small_fields() -> list[Field]:
    """Three fields of very different sizes, with training counts; the large one carries content
    vectors (semantic-ID tables code them, every other method ignores them)."""
    return [Field("small", 7, zipf_counts(7)), Field("mid", 300, zipf_counts(300, 1)),
            Field("large", 5000, zipf_counts(5000, 2), content=clustered_content(5000))]


@pytest.fixture(scope="session")
def tiny_ctr():
    """A tiny synthetic CTR task in which per-id effects carry most of the signal. The largest field
    carries content vectors unrelated to the effects (semantic-ID tables need some; others ignore them)."""
    data = make_synthetic(SyntheticConfig(rows=30_000, num_dense=2, num_fields=4, min_cardinality=20,
                                          max_cardinality=2_000, zipf=1.1, interacting_fields=4,
                                          first_order_std=1.0, second_order_std=1.0, dense_std=0.1,
                                          seed=1))
    big = max(range(len(data.fields)), key=lambda j: data.fields[j].num_embeddings)
    fields = tuple(dataclasses.replace(f, content=clustered_content(f.num_embeddings, seed=j)) if j == big else f
                   for j, f in enumerate(data.fields))
    return dataclasses.replace(data, fields=fields)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only in the project's workspace)")
    return SHARED_DATA
