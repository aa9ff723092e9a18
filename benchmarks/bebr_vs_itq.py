"""BEBR recurrent binarization vs. fixed-projection sign baselines at equal bits (no re-ranking).

Compares ``bin``, ``rbin{B}`` (random rotation), ``itq{B}`` (ITQ) and ``bebr{u}d{D}`` with the same
total bits B on a seeded synthetic clustered set of unit vectors, scoring every codec with its own
compressed path (popcount / SDC) and reporting recall@10 against exact cosine k-NN.

    python benchmarks/bebr_vs_itq.py --n 20000 --d 384 --nq 500
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from embpress.vectors import Metric, build_codec


def clustered_unit_vectors(
    n: int, d: int, *, latent: int = 64, clusters: int = 100, seed: int = 0
) -> np.ndarray:
    """(n, d) float32 unit vectors: Gaussian clusters in a ``latent``-dim subspace, mixed into d dims plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent))
    z = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, latent))
    mix = rng.standard_normal((latent, d)) / np.sqrt(latent)
    x = z @ mix + 0.15 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_k(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    """ids, gt: (nq, >=k). Mean of |ids[:, :k] & gt[:, :k]| / k."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, gt, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--nq", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--specs", nargs="*", default=None, help="codec specs (default: equal-bit groups)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    x = clustered_unit_vectors(args.n + args.nq, args.d, seed=args.seed)
    xb, xq = x[: args.n], x[args.n :]
    _, gt = faiss.knn(xq, xb, args.k, faiss.METRIC_INNER_PRODUCT)
    d = args.d
    specs = args.specs or [
        "bin",
        f"rbin{d}",
        f"itq{d}",
        f"bebr1d{d // 2}",
        f"bebr2d{d // 3}",  # d bits
        f"rbin{2 * d}",
        f"itq{2 * d}",
        "bebr1",  # 2d bits
    ]
    print(f"n={args.n} d={d} nq={args.nq} seed={args.seed}; recall@{args.k} without re-ranking, cosine")
    print(f"{'spec':>12} {'bits':>6} {'bytes':>6} {'recall@10':>10} {'fit+encode s':>13}")
    for spec in specs:
        t = time.perf_counter()
        codec = build_codec(spec, seed=args.seed).fit(xb)
        codes = codec.encode(xb)
        elapsed = time.perf_counter() - t
        dist = codec.distances(xq, codes, Metric.COSINE)
        ids = np.argsort(dist, axis=1, kind="stable")[:, : args.k]
        print(
            f"{spec:>12} {8 * codec.code_bytes:>6} {codec.code_bytes:>6} "
            f"{recall_at_k(ids, gt, args.k):>10.3f} {elapsed:>13.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
