"""Inter-feature tables (hash, dhash, robe, adapt, dhe) at high compression on a mid-size synthetic CTR set.

Prints test AUC, serving bytes and (for dhe) decoder multiply-adds per lookup, one line per trial:

    python benchmarks/inter_feature_ratios.py --ratios 10 100 --methods noid hash dhash robe adapt dhe
"""

from __future__ import annotations

import argparse
import time

import torch

from embpress.data import SyntheticConfig, make_synthetic
from embpress.models import build_model
from embpress.tables import Ratio, build_table, table_class
from embpress.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[10.0, 100.0])
    p.add_argument("--methods", nargs="+", default=["noid", "hash", "dhash", "robe", "adapt", "dhe"])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--fields", type=int, default=8)
    p.add_argument("--max-cardinality", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = make_synthetic(SyntheticConfig(rows=args.rows, num_dense=4, num_fields=args.fields, min_cardinality=50,
                                          max_cardinality=args.max_cardinality, zipf=1.1, interacting_fields=args.fields,
                                          first_order_std=1.0, second_order_std=1.0, dense_std=0.1, seed=2))
    print(f"fields {[f.num_embeddings for f in data.fields]}, train rows {len(data.train):,}", flush=True)
    for ratio in args.ratios:
        for method in args.methods:
            torch.manual_seed(0)
            budget = None if table_class(method).reference else Ratio(ratio)
            t0 = time.perf_counter()
            table = build_table(method, fields=data.fields, dim=args.dim, budget=budget)
            model = build_model("dlrm", table=table, num_dense=data.num_dense, bottom=(32,), top=(64, 32))
            res = train(model, data, TrainConfig(epochs=args.epochs, batch_size=1024, lr=2e-3, sparse_lr=2e-3,
                                                 progress=False, patience=2))
            flops = table.flops_per_lookup() if hasattr(table, "flops_per_lookup") else 0
            print(f"ratio {ratio:>5g}  {method:6s}  test AUC {res.test_auc:.4f}  bytes {table.serving_bytes():>10,} "
                  f"(full {table.full_bytes:,})  MACs/lookup {flops:,}  {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
