"""Retrieval at corpus scale: recall@10 against queries/s over nprobe, embpress IVF beside FAISS, one run.

Data (``--data``): N x D synthetic unit vectors, written to ``<out>/base.npy``, queries drawn from the
same distribution, ground truth from FAISS's exact inner-product search. ``clusters``: a rank-96
latent with a power-law spectrum and 4096 clusters, mapped to D dims, plus isotropic noise (hard
for PQ: the noise is full-rank). ``faiss``: ``faiss.contrib.datasets.SyntheticDataset``'s recipe
(10-dim Gaussian, linear map, ``sin``), normalised. Every
configuration runs in its own process (clean peak RSS), one after another:

- embpress ``Index`` built from the file with ``build_index`` (streaming), searched at each nprobe
  with and without re-ranking from the float32 originals on disk;
- FAISS ``IVF{n},PQ{M}`` + ``IndexRefineFlat`` (re-ranking from float32 in RAM), FAISS ``HNSW32``,
  FAISS ``Flat`` (the exact float32 scan every speed-up is measured against).

    python benchmarks/vectors_scale.py --out /tmp/scale --n 1000000 --threads 1

Writes ``<out>/results.jsonl`` (one record per configuration and search setting) and
``<out>/scale.png`` (recall@10 against queries/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_unit_vectors(n: int, d: int, *, seed: int, rank: int = 96, n_clusters: int = 4096,
                           alpha: float = 0.7, chunk: int = 50_000):
    """Yield (b, d) float32 unit vectors: cluster centre + noise in a rank-``rank`` latent with power-law
    spectrum ``i^-alpha``, mapped to d dims by a fixed random matrix, plus a little isotropic noise."""
    rng = np.random.default_rng(1234)  # the map and the centres are the data set's, not the seed's
    spectrum = (np.arange(1, rank + 1) ** -alpha).astype(np.float32)
    mapping = rng.standard_normal((rank, d)).astype(np.float32) / np.sqrt(rank)
    centres = rng.standard_normal((n_clusters, rank)).astype(np.float32) * spectrum
    gen = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        z = centres[gen.integers(0, n_clusters, b)] + 0.5 * gen.standard_normal((b, rank)).astype(np.float32) * spectrum
        x = z @ mapping + 0.02 * gen.standard_normal((b, d)).astype(np.float32)
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def faiss_style_unit_vectors(n: int, d: int, *, seed: int, chunk: int = 50_000):
    """Yield (b, d) float32 unit vectors by ``faiss.contrib.datasets.SyntheticDataset``'s recipe: a 10-dim
    Gaussian mapped linearly to d dims, scaled per dimension and bent by ``sin`` (low intrinsic
    dimension, non-linear); rows L2-normalised for inner-product search."""
    rs = np.random.RandomState(1338)  # the map is the data set's; the rows come from ``seed``
    mapping = rs.rand(10, d)
    scale = rs.rand(d) * 4 + 0.1
    gen = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        x = np.sin((gen.standard_normal((b, 10)) @ mapping) * scale).astype(np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


GENERATORS = {"clusters": synthetic_unit_vectors, "faiss": faiss_style_unit_vectors}


def make_data(out: Path, n: int, d: int, nq: int, kind: str = "clusters") -> None:
    base, queries, gt = out / "base.npy", out / "queries.npy", out / "gt.npy"
    if gt.exists():
        return
    import faiss

    print(f"writing {n:,} x {d} to {base}", flush=True)
    arr = np.lib.format.open_memmap(str(base) + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, d))
    s = 0
    gen = GENERATORS[kind]
    for block in gen(n, d, seed=0):
        arr[s:s + len(block)] = block
        s += len(block)
    arr.flush()
    del arr
    os.replace(str(base) + ".tmp.npy", base)
    q = next(gen(nq, d, seed=1))
    np.save(queries, q)
    x = np.load(base, mmap_mode="r")
    flat = faiss.IndexFlatIP(d)
    for s in range(0, n, 200_000):
        flat.add(np.ascontiguousarray(x[s:s + 200_000]))
    _, ids = flat.search(q, 100)
    np.save(gt, ids)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def recall(ids: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, gt, strict=True)]))


def timed(fn, q: np.ndarray, min_time: float = 1.0):
    fn(q[:10])
    reps, t0 = 0, time.perf_counter()
    while True:
        res = fn(q)
        reps += 1
        el = time.perf_counter() - t0
        if el >= min_time:
            return res, reps * len(q) / el


def run_embpress(args, spec: str, nprobes: list[int], oversample: int) -> list[dict]:
    from embpress.vectors.build import build_index
    from embpress.vectors.kernels import limit_threads

    out = Path(args.out)
    q, gt = np.load(out / "queries.npy"), np.load(out / "gt.npy")
    folder = out / "index" / spec.replace(",", "_")
    recs = []
    with limit_threads(args.threads):
        # fit alone first, so the streaming add's peak can be read apart from the training sample
        from embpress.vectors.build import sample_file_rows
        from embpress.vectors.index import Index

        rss0 = hwm_mb()
        idx = Index(spec, metric="ip", seed=0, rerank_path=out / "index" / f".{folder.name}.orig.f32")
        t = time.perf_counter()
        idx.fit(sample_file_rows(out / "base.npy", args.train_size, seed=0))
        fit_s = time.perf_counter() - t
        can_reset = reset_hwm()
        before_add = hwm_mb()
        added = idx.add_file(out / "base.npy", progress=False)
        idx._consolidate()
        add_peak = hwm_mb()
        codes_mb = (idx._codes.nbytes + (idx._ids.nbytes if idx._ids is not None else 0)) / 2**20
        block_mb = idx.block_size * idx.d * 4 / 2**20
        quant_mb = (idx.centroids_.nbytes if idx.centroids_ is not None else 0) / 2**20
        idx.save(folder)
        os.unlink(out / "index" / f".{folder.name}.orig.f32")
        del idx
        _ = build_index  # the CLI's path; the benchmark splits it to read the add's peak apart
        idx = Index.load(folder, mmap=False)
        for nprobe in nprobes if idx.is_ivf else [None]:
            for ov in (1, oversample):
                res, qps = timed(lambda b, nprobe=nprobe, ov=ov: idx.search(b, 10, nprobe=nprobe, oversample=ov), q)
                recs.append({"system": "embpress", "spec": spec, "nprobe": nprobe, "oversample": ov,
                             "recall_at_10": recall(res.ids, gt), "qps": qps, "threads": args.threads,
                             "bytes_per_vector": idx.bytes_per_vector(), "fixed_bytes": idx.fixed_bytes(),
                             "disk_bytes_per_vector": idx.disk_bytes_per_vector() if ov > 1 else 0})
    for r in recs:
        r.update(fit_s=fit_s, add_s=added["seconds"], encode_vectors_per_s=added["vectors_per_s"],
                 add_peak_rss_mb=add_peak, rss_before_add_mb=before_add, rss_start_mb=rss0,
                 hwm_reset=can_reset, codes_mb=codes_mb, block_mb=block_mb, quantizer_mb=quant_mb,
                 peak_rss_mb=peak_rss_mb())
    return recs


def run_faiss(args, key: str, params: list[int], oversample: int) -> list[dict]:
    import faiss

    out = Path(args.out)
    q, gt = np.load(out / "queries.npy"), np.load(out / "gt.npy")
    x = np.load(out / "base.npy", mmap_mode="r")
    faiss.omp_set_num_threads(args.threads)
    d = x.shape[1]
    rng = np.random.default_rng(0)
    train = np.ascontiguousarray(x[np.sort(rng.choice(x.shape[0], args.train_size, replace=False))])
    index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    index.train(train)
    refine = None
    if key.startswith("IVF"):
        refine = faiss.IndexRefineFlat(index)
        target = refine
    else:
        target = index
    for s in range(0, x.shape[0], 100_000):
        target.add(np.ascontiguousarray(x[s:s + 100_000]))
    build_s = time.perf_counter() - t
    recs = []
    per_vec = 4 * d  # Flat
    if key.startswith("IVF"):
        per_vec = index.sa_code_size() + 8  # code + int64 id in the inverted list
    elif key.startswith("HNSW"):
        per_vec = 4 * d + index.hnsw.nb_neighbors(0) * 4  # float32 vector + level-0 links (2M int32s)
    for p in params:
        for ov in ((1, oversample) if refine is not None else (1,)):
            if key.startswith("IVF"):
                faiss.extract_index_ivf(index).nprobe = p
                sp = faiss.IndexRefineSearchParameters(k_factor=float(ov)) if ov > 1 else None
                fn = (lambda b, sp=sp: refine.search(b, 10, params=sp)) if ov > 1 else (lambda b: index.search(b, 10))
            elif key.startswith("HNSW"):
                index.hnsw.efSearch = p
                fn = lambda b: index.search(b, 10)  # noqa: E731
            else:
                fn = lambda b: index.search(b, 10)  # noqa: E731
            (_, ids), qps = timed(fn, q)
            recs.append({"system": "faiss", "spec": key, "nprobe": p, "oversample": ov, "recall_at_10": recall(ids, gt),
                         "qps": qps, "threads": args.threads, "bytes_per_vector": per_vec + (4 * d if ov > 1 else 0),
                         "build_s": build_s, "peak_rss_mb": peak_rss_mb()})
    return recs


def worker(args) -> None:
    conf = json.loads(args.worker)
    if conf["system"] == "embpress":
        recs = run_embpress(args, conf["spec"], conf["params"], conf["oversample"])
    else:
        recs = run_faiss(args, conf["spec"], conf["params"], conf["oversample"])
    with open(Path(args.out) / "results.jsonl", "a") as fh:
        for r in recs:
            r["n"] = args.n
            fh.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(out / "results.jsonl")]
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list] = {}
    for r in recs:
        groups.setdefault((r["system"], r["spec"], r["oversample"], r["threads"]), []).append(r)
    for (system, spec, ov, th), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["qps"])
        label = f"{system} {spec}{' +rerank x' + str(ov) if ov > 1 else ''} ({th}t)"
        ax.plot([r["recall_at_10"] for r in rs], [r["qps"] for r in rs], marker="o" if system == "embpress" else "s",
                linestyle="-" if system == "embpress" else "--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries/s")
    ax.set_title(f"{recs[0]['n']:,} vectors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--data", choices=sorted(GENERATORS), default="clusters",
                    help="clusters: power-law spectrum, 4096 clusters, isotropic noise (hard for PQ); "
                         "faiss: SyntheticDataset's low-dimensional non-linear recipe")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--train-size", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--oversample", type=int, default=10)
    ap.add_argument("--specs", default="ivf{nlist},pq32;ivf{nlist},pq48;ivf{nlist},sq8")
    ap.add_argument("--faiss", default="IVF{nlist},PQ32;IVF{nlist},PQ48;Flat;HNSW32")
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64")
    ap.add_argument("--ef", default="16,32,64,128")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    make_data(args.out, args.n, args.d, args.nq, args.data)
    nprobes = [int(p) for p in args.nprobes.split(",")]
    confs = [{"system": "embpress", "spec": s.format(nlist=args.nlist), "params": nprobes,
              "oversample": args.oversample} for s in args.specs.split(";") if s]
    for key in (k.format(nlist=args.nlist) for k in args.faiss.split(";") if k):
        params = [int(e) for e in args.ef.split(",")] if key.startswith("HNSW") else nprobes if key.startswith("IVF") else [0]
        confs.append({"system": "faiss", "spec": key, "params": params, "oversample": args.oversample})
    for conf in confs:
        cmd = [sys.executable, __file__, "--out", str(args.out), "--n", str(args.n), "--d", str(args.d),
               "--train-size", str(args.train_size), "--threads", str(args.threads), "--worker", json.dumps(conf)]
        print("$", conf, flush=True)
        rc = subprocess.call(cmd)
        if rc:
            print(f"configuration {conf} failed (exit {rc})", flush=True)
    plot(args.out)


if __name__ == "__main__":
    main()
