"""Training throughput of a compressed table against ``full`` on the 26-field synthetic set (DLRM head).

Runs each method for the same number of optimizer steps on one thread, alternating methods over
``--repeats`` rounds (the median is reported, which damps noise from other processes), and can
write a torch.profiler table of the table's forward/backward.

    python benchmarks/tt_throughput.py --methods full tt --budget 10x --steps 300
    python benchmarks/tt_throughput.py --methods tt --profile 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from embpress.data import SyntheticConfig, make_synthetic
from embpress.models import build_model
from embpress.tables import build_table, table_class


def _model(method: str, data, dim: int, budget: str, seed: int):
    torch.manual_seed(seed)
    b = None if table_class(method).reference else budget
    table = build_table(method, fields=data.fields, dim=dim, budget=b)
    return build_model("dlrm", table=table, num_dense=data.num_dense)


def _optimizers(model) -> list[torch.optim.Optimizer]:
    sparse = model.table.sparse_parameters()
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=1e-3)]
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=1e-3))
    return opts


def _batches(data, batch_size: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return list(data.train.batches(batch_size, shuffle=True, generator=gen))


def run(model, batches, steps: int) -> tuple[float, float]:
    """Samples per wall-clock second and per CPU second of ``steps`` training steps.

    CPU time (``time.process_time``) is the steadier number on a machine shared with other jobs.
    """
    opts = _optimizers(model)
    model.train()
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        dense, ids, y = batches[step % len(batches)]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, ids), y)
        loss.backward()
        for o in opts:
            o.step()
        n += len(y)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["full", "tt"])
    ap.add_argument("--budget", default="10x")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps of the first method instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = make_synthetic(SyntheticConfig(rows=args.rows))
    batches = _batches(data, args.batch_size, seed=0)
    models = {m: _model(m, data, args.dim, args.budget, seed=0) for m in args.methods}
    for m, model in models.items():
        t = model.table
        print(f"{m}: serving {t.serving_bytes():,} B (full {t.full_bytes:,} B, {t.full_bytes / t.serving_bytes():.1f}x)")
        if m == "tt":
            print(f"  {t.extra_repr()}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = models[args.methods[0]]
        run(model, batches, 5)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(model, batches, args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    for model in models.values():
        run(model, batches, 10)  # warm up
    rates: dict[str, list[tuple[float, float]]] = {m: [] for m in models}
    for _ in range(args.repeats):
        for m, model in models.items():
            rates[m].append(run(model, batches, args.steps))
    for m, r in rates.items():
        wall, cpu = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
        runs = ", ".join(f"{x[0]:,.0f}" for x in r)
        print(f"{m:>6}: {wall:9,.0f} samples/s wall (runs: {runs}), {cpu:9,.0f} samples per CPU second")


if __name__ == "__main__":
    main()
