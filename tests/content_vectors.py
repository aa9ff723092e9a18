"""Content vectors for semantic-ID tables in tests (a plain module: ``conftest`` names clash between
``tests/`` and ``tests/vectors/`` when imported by name)."""

from __future__ import annotations

import numpy as np


def clustered_content(n: int, dim: int = 16, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """``float32[n, dim]`` content vectors around ``clusters`` random centres (for semantic-ID tables)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
