"""Fit time and peak memory of a learned PQ (``dvq``/``dopq``) on N synthetic vectors, beside FAISS's own fit.

Seeded clustered unit vectors (``bebr_vs_itq.clustered_unit_vectors``); pseudo-queries from the corpus.
Reports wall and process CPU seconds of the FAISS start and of the distillation, and the process's
peak RSS (``ru_maxrss``) after each, on ``--threads`` threads.

    python benchmarks/distill_fit_cost.py --n 100000 --spec dvq48
    python benchmarks/distill_fit_cost.py --n 100000 --spec dopq32 --opt anisotropic_eta=4

Also times encoding the N vectors with FAISS's nearest codes and with the learned codec's encoder
(score-aware codes cost a coordinate descent per vector).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import faiss
import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bebr_vs_itq import clustered_unit_vectors  # noqa: E402
from distill_scifact import build, start_spec  # noqa: E402

from embpress.vectors import build_codec  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--spec", default="dvq48")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-queries", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt", action="append", default=[], help="name=value set on the learned codec")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # the score-aware encoder
    x = clustered_unit_vectors(args.n, args.d, seed=args.seed)
    print(f"n={args.n} d={args.d} spec={args.spec} epochs={args.epochs} max_queries={args.max_queries} "
          f"threads={args.threads} opts={args.opt}; data peak RSS {peak_mib():.0f} MiB", flush=True)
    learned = build(args.spec, dict(o.split("=", 1) for o in args.opt), args.seed)
    learned.epochs, learned.max_queries = args.epochs, args.max_queries
    first = start_spec(learned)
    w, c = time.perf_counter(), time.process_time()
    start = build_codec(first, seed=args.seed).fit(x)
    print(f"FAISS {first} fit: {time.perf_counter() - w:.1f} s wall, {time.process_time() - c:.1f} s CPU; "
          f"peak RSS {peak_mib():.0f} MiB", flush=True)
    w, c = time.perf_counter(), time.process_time()
    learned.fit(x, init=start)
    print(f"{args.spec} distillation ({args.epochs} epochs over {min(args.max_queries, args.n)} pseudo-queries): "
          f"{time.perf_counter() - w:.1f} s wall, {time.process_time() - c:.1f} s CPU; peak RSS {peak_mib():.0f} MiB; "
          f"held-out recall@10 by epoch {np.round(learned.val_recall_history_, 4).tolist()}", flush=True)
    if hasattr(learned, "avq_recall_history_"):
        print(f"  score-aware k-means: held-out recall@10 by round {np.round(learned.avq_recall_history_, 4).tolist()}, "
              f"loss {np.round(learned.avq_loss_history_, 5).tolist()}, kept round {learned.avq_best_round_}")
    for name, codec in ((first, start), (args.spec, learned)):
        w = time.perf_counter()
        codec.encode(x)
        print(f"encode {args.n} vectors with {name}: {time.perf_counter() - w:.1f} s wall", flush=True)
    print(f"serving: {learned.code_bytes} B/vector codes ({learned.code_bytes * args.n / 2**20:.1f} MiB) + "
          f"{learned.centroids_.nbytes + getattr(learned, 'rotation_', np.zeros(0)).nbytes} B codebooks/rotation")


if __name__ == "__main__":
    main()
