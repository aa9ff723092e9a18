"""Queries/s and recall of every codec beside its FAISS equivalent on synthetic clustered vectors.

Writes ``<out>/base.npy`` (N x D unit-norm clustered Gaussian vectors, seeded) and runs
``embpress vectors eval --base <out>/base.npy ...`` on it, so the figures come from the CLI that
users run. Default: 100,000 x 384, 200 held-out queries, codecs fitted on 25,000 vectors, 1 thread.

    python benchmarks/vectors_qps.py --out /tmp/qps-run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

CODECS = "fp16,sq8,sq4,bin,pq48,pq96,opq48,rq16x8,pca128+sq8,mrl192+sq8,itq384,rbin384,bebr1"


def clustered_unit_vectors(n: int, d: int, *, n_clusters: int = 1000, spread: float = 0.6,
                           seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit vectors around ``n_clusters`` random centres (text-embedding-like geometry)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 10_000):
        e = min(n, s + 10_000)
        x = centers[rng.integers(0, n_clusters, e - s)] + rng.standard_normal((e - s, d)).astype(np.float32) * (
            spread / np.sqrt(d))
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--n-queries", type=int, default=200)
    ap.add_argument("--train-size", type=int, default=25_000)
    ap.add_argument("--codecs", default=CODECS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "base.npy"
    if not base.exists():
        from embpress.atomic import atomic_open

        with atomic_open(base, "wb") as fh:
            np.save(fh, clustered_unit_vectors(args.n, args.d, seed=args.seed))
    cmd = [sys.executable, "-m", "embpress.cli", "vectors", "eval", "--base", str(base), "--codecs", args.codecs,
           "--n-queries", str(args.n_queries), "--train-size", str(args.train_size), "--metric", "ip",
           "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(args.out)]
    print(" ".join(cmd), flush=True)
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
