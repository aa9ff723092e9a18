"""Learned IVF (Distill-VQ's coarse centroids) against FAISS IVF-PQ at equal bytes on SciFact.

all-MiniLM-L6-v2 SciFact corpus and test queries (the embedding cache of ``distill_scifact.py``).
Three IVF indexes over the same PQ codes size (``pq{M}`` on residuals, M bytes plus an 8-byte id per
vector, ``nlist`` lists): FAISS ``IndexIVFPQ`` (``IVF{nlist},PQ{M}``, inner product), embpress's
``Index("ivf{nlist},pq{M}")`` (FAISS k-means), and the same with its coarse centroids distilled
(``coarse_epochs``; the corpus vectors are the pseudo-queries, no labels). For each nprobe: recall@10
of the codes (no re-ranking) against the exact float top-10, and the share of the float top-10 that
lies in the probed lists (the ceiling of that recall).

``--learned dopq32a4`` adds both IVFs over a learned codec's score-aware codes: those encode the
whole vector, not the residual (``residual_ok`` is False), so one fitted codec (started from
``--starts``' FAISS OPQ when there) serves both sets of centroids unchanged: learned IVF and learned
PQ together.

    python benchmarks/distill_ivf_scifact.py --nlist 64 --m 32 --coarse-epochs 5
    python benchmarks/distill_ivf_scifact.py --nlist 64 --m 32 --coarse-epochs 5 --learned dopq32a4 --starts DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import faiss
import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_scifact import DATA, build, load, start_spec  # noqa: E402

from embpress.vectors import Index, codec_from_state  # noqa: E402
from embpress.vectors.evaluate import exact_knn, recall_at_k  # noqa: E402


def probed_share(centroids: np.ndarray, lists: np.ndarray, xq: np.ndarray, gt: np.ndarray, nprobe: int) -> float:
    """Share of the float top-10 whose list is among the query's ``nprobe`` best centroids (inner product)."""
    probes = np.argsort(-(xq @ centroids.T), axis=1)[:, :nprobe]
    return float((lists[gt][:, :, None] == probes[:, None, :]).any(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--nlist", type=int, default=64)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--coarse-epochs", type=int, default=5)
    ap.add_argument("--nprobes", default="1,2,4,8,16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--learned", default=None, help="a score-aware learned codec spec, e.g. dopq32a4")
    ap.add_argument("--opt", action="append", default=[], help="name=value set on the learned codec")
    ap.add_argument("--starts", type=Path, default=None, help="folder of fitted FAISS starts (distill_scifact.py)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # the score-aware encoder
    d = load(args.data, args.threads)
    xb, xq = d["xb"], d["xq"]
    gt = exact_knn(xb, xq, 10, "ip").ids
    nprobes = [int(v) for v in args.nprobes.split(",")]
    print(f"scifact: N={len(xb)} test queries={len(xq)} nlist={args.nlist} pq{args.m} "
          f"({args.m} B code + 8 B id per vector) coarse_epochs={args.coarse_epochs} seed={args.seed}", flush=True)

    fidx = faiss.index_factory(xb.shape[1], f"IVF{args.nlist},PQ{args.m}", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    fidx.train(xb)
    fidx.add(xb)
    f_s = time.perf_counter() - t0
    fcent = faiss.downcast_index(fidx.quantizer).reconstruct_n(0, args.nlist)
    flists = faiss.downcast_index(fidx.quantizer).search(xb, 1)[1][:, 0]

    variants = [(f"pq{args.m}", None)]
    if args.learned:
        learned = build(args.learned, dict(o.split("=", 1) for o in args.opt), args.seed)
        if learned.residual_ok:
            raise SystemExit(f"--learned {args.learned}: give a score-aware spec (e.g. dopq{args.m}a4)")
        first = args.starts / f"{start_spec(learned)}-seed{args.seed}.npz" if args.starts else None
        init = None
        if first is not None and first.is_file():
            with np.load(first) as f:
                init = codec_from_state({k: f[k] for k in f.files})
        t0 = time.perf_counter()
        learned.fit(xb, init=init)
        print(f"  fitted {args.learned} in {time.perf_counter() - t0:.1f} s (whole-vector codes: the same for "
              "every set of centroids)", flush=True)
        learned.fit = lambda x, _c=learned: _c  # fitted once above; the IVF's fit must not train it again
        variants.append((args.learned, learned))
    rows = []
    for name, codec in variants:
        for label, epochs in (("k-means", 0), ("distilled", args.coarse_epochs)):
            t0 = time.perf_counter()
            spec = f"ivf{args.nlist},{name}" if codec is None else codec
            idx = Index(spec, metric="ip", nlist=None if codec is None else args.nlist, seed=args.seed,
                        coarse_epochs=epochs).fit(xb)
            idx.add(xb)
            label = f"{label} + {name}"
            rows.append((label, idx, time.perf_counter() - t0))
        hist = getattr(idx, "coarse_history_", None)
        if hist is not None:
            print(f"  {label}: held-out share history {' '.join(f'{v:.3f}' for v in hist.val_history)} "
                  f"(kept epoch {hist.best_epoch})", flush=True)

    print(f"{'index':>26} {'fit s':>6} " + " ".join(f"{'np' + str(p) + ' rec/share':>17}" for p in nprobes))
    cells = []
    for p in nprobes:
        fidx.nprobe = p
        ids = fidx.search(xq, 10)[1]
        cells.append(f"{recall_at_k(ids, gt, 10):.4f}/{probed_share(fcent, flists, xq, gt, p):.4f}")
    print(f"{'faiss IVFPQ':>26} {f_s:>6.1f} " + " ".join(f"{c:>17}" for c in cells), flush=True)
    for label, idx, fit_s in rows:
        lists = idx._assign(xb)
        cells = []
        for p in nprobes:
            ids = idx.search(xq, 10, nprobe=p).ids
            cells.append(f"{recall_at_k(ids, gt, 10):.4f}/{probed_share(idx.centroids_, lists, xq, gt, p):.4f}")
        print(f"{label:>26} {fit_s:>6.1f} " + " ".join(f"{c:>17}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
