"""Learned PQ/OPQ (``dvq``/``dopq``, Distill-VQ / JPQ) against FAISS PQ/OPQ at equal bytes on SciFact.

all-MiniLM-L6-v2 vectors of the SciFact corpus (5,183 documents) and its 300 test queries, from the
embedding cache of ``embpress vectors eval --beir`` (encoded once there); the 809 training queries
are encoded here once (cached the same way). Every codec is fitted on the corpus, then the test
queries are searched in the codes with the codec's own scan (no re-ranking): recall@10 against the
exact float top-10 and nDCG@10 against the test qrels; scan q/s is 300 queries over the codes by the
codec's ``search_lists`` (the same lookup-table kernel for pq, opq, dvq and dopq), nq / process CPU
seconds, best of 5, on a shared machine (noisy).

Training modes (``--queries``): ``none`` (pseudo-queries from the corpus vectors, no labels),
``sentences`` (one sentence drawn from each document's text, encoded: ICT-style pseudo-queries, no
labels; see :func:`corpus_sentences`), ``train``
(the training queries' float scores distilled, no labels), ``labels`` (the training queries with
the train qrels; the learned codecs take ``loss`` from their spec options).

    python benchmarks/distill_scifact.py --specs opq48,dopq48 --queries none
    python benchmarks/distill_scifact.py --specs opq32,dopq32a4 --queries none   # score-aware codes, eta 4
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import faiss
import numba
import numpy as np
import torch

from embpress.vectors import build_codec, codec_from_state
from embpress.vectors.beir import load_beir
from embpress.vectors.encode import default_model_path, encode_texts
from embpress.vectors.evaluate import beir_metrics, exact_knn, recall_at_k

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def corpus_sentences(texts: list[str], seed: int) -> list[str]:
    """One sentence drawn from each document (6 to 60 words when it has one): label-free pseudo-queries
    in the manner of the Inverse Cloze Task (Lee et al., ACL 2019, arXiv 1906.00300), short like queries."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        sents = [s for s in _SENTENCE_END.split(text) if s.strip()]
        good = [s for s in sents if 6 <= len(s.split()) <= 60] or sents or [text]
        out.append(good[int(rng.integers(len(good)))])
    return out


def load(data: Path, threads: int) -> dict:
    """Corpus, test and train query vectors (cached), the qrels and the train pairs (query row, doc row)."""
    test = load_beir(data, split="test")
    train = load_beir(data, split="train")
    model = default_model_path()
    xb = encode_texts(test.corpus_texts, model=model, num_threads=threads, progress=False)
    xq = encode_texts(test.query_texts, model=model, num_threads=threads, progress=False)
    xt = encode_texts(train.query_texts, model=model, num_threads=threads, progress=False)
    row = {d: i for i, d in enumerate(test.corpus_ids)}
    pairs = np.array([(qi, row[d]) for qi, q in enumerate(train.query_ids) for d in train.qrels[q]], np.int64)
    overlap = set(test.query_ids) & set(train.query_ids)
    return {"xb": xb, "xq": xq, "xt": xt, "pairs": pairs, "test": test, "overlap": len(overlap), "model": model}


def build(spec: str, opts: dict, seed: int):
    """A codec from its spec; ``opts`` (name=value) go to the learned codecs only."""
    codec = build_codec(spec, seed=seed)
    if spec.startswith(("dvq", "dopq")):
        for k, v in opts.items():
            if not hasattr(codec, k):
                raise SystemExit(f"--opt {k}: {type(codec).__name__} has no such parameter")
            cur = getattr(codec, k)
            if isinstance(cur, bool):
                val = v.lower() in ("1", "true", "yes")
            elif cur is None:  # an optional number (rotation_lr)
                val = None if v.lower() == "none" else float(v)
            else:
                val = type(cur)(v)
            setattr(codec, k, val)
    return codec


def start_spec(codec) -> str:
    """The FAISS codec a learned one starts from: ``dopq32a4`` -> ``opq32``, ``dvq16x4`` -> ``pq16x4``."""
    kind = "opq" if hasattr(codec, "niter") else "pq"
    return f"{kind}{codec.m}" + ("" if codec.nbits == 8 else f"x{codec.nbits}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--specs", default="pq32,opq32,dopq32,pq48,opq48,dopq48,pq96,opq96,dopq96")
    ap.add_argument("--queries", choices=("none", "sentences", "train", "labels"), default="none")
    ap.add_argument("--opt", action="append", default=[], help="name=value set on the learned codecs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--starts", type=Path, default=None,
                    help="folder keeping the fitted FAISS pq/opq states: the baselines are fitted once and "
                         "each learned codec starts from the same one (dvqM from pqM, dopqM from opqM)")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found: SciFact lives in ../shared/data/scifact (see its README)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # training progress per epoch
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # the score-aware encoder
    opts = dict(o.split("=", 1) for o in args.opt)
    d = load(args.data, args.threads)
    xb, xq, test = d["xb"], d["xq"], d["test"]
    train_q = {"none": None, "train": d["xt"], "labels": d["xt"]}.get(args.queries)
    if args.queries == "sentences":  # one corpus sentence per document, encoded (and cached) once
        train_q = encode_texts(corpus_sentences(test.corpus_texts, args.seed), model=d["model"],
                               num_threads=args.threads, progress=False)
    gt = exact_knn(xb, xq, 10, "ip").ids
    print(f"scifact: N={len(xb)} d={xb.shape[1]} test queries={len(xq)} train queries={len(d['xt'])} "
          f"train pairs={len(d['pairs'])} (test/train query overlap {d['overlap']}); queries={args.queries} "
          f"opts={opts} seed={args.seed} threads={args.threads}", flush=True)
    print(f"{'spec':>10} {'bytes':>5} {'recall@10':>9} {'nDCG@10':>8} {'train s':>7} {'scan q/s':>8} {'best ep':>7}  val recall history")
    starts: dict[str, object] = {}

    def start(spec: str):
        """The fitted FAISS pq/opq ``spec``, fitted once (and kept in --starts when given)."""
        if spec not in starts:
            path = args.starts / f"{spec}-seed{args.seed}.npz" if args.starts else None
            if path is not None and path.is_file():
                with np.load(path) as f:
                    starts[spec] = codec_from_state({k: f[k] for k in f.files})
            else:
                t0 = time.perf_counter()
                starts[spec] = build_codec(spec, seed=args.seed).fit(xb)
                print(f"  (fitted {spec} in {time.perf_counter() - t0:.1f} s)", flush=True)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(path, **starts[spec].get_state())
        return starts[spec]

    for spec in args.specs.split(","):
        codec = build(spec, opts, args.seed)
        learned = spec.startswith(("dvq", "dopq"))
        if not learned and spec.startswith(("pq", "opq")):
            codec, fit_s = start(spec), float("nan")
        else:
            init = start(start_spec(codec)) if learned else None
            t = time.perf_counter()
            if learned:
                codec.fit(xb, queries=train_q,
                          positives=d["pairs"] if args.queries == "labels" else None, init=init)
            else:
                codec.fit(xb)
            fit_s = time.perf_counter() - t
        codes = codec.encode(xb)
        res = codec.search_lists(xq, codes, 10, "ip")
        cpu = []
        for _ in range(5):  # the scan alone, nq / process CPU seconds, best of 5
            c0 = time.process_time()
            codec.search_lists(xq, codes, 10, "ip")
            cpu.append(time.process_time() - c0)
        qps = len(xq) / max(min(cpu), 1e-9)
        rec = recall_at_k(res.ids, gt, 10)
        ndcg = beir_metrics(res.ids, res.distances, test.query_ids, test.corpus_ids, test.qrels,
                            ("ndcg@10",), backend="numpy")["ndcg@10"]
        hist = " ".join(f"{v:.3f}" for v in getattr(codec, "val_recall_history_", []))
        if hasattr(codec, "avq_recall_history_"):  # score-aware k-means rounds, before the epochs
            hist = (f"avq {' '.join(f'{v:.3f}' for v in codec.avq_recall_history_)} "
                    f"(kept {codec.avq_best_round_}) | {hist}")
        best = getattr(codec, "best_epoch_", "-")
        print(f"{spec:>10} {codec.code_bytes:>5} {rec:>9.4f} {ndcg:>8.4f} {fit_s:>7.1f} {qps:>8.0f} {best!s:>7}  {hist}",
              flush=True)


if __name__ == "__main__":
    main()
