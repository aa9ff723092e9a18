"""FDE encoding speed: embpress's vectorised encoder against fastembed's ``Muvera`` on the same token vectors.

Both use fastembed's random matrices (its dense ±1/sqrt(dproj) projection, no final projection), so the
query encodings are equal and the document encodings equal up to ties in the empty-partition fill; the
script checks that, then times both on the first ``--docs`` SciFact documents (MiniLM token states from the
embpress cache; encode them once with ``embpress vectors eval --beir ... --multivector ...``). One thread.

    python benchmarks/fde_speed.py --docs 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from embpress.vectors.beir import load_beir
from embpress.vectors.encode import encode_token_states
from embpress.vectors.multivector import FDEEncoder

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--r", type=int, default=20)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--dproj", type=int, default=8)
    args = ap.parse_args()
    from fastembed.postprocess.muvera import Muvera

    ds = load_beir(args.data)
    tok = encode_token_states(ds.corpus_texts, num_threads=1, progress=False)
    n = min(args.docs, tok.offsets.shape[0] - 1)
    clouds = [np.asarray(tok.vectors[tok.offsets[i]:tok.offsets[i + 1]], dtype=np.float32) for i in range(n)]
    d = clouds[0].shape[1]
    fe = Muvera(d, k_sim=args.k, dim_proj=args.dproj, r_reps=args.r, random_seed=0)
    enc = FDEEncoder(repetitions=args.r, simhash_bits=args.k, dproj=args.dproj, projection="dense").fit(d)
    enc.simhash_ = np.stack([s.simhash_vectors for s in fe.simhash_projections]).astype(np.float32)
    enc.projection_ = (fe.dim_reduction_projections / np.sqrt(args.dproj)).astype(np.float32)
    with threadpool_limits(1):
        t, c0 = time.perf_counter(), time.process_time()
        theirs = np.stack([fe.process_document(c) for c in clouds])
        t_fe, c_fe = time.perf_counter() - t, time.process_time() - c0
        t, c0 = time.perf_counter(), time.process_time()
        ours = enc.encode_documents(clouds)
        t_ours, c_ours = time.perf_counter() - t, time.process_time() - c0
        q_theirs = np.stack([fe.process_query(c) for c in clouds[:50]])
        q_ours = enc.encode_queries(clouds[:50])
    p = np.arange(2**args.k)
    code = p ^ (p >> 1)
    fid = np.array([sum(((c >> (args.k - 1 - j)) & 1) << j for j in range(args.k)) for c in code])

    def layout(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), args.r, 2**args.k, args.dproj)[:, :, fid].reshape(len(x), -1)

    tokens = sum(len(c) for c in clouds)
    print(f"{n} SciFact documents, {tokens:,} MiniLM token vectors, R={args.r} k={args.k} dproj={args.dproj}")
    print(f"fastembed Muvera.process_document: {t_fe:.2f} s wall, {c_fe:.2f} s CPU ({n / c_fe:,.0f} docs/s CPU)")
    print(f"embpress FDEEncoder.encode_documents: {t_ours:.2f} s wall, {c_ours:.2f} s CPU ({n / c_ours:,.0f} docs/s "
          f"CPU), {c_fe / c_ours:.1f}x less CPU, {t_fe / t_ours:.1f}x less wall")
    print(f"queries (same clouds): max |ours - fastembed| = {np.abs(q_ours - layout(q_theirs)).max():.2e}")
    diff = np.abs(ours - layout(theirs)).reshape(n, args.r, 2**args.k, args.dproj).max(axis=3)
    print(f"documents: {(diff > 1e-4).mean():.2%} of partitions differ (empty partitions filled from a tied point)")
    print("one thread, wall clock, on a shared machine: noisy")


if __name__ == "__main__":
    main()
