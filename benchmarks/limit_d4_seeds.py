"""LIMIT probe at d=4: is n=9 a real solution, and how much does the seed decide?

For n in --ns and seeds 0..S-1, run the free-embedding fit (reference settings) and print the success
rate; for each success also the float64 margin min_q (k-th relevant score - best other score), which is
> 0 exactly when every query ranks its k documents on top (an existence proof for that n and d), and
whether the solution survives TF32 inputs (mantissa cut to 10 bits, as JAX's default float32 matmul on
recent NVIDIA GPUs, where the reference ran): a hypothesis for a lower critical n there, not a measurement.

    python benchmarks/limit_d4_seeds.py --d 4 --ns 7,8,9,10 --seeds 10
"""

from __future__ import annotations

import argparse
import time

import torch

from embpress.limit.probe import fit_free_embeddings, paper_critical_n, subset_qrels, topk_accuracy


def margin(q: torch.Tensor, docs: torch.Tensor, n: int, k: int) -> float:
    rel = torch.from_numpy(subset_qrels(n, k))
    s = q.double() @ docs.double().T
    pos = s.gather(1, rel)
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, rel, True)
    neg = s.masked_fill(mask, float("-inf")).max(dim=1).values
    return float((pos.min(dim=1).values - neg).min())


def tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 explicit mantissa bits, round to nearest)."""
    b = x.float().contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--ns", default="7,8,9,10")
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"d={args.d} k={args.k}: paper fit {paper_critical_n(args.d):.2f}")
    for n in (int(x) for x in args.ns.split(",")):
        t = time.perf_counter()
        ok, margins, tf_ok = 0, [], 0
        for seed in range(args.seeds):
            r = fit_free_embeddings(n, args.d, k=args.k, seed=seed)
            if r.success:
                ok += 1
                margins.append(margin(r.queries, r.docs, n, args.k))
                tf_ok += topk_accuracy(tf32(r.queries), tf32(r.docs), torch.from_numpy(subset_qrels(n, args.k))) == 1.0
        mtxt = (f", float64 margins min {min(margins):.2e} max {max(margins):.2e}; {tf_ok}/{ok} still succeed "
                f"with TF32-rounded vectors" if margins else "")
        print(f"n={n}: {ok}/{args.seeds} seeds succeed{mtxt} ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
