"""Scan cost of learned PQ codes (``dopq``) against FAISS OPQ's codes, same kernel, timed in alternation.

SciFact all-MiniLM-L6-v2 corpus and test queries (from the embedding cache of
``benchmarks/distill_scifact.py``); the FAISS ``opqM`` start is read from ``--starts`` when there.
The learned codec is trained briefly (scan cost does not depend on how well it learned). Each
round scans the 300 queries over the 5,183 codes with embpress's ``search_lists`` (the compiled
lookup-table kernel) and with FAISS ``IndexPQ`` holding the same centroids (queries rotated first),
for both codecs, alternating; queries/s = nq / process CPU seconds, best of the rounds.

    python benchmarks/distill_scan_cost.py --m 48 --starts /tmp/starts
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
from distill_scifact import DATA, load  # noqa: E402

from embpress.vectors import build_codec, codec_from_state  # noqa: E402


def faiss_pq(codec, xb: np.ndarray) -> faiss.IndexPQ:
    """FAISS IndexPQ over the codec's codes (the same centroids; vectors rotated by the codec's rotation)."""
    d, m = xb.shape[1], codec.centroids_.shape[0]
    index = faiss.IndexPQ(d, m, 8, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(codec.centroids_.ravel(), index.pq.centroids)
    index.is_trained = True
    index.add(np.ascontiguousarray(xb @ codec.rotation_.T))
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--m", type=int, default=48)
    ap.add_argument("--starts", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
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
    learned = build_codec(f"dopq{args.m}")
    learned.epochs, learned.max_queries = 1, 1000
    learned.fit(xb, init=opq)
    runs = {}
    for name, codec in (("opq", opq), ("dopq", learned)):
        codes = codec.encode(xb)
        index = faiss_pq(codec, xb)
        assert np.array_equal(faiss.vector_to_array(index.codes).reshape(len(xb), -1), codes)
        qr = np.ascontiguousarray(xq @ codec.rotation_.T)
        codec.search_lists(xq, codes, 10, "ip")  # compile / warm
        runs[f"embpress {name}{args.m}"] = lambda c=codec, k=codes: c.search_lists(xq, k, 10, "ip")
        runs[f"FAISS IndexPQ, {name}{args.m} codes"] = lambda i=index, q=qr: i.search(q, 10)
    best = {k: np.inf for k in runs}
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
