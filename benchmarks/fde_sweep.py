"""FDE settings on SciFact: how many FDE candidates carry the exact-Chamfer top-10 (MiniLM token states).

Exact Chamfer top-10 over all documents is computed once (cached in ``--out``); then, per FDE spec (float32
FDEs, exact inner product), the share of that top-10 found among the best c FDE candidates, c in
``--candidates``, and the nDCG@10 after Chamfer re-ranking of the c candidates; with ``--codecs``, the
same through each codec's FDE codes (an ``Index``). One thread.

    python benchmarks/fde_sweep.py --out /tmp/fde-sweep --specs "fde:R=20,k=5,dproj=8;fde:R=20,k=5,dproj=32"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from embpress.vectors.beir import load_beir
from embpress.vectors.encode import encode_token_states
from embpress.vectors.evaluate import beir_metrics, exact_knn
from embpress.vectors.index import Index
from embpress.vectors.multivector import chamfer_search, parse_fde_spec, rerank_chamfer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--specs", default="fde:R=20,k=5,dproj=8")
    ap.add_argument("--candidates", default="10,20,50,100,200")
    ap.add_argument("--codecs", default="", help="FDE codecs, e.g. 'sq8,pq1280' (default: float32 only)")
    args = ap.parse_args()
    ds = load_beir(args.data)
    dtok = encode_token_states(ds.corpus_texts, num_threads=1, progress=False)
    qtok = encode_token_states(ds.query_texts, num_threads=1, progress=False)
    cands = [int(c) for c in args.candidates.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    exact_path = args.out / "chamfer_top10.npy"
    with threadpool_limits(1):
        if exact_path.is_file():
            exact = np.load(exact_path)
        else:
            t = time.perf_counter()
            exact = chamfer_search(qtok, dtok, 10).ids
            print(f"exact Chamfer: {time.perf_counter() - t:.0f} s", flush=True)
            np.save(exact_path, exact)
        rows = []
        for spec in args.specs.split(";"):
            enc = parse_fde_spec(spec).fit(dtok.vectors.shape[1])
            t = time.perf_counter()
            docs = enc.encode_documents(dtok).astype(np.float32)
            enc_s = time.perf_counter() - t
            queries = enc.encode_queries(qtok).astype(np.float32)
            for codec in ["float32", *filter(None, args.codecs.split(","))]:
                if codec == "float32":
                    res, nbytes = exact_knn(docs, queries, max(cands), "ip"), 4 * docs.shape[1]
                else:
                    t = time.perf_counter()
                    index = Index(codec, metric="ip").fit(docs)
                    index.add(docs)
                    print(f"{spec} {codec}: fit+add {time.perf_counter() - t:.0f} s", flush=True)
                    res, nbytes = index.search(queries, max(cands)), index.bytes_per_vector()
                rows += _rows(spec, codec, nbytes, enc.output_dim, res.ids, exact, cands, qtok, dtok, ds,
                              len(ds.corpus_ids) / enc_s)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))


def _rows(spec, codec, nbytes, dim, ids, exact, cands, qtok, dtok, ds, docs_per_s) -> list[dict]:
    rows = []
    for c in cands:
        hit = float(np.mean([np.isin(exact[i], ids[i, :c]).mean() for i in range(len(exact))]))
        rr = rerank_chamfer(qtok, dtok, ids[:, :c], 10)
        ndcg = beir_metrics(rr.ids, rr.distances, ds.query_ids, ds.corpus_ids, ds.qrels, ("ndcg@10",),
                            backend="numpy")["ndcg@10"]
        row = {"spec": spec, "codec": codec, "bytes_per_doc": nbytes, "fde_dim": dim, "candidates": c,
               "cand_recall_chamfer_top10": hit, "ndcg@10_reranked": ndcg, "encode_docs_per_s": round(docs_per_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
