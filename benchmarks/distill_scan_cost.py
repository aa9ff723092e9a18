"""Scan cost of learned PQ codes (``dopq``) against FAISS OPQ's codes, same kernel, timed in alternation.

SciFact all-MiniLM-L6-v2 corpus and test queries (from the embedding cache of
``benchmarks/distill_scifact.py``); the FAISS ``opqM`` start is read from ``--starts`` when there.
The learned codec is trained briefly (scan cost does not depend on how well it learned). Each
round scans the 300 queries over the 5,183 codes with embpress's ``search_lists`` (the compiled
lookup-table kernel) and with FAISS ``IndexPQ`` holding the same centroids and codes (queries rotated first),
for both codecs, alternating; queries/s = nq / process CPU seconds, best of the rounds.

    python benchmarks/distill_scan_cost.py --m 48 --starts /tmp/starts
    python benchmarks/distill_scan_cost.py --m 32 --opt anisotropic_eta=4   # score-aware codes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_scifact import DATA, build, load  # noqa: E402

from embpress.vectors import build_codec, codec_from_state  # noqa: E402
from embpress.vectors.kernels import limit_threads  # noqa: E402


def faiss_pq(codec, codes: np.ndarray) -> faiss.IndexPQ:
    """FAISS IndexPQ holding the codec's centroids and its codes byte for byte (score-aware codes are
    not FAISS's nearest ones, so they are copied in rather than recomputed by ``add``)."""
    d, m = codec.rotation_.shape[0], codec.centroids_.shape[0]
    index = faiss.IndexPQ(d, m, 8, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(codec.centroids_.ravel(), index.pq.centroids)
    index.is_trained = True
    faiss.copy_array_to_vector(np.ascontiguousarray(codes).ravel(), index.codes)
    index.ntotal = len(codes)
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--m", type=int, default=48)
    ap.add_argument("--starts", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--opt", action="append", default=[], help="name=value set on the learned codec")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    d = load(args.data, args.threads)
    xb, xq = d["xb"], d["xq"]
    path = args.starts / f"opq{args.m}-seed0.npz" if args.starts else None
    if path is not None and path.is_file():
        with np.load(path) as f:
            opq = codec_from_state({k: f[k] for k in f.files})
    else:
        opq = build_codec(f"opq{args.m}").fit(xb)
    learned = build(f"dopq{args.m}", dict(o.split("=", 1) for o in args.opt), 0)
    learned.epochs, learned.max_queries = 1, 1000
    learned.fit(xb, init=opq)
    runs = {}
    for name, codec in (("opq", opq), ("dopq", learned)):
        codes = codec.encode(xb)
        index = faiss_pq(codec, codes)
        qr = np.ascontiguousarray(xq @ codec.rotation_.T)
        mine, (_, theirs) = codec.search_lists(xq, codes, 10, "ip"), index.search(qr, 10)  # also compiles / warms
        agree = float(np.mean(mine.ids == theirs))
        print(f"{name}{args.m}: FAISS IndexPQ over the same codes returns the same top-10 ids at {agree:.4f} of ranks "
              f"(ties in float order aside)", flush=True)
        runs[f"embpress {name}{args.m}"] = lambda c=codec, k=codes: c.search_lists(xq, k, 10, "ip")
        runs[f"FAISS IndexPQ, {name}{args.m} codes"] = lambda i=index, q=qr: i.search(q, 10)
    best = {k: np.inf for k in runs}
    with limit_threads(args.threads):  # the compiled kernel's threads too, not only FAISS's and torch's
        for _ in range(args.rounds):
            for k, fn in runs.items():
                c0 = time.process_time()
                fn()
                best[k] = min(best[k], time.process_time() - c0)
    print(f"scan of {len(xq)} queries over {len(xb)} codes of {args.m} bytes, {args.threads} thread(s), "
          f"best of {args.rounds} alternating rounds (shared machine: noisy)")
    for k, v in best.items():
        print(f"  {k:>32}: {len(xq) / v:>9,.0f} queries/s")


if __name__ == "__main__":
    main()
