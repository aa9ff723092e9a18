"""Shared set-up of the retrieval tests: one thread everywhere, and seeded clustered vectors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from embpress.vectors.kernels import limit_threads


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Keep BLAS, FAISS, numba and torch on one thread: the test machine is shared."""
    prev_torch = torch.get_num_threads()
    torch.set_num_threads(1)
    with limit_threads(1):
        yield
    torch.set_num_threads(prev_torch)


def clustered(n: int, d: int, *, seed: int, clusters: int = 20, latent: int = 12, spread: float = 0.5,
              noise: float = 0.1, scaled: bool = False) -> np.ndarray:
    """Seeded unit vectors in Gaussian clusters of a ``latent``-dim subspace, plus isotropic noise.

    ``scaled`` divides the latent-to-``d`` map by sqrt(latent).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent))
    z = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, latent))
    lift = rng.standard_normal((latent, d))
    if scaled:
        lift = lift / np.sqrt(latent)
    x = z @ lift + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def make_clustered() -> Callable[..., np.ndarray]:
    return clustered
