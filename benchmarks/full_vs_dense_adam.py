"""Training throughput of embpress's `full` table (sparse gradients + SparseAdam) against a plain
`torch.nn.Embedding` with dense gradients and dense Adam, same DLRM head, same data, one run.

    python benchmarks/full_vs_dense_adam.py [--rows 200000] [--min-count 2] [--steps 150] [--threads 2]

``--min-count 1`` keeps every value seen in training, a larger table where dense optimizer
steps over untouched rows cost the most.
"""

from __future__ import annotations

import argparse
import time

import torch
from ctr_scale import PlainEmbedding  # benchmarks/ is the script's directory, first on sys.path
from torch import nn

from embpress.data import SyntheticConfig, make_synthetic
from embpress.models import build_model
from embpress.tables import build_table


def throughput(model, data, steps: int, batch: int) -> float:
    sparse = model.table.sparse_parameters()
    sparse_ids = {id(p) for p in sparse}
    opts = [torch.optim.Adam([p for p in model.parameters() if id(p) not in sparse_ids], lr=1e-3)]
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=1e-3))
    it = data.train.batches(batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = [next(it) for _ in range(steps)]
    for i, (d, s, y) in enumerate(batches):
        if i == 5:
            t0 = time.perf_counter()
        for o in opts:
            o.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(d, s), y).backward()
        for o in opts:
            o.step()
    return (steps - 5) * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = make_synthetic(SyntheticConfig(rows=args.rows, min_count=args.min_count))
    print(data.summary())
    for name in ("full", "plain", "full", "plain"):
        torch.manual_seed(0)
        table = (build_table("full", fields=data.fields, dim=16) if name == "full"
                 else PlainEmbedding(fields=data.fields, dim=16))
        model = build_model("dlrm", table=table, num_dense=data.num_dense)
        sps = throughput(model, data, args.steps, args.batch)
        label = "embpress full (sparse grad + SparseAdam)" if name == "full" else "nn.Embedding + dense Adam"
        print(f"{label:45s} {sps:12,.0f} samples/s")


if __name__ == "__main__":
    main()
